"""Source `rec` on RecordIO files that mxnet 1.9.1 wrote (tests/fixtures/recordio, see make_fixtures.py), read
without mxnet; hostile framing; a build of a rec file that loads with `datasets`."""

import hashlib
import json
import os
import shutil
import tarfile
import tracemalloc
from pathlib import Path

import datasets
import pytest

from conftest import build, run_cli
from facegen.errors import UsageError
from facegen.plugins import recordio
from facegen.plugins import rec as rec_plugin
from facegen.plugins.rec import RecSource
from facegen.records import SourceImage, Skip
from facegen.testing.recordio import HOSTILE_KINDS, face_jpeg, write_face_rec, write_hostile_rec

FIXTURES = Path(__file__).parent / "fixtures" / "recordio"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


def images_by_key(layout):
    return {r["key"]: r for r in EXPECTED[layout]["records"]}


def loaded(source):
    return {i: source.load(i) for i in source.identities()}


def test_face_layout_reads_what_mxnet_wrote():
    source = RecSource(FIXTURES / "face")
    assert source.layout == "face" and source.warnings == []
    assert source.identities() == ["0", "1", "3"]  # the class labels; class 2 has no images
    assert source.image_refs("1") == ["train.rec:3", "train.rec:4", "train.rec:5"]
    expected = images_by_key("face")
    for identity, items in loaded(source).items():
        for item in items:
            record = expected[item.meta["record"]]
            assert isinstance(item, SourceImage) and item.ext == "jpg"
            assert hashlib.sha256(item.data).hexdigest() == record["image_sha256"]  # bytes as stored
            assert record["labels"][0] == int(identity)  # mxnet's label[0] is the identity
    # record 2 is stored in three chunks (cut where its JPEG comment holds the magic word): joined as mxnet does
    assert EXPECTED["face"]["chunk_flags_of_record_2"] == [1, 2, 3]
    assert source.load_images("0", [1])[0].data.count(recordio.MAGIC_BYTES) == 3
    assert source.provenance()["property"] == "3,24,24"
    assert source.image_format == "jpg"


def test_planning_a_face_layout_reads_no_image(monkeypatch):
    """Record 0 is read whole; then only headers: identity records and each run's first image (HEAD_BYTES each)."""
    reads = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, at: reads.append((n, at)) or real_pread(fd, n, at))
    source = RecSource(FIXTURES / "face")
    offsets = dict(line.split("\t") for line in (FIXTURES / "face" / "train.idx").read_text().splitlines())
    record_zero = [r for r in reads if r[1] == int(offsets["0"])]
    assert record_zero and all(n <= recordio.HEAD_BYTES for n, at in reads if at != int(offsets["0"]))
    images_read = {k for k, v in offsets.items() if int(v) in {at for _, at in reads} and 1 <= int(k) <= 7}
    assert images_read == {"1", "3", "6"}  # the first image of each run, for its class
    reads.clear()
    source.image_refs("3")
    assert reads == []
    assert len(source.load_images("3", [1])) == 1 and len(reads) == 1  # one pread per image


def test_plain_layout_takes_each_record_s_own_label():
    source = RecSource(FIXTURES / "plain" / "data.rec")
    assert source.layout == "plain"  # record 0 is an image with a vector label, not a header record
    assert source.identities() == ["5", "7", "9"]
    assert source.image_refs("7") == ["data.rec:0", "data.rec:3", "data.rec:6"]  # .idx order within the class
    expected = images_by_key("plain")
    for identity, items in loaded(source).items():
        for item in items:
            assert hashlib.sha256(item.data).hexdigest() == expected[item.meta["record"]]["image_sha256"]
            assert expected[item.meta["record"]]["labels"][0] == int(identity)


