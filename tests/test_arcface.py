"""The ArcFace recogniser wrapper: preprocessing identical to insightface, batching, normalisation, model lookup."""

import warnings

import numpy as np
import onnx
import pytest

from facegen.errors import UsageError
from facegen.generators.arcface import (
    ARC2FACE_REPO_ID,
    ARC2FACE_REVISION,
    ArcFaceEmbedder,
    MissingModelError,
    resolve_arcface,
)
from facegen.testing.arcface import write_tiny_arcface
from facegen.testing.folder import draw_face


@pytest.fixture(scope="module")
def tiny_arcface(tmp_path_factory):
    return write_tiny_arcface(tmp_path_factory.mktemp("models") / "arcface.onnx")


@pytest.fixture(scope="module")
def crops():
    return np.stack([np.asarray(draw_face(i % 5, i, size=112)) for i in range(10)])


def test_tiny_model_has_arcface_io(tiny_arcface):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tiny_arcface), providers=["CPUExecutionProvider"])
    (model_input,), (model_output,) = session.get_inputs(), session.get_outputs()
    assert model_input.shape[1:] == [3, 112, 112] and not isinstance(model_input.shape[0], int)
    assert model_output.shape[-1] == 512
    # insightface's router takes it for a recognition model, as it does arcface.onnx
    from insightface.model_zoo.model_zoo import ModelRouter

    model = ModelRouter(str(tiny_arcface)).get_model(providers=["CPUExecutionProvider"])
    assert model.taskname == "recognition"


def test_embed_equals_insightface_get_feat(tiny_arcface, crops):
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    reference = ArcFaceONNX(str(tiny_arcface))
    # insightface is handed BGR images and swaps them to RGB itself
    expected = reference.get_feat([np.ascontiguousarray(c[:, :, ::-1]) for c in crops])
    got = ArcFaceEmbedder(tiny_arcface, providers=["CPUExecutionProvider"]).embed(crops)
    assert got.shape == (10, 512) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # and channel order matters: feeding BGR gives something else
    assert not np.allclose(got, ArcFaceEmbedder(tiny_arcface).embed(crops[:, :, :, ::-1]), atol=1e-4)


def test_mxnet_style_graph_is_fed_raw_pixels_like_insightface(tmp_path, tiny_arcface, crops):
    # insightface feeds raw pixels (mean 0, std 1) to graphs whose first nodes are named Sub.../Mul...
    model = onnx.load(str(tiny_arcface))
    model.graph.node[0].name = "Sub_0"
    model.graph.node[1].name = "Mul_1"
    path = tmp_path / "mxnet_style.onnx"
    onnx.save(model, str(path))
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    reference = ArcFaceONNX(str(path))
    assert (reference.input_mean, reference.input_std) == (0.0, 1.0)
    embedder = ArcFaceEmbedder(path)
    assert (embedder.input_mean, embedder.input_std) == (0.0, 1.0)
    expected = reference.get_feat([np.ascontiguousarray(c[:, :, ::-1]) for c in crops[:3]])
    np.testing.assert_allclose(embedder.embed(crops[:3]), expected, rtol=1e-5, atol=1e-5)


def test_batched_equals_one_at_a_time(tiny_arcface, crops):
    batched = ArcFaceEmbedder(tiny_arcface, batch_size=4).embed(crops)
    single = np.concatenate([ArcFaceEmbedder(tiny_arcface, batch_size=1).embed(c[None]) for c in crops])
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)
    assert ArcFaceEmbedder(tiny_arcface).embed(crops[:0]).shape == (0, 512)


def test_embed_unit(tiny_arcface, crops):
    embedder = ArcFaceEmbedder(tiny_arcface)
    raw = embedder.embed(crops)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)  # raw embeddings are not unit length
    unit = embedder.embed_unit(crops)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-5, atol=1e-7)
    # different faces, different embeddings
    assert np.abs(unit[0] - unit[1]).max() > 1e-3


def test_wrong_input_shape_is_refused(tiny_arcface):
    with pytest.raises(ValueError, match="112, 112, 3"):
        ArcFaceEmbedder(tiny_arcface).embed(np.zeros((2, 128, 128, 3), np.uint8))


def test_resolve_arcface_in_the_local_layouts(tmp_path):
    flat = write_tiny_arcface(tmp_path / "flat" / "arcface.onnx")
    assert resolve_arcface(tmp_path / "flat") == str(flat)
    for folder in ("arc2face", "antelopev2"):
        nested = write_tiny_arcface(tmp_path / folder / folder / "arcface.onnx")
        assert resolve_arcface(tmp_path / folder) == str(nested)


def test_resolve_arcface_missing_in_model_dir(tmp_path):
    with pytest.raises(MissingModelError) as info:
        resolve_arcface(tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message
    assert f"hf download {ARC2FACE_REPO_ID} arcface.onnx --revision {ARC2FACE_REVISION}" in message
    assert isinstance(info.value, UsageError)  # the CLI turns it into one line and exit code 2


def test_embed_without_a_network_fails_in_one_line_naming_the_option(tmp_path, monkeypatch):
    import socket
    import time

    from huggingface_hub import constants as hub_constants

    from conftest import facegen
    from facegen.testing.folder import write_folder_source

    with socket.socket() as s:  # a port nothing listens on: every request is refused, like a machine offline
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(hub_constants, "ENDPOINT", closed)
    monkeypatch.setattr(hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        closed + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    src = write_folder_source(tmp_path / "src", identities=1, images_per_identity=1)
    started = time.monotonic()
    result = facegen("embed", "--source", "folder", "--source-path", src, "--out", tmp_path / "p.npz")
    elapsed = time.monotonic() - started
    assert result.returncode == 2
    # no retry lines from huggingface_hub (5 retries with backoff took about 25 s)
    assert result.stderr.count("\n") == 1 and "pass `--model-dir DIR`" in result.stderr, result.stderr
    assert elapsed < 15, elapsed


def test_resolve_arcface_offline_without_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(MissingModelError, match="cannot get arcface.onnx from the Hub repo FoivosPar/Arc2Face"):
            resolve_arcface(None)
