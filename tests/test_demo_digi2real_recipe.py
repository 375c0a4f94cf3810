"""The documented Digi2Real workflow on a DigiFace-layout fixture: embed -> select-identities -> estimate-shift ->
`facegen build --recipe digi2real`, each as a `facegen` command run where the recipe expects it, with tiny
random-weight models."""

import numpy as np
import pytest

from conftest import facegen
from facegen.testing.digiface import write_digiface_part
from facegen.testing.folder import write_folder_source


def step(cwd, *args):
    proc = facegen(*args, cwd=cwd, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, f"facegen {' '.join(map(str, args))}:\n{proc.stderr}"
    return proc.stdout


@pytest.mark.slow
def test_recipe_workflow_end_to_end(tmp_path, tiny_arc2face):
    digiface = tmp_path / "digiface"
    write_digiface_part(digiface, ids=range(6), images_per_identity=7)
    ffhq = write_folder_source(tmp_path / "ffhq", identities=2, images_per_identity=2, size=256, start=500)
    models = tiny_arc2face

    # the three steps of the recipe's header, writing where the recipe reads
    out = step(tmp_path, "embed", "--source", "digiface", "--source-path", digiface,
               "--source-opt", "max_images=5", "--model-dir", models, "--out", "digi2real/prototypes.npz")
    assert "6 prototypes from 30 images" in out  # five images per subject
    out = step(tmp_path, "select-identities", "--prototypes", "digi2real/prototypes.npz", "--count", 4,
               "--out", "digi2real/ids.txt")
    assert "kept 4 of 6" in out
    out = step(tmp_path, "estimate-shift", "--real", f"folder:{ffhq}", "--synthetic",
               f"digiface:{digiface}:max_images=5", "--model-dir", models, "--max-images", 6,
               "--device", "cpu", "--out", "digi2real/delta.safetensors")
    assert "real: 4 images" in out and "synthetic: 6 images" in out

    # the build, with the recipe's paper settings cut down for CPU speed
    out = step(tmp_path, "build", "--recipe", "digi2real", "--source-path", digiface, "--out", "out",
               "--plugin-opt", f"model_dir={models}", "--plugin-opt", "steps=2", "--plugin-opt", "latents=2",
               "--plugin-opt", "images_per_latent=1")
    assert "identities 4, images 8" in out

    import datasets

    rows = datasets.load_dataset(str(tmp_path / "out"), split="train")
    kept = [line for line in (tmp_path / "digi2real" / "ids.txt").read_text().splitlines()
            if not line.startswith("#")]
    assert sorted({row["json"]["identity"] for row in rows}) == sorted(kept)
    assert len(rows) == 8 and all(0 <= row["json"]["t"] <= 1 for row in rows)
    # the kept identities are the four whose highest similarity to another identity is lowest
    with np.load(tmp_path / "digi2real" / "prototypes.npz") as data:
        ids, unit = list(data["ids"]), data["embeddings"]
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -1)
    expected = [ids[i] for i in np.argsort(similarity.max(axis=1), kind="stable")[:4]]
    assert kept == expected
