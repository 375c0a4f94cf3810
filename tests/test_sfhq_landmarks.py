"""Five points from SFHQ's 110 landmarks and the ArcFace similarity alignment, checked on known geometry."""

import cv2
import numpy as np
import pytest

from facegen.generators.landmarks import (
    ARCFACE_TEMPLATE_112,
    align_arcface,
    arcface_matrix,
    five_points_from_sfhq,
    transform_points,
    umeyama_similarity,
)
from facegen.testing.sfhq import canonical_landmarks


def similarity(scale, degrees, tx, ty):
    angle = np.deg2rad(degrees)
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return np.hstack([rotation, [[tx], [ty]]])


def test_umeyama_recovers_a_known_similarity():
    rng = np.random.default_rng(3)
    src = rng.uniform(0, 100, (7, 2))
    known = similarity(2.7, -33.0, 140.0, -12.5)
    estimated = umeyama_similarity(src, transform_points(src, known))
    np.testing.assert_allclose(estimated, known, atol=1e-9)


def test_umeyama_never_returns_a_reflection():
    src = ARCFACE_TEMPLATE_112
    mirrored = src * [-1, 1]
    matrix = umeyama_similarity(src, mirrored)
    assert np.linalg.det(matrix[:, :2]) > 0


def test_five_points_use_eye_contour_means_nose_tip_and_mouth_corners():
    landmarks = canonical_landmarks(np.random.default_rng(1))
    five = five_points_from_sfhq(landmarks)
    np.testing.assert_allclose(five[0], landmarks[36:42].mean(axis=0))
    np.testing.assert_allclose(five[1], landmarks[42:48].mean(axis=0))
    np.testing.assert_allclose(five[2:], landmarks[[30, 48, 54]])
    # the fixture's canonical face is built on the template
    np.testing.assert_allclose(five, ARCFACE_TEMPLATE_112, atol=1e-9)


def gaussian_blobs(points, shape, sigma):
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    image = np.zeros(shape)
    for x, y in points:
        image += np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma ** 2))
    return np.clip(image * 255, 0, 255).astype(np.uint8)


def blob_centroids(image, expected, radius):
    """Intensity-weighted centroid of the blob around each expected point."""
    ys, xs = np.mgrid[0:image.shape[0], 0:image.shape[1]].astype(np.float64)
    found = []
    for x, y in expected:
        window = ((xs - x) ** 2 + (ys - y) ** 2) <= radius ** 2
        weights = image.astype(np.float64) * window
        found.append([(weights * xs).sum() / weights.sum(), (weights * ys).sum() / weights.sum()])
    return np.array(found)


@pytest.mark.parametrize("scale, degrees, crop", [(4.5, 17.0, 112), (7.0, -28.0, 112), (3.0, 5.0, 224)])
def test_alignment_maps_a_known_face_back_onto_the_template(scale, degrees, crop):
    # an image whose 110 landmarks are a known similarity of the canonical (template-built) face
    side = 900
    known = similarity(scale, degrees, 0.0, 0.0)
    known[:, 2] = side / 2 - known[:, :2] @ [56.0, 72.0]  # the face centre in the image centre
    landmarks = transform_points(canonical_landmarks(np.random.default_rng(5)), known)
    five = five_points_from_sfhq(landmarks)
    assert ((five > 20) & (five < side - 20)).all()
    # blobs drawn at the five points, sigma = 2.5 px of the crop scale
    image = gaussian_blobs(five, (side, side), sigma=2.5 * scale * 112 / crop)
    rgb = np.repeat(image[:, :, None], 3, axis=2)

    aligned = align_arcface(rgb, five, size=crop)

    assert aligned.shape == (crop, crop, 3)
    template = ARCFACE_TEMPLATE_112 * crop / 112
    found = blob_centroids(aligned[:, :, 0], template, radius=7 * crop / 112)
    error = np.linalg.norm(found - template, axis=1)
    assert error.max() < 0.5, error
    # and the matrix itself sends the five points exactly onto the template
    np.testing.assert_allclose(transform_points(five, arcface_matrix(five, crop)), template, atol=1e-6)


def test_nearest_interpolation_keeps_label_values():
    known = similarity(5.0, 10.0, 300.0, 200.0)
    five = transform_points(ARCFACE_TEMPLATE_112, known)
    labels = np.zeros((800, 800), np.uint8)
    labels[300:500, 250:600] = 17
    labels[400:450, 300:350] = 4
    crop = align_arcface(labels, five, size=112, interpolation=cv2.INTER_NEAREST)
    assert set(np.unique(crop)) <= {0, 4, 17}


@pytest.mark.parametrize("damage, message", [
    (lambda p: p[:68], "shape"),
    (lambda p: np.where(np.arange(110)[:, None] == 30, np.nan, p), "NaN"),
    (lambda p: p[::-1].copy(), "ordered|order"),  # points in some other order
    (lambda p: p * [-1, 1], "order"),  # a mirrored face: left and right swapped
])
def test_landmarks_that_are_not_a_face_are_refused(damage, message):
    landmarks = transform_points(canonical_landmarks(), similarity(4.0, 0.0, 500.0, 300.0))
    with pytest.raises(ValueError, match=message):
        five_points_from_sfhq(damage(landmarks))


def test_upside_down_face_is_still_a_face():
    # in-plane rotation of any angle keeps the layout in the face's own frame
    landmarks = transform_points(canonical_landmarks(), similarity(4.0, 180.0, 900.0, 900.0))
    five = five_points_from_sfhq(landmarks)
    np.testing.assert_allclose(transform_points(five, arcface_matrix(five)), ARCFACE_TEMPLATE_112, atol=1e-6)
