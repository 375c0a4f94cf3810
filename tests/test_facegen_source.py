"""Source `facegen`: a facegen dataset read back (bytes, json, extras, licence, citation), hostile shards, Hub ids."""

import io
import json
import tarfile

import numpy as np
import pytest
from datasets import load_dataset

from facegen.errors import UsageError
from facegen import hub_ids
from facegen.published import PublishedDataset, hub_dataset, resolve_dataset
from facegen.testing.output import RESEARCH_ONLY, write_output_folder
from conftest import build, run_cli


def members(tar_path):
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


@pytest.fixture
def parent(tmp_path):
    """A finished build with an `embedding.npy` extra and a research-only licence, 6 identities in 3 shards."""
    return write_output_folder(tmp_path / "parent", identities=6, images_per_identity=3, shard_size=2,
                               source_license=RESEARCH_ONLY)


def test_a_facegen_dataset_comes_back_as_it_was(parent, tmp_path):
    child = tmp_path / "child"
    build("--source", "facegen", "--source-path", parent, "--plugin", "passthrough", "--out", child,
          "--shard-size", 4)
    parent_members = {}
    for tar in sorted((parent / "data" / "train").glob("*.tar")):
        parent_members.update(members(tar))
    rows = list(load_dataset(str(child), split="train", streaming=True))
    assert len(rows) == 18
    assert sorted({r["cls"] for r in rows}) == list(range(6))
    child_members = {}
    for tar in sorted((child / "data" / "train").glob("*.tar")):
        child_members.update(members(tar))
    for row in rows:
        meta = row["json"]
        parent_key = meta["source_ref"].rpartition("#")[2]
        assert meta["source_ref"] == f"parent/data/train/train-{meta['parent_cls'] // 2:06d}.tar#{parent_key}"
        parent_meta = json.loads(parent_members[f"{parent_key}.json"])
        # the json as it was, the parent's own source fields kept under parent_*
        assert meta["identity"] == parent_meta["identity"] and meta["source"] == "facegen"
        assert meta["parent_source"] == parent_meta["source"]
        assert meta["parent_source_ref"] == parent_meta["source_ref"]
        assert meta["parent_cls"] == int(parent_members[f"{parent_key}.cls"])
        # image and extra bytes copied exactly
        assert child_members[f"{row['__key__']}.png"] == parent_members[f"{parent_key}.png"]
        assert child_members[f"{row['__key__']}.embedding.npy"] == parent_members[f"{parent_key}.embedding.npy"]
        np.testing.assert_array_equal(np.load(io.BytesIO(child_members[f"{row['__key__']}.embedding.npy"])),
                                      np.asarray(row["embedding.npy"]))
    # the card cites the parent and carries its licence (research only) into the chain
    readme = (child / "README.md").read_text()
    assert "@misc{parent," in readme and "@misc{fixture2026," in readme
    licence = readme.split("## Licence", 1)[1]
    assert "the licence of the parent dataset parent" in licence
    assert "Non-commercial use only" in licence
    assert "license: other" in readme.split("---")[1]


def test_curation_file_removes_identities_and_samples_and_keeps_labels_contiguous(parent, tmp_path):
    dataset = PublishedDataset(parent)
    first, second = dataset.identities[1], dataset.identities[4]
    dropped_key = dataset.by_identity[dataset.identities[2]][0].key
    curation = tmp_path / "curation.json"
    curation.write_text(json.dumps({
        "removed_identities": [{"identity": first, "reason": "near-duplicate"},
                               {"identity": second, "reason": "too few images"}],
        "removed_samples": [{"identity": dataset.identities[2], "key": dropped_key, "reason": "outlier"}],
        "parent_fingerprint": dataset.fingerprint()}))
    child = tmp_path / "child"
    build("--source", "facegen", "--source-path", parent, "--source-opt", f"curation={curation}",
          "--plugin", "passthrough", "--out", child)
    rows = list(load_dataset(str(child), split="train", streaming=True))
    assert len(rows) == 18 - 6 - 1
    assert sorted({r["cls"] for r in rows}) == [0, 1, 2, 3]
    assert {r["json"]["identity"] for r in rows} == set(dataset.identities) - {first, second}
    assert not any(r["json"]["source_ref"].endswith(f"#{dropped_key}") for r in rows)
    run = json.loads((child / ".facegen" / "run.json").read_text())
    assert run["source"]["provenance"]["curation"]["removed_identities"][0]["identity"] == first
    # the card publishes the curation file as provenance/curation.json, and a rebuild from the card uses it
    readme = (child / "README.md").read_text()
    assert str(tmp_path) not in readme and "curation=provenance/curation.json" in readme
    assert (child / "provenance" / "curation.json").read_bytes() == curation.read_bytes()
    curation.unlink()
    rebuilt = tmp_path / "rebuilt"
    build("--from-card", child, "--source-path", parent, "--out", rebuilt)
    again = list(load_dataset(str(rebuilt), split="train", streaming=True))
    assert sorted((r["__key__"], r["json"]["source_ref"]) for r in again) == sorted(
        (r["__key__"], r["json"]["source_ref"]) for r in rows)


def test_bad_curation_file_is_one_line(parent, tmp_path, capsys):
    curation = tmp_path / "curation.json"
    curation.write_text(json.dumps({"removed_identities": [{"identity": "nobody"}]}))
    code, _, err = run_cli(["build", "--source", "facegen", "--source-path", parent, "--source-opt",
                            f"curation={curation}", "--plugin", "passthrough", "--out", tmp_path / "c"], capsys)
    assert code == 2 and "names identity 'nobody'" in err and "Traceback" not in err
    code, _, err = run_cli(["build", "--source", "facegen", "--source-path", tmp_path / "missing",
                            "--plugin", "passthrough", "--out", tmp_path / "c"], capsys)
    assert code == 2 and err.count("\n") == 1


