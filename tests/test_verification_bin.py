"""Source `bin`: insightface verification pickles (Python 3 bytes, cv2.imencode arrays, Python 2 str) read with the
restricted unpickler as a dataset of pairs; hostile pickles; a build that loads with its pair columns."""

import pickle
import tracemalloc

import datasets
import numpy as np
import pytest

from conftest import build, run_cli
from facegen.errors import UsageError
from facegen.generators.safe_pickle import UnsafePickleError, load_verification_pairs
from facegen.plugins.verification import VerificationBinSource
from facegen.records import SourceImage, Skip
from facegen.testing.verification import FORMS, HOSTILE_KINDS, pair_images, write_hostile_bin, write_verification_bin


def insightface_load_bin(path):
    """How insightface's eval/verification.py load_bin opens the file: plain pickle, then encoding='bytes'."""
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except UnicodeDecodeError:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")


@pytest.mark.parametrize("form", FORMS)
def test_pairs_read_as_insightface_reads_them(form, tmp_path):
    path = write_verification_bin(tmp_path / "lfw.bin", pairs=3, form=form)
    bins, issame = insightface_load_bin(path)  # the trusted reader, on our own fixture
    source = VerificationBinSource(path)
    assert source.identities() == ["pair-000000", "pair-000001", "pair-000002"]
    assert source.image_refs("pair-000001") == ["lfw.bin:2", "lfw.bin:3"]
    for p, identity in enumerate(source.identities()):
        left, right = source.load(identity)
        assert left.data == bytes(np.asarray(bins[2 * p]).tobytes() if form == "arrays" else bins[2 * p])
        assert right.data == bytes(np.asarray(bins[2 * p + 1]).tobytes() if form == "arrays" else bins[2 * p + 1])
        assert left.meta == {"pair": p, "side": "left", "issame": issame[p]}
        assert right.meta == {"pair": p, "side": "right", "issame": issame[p]}
        assert left.ext == right.ext == "jpg"
    assert source.provenance()["same_pairs"] == 2


def test_python2_pickle_needs_bytes_encoding_and_numpy_bools_are_bools(tmp_path):
    path = write_verification_bin(tmp_path / "agedb_30.bin", form="python2")
    with pytest.raises(UnicodeDecodeError):  # why insightface retries with encoding="bytes"
        pickle.loads(path.read_bytes())
    assert load_verification_pairs(path) == pair_images(3)
    bins, issame = pair_images(2)
    (tmp_path / "numpy.bin").write_bytes(pickle.dumps((bins, [np.bool_(True), np.bool_(False)]), protocol=2))
    assert load_verification_pairs(tmp_path / "numpy.bin")[1] == [True, False]
    (tmp_path / "array.bin").write_bytes(pickle.dumps((bins, np.array([False, True])), protocol=4))
    assert load_verification_pairs(tmp_path / "array.bin")[1] == [False, True]


@pytest.mark.parametrize("kind", sorted(HOSTILE_KINDS))
def test_hostile_pickles_are_one_line_run_nothing_and_allocate_nothing_large(kind, tmp_path):
    marker = tmp_path / "pwned"
    path = write_hostile_bin(tmp_path / "cfp_fp.bin", kind, marker)
    tracemalloc.start()
    with pytest.raises(UsageError) as refused:
        VerificationBinSource(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20, f"{kind}: {peak} bytes at the peak"
    assert not marker.exists()
    message = str(refused.value)
    assert "\n" not in message and message.startswith("source 'bin': cfp_fp.bin is not a verification pickle")
    expected = {"forbidden global": "refused to unpickle global posix.system",
                "huge array": "refused an array of shape (1099511627776,)",
                "lying length": "expected 1099511627776 bytes", "odd image count": "3 images for 2 pairs",
                "not bytes": "bins holds a int"}[kind]
    assert expected in message


def test_over_the_byte_budget_is_refused_unread(tmp_path, monkeypatch):
    path = write_verification_bin(tmp_path / "lfw.bin")
    with pytest.raises(UnsafePickleError, match="over the 1000 bytes limit"):
        load_verification_pairs(path, max_bytes=1000)


def test_an_entry_that_is_not_an_image_is_a_counted_skip(tmp_path):
    bins, issame = pair_images(2)
    bins[3] = b"not an image"
    (tmp_path / "x.bin").write_bytes(pickle.dumps((bins, issame), protocol=4))
    source = VerificationBinSource(tmp_path / "x.bin")
    left, right = source.load("pair-000001")
    assert isinstance(left, SourceImage) and isinstance(right, Skip) and right.reason == "not an image"


def test_build_of_lfw_bin_loads_as_pairs(tmp_path, capsys):
    path = write_verification_bin(tmp_path / "lfw.bin", pairs=4, form="python2")
    out = tmp_path / "out"
    build("--source", "bin", "--source-path", path, "--plugin", "passthrough", "--out", out)
    ds = datasets.load_dataset(str(out), split="train")
    assert ds.num_rows == 8
    rows = sorted((r["json"]["pair"], r["json"]["side"], r["json"]["issame"], r["json"]["identity"]) for r in ds)
    assert rows == [(p, side, p % 2 == 0, f"pair-{p:06d}") for p in range(4) for side in ("left", "right")]
    assert ds.features["json"]["issame"] == datasets.Value("bool")
    by_ref = {r["json"]["source_ref"]: r for r in ds}
    assert by_ref["lfw.bin:5"]["json"]["side"] == "right" and by_ref["lfw.bin:5"]["cls"] == 2

    hostile = write_hostile_bin(tmp_path / "evil.bin", "forbidden global", tmp_path / "pwned")
    capsys.readouterr()
    code, _, err = run_cli(["build", "--source", "bin", "--source-path", hostile, "--plugin", "passthrough",
                            "--out", tmp_path / "out2"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "posix.system" in err
    assert not (tmp_path / "pwned").exists()
