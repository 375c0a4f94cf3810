"""A fixture SFHQ download in the published layout, with drawn faces whose landmarks and segmentation match.

Layout written (per part, Kaggle's doubled folder names by default)::

    ROOT/synthetic-faces-high-quality-sfhq-part-1/
        images/images/SFHQ_pt1_00000000.jpg                  face image (size x size, JPEG)
        landmarks/landmarks/SFHQ_pt1_00000000.npz            key 'landmarks': (110, 2) float64 pixel coordinates
        segmentations/segmentations/SFHQ_pt1_00000000.png    mode L, face-parsing label ids (0 background, 1 skin …)
        pretrained_features/pretrained_features/SFHQ_pt1_00000000.pickle   {model name: (1, D) array}
        tiny sample (30 images)/...                          copies of the first images (ignored by the source)

Index numbers have gaps (0, 1, 3, 4, 6 …) like the curated real parts. The 110 landmarks are the iBUG-68 points
(0-67) followed by 21 inner and 21 outer hairline points, built around the ArcFace 112x112 template so that the
eye contour means, nose tip (30) and mouth corners (48, 54) of the canonical shape are exactly the template, then
moved into the image by a per-image similarity transform (``fixture_similarity``).
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# the feature sets a third-party loader found in the real pickles, with their dimensions
REAL_FEATURE_DIMS = {"CLIP_ViTL_14@336": 768, "CLIP_ResNet50x64": 1024, "CLIP_ViTL_14": 768,
                     "ConvNext_XL_Imagenet21k": 2048}

ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                        [70.7299, 92.2041]])

# face-parsing (BiSeNet, CelebAMask-HQ) label ids
SEG_SKIN, SEG_L_BROW, SEG_R_BROW, SEG_L_EYE, SEG_R_EYE = 1, 2, 3, 4, 5
SEG_NOSE, SEG_MOUTH, SEG_U_LIP, SEG_L_LIP, SEG_HAIR = 10, 11, 12, 13, 17


def sfhq_name(part: int, number: int) -> str:
    return f"SFHQ_pt{part}_{number:08d}"


def part_numbers(count: int) -> list[int]:
    """Image numbers with gaps: 0, 1, 3, 4, 6, 7 …"""
    return [3 * k // 2 for k in range(count)]


def _ellipse(center, rx, ry, angles):
    angles = np.asarray(angles, dtype=np.float64)
    return np.stack([center[0] + rx * np.cos(angles), center[1] + ry * np.sin(angles)], axis=1)


def canonical_landmarks(rng: np.random.Generator | None = None) -> np.ndarray:
    """110 (x, y) points in ArcFace-112 coordinates: iBUG-68 order, then inner and outer hairline (21 each).

    The eye contours average exactly to the template's eye points, point 30 is its nose tip and 48/54 its mouth
    corners; ``rng`` adds a little per-face variation elsewhere (brows, jaw, hairline).
    """
    rng = rng or np.random.default_rng(0)
    jitter = lambda: rng.uniform(-1.5, 1.5)  # noqa: E731
    left_eye, right_eye, nose, mouth_l, mouth_r = ARCFACE_112
    points = np.zeros((110, 2))
    # jaw 0-16: from the left temple down round the chin to the right temple
    points[0:17] = _ellipse((56 + jitter(), 52), 38 + jitter(), 57 + jitter(), np.pi - np.arange(17) * np.pi / 16)
    # brows 17-21 (image left), 22-26 (image right)
    for start, eye in ((17, left_eye), (22, right_eye)):
        xs = eye[0] + np.linspace(-10, 10, 5)
        ys = eye[1] - 10 + jitter() - 2.5 * np.sin(np.linspace(0, np.pi, 5))
        points[start:start + 5] = np.stack([xs, ys], axis=1)
    # nose bridge 27-30 (30 = tip), lower nose 31-35
    points[27:31] = np.stack([np.full(4, nose[0]), np.linspace(51.6, nose[1], 4)], axis=1)
    points[31:36] = np.stack([nose[0] + np.linspace(-8, 8, 5), np.full(5, nose[1] + 3.5)], axis=1)
    # eyes 36-41 and 42-47: outer corner, two upper, inner corner, two lower; angles sum to zero -> mean = centre
    eye_angles = np.pi - np.arange(6) * np.pi / 3  # pi, 2pi/3, pi/3, 0, -pi/3, -2pi/3
    points[36:42] = _ellipse(left_eye, 6.5, -3.2, eye_angles)
    points[42:48] = _ellipse(right_eye, 6.5, -3.2, eye_angles)  # 42 = inner corner, 45 = outer corner
    # outer mouth 48-59: 48 left corner, upper lip to 54 right corner, lower lip back
    center = (mouth_l + mouth_r) / 2
    half = np.linalg.norm(mouth_r - mouth_l) / 2
    tilt = np.arctan2(*(mouth_r - mouth_l)[::-1])
    rot = np.array([[np.cos(tilt), -np.sin(tilt)], [np.sin(tilt), np.cos(tilt)]])
    upper = np.pi - np.arange(7) * np.pi / 6
    lower = -np.arange(1, 6) * np.pi / 6
    outer = np.concatenate([_ellipse((0, 0), half, -4.5, upper), _ellipse((0, 0), half, -6.5, lower)])
    points[48:60] = outer @ rot.T + center
    inner_angles = np.pi - np.arange(8) * np.pi / 4
    points[60:68] = _ellipse((0, 0), half * 0.7, -1.5, inner_angles) @ rot.T + center
    # hairlines 68-88 (inner) and 89-109 (outer), over the forehead from temple to temple
    arc = np.pi + np.arange(21) * np.pi / 20
    points[68:89] = _ellipse((56, 50), 38, 36 + jitter(), arc)
    points[89:110] = _ellipse((56, 50), 46, 46 + jitter(), arc)
    return points


def fixture_similarity(rng: np.random.Generator, size: int) -> np.ndarray:
    """A 2x3 similarity matrix from ArcFace-112 coordinates into a ``size`` image, FFHQ-like framing."""
    scale = size * rng.uniform(0.21, 0.25) / np.linalg.norm(ARCFACE_112[1] - ARCFACE_112[0])
    angle = np.deg2rad(rng.uniform(-12, 12))
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    target = np.array([size * 0.5 + rng.uniform(-0.03, 0.03) * size, size * 0.52 + rng.uniform(-0.03, 0.03) * size])
    matrix = np.empty((2, 3))
    matrix[:, :2] = rotation
    matrix[:, 2] = target - rotation @ np.array([56.0, 72.0])
    return matrix


def draw_sfhq_face(landmarks: np.ndarray, size: int, rng: np.random.Generator, noise: float = 5.0):
    """Draw a face on its 110 landmarks; returns (RGB image, mode-L segmentation with face-parsing ids)."""
    background = tuple(int(v) for v in rng.integers(30, 230, 3))
    skin = tuple(int(v) for v in rng.integers([150, 100, 70], [255, 210, 180]))
    hair = tuple(int(v) for v in rng.integers(0, 120, 3))
    iris = tuple(int(v) for v in rng.integers(0, 160, 3))
    image = Image.new("RGB", (size, size), background)
    seg = Image.new("L", (size, size), 0)
    draw, label = ImageDraw.Draw(image), ImageDraw.Draw(seg)
    pts = [tuple(map(float, p)) for p in landmarks]
    width = max(1, size // 100)

    def polygon(indices, colour, seg_id):
        shape = [pts[i] for i in indices]
        draw.polygon(shape, fill=colour)
        label.polygon(shape, fill=seg_id)

    polygon(list(range(89, 110)) + [16, 0], hair, SEG_HAIR)
    polygon(list(range(0, 17)) + list(range(88, 67, -1)), skin, SEG_SKIN)
    for brow, seg_id in ((range(17, 22), SEG_L_BROW), (range(22, 27), SEG_R_BROW)):
        line = [pts[i] for i in brow]
        draw.line(line, fill=hair, width=3 * width)
        label.line(line, fill=seg_id, width=3 * width)
    dark_skin = tuple(max(0, c - 45) for c in skin)
    polygon([27, 31, 32, 33, 34, 35], dark_skin, SEG_NOSE)
    for eye, seg_id in ((range(36, 42), SEG_L_EYE), (range(42, 48), SEG_R_EYE)):
        polygon(list(eye), (245, 245, 245), seg_id)
        centre = landmarks[list(eye)].mean(axis=0)
        radius = 0.2 * np.linalg.norm(landmarks[eye.start] - landmarks[eye.start + 3])
        draw.ellipse([centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius], fill=iris)
    polygon(list(range(48, 55)) + [64, 63, 62, 61, 60], (170, 50, 60), SEG_U_LIP)
    polygon(list(range(54, 60)) + [48, 60, 67, 66, 65, 64], (150, 40, 50), SEG_L_LIP)
    polygon(list(range(60, 68)), (60, 10, 20), SEG_MOUTH)

    pixels = np.asarray(image, dtype=np.float32)
    if noise:
        pixels = pixels + rng.normal(0, noise, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), seg


class _RunsShellCommand:
    """Pickles to ``os.system(command)``: what a malicious pickle does. Dumping it runs nothing."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def malicious_pickle_bytes(command: str) -> bytes:
    """A features pickle whose value would run ``command`` through os.system if unpickled naively."""
    return pickle.dumps({"CLIP_ViTL_14@336": _RunsShellCommand(command)}, protocol=4)


