"""`facegen estimate-shift`: Δ = mean projected encoder output over real images minus over synthetic images."""

import numpy as np
import pytest
import torch
from safetensors import safe_open

from facegen.builders.quality.identities import FaceEmbedder
from facegen.builders.quality.shift import (
    SHIFT_KEY,
    SourceSpec,
    estimate_shift,
    load_text_encoder,
    parse_source_spec,
    sample_unit_embeddings,
)
from conftest import run_cli
from facegen.errors import UsageError
from facegen.generators.arc2face import project_embeddings
from facegen.generators.arcface import ArcFaceEmbedder
from facegen.testing.arc2face import write_tiny_arc2face
from facegen.testing.folder import draw_face, write_folder_source


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shift")
    models = write_tiny_arc2face(root / "models")
    synthetic = write_folder_source(root / "synthetic", identities=4, images_per_identity=2)
    real = write_folder_source(root / "real", identities=2, images_per_identity=3, size=256, start=100)
    return root, models, synthetic, real




def test_parse_source_spec():
    assert parse_source_spec("folder:/data/ffhq") == SourceSpec("folder", "/data/ffhq", {})
    assert parse_source_spec("digiface:/d/digi:parts=72,x=1") == SourceSpec("digiface", "/d/digi",
                                                                           {"parts": "72", "x": "1"})
    assert parse_source_spec("folder:C:/data") == SourceSpec("folder", "C:/data", {})  # no '=': part of the path
    assert str(parse_source_spec("digiface:/d:parts=72")) == "digiface:/d:parts=72"
    assert parse_source_spec("folder:~/ffhq").path.endswith("/ffhq") and "~" not in parse_source_spec("folder:~/x").path
    for bad in ("folder", "folder:", ":/x", "folder:/x:a=1,b"):
        with pytest.raises(UsageError):
            parse_source_spec(bad)


