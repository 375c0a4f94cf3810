"""ArcFace 5-point alignment: the similarity fit, the warp, and detection (SCRFD loading path and real dlib faces)."""

import importlib.util
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from facegen.generators.alignment import (
    ARCFACE_TEMPLATE,
    FaceAligner,
    MissingModelError,
    arcface_matrix,
    crop_for_recognition,
    resolve_scrfd,
    umeyama,
    warp_face,
)
from facegen.testing.arcface import STANDIN_FACE_FRACTION
from facegen.testing.folder import draw_face


def insightface_image(name):
    import insightface

    path = os.path.join(os.path.dirname(insightface.__file__), "data", "images", name)
    return np.asarray(Image.open(path).convert("RGB"))


def similarity(scale, angle_deg, tx, ty):
    a = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty],
                     [0, 0, 1]])


def apply(matrix, points):
    return points @ matrix[:2, :2].T + matrix[:2, 2]


def decompose(matrix):
    """scale, rotation in degrees, translation of a similarity matrix"""
    scale = np.hypot(matrix[0, 0], matrix[1, 0])
    return scale, np.degrees(np.arctan2(matrix[1, 0], matrix[0, 0])), matrix[:2, 2]


def test_umeyama_recovers_a_similarity_exactly():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 400, (5, 2))
    truth = similarity(0.37, 23.0, -12.5, 40.0)
    np.testing.assert_allclose(umeyama(src, apply(truth, src)), truth, atol=1e-9)


def test_umeyama_matches_skimage_and_never_reflects():
    from skimage.transform import SimilarityTransform

    rng = np.random.default_rng(1)
    for _ in range(20):
        src = rng.uniform(0, 500, (5, 2))
        dst = ARCFACE_TEMPLATE + rng.normal(0, 3, (5, 2))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # skimage 0.26 deprecates .estimate; that is why we have umeyama
            reference = SimilarityTransform()
            reference.estimate(src, dst)
        np.testing.assert_allclose(umeyama(src, dst), reference.params, atol=1e-6)
    mirrored = ARCFACE_TEMPLATE * np.array([-1, 1])  # a mirror image cannot be reached without reflection
    assert np.linalg.det(umeyama(mirrored, ARCFACE_TEMPLATE)[:2, :2]) > 0


