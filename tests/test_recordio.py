"""The RecordIO format module: its writer against mxnet's own bytes and against a reader written here from the
format's description (dmlc-core recordio.cc, mxnet recordio.py), never against facegen's reader."""

import hashlib
import json
import struct
from pathlib import Path

import pytest

from facegen.plugins import recordio
from facegen.plugins.recordio import MAGIC_BYTES, RecordWriter, pack

FIXTURES = Path(__file__).parent / "fixtures" / "recordio"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
LAYOUTS = {"face": "train", "plain": "data", "dcface": "file"}


def spec_records(rec: bytes) -> list[tuple[int, bytes]]:
    """Every record of a .rec, read from the format's description: (offset, payload)."""
    out, position, parts, first = [], 0, None, 0
    while position < len(rec):
        magic, lrec = struct.unpack_from("<II", rec, position)
        assert magic == 0xCED7230A, f"no magic at {position}"
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        data = rec[position + 8:position + 8 + length]
        assert len(data) == length
        if cflag in (0, 1):
            first = position
        if cflag == 0:
            assert parts is None
            out.append((first, data))
        elif cflag == 1:
            assert parts is None
            parts = [data]
        else:
            assert parts is not None
            parts += [b"\x0a\x23\xd7\xce", data]  # the magic word, little-endian, put back between the parts
            if cflag == 3:
                out.append((first, b"".join(parts)))
                parts = None
        position += 8 + length + (-length % 4)
    assert parts is None
    return out


def spec_unpack(payload: bytes):
    """IRHeader 'IfQQ' (24 bytes), then ``flag`` float32 labels when flag > 0, then the image."""
    flag, label, id_, id2 = struct.unpack_from("<IfQQ", payload)
    if flag == 0:
        return [label], id_, id2, payload[24:]
    return list(struct.unpack_from(f"<{flag}f", payload, 24)), id_, id2, payload[24 + 4 * flag:]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_writer_reproduces_the_bytes_mxnet_wrote(layout, tmp_path):
    """Each record of mxnet's fixture, packed again by facegen from its header and image, gives the same .rec
    and .idx bytes: header packing (scalar and vector labels), chunk cutting at the magic word, padding, index."""
    stem = LAYOUTS[layout]
    original = (FIXTURES / layout / f"{stem}.rec").read_bytes()
    with RecordWriter(tmp_path / "copy.rec", tmp_path / "copy.idx") as writer:
        for _, payload in spec_records(original):
            labels, id_, id2, image = spec_unpack(payload)
            flag = struct.unpack_from("<I", payload)[0]
            key = {r["id"]: r["key"] for r in EXPECTED[layout]["records"]}[id_]
            writer.write(key, pack(labels if flag else labels[0], image, id=id_, id2=id2))
    assert (tmp_path / "copy.rec").read_bytes() == original
    assert (tmp_path / "copy.idx").read_text() == (FIXTURES / layout / f"{stem}.idx").read_text()


def test_the_mxnet_fixture_holds_a_record_cut_in_three_chunks():
    face = EXPECTED["face"]
    assert face["chunk_flags_of_record_2"] == [1, 2, 3]
    payloads = dict(spec_records((FIXTURES / "face" / "train.rec").read_bytes()))
    offsets = dict(line.split("\t") for line in (FIXTURES / "face" / "train.idx").read_text().splitlines())
    image = spec_unpack(payloads[int(offsets["2"])])[3]
    assert hashlib.sha256(image).hexdigest() == face["records"][2]["image_sha256"]
    assert image.count(MAGIC_BYTES) == 3  # two at aligned offsets (cut) and one unaligned (kept in place)


@pytest.mark.parametrize("image", [
    b"",
    MAGIC_BYTES,  # the payload's header is 24 bytes: the magic lands at aligned offset 24
    b"\xff\xd8" + b"ab" + MAGIC_BYTES * 3 + b"tail",  # consecutive cuts: empty middle chunks
    b"xyz" + MAGIC_BYTES + b"q",  # unaligned: not cut
    b"abcd" * 5 + MAGIC_BYTES,  # at the very end: an empty last chunk
    bytes(range(256)) * 40,  # no magic at all, 10 KB
])
@pytest.mark.parametrize("label", [3.0, [7.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
def test_writer_output_reads_back_with_a_reader_written_from_the_spec(image, label, tmp_path):
    rec, idx = tmp_path / "x.rec", tmp_path / "x.idx"
    with RecordWriter(rec, idx) as writer:
        writer.write(5, pack(label, image, id=5))
        writer.write(9, pack(label, image[::-1], id=9, id2=2))
    data = rec.read_bytes()
    assert len(data) % 4 == 0
    records = spec_records(data)
    index = [tuple(map(int, line.split("\t"))) for line in idx.read_text().splitlines()]
    assert [(5, records[0][0]), (9, records[1][0])] == index
    for (_, payload), expected_image, expected_id in zip(records, (image, image[::-1]), (5, 9)):
        labels, id_, _, got = spec_unpack(payload)
        assert got == expected_image and id_ == expected_id
        assert labels == ([label] if isinstance(label, float) else label)
        assert struct.unpack_from("<I", payload)[0] == (0 if isinstance(label, float) else len(label))


def test_facegen_reader_joins_the_chunks_and_checks_framing(tmp_path):
    rec = tmp_path / "x.rec"
    image = b"ab" + MAGIC_BYTES * 2 + b"end"
    with RecordWriter(rec, tmp_path / "x.idx") as writer:
        writer.write(0, pack([4.0, 1.0], image))
    fd = __import__("os").open(rec, __import__("os").O_RDONLY)
    try:
        header, got = recordio.unpack(recordio.read_record(fd, 0, rec.stat().st_size))
        assert got == image and header.labels == (4.0, 1.0) and header.flag == 2
        with pytest.raises(recordio.RecordError, match="too large"):
            recordio.read_record(fd, 0, rec.stat().st_size, max_bytes=16)
        with pytest.raises(recordio.RecordError, match="no RecordIO magic"):
            recordio.read_record(fd, 4, rec.stat().st_size)
    finally:
        __import__("os").close(fd)


def test_idx_parsing_refuses_what_is_not_key_tab_offset(tmp_path):
    path = tmp_path / "x.idx"
    path.write_text("0\t0\n1\t48\n")
    keys, offsets = recordio.read_idx(path)
    assert keys.tolist() == [0, 1] and offsets.tolist() == [0, 48]
    for text, message in [("0\t0\n0\t48\n", "listed more than once"), ("0\t0\nx\t4\n", "not key<TAB>offset"),
                          ("0\t0\t9\n", "not key<TAB>offset"), ("0\t-4\n", "negative")]:
        path.write_text(text)
        with pytest.raises(recordio.IdxError, match=message):
            recordio.read_idx(path)
    path.write_text("0\t0\n" * 10)
    with pytest.raises(recordio.IdxError, match="over the 8 bytes limit"):
        recordio.read_idx(path, max_bytes=8)
