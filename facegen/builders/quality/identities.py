"""Identity prototypes (`facegen embed`) and the selection of the most distinct identities (`facegen select-identities`).

API summary
-----------
- ``open_source(name, path, options) -> Source``: a source plugin through the registry.
- ``FaceEmbedder(model_dir=None, detector="scrfd", det_size=640, batch_size=64, providers=None,
  arc2face_revision=None, realign=False)``: Arc2Face's recogniser plus a face aligner created only when an image
  needs one, applying the arc2face transform's own rule for a source image
  (:func:`facegen.generators.embeddings.embed_source_images`: ``hints["embedding"]`` used as it is (DisCo), 112x112
  images embedded as they are (DigiFace; ``realign=True``: detected and aligned again first), ``hints["landmarks5"]``
  warped (SFHQ), anything else detected and aligned; an image it cannot use is skipped with its reason).
  ``.embed_sources(list of image lists)`` gives each list's raw embeddings in one recogniser pass;
  ``.embed_images(images) -> (unit embeddings (K, 512) float32, refs, skips)`` one list's, normalised.
- ``embed_source(source, embedder, limit=None, progress=True) -> Prototypes``: per identity, the transform's
  prototype (:func:`facegen.generators.arc2face.prototype` of the same embeddings, so equal to the last bit).
  Identities with no usable image are left out and counted.
- ``Prototypes(ids, embeddings, num_images, skipped)``; ``.save(path)`` writes ``prototypes.npz`` with ``ids``
  (unicode strings), ``embeddings`` (N x 512 float32 unit rows) and ``num_images`` (int32);
  ``load_prototypes(path)`` reads it back without pickle.
- ``max_similarity(embeddings, block=2048) -> (N,) float32``: each row's highest cosine similarity to any OTHER row,
  computed in row blocks x column blocks (never N x N in memory).
- ``select_least_similar(ids, embeddings, count, block=2048) -> Selection``: the ``count`` identities whose highest
  similarity to any other identity is lowest, most distinct first (``--method one-pass``, the default: the paper's
  "We sorted identities based on their cosine similarities with other identities and created a set of identities
  from this sorted list"). Both members of a near-duplicate pair rank low, so both are dropped.
- ``select_greedy(ids, embeddings, count, block=2048, neighbors=32) -> Selection``: ``--method greedy``: the
  identity most similar to another REMAINING identity is dropped, one at a time, until ``count`` remain; one
  member of each near-duplicate pair stays. ``nearest_neighbors(embeddings, k, block)`` is its blockwise pass.
- ``select_identities(ids, embeddings, count, method="one-pass", block=2048)``: either, by name.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facegen import registry
from facegen.api import Source
from facegen.builders.quality.pieces import ArraySpec, Piece, Ranks, load_arrays, run_pass
from facegen.errors import UsageError
from facegen.fileio import atomic_npz, atomic_write, sha256_file
from facegen.generators.embeddings import EMBEDDING_SIZE, SourceEmbeddings, normalize
from facegen.layout.records import dumps, json_safe
from facegen.messages import info, plural
from facegen.records import SourceImage, Skip

LOAD_THREADS = 4  # identities are read ahead by threads (file and zip reads release the GIL)


def open_source(name: str, path: str, options: dict | None = None) -> Source:
    if not name:
        raise UsageError("a source plugin name is required (see `facegen plugins`)")
    if not path:
        raise UsageError(f"source {name!r} needs a path")
    return registry.get_source(name)(path, **(options or {}))


class FaceEmbedder:
    """Source images embedded with Arc2Face's recogniser by the transform's own rule
    (:mod:`facegen.generators.embeddings`); see the module docstring."""

    def __init__(self, model_dir: str | None = None, detector: str = "scrfd", det_size: int = 640,
                 batch_size: int = 64, providers: list | None = None, arc2face_revision: str | None = None,
                 realign: bool = False):
        from facegen.generators.arcface import ARC2FACE_REVISION, ArcFaceEmbedder, resolve_arcface

        if model_dir is not None and not os.path.isdir(model_dir):
            raise UsageError(f"model directory {model_dir} does not exist")
        self.model_dir = model_dir
        self.detector = detector
        self.det_size = det_size
        self.providers = providers
        self.realign = realign  # detect and align 112x112 crops again instead of embedding them as they are
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

    def embed_sources(self, image_lists: Sequence[Sequence[SourceImage]]) -> list[SourceEmbeddings]:
        """For each list of images: the raw embeddings of the images used, their refs and skips (one recogniser
        pass in all)."""
        from facegen.generators.embeddings import embed_source_images

        return embed_source_images(image_lists, self.recogniser, lambda: self.aligner, realign=self.realign)

    def identity(self) -> dict:
        """What must match for embeddings made earlier to be reused: the recogniser's weights and the rule."""
        return {"model": "arcface.onnx", "sha256": sha256_file(self.recogniser_path), "detector": self.detector,
                "det_size": self.det_size, "realign": self.realign}

    def embed_images(self, images: Sequence[SourceImage]) -> tuple[np.ndarray, list[str], list[Skip]]:
        """(unit embeddings (K, 512) float32, their refs, skips) of one list of images."""
        sources = self.embed_sources([images])[0]
        return normalize(sources.embeddings), sources.refs, sources.skipped