@pytest.mark.parametrize("size", [112, 224, 128])
def test_arcface_matrix_and_warp_match_insightface(size):
    from insightface.utils import face_align

    rng = np.random.default_rng(size)
    landmarks = (ARCFACE_TEMPLATE * 3 + 60 + rng.normal(0, 4, (5, 2))).astype(np.float32)
    image = rng.integers(0, 255, (480, 420, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected_matrix = face_align.estimate_norm(landmarks, image_size=size)
        expected_crop = face_align.norm_crop(image, landmarks, image_size=size)
    np.testing.assert_allclose(arcface_matrix(landmarks, size), expected_matrix, rtol=1e-5, atol=1e-4)
    crop = warp_face(image, landmarks, size)
    assert crop.shape == (size, size, 3)
    # identical up to a rounding step of the bilinear interpolation
    assert np.abs(crop.astype(int) - expected_crop.astype(int)).max() <= 1


def test_template_landmarks_land_on_the_template():
    truth = similarity(2.5, -12.0, 100.0, 40.0)
    landmarks = apply(truth, ARCFACE_TEMPLATE)
    np.testing.assert_allclose(apply(np.vstack([arcface_matrix(landmarks), [0, 0, 1]]), landmarks),
                               ARCFACE_TEMPLATE, atol=1e-4)


# --- SCRFD path, on the SCRFD-shaped stand-in (the real scrfd_10g_bnkps.onnx is not reachable in CI) ---


@pytest.fixture(scope="module")
def face_models(tiny_face_models):
    return tiny_face_models


def test_resolve_scrfd_layouts_and_missing(tmp_path, face_models):
    assert resolve_scrfd(face_models).endswith("antelopev2/scrfd_10g_bnkps.onnx")
    with pytest.raises(MissingModelError) as info:
        resolve_scrfd(tmp_path)
    assert "antelopev2" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(MissingModelError):
        FaceAligner(model_dir=tmp_path)


def test_scrfd_loading_and_decoding_path(face_models):
    from insightface.model_zoo.model_zoo import ModelRouter

    # insightface routes the stand-in to its SCRFD class, like the real file (>= 5 outputs)
    routed = ModelRouter(resolve_scrfd(face_models)).get_model(providers=["CPUExecutionProvider"])
    assert routed.taskname == "detection" and routed.use_kps and routed.fmc == 3

    aligner = FaceAligner(model_dir=face_models, det_size=(640, 640))
    image = np.asarray(draw_face(2, 0, size=512))
    faces = aligner.detect(image)
    assert len(faces) == 1
    side = STANDIN_FACE_FRACTION * 512
    expected = 256 + (ARCFACE_TEMPLATE - 56) / 112 * side
    np.testing.assert_allclose(faces[0].landmarks, expected, atol=0.5)
    np.testing.assert_allclose(faces[0].box, [256 - side / 2, 256 - side / 2, 256 + side / 2, 256 + side / 2],
                               atol=0.5)
    crop = aligner.align_one(image)
    assert crop.shape == (112, 112, 3)
    # the crop is the stand-in's box resized: compare with a plain resize of that box
    box = faces[0].box.round().astype(int)
    resized = np.asarray(Image.fromarray(image[box[1]:box[3], box[0]:box[2]]).resize((112, 112), Image.BILINEAR))
    assert np.abs(crop.astype(float) - resized).mean() < 12


def test_scrfd_flat_image_has_no_face(face_models):
    aligner = FaceAligner(model_dir=face_models)
    flat = np.full((512, 512, 3), 97, np.uint8)
    assert aligner.detect(flat) == []
    results = aligner.align([flat, np.asarray(draw_face(1, 0, size=256)), flat])
    assert results[0] is None and results[2] is None and results[1].shape == (112, 112, 3)


def test_crop_for_recognition_routes(face_models):
    aligned = np.asarray(draw_face(0, 0, size=112))
    assert crop_for_recognition(aligned) is aligned  # DigiFace/DisCo crops are already aligned
    big = np.asarray(draw_face(0, 0, size=448))
    landmarks = ARCFACE_TEMPLATE * 4  # the same face at 4x: warping must give back about the 112 picture
    crop = crop_for_recognition(big, landmarks5=landmarks)
    assert crop.shape == (112, 112, 3)
    with pytest.raises(ValueError, match="needs a face aligner"):
        crop_for_recognition(big)
    assert crop_for_recognition(np.zeros((300, 300, 3), np.uint8), aligner=FaceAligner(model_dir=face_models)) is None


# --- real detections: dlib's HOG detector + 68-point landmarks (pretrained models shipped on PyPI) ---



@pytest.fixture(scope="module")
def dlib_aligner():
    # PyPI dlib-bin + face-recognition-models (test dependencies): without them only these tests are skipped
    pytest.importorskip("dlib")
    if importlib.util.find_spec("face_recognition_models") is None:
        pytest.skip("face-recognition-models is not installed")
    return FaceAligner(detector="dlib")


def test_dlib_finds_the_faces_of_a_real_photo(dlib_aligner):
    image = insightface_image("t1.jpg")  # a group photo of six people
    faces = dlib_aligner.detect(image)
    assert len(faces) == 6
    areas = [f.area for f in faces]
    assert areas == sorted(areas, reverse=True)
    for face in faces:
        x0, y0, x1, y1 = face.box
        eyes_y = face.landmarks[:2, 1]
        # eyes inside the box, above the nose, above the mouth; left eye left of the right eye
        assert np.all((face.landmarks[:, 0] >= x0 - 5) & (face.landmarks[:, 0] <= x1 + 5))
        assert face.landmarks[0, 0] < face.landmarks[1, 0]
        assert eyes_y.max() < face.landmarks[2, 1] < face.landmarks[3:, 1].min()


def test_dlib_alignment_puts_faces_on_the_template(dlib_aligner):
    image = insightface_image("t1.jpg")
    for face in dlib_aligner.detect(image):
        crop = warp_face(image, face.landmarks, 224)
        again = dlib_aligner.detect(crop)
        assert len(again) == 1
        # the transform from the re-detected landmarks to the template is close to the identity
        scale, angle, shift = decompose(umeyama(again[0].landmarks / 2, ARCFACE_TEMPLATE))
        assert abs(scale - 1) < 0.1 and abs(angle) < 5 and np.abs(shift).max() < 6


def test_dlib_on_an_arcface_aligned_photo(dlib_aligner):
    image = insightface_image("Tom_Hanks_54745.png")  # insightface's example of an aligned 112x112 crop
    (face,) = dlib_aligner.detect(image)
    scale, angle, shift = decompose(umeyama(face.landmarks, ARCFACE_TEMPLATE))
    assert abs(scale - 1) < 0.1 and abs(angle) < 5 and np.abs(shift).max() < 8


def test_dlib_blank_image_is_none(dlib_aligner):
    blank = np.full((400, 400, 3), 200, np.uint8)
    assert dlib_aligner.align([blank]) == [None]


def test_scrfd_retries_a_frame_filling_face_at_256(face_models, monkeypatch):
    """No face at det_size 640 (a tight crop) -> one retry at 256, as the Arc2Face maintainer advises."""
    aligner = FaceAligner(model_dir=face_models)
    real_detect = aligner._scrfd.detect
    sizes = []

    def detect(image_bgr, input_size, det_thresh):
        sizes.append(tuple(input_size))
        boxes, kps = real_detect(image_bgr, input_size=input_size, det_thresh=det_thresh)
        return (boxes[:0], kps[:0] if kps is not None else kps) if tuple(input_size) == (640, 640) else (boxes, kps)

    monkeypatch.setattr(aligner._scrfd, "detect", detect)
    image = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    crop = aligner.align_one(image)
    assert sizes == [(640, 640), (256, 256)] and crop is not None and crop.shape == (112, 112, 3)
    aligner.retry_det_size = None
    sizes.clear()
    assert aligner.align_one(image) is None and sizes == [(640, 640)]
