"""Source `lmdb` on LMDB files in Vec2Face's layout (facegen.testing.vec2face writes them as Vec2Face's
imagelist2lmdb.py does), masks as Vec2Face's loader reads them, hostile values and metadata, a build that loads."""

import tracemalloc

import datasets
import msgpack
import numpy as np
import pytest

from conftest import build
from facegen.errors import UsageError
from facegen.plugins import lmdb_source
from facegen.plugins.lmdb_source import LmdbSource
from facegen.records import SourceImage, Skip
from facegen.testing.recordio import face_jpeg
from facegen.testing.vec2face import HOSTILE_KINDS, write_hostile_lmdb, write_mask, write_vec2face_lmdb


@pytest.fixture
def hsface(tmp_path):
    return write_vec2face_lmdb(tmp_path / "hsface10k.lmdb", identities=4, images_per_identity=3)


def vec2face_reads(path, mask=None):
    """What Vec2Face's training loader (data/data_loader_train_lmdb.py, class LMDB) yields: (image bytes, label)
    for index 0 .. len-1, through the mask when there is one."""
    import lmdb

    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, readahead=False, meminit=False)
    with env.begin(write=False) as txn:
        length = msgpack.loads(txn.get(b"__len__"))
        keys = msgpack.loads(txn.get(b"__keys__"))
    if mask is not None:
        mask = np.load(mask)
        length = len(mask)
    out = []
    for index in range(length):
        if mask is not None:
            index = mask[index]
        with env.begin(write=False) as txn:
            out.append(tuple(msgpack.loads(txn.get(keys[index]))))
    env.close()
    return out


def test_reads_every_record_with_its_label_as_vec2face_does(hsface):
    source = LmdbSource(hsface)
    assert source.identities() == ["0", "1", "2", "3"] and source.warnings == []
    assert source.image_refs("2") == ["hsface10k.lmdb:6", "hsface10k.lmdb:7", "hsface10k.lmdb:8"]
    got = [(item.data, int(identity)) for identity in source.identities() for item in source.load(identity)]
    item = source.load_images("1", [2])[0]
    assert isinstance(item, SourceImage) and item.ext == "jpg" and item.meta == {"index": 5}
    assert source.provenance()["classnum"] == 4
    bgr = LmdbSource(hsface, channels="bgr")
    assert (source.channels, bgr.channels) == ("rgb", "bgr") and bgr.load("0")  # one open environment
    source.close()
    assert bgr.load("1")[0].data == got[3][0]
    bgr.close()
    assert sorted(got) == sorted(vec2face_reads(hsface))


def test_mask_is_an_index_array_over_keys_as_vec2face_reads_it(hsface, tmp_path):
    """HSFace100K/200K: the first identities of the 300K set, selected by positions in __keys__."""
    mask = write_mask(tmp_path / "hsface100k_mask.npy", np.arange(0, 6, dtype=np.int64))
    source = LmdbSource(hsface, mask=str(mask))
    assert source.identities() == ["0", "1"]
    got = [(item.data, int(identity)) for identity in source.identities() for item in source.load(identity)]
    source.close()
    assert sorted(got) == sorted(vec2face_reads(hsface, mask))
    scattered = write_mask(tmp_path / "scattered.npy", np.array([11, 0, 7], dtype=np.int32))
    assert LmdbSource(hsface, mask=str(scattered)).image_refs("3") == ["hsface10k.lmdb:11"]


@pytest.mark.parametrize("mask, message", [
    (np.ones(12, bool), "boolean array; Vec2Face's masks are integer arrays of positions"),
    (np.array([0, 0]), "repeats positions"),
    (np.array([0, 12]), "outside 0..11"),
    (np.array([[0, 1]]), "1-D integer array"),
    (np.array([0.0, 1.0]), "1-D integer array"),
])
def test_masks_that_are_not_what_vec2face_reads_are_one_line(hsface, tmp_path, mask, message):
    path = write_mask(tmp_path / "mask.npy", mask)
    with pytest.raises(UsageError, match=message):
        LmdbSource(hsface, mask=str(path))