def test_sampling_spreads_over_identities(world):
    _, models, synthetic, real = world
    embedder = FaceEmbedder(str(models))
    spec = parse_source_spec(f"folder:{synthetic}")
    units, counts, skips = sample_unit_embeddings([spec], embedder, max_images=4, seed=0, progress=False)
    # 4 images from 4 identities: one each (quota = ceil(4 / 4))
    assert units.shape == (4, 512) and counts == {str(spec): 4} and not skips
    all_units = np.stack([embedder.recogniser.embed_unit(np.asarray(draw_face(i, k))[None])[0]
                          for i in range(4) for k in range(2)])
    matches = [int(np.argmax(all_units @ u)) // 2 for u in units]
    assert sorted(matches) == [0, 1, 2, 3]
    # the real set's 256x256 images go through detection and alignment
    units, counts, _ = sample_unit_embeddings([parse_source_spec(f"folder:{real}")], embedder, max_images=100,
                                              seed=0, progress=False)
    assert len(units) == 6


def test_delta_is_the_difference_of_mean_projections(world, tmp_path):
    _, models, synthetic, real = world
    estimate = estimate_shift([parse_source_spec(f"folder:{real}")], [parse_source_spec(f"folder:{synthetic}")],
                              model_dir=str(models), max_images=100, device="cpu", progress=False)
    assert estimate.real_count == 6 and estimate.synthetic_count == 8

    # by hand: every synthetic image is a 112 crop, embedded directly, projected, averaged
    tokenizer, encoder, _ = load_text_encoder(str(models))
    recogniser = ArcFaceEmbedder(models / "arc2face" / "arcface.onnx")
    synth_units = recogniser.embed_unit(np.stack([np.asarray(draw_face(i, k)) for i in range(4) for k in range(2)]))
    expected_synth = project_embeddings(tokenizer, encoder, synth_units).double().mean(dim=0).numpy()
    np.testing.assert_allclose(estimate.mean_synthetic, expected_synth, atol=1e-5)
    np.testing.assert_allclose(estimate.delta, estimate.mean_real - estimate.mean_synthetic, atol=1e-5)
    assert estimate.delta.shape == (77, encoder.config.hidden_size)

    # positions before "id" (BOS, photo, of, a) never see the embedding (causal attention): Δ is 0 there;
    # "id" and every later position carry it
    assert estimate.id_position == 4
    row_norms = np.linalg.norm(estimate.delta, axis=1)
    assert np.all(row_norms[:4] < 1e-5) and np.all(row_norms[4:] > 1e-4)

    path = tmp_path / "delta.safetensors"
    estimate.save(path)
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {SHIFT_KEY, "mean_real", "mean_synthetic"}
        delta = f.get_tensor(SHIFT_KEY)
        meta = f.metadata()
    assert delta.dtype == torch.float32 and tuple(delta.shape) == estimate.delta.shape
    assert meta["real_count"] == "6" and meta["synthetic_count"] == "8" and meta["id_token_position"] == "4"
    assert "all 77 positions" in meta["tensor"] and meta["arc2face_id"] == "FoivosPar/Arc2Face"
    assert float(meta["delta_norm"]) == pytest.approx(float(np.linalg.norm(estimate.delta)), rel=1e-4)


def test_estimate_shift_command(world, tmp_path, capsys):
    _, models, synthetic, real = world
    out = tmp_path / "delta.safetensors"
    args = ["estimate-shift", "--real", f"folder:{real}", "--synthetic", f"folder:{synthetic}", "--model-dir", models,
            "--max-images", 5, "--device", "cpu", "--out", out]
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    assert "real: 5 images" in stdout and "synthetic: 5 images" in stdout and "|delta| = " in stdout
    swapped = tmp_path / "swapped.safetensors"
    args[2], args[4] = args[4], args[2]
    args[-1] = swapped
    assert run_cli(args, capsys)[0] == 0
    with safe_open(str(out), "pt") as a, safe_open(str(swapped), "pt") as b:
        torch.testing.assert_close(a.get_tensor("delta"), -b.get_tensor("delta"), atol=1e-5, rtol=1e-5)

    # the arc2face transform reads the file (its shift option)
    from facegen.plugins.arc2face import Arc2FaceTransform

    transform = Arc2FaceTransform(shift=str(out))
    loaded = transform._load_shift(hidden=512)
    with safe_open(str(out), "pt") as f:
        torch.testing.assert_close(loaded, f.get_tensor("delta"))


def test_estimate_shift_errors_are_one_line(world, tmp_path, capsys):
    _, models, synthetic, _ = world
    code, _, stderr = run_cli(["estimate-shift", "--real", "folder", "--synthetic", f"folder:{synthetic}",
                               "--out", tmp_path / "d.safetensors"], capsys)
    assert code == 2 and "must be NAME:PATH" in stderr
    code, _, stderr = run_cli(["estimate-shift", "--real", f"folder:{synthetic}", "--synthetic",
                               f"folder:{synthetic}", "--model-dir", tmp_path, "--out", tmp_path / "d.safetensors"],
                              capsys)
    assert code == 2 and stderr.count("\n") == 1 and "missing in" in stderr and "Traceback" not in stderr


def test_digi2real_recipe_has_the_paper_defaults(tmp_path, monkeypatch):
    from facegen.builders.engine.options import load_recipe
    from facegen.plugins.arc2face import Arc2FaceTransform

    recipe = load_recipe("digi2real")
    assert recipe["source"] == "digiface" and recipe["plugin"] == "arc2face"
    assert recipe["source_opts"]["max_images"] == 5  # five source images per subject (paper §3)
    opts = recipe["plugin_opts"]
    assert (opts["latents"], opts["images_per_latent"], opts["alpha"]) == (4, 5, 2.0)
    assert opts["shift"] == "digi2real/delta.safetensors" and recipe["identities_file"] == "digi2real/ids.txt"
    # the transform accepts every option once the shift file of step 3 exists
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="estimate-shift"):
        Arc2FaceTransform(**opts)
    (tmp_path / "digi2real").mkdir()
    (tmp_path / "digi2real" / "delta.safetensors").write_bytes(b"")
    transform = Arc2FaceTransform(**opts)
    assert transform.opts["steps"] == 25 and transform.opts["guidance"] == 3.0 and transform.opts["shift_scale"] == 1