def test_dcface_list_layout_takes_the_class_from_the_path_folder():
    source = RecSource(FIXTURES / "dcface")
    assert source.layout == "list"
    assert source.identities() == ["0", "2", "10"]  # folder names in natural order
    items = source.load("10")
    assert [i.meta["path"] for i in items] == ["10/0.jpg", "10/1.jpg"]
    assert [i.meta["record"] for i in items] == [2, 5]
    expected = images_by_key("dcface")
    assert all(hashlib.sha256(i.data).hexdigest() == expected[i.meta["record"]]["image_sha256"] for i in items)
    assert all(r["labels"] == [0.0] for r in EXPECTED["dcface"]["records"])  # DCFace's headers say nothing
    assert "path" in source.json_features() and "path" not in RecSource(FIXTURES / "face").json_features()


def test_channels_option_declares_the_order_and_keeps_the_bytes():
    rgb, bgr = RecSource(FIXTURES / "face"), RecSource(FIXTURES / "face", channels="bgr")
    a, b = rgb.load("1")[0], bgr.load("1")[0]
    assert (rgb.channels, bgr.channels) == ("rgb", "bgr") and a.data == b.data  # the build marks each json
    assert set(bgr.json_features()) == {"record"}
    with pytest.raises(UsageError, match="channels"):
        RecSource(FIXTURES / "face", channels="yuv")


def test_broken_identity_record_and_stray_labels(tmp_path):
    """An unreadable identity record: its images are placed by their own labels (said in a warning); an image whose
    label differs from its run's class is a counted skip."""
    folder = write_face_rec(tmp_path / "rec", identities=3, images_per_identity=2)
    offsets = {int(k): int(v) for k, v in (l.split("\t") for l in (folder / "train.idx").read_text().splitlines())}
    with open(folder / "train.rec", "r+b") as f:
        f.seek(offsets[8])  # identity record of class 1 (images 3 and 4)
        f.write(b"JUNK")
        f.seek(offsets[2] + 8 + 24)  # image 2's class label: 0 -> 2
        f.write(recordio.struct.pack("<f", 2.0))
    source = RecSource(folder)
    assert source.identities() == ["0", "1", "2"]
    assert any("identity record unreadable: bad record framing" in w for w in source.warnings)
    assert any("in no identity record's range" in w for w in source.warnings)
    assert source.image_refs("1") == ["train.rec:3", "train.rec:4"]
    skipped = source.load("0")[1]
    assert isinstance(skipped, Skip) and skipped.reason == "label disagrees with its identity"


