"""`facegen demo OUT`: the README's first command, end to end, offline."""

import json
import time

import numpy as np
import pytest

from conftest import facegen


@pytest.mark.slow
def test_demo_builds_a_loadable_dataset_and_says_the_weights_are_random(tmp_path):
    out = tmp_path / "demo"
    start = time.perf_counter()
    proc = facegen("demo", out, env={"HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert seconds < 600, f"demo took {seconds:.0f} s"  # a first command: about 20 s on 2 idle cores
    assert proc.stdout.count("RANDOM weights") == 2  # first and last thing said
    assert "facegen build done" in proc.stdout and "facegen select-identities" in proc.stdout

    # every intermediate file of the three Digi2Real steps is there
    with np.load(out / "prototypes.npz") as data:
        assert data["embeddings"].shape == (6, 512)
    kept = [line for line in (out / "ids.txt").read_text().splitlines() if not line.startswith("#")]
    assert len(kept) == 4
    assert (out / "models" / "arc2face" / "arcface.onnx").is_file()
    assert (out / "models" / "antelopev2" / "scrfd_10g_bnkps.onnx").is_file()

    import datasets

    rows = datasets.load_dataset(str(out / "dataset"), split="train")
    assert len(rows) == 4 * 2 * 2  # 4 selected identities x 2 latents x 2 images
    assert sorted(set(rows["cls"])) == [0, 1, 2, 3]
    assert {row["json"]["identity"] for row in rows} == set(kept)
    assert rows[0]["png"].size == (112, 112)  # detected and aligned to the ArcFace crop
    run = json.loads((out / "dataset" / ".facegen" / "run.json").read_text())
    assert "shift" in json.dumps(run)

    # running it again resumes: nothing is rebuilt
    again = facegen("demo", out, env={"HF_HUB_OFFLINE": "1"})
    assert again.returncode == 0, again.stderr
    assert "0 written now, 1 already complete" in again.stdout


def test_demo_refuses_a_foreign_non_empty_folder(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    proc = facegen("demo", tmp_path)
    assert proc.returncode == 2
    assert "not empty" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
