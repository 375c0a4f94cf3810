"""The full-size random-weight face models that benchmarks/gpu_check.py times: the published networks' arithmetic
(IResNet-100, SCRFD-10G-KPS) behind the published files' interfaces, so the real loading, detection, alignment and
embedding code runs on them at the real cost."""

import numpy as np
import onnx
import pytest

from facegen.generators.alignment import FaceAligner
from facegen.generators.arcface import ArcFaceEmbedder
from facegen.testing.arcface import (
    STANDIN_FACE_FRACTION,
    _ConvNet,
    _scrfd_10g_network,
    write_arcface_r100,
    write_scrfd_10g,
    write_scrfd_standin,
)
from facegen.testing.folder import draw_face


def test_scrfd_10g_costs_the_published_arithmetic_and_answers_like_the_standin(tmp_path):
    net = _ConvNet(0, "count_")
    _scrfd_10g_network(net, 640)
    # SCRFD-10G is named for its multiply-adds at VGA (640x480): 3/4 of the 640x640 count
    assert 9.5e9 < net.macs * 0.75 < 10.5e9

    from insightface.model_zoo.model_zoo import ModelRouter

    full = write_scrfd_10g(tmp_path / "antelopev2" / "scrfd_10g_bnkps.onnx", seed=3)
    routed = ModelRouter(str(full)).get_model(providers=["CPUExecutionProvider"])
    assert routed.taskname == "detection" and routed.use_kps and routed.fmc == 3
    standin = FaceAligner(model_path=write_scrfd_standin(tmp_path / "standin.onnx"))
    aligner = FaceAligner(model_path=full)
    image = np.asarray(draw_face(1, 0, size=512))
    (face,), (expected,) = aligner.detect(image), standin.detect(image)
    np.testing.assert_allclose(face.box, expected.box, atol=1e-3)
    np.testing.assert_allclose(face.landmarks, expected.landmarks, atol=1e-3)
    assert abs(face.box[2] - face.box[0] - STANDIN_FACE_FRACTION * 512) < 0.5
    assert aligner.detect(np.full((512, 512, 3), 90, np.uint8)) == []


@pytest.mark.slow
def test_arcface_r100_has_the_published_size_and_interface(tmp_path):
    path = write_arcface_r100(tmp_path / "arcface.onnx")
    model = onnx.load(str(path))
    parameters = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert 64e6 < parameters < 66e6  # IResNet-100: 65.2 M
    macs = int(model.doc_string.rsplit(" ", 1)[1])
    assert 11.9e9 < macs < 12.3e9  # insightface lists R100 at 24.2 GFLOPs
    embedder = ArcFaceEmbedder(path)
    assert (embedder.input_mean, embedder.input_std) == (127.5, 127.5)  # not taken for a self-normalising graph
    crops = np.stack([np.asarray(draw_face(i, i, size=112)) for i in range(3)])
    embeddings = embedder.embed(crops)
    assert embeddings.shape == (3, 512) and np.isfinite(embeddings).all()
    assert not np.allclose(embeddings[0], embeddings[1])