@pytest.mark.parametrize("kind", sorted(HOSTILE_KINDS))
def test_hostile_framing_is_a_counted_skip_or_one_line_in_bounded_memory(kind, tmp_path):
    folder = write_hostile_rec(tmp_path / "rec", kind)
    tracemalloc.start()
    try:
        try:
            source = RecSource(folder)
        except UsageError as exc:
            assert kind.startswith("record 0") and "\n" not in str(exc) and "record 0" in str(exc)
            return
        items = [item for identity in source.identities() for item in source.load(identity)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{kind}: {peak} bytes at the peak"
    skips = [i for i in items if isinstance(i, Skip)]
    reasons = {
        "bad magic": "bad record framing", "chunk out of order": "bad record framing",
        "length past the end": "record past the end of the file", "offset past the end":
        "record past the end of the file", "lying idx": "bad record framing", "huge label count": "bad record header",
    }
    assert [(s.ref, s.reason) for s in skips] == [("train.rec:6" if kind == "length past the end" else "train.rec:2",
                                                   reasons[kind])]
    assert sum(isinstance(i, SourceImage) for i in items) == 5


def test_build_of_a_rec_file_loads_with_its_bytes_and_json(tmp_path, capsys):
    out = tmp_path / "out"
    build("--source", "rec", "--source-path", FIXTURES / "face", "--source-opt", "channels=bgr",
          "--plugin", "passthrough", "--out", out)
    ds = datasets.load_dataset(str(out), split="train")
    assert ds.num_rows == 7 and ds.column_names[0] == "jpg"
    rows = {r["json"]["record"]: r["json"] for r in ds}
    assert rows[4] == {"identity": "1", "source": "rec", "source_ref": "train.rec:4", "width": 24, "height": 24,
                       "record": 4, "channels": "bgr"}
    members = {}
    for tar in (out / "data" / "train").iterdir():
        with tarfile.open(tar) as archive:
            members.update({m.name: archive.extractfile(m).read() for m in archive.getmembers()})
    expected = images_by_key("face")
    stored = [hashlib.sha256(data).hexdigest() for name, data in members.items() if name.endswith(".jpg")]
    assert sorted(stored) == sorted(r["image_sha256"] for r in expected.values() if r["image_bytes"])

    hostile = write_hostile_rec(tmp_path / "hostile", "record 0 declares billions")
    capsys.readouterr()
    code, _, err = run_cli(["build", "--source", "rec", "--source-path", hostile, "--plugin", "passthrough",
                            "--out", tmp_path / "out2"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "record 0 declares" in err


def test_wrong_paths_are_one_line(tmp_path):
    (tmp_path / "a.rec").write_bytes(b"")
    with pytest.raises(UsageError, match="no a.idx beside it"):
        RecSource(tmp_path / "a.rec")
    shutil.copy(FIXTURES / "plain" / "data.rec", tmp_path / "data.rec")
    (tmp_path / "data.idx").write_text("0\t0\nzero\t4\n")
    with pytest.raises(UsageError, match="data.idx: not key<TAB>offset lines"):
        RecSource(tmp_path / "data.rec")


def test_record_zero_past_float32_s_exact_integers_plans_by_each_image_s_label(monkeypatch):
    """Glint360K's record 0 holds [17 M, 17.4 M] as float32, which rounds past 2^24: the identity records' ranges can
    be off by one, so each image record's own label is read instead (identity records, holding no image, are not
    images). Shown on mxnet's fixture with the threshold lowered."""
    monkeypatch.setattr(rec_plugin, "FLOAT32_EXACT", 4)
    source = RecSource(FIXTURES / "face")
    assert any("past 2^24" in w for w in source.warnings)
    assert source.identities() == ["0", "1", "3"]
    assert [source.image_refs(i) for i in source.identities()] == [
        ["train.rec:1", "train.rec:2"], ["train.rec:3", "train.rec:4", "train.rec:5"], ["train.rec:6", "train.rec:7"]]
    assert source.provenance()["left_out"] == {}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_identity_record_labelled_nan_or_infinite_is_left_out(tmp_path, bad):
    """An identity record whose range is NaN or infinite crashed planning (int(nan)): it is a record without a
    [start, end) label like any other broken one, and its images are placed by their own labels."""
    folder = tmp_path / "rec"
    folder.mkdir()
    with recordio.RecordWriter(folder / "train.rec", folder / "train.idx") as writer:
        writer.write(0, recordio.pack([3.0, 4.0], b""))  # 2 images, then 1 identity record
        writer.write(1, recordio.pack(0.0, face_jpeg(0, 0)))
        writer.write(2, recordio.pack(0.0, face_jpeg(0, 1)))
        writer.write(3, recordio.pack([bad, 3.0], b""))
    source = RecSource(folder)
    assert any("identity record without a [start, end) label" in w for w in source.warnings), source.warnings
    assert source.identities() == ["0"]
    assert [type(i) for i in source.load("0")] == [SourceImage, SourceImage]


def test_a_property_that_is_a_fifo_is_ignored_never_a_hang(tmp_path):
    """A FIFO named ``property`` beside the .rec: opening it to read blocked the build forever (no writer). It is
    ignored with a warning, at once (bound 1 s, checked with 10 s)."""
    import threading

    folder = tmp_path / "face"
    shutil.copytree(FIXTURES / "face", folder)
    (folder / "property").unlink()
    os.mkfifo(folder / "property")
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(source=RecSource(folder)), daemon=True)
    thread.start()
    thread.join(10)
    try:
        assert not thread.is_alive(), "RecSource still opening the FIFO after 10 s"
    finally:
        try:  # a reader blocked in open() wakes when a writer comes, so a failure leaves no stuck thread behind
            os.close(os.open(folder / "property", os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    source = outcome["source"]
    assert source.provenance()["property"] is None
    assert "rec: train.rec: the 'property' beside it is not a regular file: ignored" in source.warnings
    assert source.identities()
