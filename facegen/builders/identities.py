"""Identity prototypes (`facegen embed`) and the selection of the most distinct identities (`facegen select-identities`).

API summary
-----------
- ``open_source(name, path, options) -> Source``: a source plugin through the registry.
- ``FaceEmbedder(model_dir=None, detector="scrfd", det_size=640, batch_size=64, providers=None,
  arc2face_revision=None)``: Arc2Face's
  recogniser plus a face aligner created only when an image needs one. ``.embed_images(images) ->
  (embeddings (K, 512) unit float32, refs, skips)`` for one identity's ``SourceImage`` list, the same rules as the
  arc2face transform: ``hints["embedding"]`` used as it is (DisCo), 112x112 images embedded as they are (DigiFace),
  ``hints["landmarks5"]`` warped (SFHQ), anything else detected and aligned; undecodable images and images without
  a face are skipped with their reason. ``.embed_batch(list of image lists)`` runs one recogniser pass for many.
- ``embed_source(source, embedder, limit=None, progress=True) -> Prototypes``: per identity, the normalised mean
  of its unit embeddings (the transform's prototype). Identities with no usable image are left out and counted.
- ``Prototypes(ids, embeddings, num_images, skipped)``; ``.save(path)`` writes ``prototypes.npz`` with ``ids``
  (unicode strings), ``embeddings`` (N x 512 float32 unit rows) and ``num_images`` (int32);
  ``load_prototypes(path)`` reads it back without pickle.
- ``max_similarity(embeddings, block=2048) -> (N,) float32``: each row's highest cosine similarity to any OTHER row,
  computed in row blocks x column blocks (never N x N in memory).
- ``select_least_similar(ids, embeddings, count, block=2048) -> Selection``: the ``count`` identities whose highest
  similarity to any other identity is lowest (the paper's filtered DigiFace set), most distinct first.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from facegen import registry
from facegen.api import Source
from facegen.errors import UsageError
from facegen.records import SourceImage, Skip

LOAD_THREADS = 4  # identities are read ahead by threads (file and zip reads release the GIL)


def open_source(name: str, path: str, options: dict | None = None) -> Source:
    if not name:
        raise UsageError("a source plugin name is required (see `facegen plugins`)")
    if not path:
        raise UsageError(f"source {name!r} needs a path")
    return registry.get_source(name)(path, **(options or {}))


def decode_rgb(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


class FaceEmbedder:
    """Unit ArcFace embeddings of source images with Arc2Face's recogniser (see the module docstring)."""

    def __init__(self, model_dir: str | None = None, detector: str = "scrfd", det_size: int = 640,
                 batch_size: int = 64, providers: list | None = None, arc2face_revision: str | None = None):
        from facegen.generators.arcface import ARC2FACE_REVISION, ArcFaceEmbedder, resolve_arcface

        if model_dir is not None and not os.path.isdir(model_dir):
            raise UsageError(f"model directory {model_dir} does not exist")
        self.model_dir = model_dir
        self.detector = detector
        self.det_size = det_size
        self.providers = providers
        self.recogniser_path = resolve_arcface(model_dir, revision=arc2face_revision or ARC2FACE_REVISION)
        self.recogniser = ArcFaceEmbedder(self.recogniser_path, providers=providers, batch_size=batch_size)
        self._aligner = None

    @property
    def aligner(self):
        """The face aligner, created on first need (112x112 sources never need one)."""
        if self._aligner is None:
            from facegen.generators.alignment import FaceAligner

            self._aligner = FaceAligner(detector=self.detector, model_dir=self.model_dir,
                                        det_size=(self.det_size, self.det_size), providers=self.providers)
        return self._aligner

    def embed_batch(self, image_lists: Sequence[Sequence[SourceImage]]
                    ) -> list[tuple[np.ndarray, list[str], list[Skip]]]:
        """For each list of images: (unit embeddings (K, 512), their refs, skips); one recogniser pass in all."""
        from facegen.generators.alignment import crop_for_recognition
        from facegen.generators.arcface import normalize

        results = []
        crops, slots = [], []
        for images in image_lists:
            rows: list[np.ndarray | None] = []
            refs: list[str] = []
            skips: list[Skip] = []
            for image in images:
                given = image.hints.get("embedding")
                if given is not None:
                    rows.append(np.asarray(given, dtype=np.float32).reshape(-1))
                    refs.append(image.ref)
                    continue
                try:
                    rgb = decode_rgb(image.data)
                except Exception as exc:  # PIL raises many exception types for broken files
                    skips.append(Skip(image.ref, "corrupt image", f"{type(exc).__name__}: {exc}"))
                    continue
                landmarks = image.hints.get("landmarks5")
                needs_aligner = rgb.shape[:2] != (112, 112) and landmarks is None
                crop = crop_for_recognition(rgb, landmarks, self.aligner if needs_aligner else None)
                if crop is None:
                    skips.append(Skip(image.ref, "no face detected"))
                    continue
                slots.append((len(results), len(rows)))
                crops.append(crop)
                rows.append(None)
                refs.append(image.ref)
            results.append((rows, refs, skips))
        if crops:
            embedded = self.recogniser.embed(np.stack(crops))
            for (i, j), vector in zip(slots, embedded):
                results[i][0][j] = vector
        out = []
        for rows, refs, skips in results:
            matrix = np.stack(rows) if rows else np.zeros((0, 512), np.float32)
            out.append((normalize(matrix), refs, skips))
        return out

    def embed_images(self, images: Sequence[SourceImage]) -> tuple[np.ndarray, list[str], list[Skip]]:
        return self.embed_batch([images])[0]


