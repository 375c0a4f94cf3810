"""Face embeddings as facegen uses them: the one vector normalisation, and the one rule for embedding a source image
with Arc2Face's recogniser, shared by the arc2face transform and `facegen embed` / `select-identities` /
`estimate-shift` (so that a selection or a shift measures exactly what the transform will use).

API summary
-----------
- ``normalize(x, axis=-1, dtype=np.float32) -> x / ||x||``, computed in ``dtype``. **A zero vector stays zero**
  (it has no direction; it never becomes NaN and never raises): code that needs a direction leaves zero vectors out
  first, as :func:`embed_source_images` does.
- ``embed_source_images(image_lists, recogniser, aligner, realign=False, use_given=True, threads=1)
  -> list[SourceEmbeddings]``: for each identity's list of source images (``.ref``, ``.data``, ``.hints``, as
  ``facegen.api.SourceImage``), the RAW embeddings of the images it uses, their refs, and a ``Skip`` for each image it
  does not use. One recogniser call for all the lists.

The rule, per image, in order:

1. ``hints["embedding"]`` (DisCo hands its embeddings over) is used as it is when ``use_given``; the image is then
   not decoded.
2. Otherwise the image is decoded ("corrupt image" when it cannot be) and cropped for recognition
   (:func:`facegen.generators.alignment.crop_for_recognition`): a 112x112 image is taken as an aligned crop
   (``realign``: detected and aligned again), ``hints["landmarks5"]`` are warped without detection, anything else
   is detected and aligned. ``aligner()`` is called only when an image needs one; it may return None (then such an
   image is "source image not embeddable"). No face found: "no face detected in source image".
3. The crops are embedded with ``recogniser.embed`` (raw ArcFace output, float32).
4. An embedding that is zero (no direction) or holds NaN or infinity is not used: "zero embedding", "embedding not
   finite".
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from facegen.api import Skip

EMBEDDING_SIZE = 512


def normalize(x: np.ndarray, axis: int = -1, dtype=np.float32) -> np.ndarray:
    """Unit-length vectors along ``axis``, in ``dtype``; a zero vector stays zero."""
    x = np.asarray(x, dtype=dtype)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def decode_rgb(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


@dataclass
class SourceEmbeddings:
    """One identity's source images as the recogniser saw them."""

    refs: list[str] = field(default_factory=list)  # the images used, in the order given
    embeddings: np.ndarray = field(default_factory=lambda: np.zeros((0, EMBEDDING_SIZE), np.float32))  # raw, none zero
    skipped: list[Skip] = field(default_factory=list)


def source_crop(image: Any, aligner: Callable[[], Any], realign: bool) -> np.ndarray | Skip:
    """The crop of one source image to embed, or the Skip saying why there is none (step 2 of the rule)."""
    from facegen.generators.alignment import crop_for_recognition

    try:
        rgb = decode_rgb(image.data)
    except Exception as exc:  # PIL raises many types for broken files
        return Skip(image.ref, "corrupt image", f"{type(exc).__name__}: {exc}")
    landmarks = image.hints.get("landmarks5")
    needs_aligner = landmarks is None and (realign or rgb.shape[:2] != (112, 112))
    try:
        crop = crop_for_recognition(rgb, landmarks, aligner() if needs_aligner else None, realign=realign)
    except ValueError as exc:  # e.g. a large image and no aligner to crop it
        return Skip(image.ref, "source image not embeddable", str(exc))
    if crop is None:
        return Skip(image.ref, "no face detected in source image")
    return crop


def embed_source_images(image_lists: Sequence[Sequence[Any]], recogniser, aligner: Callable[[], Any], *,
                        realign: bool = False, use_given: bool = True, threads: int = 1) -> list[SourceEmbeddings]:
    """The rule of the module docstring for each list of images; ``threads`` decode and crop (PIL and ONNX Runtime
    release the GIL); results in input order."""
    images = [image for images in image_lists for image in images]
    given = [image.hints.get("embedding") if use_given else None for image in images]
    to_crop = [image for image, embedding in zip(images, given) if embedding is None]
    if threads > 1 and len(to_crop) > 1:
        with ThreadPoolExecutor(min(threads, len(to_crop)), thread_name_prefix="source-crop") as pool:
            cropped = iter(list(pool.map(lambda image: source_crop(image, aligner, realign), to_crop)))
    else:
        cropped = iter([source_crop(image, aligner, realign) for image in to_crop])

    rows: list[list[tuple[str, np.ndarray | None]]] = []  # per list: (ref, embedding, or None until embedded)
    skipped: list[list[Skip]] = []
    crops, slots = [], []
    handed = iter(given)
    for images in image_lists:
        rows.append([])
        skipped.append([])
        for image in images:
            embedding = next(handed)
            if embedding is not None:
                rows[-1].append((image.ref, np.asarray(embedding, dtype=np.float32).reshape(-1)))
                continue
            crop = next(cropped)
            if isinstance(crop, Skip):
                skipped[-1].append(crop)
                continue
            slots.append((len(rows) - 1, len(rows[-1])))
            rows[-1].append((image.ref, None))
            crops.append(crop)
    if crops:
        for (i, j), embedding in zip(slots, recogniser.embed(np.stack(crops))):
            rows[i][j] = (rows[i][j][0], embedding)

    out = []
    for found, skips in zip(rows, skipped):
        result = SourceEmbeddings(skipped=skips)
        used = []
        for ref, embedding in found:
            if not np.all(np.isfinite(embedding)):
                result.skipped.append(Skip(ref, "embedding not finite", "NaN or infinity in the embedding"))
                continue
            if not np.any(embedding):
                result.skipped.append(Skip(ref, "zero embedding", "a zero vector has no direction"))
                continue
            result.refs.append(ref)
            used.append(embedding)
        if used:
            result.embeddings = np.stack(used)
        out.append(result)
    return out