def test_hostile_shards_are_counted_skips(parent):
    shards = sorted((parent / "data" / "train").glob("*.tar"))
    # 1: a sample whose label is not an integer and one whose json is huge
    with tarfile.open(shards[0], "a") as tar:
        for name, data in (("999999_000.png", b"x"), ("999999_000.cls", b"alice"),
                           ("999998_000.png", b"x"), ("999998_000.cls", b"7"),
                           ("999998_000.json", b" " * (2 << 20))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    # 1b: a json nested deeper than Python's stack: a counted skip, not a RecursionError
    with tarfile.open(shards[1], "a") as tar:
        for name, data in (("999997_000.png", b"x"), ("999997_000.cls", b"8"),
                           ("999997_000.json", b"[" * 200_000)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    # 2: a truncated shard: the samples before the cut are kept, the one cut is not
    data = shards[2].read_bytes()
    shards[2].write_bytes(data[:len(data) // 2])
    dataset = PublishedDataset(parent)
    assert dataset.skipped["bad label"] == 1
    assert dataset.skipped["unreadable shard"] == 1
    assert dataset.skipped["truncated sample"] == 1
    huge = [s for s in dataset.samples if s.key == "999998_000"]
    assert huge and dataset.meta(huge[0]) == {}  # never read into memory
    assert dataset.skipped["bad json"] == 1 and not [s for s in dataset.samples if s.key == "999997_000"]
    sample = dataset.samples[0]  # a json member that changed after the scan: read as none
    assert "json" in dataset.members(sample)
    dataset.read = lambda sample, field: b"[" * 200_000
    assert dataset.meta(sample) == {} and dataset._identity_in_json(sample) is None
    del dataset.read
    for sample in dataset.samples:  # everything listed can be read whole
        assert len(dataset.image(sample)) == dataset.members(sample)["png"][1]


def test_hub_ids_are_recognised_and_an_unreachable_hub_is_one_line(tmp_path, monkeypatch):
    assert hub_ids.parse("org/name") == ("org/name", None)
    assert hub_ids.parse("hf://datasets/org/name@v1") == ("org/name", "v1")
    assert hub_ids.parse("hf://datasets/org/name/") == ("org/name", None)
    for not_an_id in ("./org/name", "/org/name", "~/name", "org", "org/name/x", "org--x/name", "hf://models/a/b",
                      None, ""):
        assert hub_ids.parse(not_an_id) is None, not_an_id
    with pytest.raises(UsageError, match="hf://datasets"):
        hub_ids.dataset_id("hf://models/org/name")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    # a path that does not exist is never a Hub id when its first folder is local: "no such folder"
    assert hub_ids.dataset_id("out/nope") is None
    with pytest.raises(UsageError, match="^out/nope: no such folder"):
        hub_dataset("out/nope")
    with pytest.raises(UsageError, match="^nope: no such folder"):
        hub_dataset("nope")
    assert hub_dataset(tmp_path / "out") is None
    assert hub_ids.dataset_id("hf://datasets/out/nope") == ("out/nope", None)  # the URL form is always an id
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError, match="cannot be downloaded"):
        resolve_dataset("someone/not-cached-anywhere")
    folder, repo = resolve_dataset(tmp_path)
    assert folder == tmp_path.resolve() and repo is None
    for bad in ("org", "a/b/c", "org/name@v1", "org/na me"):
        with pytest.raises(UsageError, match="--repo"):
            hub_ids.check_repo_name(bad)
    assert hub_ids.check_repo_name("org/name") == "org/name"


def test_a_built_dataset_is_read_from_its_sample_index_like_a_scan(parent, tmp_path):
    """A real build (shards sized by samples and shuffled, with `.facegen/shards/index/`) is read from its sample
    index without scanning; the result is the scan's, and an index that no longer matches its shard is ignored."""
    import shutil

    child = tmp_path / "child"
    build("--source", "facegen", "--source-path", parent, "--plugin", "passthrough", "--out", child,
          "--shard-samples", 5)
    indexed = PublishedDataset(child)
    shards = sorted((child / "data" / "train").glob("*.tar"))
    assert len(shards) == 4 and indexed.indexed_shards == 4
    scanned_copy = tmp_path / "scanned"
    shutil.copytree(child, scanned_copy)
    shutil.rmtree(scanned_copy / ".facegen" / "shards" / "index")
    scanned = PublishedDataset(scanned_copy)
    assert scanned.indexed_shards == 0
    assert scanned.identities == indexed.identities and len(indexed.samples) == 18
    for a, b in zip(indexed.samples, scanned.samples, strict=True):
        assert (a.key, a.cls, a.identity, a.shard) == (b.key, b.cls, b.identity, b.shard)
        assert indexed.members(a) == scanned.members(b)
        assert indexed.image(a) == scanned.image(b) and indexed.meta(a) == scanned.meta(b)
        assert indexed.read(a, "embedding.npy") == scanned.read(b, "embedding.npy")
    # a shard rewritten since its index was written (here: one sample appended) is scanned instead
    with tarfile.open(shards[1], "a") as tar:
        for name, data in (("999999_000.png", b"x"), ("999999_000.cls", b"3")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    again = PublishedDataset(child)
    assert again.indexed_shards == 3 and len(again.samples) == 19