@dataclass
class Prototypes:
    ids: list[str]
    embeddings: np.ndarray  # (N, 512) float32, unit rows
    num_images: np.ndarray  # (N,) int32: images behind each prototype
    skipped: list[Skip] = field(default_factory=list)
    identities_without_images: list[str] = field(default_factory=list)

    def save(self, path: str | os.PathLike) -> None:
        """The same prototypes give the same bytes (:func:`facegen.fileio.atomic_npz`)."""
        atomic_npz(path, {"ids": np.array(self.ids, dtype=str), "embeddings": self.embeddings.astype(np.float32),
                          "num_images": self.num_images.astype(np.int32)})


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


def _embed_batches(source: Source, embedder: FaceEmbedder, ids: list[str], per_batch: int, batches: Iterable[int],
                   bar) -> Iterator[tuple[int, Piece]]:
    """The piece of each batch of ``per_batch`` identities (``ids[b·P:(b+1)·P]``), in order: each identity's
    prototype (a zero row and 0 images when none of its images could be used) and its skips. One recogniser pass
    per batch, as one process has always cut them."""
    from facegen.generators.arc2face import prototype

    with ThreadPoolExecutor(LOAD_THREADS) as pool:
        for b in batches:
            chunk = ids[b * per_batch:(b + 1) * per_batch]
            loaded = list(pool.map(lambda i: _load_identity(source, i), chunk))
            results = embedder.embed_sources([images for images, _ in loaded])
            vectors = np.zeros((len(chunk), EMBEDDING_SIZE), np.float32)
            counts = np.zeros(len(chunk), np.int32)
            skips = []
            for k, ((_, load_skips), sources) in enumerate(zip(loaded, results)):
                skipped = [*load_skips, *sources.skipped]
                if sources.refs:
                    vector = prototype(sources.embeddings)  # the transform's prototype, to the last bit
                    if np.isfinite(vector).all():
                        vectors[k], counts[k] = vector, len(sources.refs)
                    else:  # a broken model's output
                        skipped.append(Skip(chunk[k], "embedding not finite"))
                skips.append([[x.ref, x.reason, x.detail] for x in skipped])
            bar.update(len(chunk))
            yield b, Piece(chunk, {"vectors": vectors, "num_images": counts}, {"skipped": skips})


def _join(pieces: list[Piece]) -> Prototypes:
    kept_ids, vectors, counts, skipped, empty = [], [], [], [], []
    for piece in pieces:
        for identity_id, vector, count, skips in zip(piece.keys, piece.arrays["vectors"], piece.arrays["num_images"],
                                                      piece.columns["skipped"]):
            skipped.extend(Skip(*x) for x in skips)
            if count == 0:
                empty.append(identity_id)
                continue
            kept_ids.append(identity_id)
            vectors.append(vector)
            counts.append(count)
    embeddings = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, EMBEDDING_SIZE), np.float32)
    return Prototypes(kept_ids, embeddings, np.array(counts, dtype=np.int32), skipped, empty)


SPECS = {"vectors": ArraySpec("float32", EMBEDDING_SIZE), "num_images": ArraySpec("int32")}
RECORD_BYTES_PER_IDENTITY = 4 << 20  # an identity's skips in a piece's record, at most (~10,000 of them)


def _check_skips(piece: Piece) -> Piece:
    if set(piece.columns) != {"skipped"}:
        raise ValueError(f"columns {sorted(piece.columns)}, expected skipped")
    for skips in piece.columns["skipped"]:
        if not isinstance(skips, list) or not all(
                isinstance(x, list) and len(x) == 3 and all(type(v) is str for v in x) for x in skips):
            raise ValueError("'skipped' holds something other than [ref, reason, detail] strings")
    return piece