def write_sfhq_source(
    root: str | os.PathLike,
    parts: tuple[int, ...] = (1,),
    images_per_part: int = 5,
    size: int = 256,
    kaggle_nesting: bool = True,
    part_folders: bool = True,
    feature_dims: dict[str, int] | None = None,
    feature_dtype: str = "float32",
    sample_folder: bool = True,
    missing_landmarks: int = 0,
    missing_segmentation: int = 0,
    missing_features: int = 0,
    malicious_pickles: int = 0,
    corrupt_images: int = 0,
    orphan_landmarks: int = 0,
    seed: int = 0,
) -> Path:
    """Write an SFHQ download under ``root``; returns ``root``.

    ``part_folders``: one folder per part named like Kaggle's dataset slug (otherwise the files of all parts go
    straight under ``root``). ``kaggle_nesting``: doubled folder names (``images/images/``). Damage is applied to
    the last images of each part, each kind to a different image: ``missing_landmarks`` / ``missing_segmentation``
    / ``missing_features`` delete those files, ``malicious_pickles`` replace the features pickle by one that would
    run ``touch ROOT/PWNED-<name>`` when unpickled naively, ``corrupt_images`` truncate the JPEG;
    ``orphan_landmarks`` add landmark files whose image does not exist.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    dims = dict(REAL_FEATURE_DIMS if feature_dims is None else feature_dims)
    for part in parts:
        part_root = root / f"synthetic-faces-high-quality-sfhq-part-{part}" if part_folders else root
        folders = {}
        for kind in ("images", "landmarks", "segmentations", "pretrained_features"):
            folders[kind] = part_root / kind / kind if kaggle_nesting else part_root / kind
            folders[kind].mkdir(parents=True, exist_ok=True)
        numbers = part_numbers(images_per_part)
        names = [sfhq_name(part, n) for n in numbers]
        for name in names:
            rng = np.random.default_rng([seed, part, int(name[-8:])])
            matrix = fixture_similarity(rng, size)
            landmarks = canonical_landmarks(rng) @ matrix[:, :2].T + matrix[:, 2]
            image, seg = draw_sfhq_face(landmarks, size, rng)
            image.save(folders["images"] / f"{name}.jpg", format="JPEG", quality=90)
            np.savez(folders["landmarks"] / f"{name}.npz", landmarks=landmarks)
            seg.save(folders["segmentations"] / f"{name}.png", format="PNG")
            features = {model: rng.normal(0, 1, (1, dim)).astype(feature_dtype) for model, dim in dims.items()}
            with open(folders["pretrained_features"] / f"{name}.pickle", "wb") as f:
                pickle.dump(features, f, protocol=4)
        if sample_folder:
            sample = part_root / f"tiny sample ({min(2, len(names))} images)"
            sample.mkdir(exist_ok=True)
            for name in names[:2]:
                shutil.copy(folders["images"] / f"{name}.jpg", sample / f"{name}.jpg")
        victims = iter(reversed(names))
        for count, kind, ext in ((missing_landmarks, "landmarks", "npz"),
                                 (missing_segmentation, "segmentations", "png"),
                                 (missing_features, "pretrained_features", "pickle")):
            for _ in range(count):
                (folders[kind] / f"{next(victims)}.{ext}").unlink()
        for _ in range(malicious_pickles):
            name = next(victims)
            data = malicious_pickle_bytes(f"touch {root / ('PWNED-' + name)}")
            (folders["pretrained_features"] / f"{name}.pickle").write_bytes(data)
        for _ in range(corrupt_images):
            path = folders["images"] / f"{next(victims)}.jpg"
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 3])
        for k in range(orphan_landmarks):
            orphan = sfhq_name(part, numbers[-1] + 10 + k)
            np.savez(folders["landmarks"] / f"{orphan}.npz", landmarks=canonical_landmarks())
    return root
