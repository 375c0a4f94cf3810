"""`facegen report --against lfw.bin`: does a benchmark's face appear among a synthetic dataset's identities?

A synthetic training set whose identities resemble the people of a verification benchmark (LFW, CFP-FP, AgeDB-30)
inflates the accuracy measured on it. The benchmark is an insightface verification ``.bin`` (a pickle of ``(bins,
issame_list)``, read with facegen's restricted unpickler: :func:`facegen.generators.safe_pickle.
load_verification_pairs`); its images are not grouped by person, so each image stands alone: both sides of every
pair are embedded with the report's recogniser, and each synthetic identity's prototype (the normalised mean of
its images' unit embeddings) is compared with every benchmark image. An identity is listed when some benchmark
image reaches ``threshold`` with its prototype, with its nearest benchmark images above it (``NEAREST`` at most).

The threshold is the report's ``--min-similarity``: the cosine at which an image counts as one of an identity's
own (below it an image of the dataset is an outlier), so a benchmark image listed here would pass as a member of
that synthetic identity. Images are decoded and embedded in batches (memory bounded by the batch), and the
similarities are computed in blocks of prototypes (never identities x images in memory at once).
"""

from __future__ import annotations

import io
import os
import pickle
import warnings

import numpy as np

from facegen.errors import UsageError
from facegen.generators.safe_pickle import UnsafePickleError, load_verification_pairs

NEAREST = 5  # benchmark images listed per matching identity
SIDES = ("left", "right")
BLOCK = 1024  # prototypes per block of similarities


def is_verification_file(path: str | os.PathLike | None) -> bool:
    """``--against`` names an insightface verification file (``*.bin``) rather than a dataset."""
    return path is not None and os.fspath(path).endswith(".bin") and os.path.isfile(path)


def image_ref(index: int) -> str:
    """A benchmark image as the report names it: its pair and side (``pair-000061/right``)."""
    return f"pair-{index // 2:06d}/{SIDES[index % 2]}"


def _rgb(encoded) -> tuple[np.ndarray | None, str]:
    """(RGB array or None, why not): an image whose header declares more than the build's pixel limit
    (:data:`facegen.builders.engine.images.MAX_PIXELS`, as the report's own images) is not decoded."""
    from PIL import Image

    from facegen.builders.engine.images import MAX_PIXELS

    data = encoded if isinstance(encoded, bytes) else np.asarray(encoded).tobytes()
    try:
        with warnings.catch_warnings():  # PIL warns on opening what the check below counts as too large
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        with image:
            if image.width * image.height > MAX_PIXELS:
                return None, "image too large"
            return np.asarray(image.convert("RGB")), ""
    except (Image.DecompressionBombError, MemoryError):  # PIL's own limit, above the build's
        return None, "image too large"
    except Exception as exc:  # PIL raises many types for broken files: that image is counted as not embedded
        return None, f"corrupt image ({type(exc).__name__})"


def embed_benchmark(path: str | os.PathLike, recognizer, batch_size: int = 64, progress: bool = True,
                    skipped: dict[str, int] | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(unit embeddings of the embedded images, their indices in ``bins``, the pairs in the file); ``skipped``
    counts the images not embedded, by reason."""
    from tqdm.auto import tqdm

    skipped = {} if skipped is None else skipped
    name = os.path.basename(os.fspath(path))
    try:
        bins, issame = load_verification_pairs(path)
    except (UnsafePickleError, pickle.UnpicklingError) as exc:
        raise UsageError(f"--against {name} is not a verification pickle of (bins, issame_list): "
                         f"{str(exc).splitlines()[0][:300]}") from None
    except OSError as exc:
        raise UsageError(f"--against: cannot read {name}: {exc.strerror or exc}") from None
    vectors, indices = [], []
    with tqdm(total=len(bins), unit="image", desc=f"embed {name}", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(bins), batch_size):
            decoded = []
            for i in range(start, min(start + batch_size, len(bins))):
                rgb, reason = _rgb(bins[i])
                if rgb is None:
                    skipped[reason] = skipped.get(reason, 0) + 1
                else:
                    decoded.append((i, rgb))
            if decoded:
                for (i, _), vector in zip(decoded, recognizer.embed([rgb for _, rgb in decoded])):
                    if vector is not None:
                        vectors.append(np.asarray(vector, np.float32))
                        indices.append(i)
                    else:
                        skipped["no face detected"] = skipped.get("no face detected", 0) + 1
            bar.update(min(batch_size, len(bins) - start))
    matrix = np.stack(vectors) if vectors else np.zeros((0, 0), np.float32)
    return matrix, np.asarray(indices, np.int64), len(issame)


def benchmark_leakage(ids: list[str], prototypes: np.ndarray, path: str | os.PathLike, recognizer,
                      threshold: float, batch_size: int = 64, progress: bool = True) -> dict:
    """The report's ``against`` section for a verification file: identities of the dataset (``ids``, their unit
    ``prototypes``) with a benchmark image at cosine >= ``threshold``, nearest first."""
    skipped: dict[str, int] = {}
    images, indices, pairs = embed_benchmark(path, recognizer, batch_size, progress, skipped)
    matches, nearest = [], {}
    if len(ids) and len(indices):
        for r0 in range(0, len(ids), BLOCK):
            tile = prototypes[r0:r0 + BLOCK] @ images.T
            for r in np.flatnonzero((tile >= threshold).any(axis=1)).tolist():
                above = np.flatnonzero(tile[r] >= threshold)
                best = above[np.argsort(-tile[r, above], kind="stable")][:NEAREST]
                identity = ids[r0 + r]
                nearest[identity] = [[image_ref(int(indices[j])), round(float(tile[r, j]), 6)] for j in best]
                matches.append([identity, *nearest[identity][0]])
    matches.sort(key=lambda m: (-m[2], m[0]))
    return {"dataset": os.path.basename(os.fspath(path)), "kind": "verification images", "pairs": pairs,
            "images": 2 * pairs, "embedded": int(len(indices)),
            "skipped": dict(sorted(skipped.items())), "identities": len(ids), "threshold": threshold,
            "matches": matches, "nearest": {m[0]: nearest[m[0]] for m in matches}}
