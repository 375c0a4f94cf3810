"""`facegen build` with the e4e transform end to end: seeds -> truncation, folder -> project, then load_dataset."""

import json

import datasets
import numpy as np
import pytest

from conftest import build, facegen
from facegen.testing.folder import write_folder_source

pytestmark = pytest.mark.slow




@pytest.fixture(scope="module")
def checkpoints(stylegan_checkpoints):
    return stylegan_checkpoints


def test_truncation_from_seeds_loads_and_does_not_depend_on_batch_size(tmp_path, checkpoints):
    e4e_path, g_path = checkpoints
    common = ["--source", "seeds", "--source-path", "-", "--source-opt", "count=5", "--plugin", "e4e",
              "--plugin-opt", f"checkpoint={e4e_path}", "--plugin-opt", "mode=truncation",
              "--plugin-opt", "candidates=2", "--shard-size", "2"]
    build(*common, "--plugin-opt", "batch_size=4", "--out", tmp_path / "a")
    ds = datasets.load_dataset(str(tmp_path / "a"), split="train").sort("__key__")  # published shuffled
    assert ds.num_rows == 10
    assert ds.column_names == ["png", "cls", "json", "__key__", "__url__"]
    assert ds["cls"] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert ds["__key__"][:2] == ["000000_000", "000000_001"]
    first = ds[0]
    assert first["png"].size == (32, 32)
    meta = first["json"]
    assert (meta["identity"], meta["source"], meta["source_ref"]) == ("0", "seeds", "seed:0")
    assert (meta["mode"], meta["candidate"], meta["noise"]) == ("truncation", 0, "const")
    assert meta["psi"] == pytest.approx(1.5) and meta["phi"] == pytest.approx(0.5)
    assert [m["candidate"] for m in ds["json"][:4]] == [0, 1, 0, 1]
    assert len({m["seed"] for m in ds["json"]}) == 5

    readme = (tmp_path / "a" / "README.md").read_text()
    assert "license: other" in readme and "nvidia-source-code-license-nc" in readme
    assert "karras2020analyzing" in readme and "tov2021designing" in readme
    run = json.loads((tmp_path / "a" / ".facegen" / "run.json").read_text())
    roles = [m["role"] for m in run["transform"]["models"]]
    assert roles[0].startswith("e4e encoder") and roles[1].startswith("StyleGAN2")
    assert run["transform"]["models"][1]["source"] == str(e4e_path.resolve())

    # one identity per call instead of four, and the generator from the rosinality file (the same weights):
    # the same dataset
    build(*common, "--plugin-opt", "batch_size=1", "--plugin-opt", f"generator_checkpoint={g_path}",
          "--out", tmp_path / "b")
    other = datasets.load_dataset(str(tmp_path / "b"), split="train").sort("__key__")
    assert other["json"] == ds["json"]
    for a, b in zip(ds["png"], other["png"]):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_project_from_a_folder_source_follows_its_identities(tmp_path, checkpoints):
    e4e_path, _ = checkpoints
    src = write_folder_source(tmp_path / "src", identities=3, images_per_identity=2, corrupt=1)
    out = tmp_path / "out"
    build("--source", "folder", "--source-path", src, "--plugin", "e4e", "--plugin-opt", f"checkpoint={e4e_path}",
          "--plugin-opt", "mode=project", "--plugin-opt", "input_framing=arcface", "--plugin-opt", "align=arcface",
          "--out", out)
    ds = datasets.load_dataset(str(out), split="train")
    assert ds.num_rows == 3 * 2 - 1
    assert {img.size for img in ds["png"]} == {(112, 112)}
    assert {(m["width"], m["height"]) for m in ds["json"]} == {(112, 112)}
    identities = [m["identity"] for m in ds["json"]]
    assert ds["cls"] == [int(i) for i in identities]
    # psi/phi do not apply in project mode: not declared, not in the json (a null would break default_collate)
    assert set(ds.features["json"]) == {"identity", "source", "source_ref", "width", "height", "image_index",
                                        "mode", "seed", "candidate", "perturbation", "noise"}
    assert all(m["mode"] == "project" and None not in m.values() for m in ds["json"])
    stats = json.loads((out / ".facegen" / "units" / "000000.json").read_text())  # the unit of work
    assert stats["skipped"] == {"corrupt image": 1}


def test_cli_reports_a_missing_checkpoint_in_one_line(tmp_path):
    proc = facegen("build", "--source", "seeds", "--source-opt", "count=2",
                   "--plugin", "e4e", "--plugin-opt", f"checkpoint={tmp_path / 'nothere.pt'}",
                   "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert "nothere.pt not found" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_sfhq_truncation_recipe_needs_only_the_checkpoint(tmp_path, checkpoints):
    e4e_path, _ = checkpoints
    out = tmp_path / "out"
    build("--recipe", "sfhq-truncation", "--source-opt", "count=3", "--plugin-opt", f"checkpoint={e4e_path}",
          "--plugin-opt", "batch_size=3", "--out", out)
    ds = datasets.load_dataset(str(out), split="train")
    assert ds.column_names[0] == "jpg" and ds.num_rows == 3
    assert {(j["mode"], j["psi"], j["phi"]) for j in ds["json"]} == {("truncation", 1.5, 0.5)}
    run = json.loads((out / ".facegen" / "run.json").read_text())
    assert run["options"]["source_path"] is None and run["options"]["recipe"] == "sfhq-truncation"