def embed_source(source: Source, embedder: FaceEmbedder, limit: int | None = None, progress: bool = True,
                 identities_per_batch: int = 16, pieces: Path | None = None,
                 ranks: Ranks | None = None) -> Prototypes | None:
    """Prototype of every identity of ``source`` (in the source's order), in batches of ``identities_per_batch``
    identities cut at global positions.

    ``pieces``: a folder (:func:`facegen.layout.pieces_folder` of the output) where each batch is kept as it is
    done, so that a rerun resumes (:func:`facegen.builders.quality.pieces.run_pass`), on every process of the run
    (``ranks``); the main process gets the prototypes, the others None. Without it, everything stays in memory."""
    from tqdm.auto import tqdm

    ids = list(source.identities())
    if limit is not None:
        ids = ids[:limit]
    per_batch = identities_per_batch
    count = -(-len(ids) // per_batch)
    ranks = ranks or Ranks()
    mine = sum(len(ids[b * per_batch:(b + 1) * per_batch]) for b in range(ranks.index, count, ranks.count))
    bar = tqdm(total=mine, unit="id", desc=f"embed{ranks.describe()}", disable=not progress)
    with bar:
        if pieces is None:
            return _join([piece for _, piece in _embed_batches(source, embedder, ids, per_batch, range(count), bar)])
        signature = json_safe({"pass": "embed", "source": source.name, "source_path": source.path and os.path.abspath(
            source.path), "source_opts": source.opts, "recogniser": embedder.identity(),
            "identities_per_batch": per_batch, "identities": hashlib.sha256("\n".join(ids).encode()).hexdigest()})

        def load(path: Path, b: int) -> Piece:
            keys = ids[b * per_batch:(b + 1) * per_batch]
            return _check_skips(load_arrays(path, signature, b, keys, SPECS,
                                            len(dumps(keys)) + len(keys) * RECORD_BYTES_PER_IDENTITY))

        result = run_pass(pieces, signature, count,
                          lambda batches: _embed_batches(source, embedder, ids, per_batch, batches, bar), load, ranks,
                          reused=lambda b: bar.update(len(ids[b * per_batch:(b + 1) * per_batch])))
    if result is None:
        return None
    if result.reused:
        info(f"facegen embed: {result.reused} of {count} batches reused from an interrupted run, "
             f"{result.computed} embedded")
    return _join(result.pieces)


# --------------------------------------------------------------------------------------------------------------
# Selection of the most distinct identities
# --------------------------------------------------------------------------------------------------------------


def max_similarity(embeddings: np.ndarray, block: int = 2048) -> np.ndarray:
    """Each row's highest cosine similarity to any other row (rows are normalised here), blockwise.

    Similarity is symmetric, so only the tiles on and above the diagonal are computed: tile (r, c) updates the best
    of its rows and of its columns. Memory: one ``block x block`` float32 tile (16 MiB at 2048) besides the input;
    compute: N^2 / 2 * D multiply-adds in BLAS matrix products.
    """
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
    method: str = "one-pass"
    refreshed: int = 0  # greedy: neighbour lists recomputed during the drop loop


def _check_count(ids: Sequence[str], count: int) -> None:
    if count < 1:
        raise UsageError("--count must be at least 1")
    if len(ids) < 2:
        raise UsageError("selection needs at least two identities")
    if count > len(ids):
        raise UsageError(f"--count {count} is more than the {len(ids)} {plural('identity', len(ids))} in the "
                         "prototypes file")


def select_least_similar(ids: Sequence[str], embeddings: np.ndarray, count: int, block: int = 2048) -> Selection:
    _check_count(ids, count)
    start = time.perf_counter()
    scores = max_similarity(embeddings, block=block)
    order = np.argsort(scores, kind="stable")[:count]  # ties keep the source order
    chosen = [ids[i] for i in order]
    return Selection(chosen, scores[order], float(scores[order[-1]]), len(ids), time.perf_counter() - start)


class _TopK:
    """A running top-k (values and column indices, unordered) per row, merged tile by tile.

    A row's first tile goes through ``torch.topk``; later tiles only contribute the entries above the row's current
    k-th best (one comparison over the tile, then a sparse merge), which soon are a handful per row.
    """

    def __init__(self, n: int, k: int):
        self.k = k
        self.values = np.full((n, k), -np.inf, dtype=np.float32)
        self.indices = np.full((n, k), -1, dtype=np.int64)
        self.kth = np.full(n, -np.inf, dtype=np.float32)  # each row's current k-th best

    def add(self, row0: int, tile: np.ndarray, col0: int, axis: int = 1) -> None:
        """Offer a tile of similarities. ``axis=1``: ``tile[r, c]`` is row ``row0 + r`` to column ``col0 + c``;
        ``axis=0``: the tile is read transposed (its columns are the rows offered), without copying it."""
        import torch

        count = tile.shape[1 - axis]
        kth = self.kth[row0:row0 + count]
        if np.isneginf(kth).any():  # rows with fewer than k neighbours so far: a plain top-k of the tile
            values, top = torch.topk(torch.from_numpy(tile), min(self.k, tile.shape[axis]), dim=axis)
            values, top = (values.numpy(), top.numpy()) if axis == 1 else (values.numpy().T, top.numpy().T)
            self._merge(np.arange(count) + row0, values, top + col0)
            return
        tile = np.ascontiguousarray(tile)
        flat = np.flatnonzero(tile > (kth[:, None] if axis == 1 else kth[None, :]))  # 40x faster than nonzero
        if len(flat) == 0:
            return
        v = tile.reshape(-1)[flat]
        r, c = np.divmod(flat, tile.shape[1])
        if axis == 0:
            r, c = c, r
        order = np.lexsort((-v, r))  # by row, best first: only a row's first k candidates can enter
        r, c, v = r[order], c[order], v[order]
        rank = np.arange(len(r)) - np.searchsorted(r, r)
        keep = rank < self.k
        r, c, v, rank = r[keep], c[keep], v[keep], rank[keep]
        hit, r = np.unique(r, return_inverse=True)
        values = np.full((len(hit), self.k), -np.inf, dtype=np.float32)
        indices = np.full((len(hit), self.k), -1, dtype=np.int64)
        values[r, rank] = v
        indices[r, rank] = c + col0
        self._merge(hit + row0, values, indices)

    def _merge(self, rows: np.ndarray, values: np.ndarray, indices: np.ndarray) -> None:
        all_v = np.concatenate([self.values[rows], values], axis=1)
        all_i = np.concatenate([self.indices[rows], indices], axis=1)
        best = np.argpartition(-all_v, self.k - 1, axis=1)[:, :self.k]
        self.values[rows] = np.take_along_axis(all_v, best, 1)
        self.indices[rows] = np.take_along_axis(all_i, best, 1)
        self.kth[rows] = self.values[rows].min(axis=1)


def nearest_neighbors(embeddings: np.ndarray, k: int, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` most similar OTHER rows: (cosines (N, k) float32, indices (N, k) int64), best first.

    The symmetric tiling of :func:`max_similarity` (tile (r, c) serves its rows and its columns) with a running
    top-k per row instead of a running maximum. Memory: one tile plus the (N, k) results. Cosines are float32
    matrix products: the same pair may differ in its last bit between tiles (see :func:`select_greedy`).
    """
    unit = np.ascontiguousarray(normalize(embeddings))
    n = len(unit)
    k = min(k, n - 1)
    top = _TopK(n, k)
    for r0 in range(0, n, block):
        rows = unit[r0:r0 + block]
        for c0 in range(r0, n, block):
            tile = rows @ unit[c0:c0 + block].T
            if c0 == r0:  # no row is its own neighbour; the tile serves both directions at once
                np.fill_diagonal(tile, -np.inf)
                top.add(r0, tile, c0)
            else:
                top.add(r0, tile, c0)
                top.add(c0, tile, r0, axis=0)
    order = np.argsort(-top.values, axis=1, kind="stable")
    return np.take_along_axis(top.values, order, 1), np.take_along_axis(top.indices, order, 1)


def select_greedy(ids: Sequence[str], embeddings: np.ndarray, count: int, block: int = 2048,
                  neighbors: int = 32) -> Selection:
    """The ``count`` identities left after dropping, one at a time, the identity most similar to another REMAINING
    identity (its highest cosine recomputed after every drop). A near-duplicate pair loses one member, not both:
    once one is dropped, the other's highest similarity falls to its next neighbour. Equal similarities drop the
    identity later in the source order first. Kept ids come most distinct first, as in :func:`select_least_similar`.

    Exact, and fast on 110K identities: one blockwise pass lists each identity's ``neighbors`` nearest; the drop
    loop keeps a max-heap of upper bounds of each identity's current highest similarity (similarities only fall as
    identities are dropped) and makes an identity's value exact only when it reaches the top: the cosine to the
    first neighbour in its list not yet dropped, or, once all of them are gone, to the nearest in a fresh list
    among the remaining identities (one matrix-vector product). Cosines used in decisions are summed in float64
    and rounded to float32, so a pair has one value from either side (float32 tiles may differ in the last bit).
    """
    import heapq

    _check_count(ids, count)
    start = time.perf_counter()
    unit = np.ascontiguousarray(normalize(embeddings))
    n = len(unit)
    _, indices = nearest_neighbors(embeddings, neighbors, block=block)  # normalised there the same way
    lists: dict[int, np.ndarray] = {}  # fresh neighbour lists of identities whose first list ran out
    pointer = [0] * n
    dropped = np.zeros(n, dtype=bool)

    def cosine(i: int, j: int) -> float:
        return float(np.float32(np.dot(unit[i].astype(np.float64), unit[j].astype(np.float64))))

    first = exact_cosines(unit, np.arange(n), indices[:, 0])
    heap = [(-float(first[i]), -i) for i in range(n)]  # ties: the later identity pops (is dropped) first
    heapq.heapify(heap)
    remaining, refreshed = n, 0
    while remaining > count:
        key, neg_i = heapq.heappop(heap)
        i = -neg_i
        if dropped[i]:
            continue
        row = lists.get(i, indices[i])
        p = pointer[i]
        while p < len(row) and dropped[row[p]]:
            p += 1
        pointer[i] = p
        if p == len(row):  # every listed neighbour is gone: list the nearest remaining ones
            sims = unit @ unit[i]
            sims[dropped] = -np.inf
            sims[i] = -np.inf
            size = min(4 * neighbors, remaining - 1)
            fresh = np.argpartition(-sims, size - 1)[:size]
            lists[i] = fresh[np.lexsort((fresh, -exact_cosines(unit, np.full(size, i), fresh)))]
            pointer[i] = 0
            refreshed += 1
            heapq.heappush(heap, (-cosine(i, int(lists[i][0])), neg_i))
            continue
        current = cosine(i, int(row[p]))
        if current < -key:  # stale: its nearest neighbour was dropped since this entry was pushed
            heapq.heappush(heap, (-current, neg_i))
            continue
        dropped[i] = True  # an exact value on top of upper bounds: the most similar remaining identity
        remaining -= 1
    kept = np.flatnonzero(~dropped)
    scores = max_similarity(unit[kept], block=block)
    order = np.argsort(scores, kind="stable")
    return Selection([ids[i] for i in kept[order]], scores[order], float(scores.max()), n,
                     time.perf_counter() - start, method="greedy", refreshed=refreshed)


def exact_cosines(unit: np.ndarray, rows: np.ndarray, cols: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """cos(unit[rows[m]], unit[cols[m]]) for two index vectors, summed in float64 and rounded to float32."""
    out = np.empty(len(rows), dtype=np.float32)
    for start in range(0, len(rows), chunk):
        a = unit[rows[start:start + chunk]].astype(np.float64)
        b = unit[cols[start:start + chunk]].astype(np.float64)
        out[start:start + chunk] = np.einsum("md,md->m", a, b)
    return out


def select_identities(ids: Sequence[str], embeddings: np.ndarray, count: int, method: str = "one-pass",
                      block: int = 2048) -> Selection:
    """``method="one-pass"``: :func:`select_least_similar` (the paper's sorted list); ``"greedy"``:
    :func:`select_greedy` (one member of each near-duplicate pair stays)."""
    if method == "one-pass":
        return select_least_similar(ids, embeddings, count, block=block)
    if method == "greedy":
        return select_greedy(ids, embeddings, count, block=block)
    raise UsageError(f"unknown selection method {method!r} (one-pass or greedy)")


def write_ids(path: str | os.PathLike, selection: Selection, header: Iterable[str] = ()) -> None:
    """One id per line, most distinct first, after ``#`` comment lines (ignored by --identities-file)."""
    atomic_write(path, "".join([*(f"# {line}\n" for line in header),
                                *(f"{identity_id}\n" for identity_id in selection.ids)]).encode("utf-8"))