def test_hostile_mask_files_are_refused_before_anything_is_allocated(hsface, tmp_path):
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UsageError, match="Python objects"):
        LmdbSource(hsface, mask=str(pickled))
    huge = tmp_path / "huge.npy"  # a header declaring 2^40 positions, and 8 bytes of data
    header = {"descr": "<i8", "fortran_order": False, "shape": (1 << 40,)}
    with open(huge, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(bytes(8))
    tracemalloc.start()
    with pytest.raises(UsageError, match="declares 1099511627776 positions"):
        LmdbSource(hsface, mask=str(huge))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20
    (tmp_path / "text.npy").write_text("0,1,2")
    with pytest.raises(UsageError, match="not a .npy file"):
        LmdbSource(hsface, mask=str(tmp_path / "text.npy"))


@pytest.mark.parametrize("kind", sorted(HOSTILE_KINDS))
def test_hostile_values_are_counted_or_one_line_in_bounded_memory(kind, tmp_path):
    path = write_hostile_lmdb(tmp_path / "x.lmdb", kind)
    tracemalloc.start()
    try:
        try:
            source = LmdbSource(path)
        except UsageError as exc:
            assert kind == "huge keys list" and "__keys__ is not a msgpack list" in str(exc)
            return
        items = [item for identity in source.identities() for item in source.load(identity)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{kind}: {peak} bytes at the peak"  # the 9 MiB value is never copied
    if kind == "huge value":  # its label is readable: planned, then a counted skip, never copied
        assert [(i.ref, i.reason) for i in items if isinstance(i, Skip)] == [("x.lmdb:1", "value too large")]
    else:  # no label to place it by: left out of the plan, and said
        assert source.warnings == [
            "lmdb: x.lmdb: left out 1 record (value is not msgpack (image bytes, label)), e.g. index 1"]
        assert source.provenance()["left_out"] == {"value is not msgpack (image bytes, label)": 1}
    assert sum(isinstance(i, SourceImage) for i in items) == 5


def test_a_value_changed_after_planning_is_a_counted_skip(hsface, monkeypatch):
    source = LmdbSource(hsface)
    monkeypatch.setattr(lmdb_source.msgpack, "unpackb", lambda *a, **k: (face_jpeg(0, 0), 3))
    skipped = source.load_images("0", [0])[0]
    assert isinstance(skipped, Skip) and skipped.reason == "label disagrees with its identity"


def test_not_an_lmdb_and_missing_metadata_are_one_line(tmp_path):
    (tmp_path / "x.lmdb").write_bytes(b"\0" * 8192)
    with pytest.raises(UsageError, match="not a readable LMDB"):
        LmdbSource(tmp_path / "x.lmdb")
    import lmdb

    env = lmdb.open(str(tmp_path / "y.lmdb"), subdir=False)
    with env.begin(write=True) as txn:
        txn.put(b"0", msgpack.dumps((b"\xff\xd8\xff", 0)))
    env.close()
    with pytest.raises(UsageError, match="no __len__ key"):
        LmdbSource(tmp_path / "y.lmdb")


def test_build_of_an_hsface_lmdb_loads(hsface, tmp_path):
    out = tmp_path / "out"
    build("--source", "lmdb", "--source-path", hsface, "--plugin", "passthrough", "--out", out)
    ds = datasets.load_dataset(str(out), split="train")
    assert ds.num_rows == 12
    rows = sorted((r["json"]["index"], r["json"]["identity"], r["json"]["channels"]) for r in ds)
    assert rows == [(i, str(i // 3), "rgb") for i in range(12)]
    assert ds.features["json"]["index"] == datasets.Value("int64")


@pytest.mark.parametrize("label", [2**63, 2**64 - 1])
def test_a_label_beyond_int64_is_left_out_and_counted(tmp_path, label):
    """msgpack holds labels up to 2**64 - 1: planning crashed with OverflowError putting one in its int64 array."""
    path = write_vec2face_lmdb(tmp_path / "x.lmdb", values={1: msgpack.dumps((face_jpeg(0, 1), label))})
    source = LmdbSource(path)
    assert source.warnings == ["lmdb: x.lmdb: left out 1 record (label is not a class number), e.g. index 1"]
    assert source.provenance()["left_out"] == {"label is not a class number": 1}
    items = [item for identity in source.identities() for item in source.load(identity)]
    assert sum(isinstance(i, SourceImage) for i in items) == 5