@dataclass
class Prototypes:
    ids: list[str]
    embeddings: np.ndarray  # (N, 512) float32, unit rows
    num_images: np.ndarray  # (N,) int32: images behind each prototype
    skipped: list[Skip] = field(default_factory=list)
    identities_without_images: list[str] = field(default_factory=list)

    def save(self, path: str | os.PathLike) -> None:
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, ids=np.array(self.ids, dtype=str), embeddings=self.embeddings.astype(np.float32),
                 num_images=self.num_images.astype(np.int32))
        os.replace(tmp, path)


def load_prototypes(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """``ids`` and ``embeddings`` of a prototypes.npz (no pickle: a file holding objects is refused)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            ids = [str(i) for i in data["ids"]]
            embeddings = np.asarray(data["embeddings"], dtype=np.float32)
    except FileNotFoundError:
        raise UsageError(f"prototypes file {path} does not exist (make it with `facegen embed`)") from None
    except (KeyError, ValueError, OSError) as exc:
        raise UsageError(f"{path} is not a prototypes file with 'ids' and 'embeddings' ({exc})") from None
    if embeddings.ndim != 2 or len(ids) != len(embeddings):
        raise UsageError(f"{path}: 'embeddings' must be N x D with one row per id "
                         f"(got {embeddings.shape} for {len(ids)} ids)")
    return ids, embeddings


def _load_identity(source: Source, identity_id: str):
    items = source.load(identity_id)
    return [i for i in items if isinstance(i, SourceImage)], [i for i in items if isinstance(i, Skip)]


def embed_source(source: Source, embedder: FaceEmbedder, limit: int | None = None, progress: bool = True,
                 identities_per_batch: int = 16) -> Prototypes:
    """Prototype of every identity of ``source`` (in the source's order)."""
    from tqdm.auto import tqdm

    from facegen.generators.arcface import normalize

    ids = list(source.identities())
    if limit is not None:
        ids = ids[:limit]
    kept_ids, vectors, counts, skipped, empty = [], [], [], [], []
    bar = tqdm(total=len(ids), unit="id", desc="embed", disable=not progress)
    with ThreadPoolExecutor(LOAD_THREADS) as pool:
        for start in range(0, len(ids), identities_per_batch):
            chunk = ids[start:start + identities_per_batch]
            loaded = list(pool.map(lambda i: _load_identity(source, i), chunk))
            for _, load_skips in loaded:
                skipped.extend(load_skips)
            results = embedder.embed_batch([images for images, _ in loaded])
            for identity_id, (unit, _refs, skips) in zip(chunk, results):
                skipped.extend(skips)
                usable = unit[np.linalg.norm(unit, axis=1) > 0]
                if len(usable) == 0:
                    empty.append(identity_id)
                    continue
                kept_ids.append(identity_id)
                vectors.append(normalize(usable.mean(axis=0)))
                counts.append(len(usable))
            bar.update(len(chunk))
    bar.close()
    embeddings = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, 512), np.float32)
    return Prototypes(kept_ids, embeddings, np.array(counts, dtype=np.int32), skipped, empty)


# --------------------------------------------------------------------------------------------------------------
# Selection of the most distinct identities
# --------------------------------------------------------------------------------------------------------------


def max_similarity(embeddings: np.ndarray, block: int = 2048) -> np.ndarray:
    """Each row's highest cosine similarity to any other row (rows are normalised here), blockwise.

    Similarity is symmetric, so only the tiles on and above the diagonal are computed: tile (r, c) updates the best
    of its rows and of its columns. Memory: one ``block x block`` float32 tile (16 MiB at 2048) besides the input;
    compute: N^2 / 2 * D multiply-adds in BLAS matrix products.
    """
    from facegen.generators.arcface import normalize

    unit = np.ascontiguousarray(normalize(embeddings))
    n = len(unit)
    best = np.full(n, -np.inf, dtype=np.float32)
    for r0 in range(0, n, block):
        rows = unit[r0:r0 + block]
        for c0 in range(r0, n, block):
            tile = rows @ unit[c0:c0 + block].T
            if c0 == r0:  # the diagonal tile holds each row's similarity to itself: exclude it
                np.fill_diagonal(tile, -np.inf)
            np.maximum(best[r0:r0 + block], tile.max(axis=1), out=best[r0:r0 + block])
            np.maximum(best[c0:c0 + block], tile.max(axis=0), out=best[c0:c0 + block])
    return best


@dataclass
class Selection:
    ids: list[str]  # chosen, most distinct first
    scores: np.ndarray  # their highest similarity to any other identity
    threshold: float  # the highest score kept
    total: int
    seconds: float


def select_least_similar(ids: Sequence[str], embeddings: np.ndarray, count: int, block: int = 2048) -> Selection:
    if count < 1:
        raise UsageError("--count must be at least 1")
    if len(ids) < 2:
        raise UsageError("selection needs at least two identities")
    if count > len(ids):
        raise UsageError(f"--count {count} is more than the {len(ids)} identities in the prototypes file")
    start = time.perf_counter()
    scores = max_similarity(embeddings, block=block)
    order = np.argsort(scores, kind="stable")[:count]  # ties keep the source order
    chosen = [ids[i] for i in order]
    return Selection(chosen, scores[order], float(scores[order[-1]]), len(ids), time.perf_counter() - start)


def write_ids(path: str | os.PathLike, selection: Selection, header: Iterable[str] = ()) -> None:
    """One id per line, most distinct first, after ``#`` comment lines (ignored by --identities-file)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for line in header:
            f.write(f"# {line}\n")
        for identity_id in selection.ids:
            f.write(f"{identity_id}\n")
    os.replace(tmp, path)
