"""`facegen report`: identity consistency, separability, near-duplicate identities, outliers and identity leakage.

Steps (each a function below):

1. Read the dataset (:class:`facegen.published.PublishedDataset`: tar headers and json members only).
2. Embed every sample with a face recogniser (:func:`embed_dataset`), in batches, with a samples/s progress bar;
   the unit embeddings are kept in ``.facegen/report_embeddings.npz`` and reused while the shards and the
   recogniser are the same (``facegen curate`` and a rerun with other thresholds embed nothing).
3. Analyse (:func:`analyse`): an identity's prototype is the normalised mean of its unit embeddings; a sample's
   consistency is its cosine to its identity's prototype; an identity's separability is its prototype's highest
   cosine to another identity's prototype. Near-duplicate identities: prototype cosine >= ``dedup``. Outliers:
   samples whose consistency is < ``min_similarity``. Image modes and sizes are counted from the decoded images.
4. ``--against``: the prototypes of another dataset (a facegen folder, a Hub id, or a plain identity folder read
   with the `folder` source: :func:`against_dataset`); identities of this one whose prototype reaches ``dedup``
   with any of them are listed (identity leakage, e.g. evaluation identities in a training set). An insightface
   verification file (``lfw.bin``) is compared image by image instead (:mod:`facegen.builders.quality.leakage`).
5. Write ``.facegen/report.json``, the plots ``report/*.png`` and re-render the card (its Quality section), holding
   the folder's lock. Only the report's own files are written: the plots (and, in a folder of their own, report.json
   and the cached embeddings) are recorded as facegen's (``.facegen/own_files.json``), and a file of the user's under
   one of their names stops the report before anything is computed.

Where the report goes: into the dataset's folder (above) for a local dataset; for a Hub dataset (``ORG/NAME`` or
``hf://datasets/ORG/NAME``, downloaded into the Hub cache, which is never written to) into ``report_dir``
(``--out DIR``, required then): ``DIR/report.json``, ``DIR/report_embeddings.npz`` and ``DIR/report/*.png``. A
local dataset may be given ``--out DIR`` too; its card is then left as it is.

Recognisers and their default thresholds (:data:`DEFAULTS`):

- ``dlib`` (default; works offline: real weights from PyPI): dlib descriptors are not centred, so every cosine is
  high. Measured on real faces (the test photos: insightface's t1.jpg and Tom_Hanks_54745.png, scikit-image's
  astronaut, aligned by dlib, augmented by flips, small crops and colour jitter): prototypes of 8 different people
  reach 0.80-0.93 with each other, prototypes of the same person made of different augmentations 0.999; a
  sample's cosine to its own identity's prototype is 0.93-0.999 (lowest: the small, blurred astronaut face), and
  an image of another person planted among 6 images of one identity has 0.92. Defaults: ``dedup`` 0.95,
  ``min_similarity`` 0.925. Faces that vary more (pose, age, lighting) reach lower cosines: check the
  consistency plot before curating with the default.
- ``arcface`` (antelopev2's recogniser as Arc2Face uses it): cosines of different people centre near 0. Defaults
  ``dedup`` 0.6 and ``min_similarity`` 0.3, from the usual ArcFace verification operating points (not measured
  here: the real weights are not reachable offline).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import io
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import facegen
from facegen.builders.engine.images import MAX_PIXELS
from facegen.builders.engine.lock import output_lock
from facegen.builders.quality.pieces import (
    ArraySpec,
    OtherPass,
    Piece,
    Ranks,
    load_arrays,
    remove_pieces,
    run_pass,
    save_arrays,
    wait_for,
)
from facegen.errors import REPORT_EXTRA_INSTALL, UsageError
from facegen.fileio import sha256_file
from facegen.generators.embeddings import normalize
from facegen.layout import (
    CONSISTENCY_PLOT,
    FACEGEN_DIR,
    REPORT_EMBEDDINGS,
    REPORT_JSON,
    SEPARABILITY_PLOT,
    WORST_IDENTITIES_PLOT,
    OutputFolder,
    pieces_folder,
)
from facegen.layout.records import (
    QualityReport,
    ReportSettings,
    dumps,
    json_safe,
    record_files,
    refuse_foreign_files,
    remove_own_file,
    write_own_files,
)
from facegen.messages import count, info, warn
from facegen.published import PublishedDataset

DEFAULTS = {
    "dlib": {"dedup": 0.95, "min_similarity": 0.925},
    "arcface": {"dedup": 0.6, "min_similarity": 0.3},
}
RECOGNIZERS = tuple(DEFAULTS)
WORST_IDENTITIES = 6
WORST_IMAGES = 8
LISTED = 1000  # skipped samples listed by name in report.json (all are counted)


# ----------------------------------------------------------------------------------------------- recognisers


class Recognizer:
    """A face recogniser for the report, in two steps: :meth:`crop` finds and aligns the face of one decoded RGB
    image (on the loading threads, CPU), :meth:`embed_crops` embeds a batch of crops in one network call (on the
    GPU when there is one: dlib built with CUDA, onnxruntime's CUDA provider for arcface)."""

    name = ""
    model = ""  # what the card names (never a local path)
    dim = 0  # embedding size

    def crop(self, image_rgb: np.ndarray) -> np.ndarray | None:
        """The aligned face to embed, or None: no face."""
        raise NotImplementedError

    def embed_crops(self, crops: list[np.ndarray]) -> np.ndarray:
        """(len(crops), dim) float32 unit rows."""
        raise NotImplementedError

    def embed(self, images_rgb: list[np.ndarray]) -> list[np.ndarray | None]:
        """Unit embeddings of decoded images (None: no face)."""
        crops = [self.crop(image) for image in images_rgb]
        vectors = iter(self.embed_crops([c for c in crops if c is not None]))
        return [None if c is None else next(vectors) for c in crops]

    def identity(self) -> dict:
        """What must match for cached embeddings to be reused."""
        return {"name": self.name, "model": self.model}


class DlibReportRecognizer(Recognizer):
    """dlib's recogniser: the PyPI build (dlib-bin) runs on the CPU; a dlib built with CUDA batches the network on
    this process's GPU (``local``: its index on the machine)."""

    name = "dlib"

    def __init__(self, local: int = 0):
        from facegen.generators.dlib_recognizer import EMBEDDING_SIZE, DlibRecognizer

        self._dlib = DlibRecognizer()
        self.model = DlibRecognizer.model_id
        self.dim = EMBEDDING_SIZE
        import dlib

        if getattr(dlib, "DLIB_USE_CUDA", False) and dlib.cuda.get_num_devices() > 1:
            dlib.cuda.set_device(local % dlib.cuda.get_num_devices())

    def crop(self, image_rgb):
        return self._dlib.chip(image_rgb)

    def embed_crops(self, crops):
        return normalize(self._dlib.embed_chips(crops))


class ArcFaceReportRecognizer(Recognizer):
    """Arc2Face's recogniser (``FaceEmbedder``): 112x112 crops as they are, other images detected and aligned;
    onnxruntime's CUDA provider (``onnxruntime-gpu``) on this process's GPU when it has one, else the CPU."""

    name = "arcface"

    def __init__(self, model_dir: str | None, detector: str = "scrfd", det_size: int = 640, batch_size: int = 64,
                 gpu: int | None = None):
        from facegen.builders.quality.identities import FaceEmbedder
        from facegen.generators.arcface import EMBEDDING_SIZE, default_providers

        self._embedder = FaceEmbedder(model_dir, detector=detector, det_size=det_size, batch_size=batch_size,
                                      providers=default_providers(device_id=gpu))
        self.model = f"arcface.onnx ({'--model-dir' if model_dir else 'Hub'}), detector {detector}"
        self.dim = EMBEDDING_SIZE
        self._weights = sha256_file(self._embedder.recogniser_path)  # the weights, not where they lie
        self._aligning = threading.Lock()  # one detection at a time (dlib's detector is not documented thread-safe)

    def identity(self):
        return {"name": self.name, "model": "arcface.onnx", "sha256": self._weights,
                "detector": self._embedder.detector}

    def crop(self, image_rgb):
        from facegen.generators.alignment import crop_for_recognition

        if image_rgb.shape[:2] == (112, 112):
            return crop_for_recognition(image_rgb, None, None)
        with self._aligning:
            return crop_for_recognition(image_rgb, None, self._embedder.aligner)

    def embed_crops(self, crops):
        if not crops:
            return np.zeros((0, self.dim), np.float32)
        return normalize(self._embedder.recogniser.embed(np.stack(crops)))


def make_recognizer(name: str, model_dir: str | None = None, detector: str = "scrfd",
                    batch_size: int = 64, ranks: Ranks | None = None) -> Recognizer:
    """The recogniser ``name``, on this process's GPU (``ranks``: its index on its machine) when it has one."""
    ranks = ranks or Ranks()
    if name == "dlib":
        return DlibReportRecognizer(ranks.local)
    if name == "arcface":
        return ArcFaceReportRecognizer(model_dir, detector=detector, batch_size=batch_size,
                                       gpu=ranks.gpu() if ranks.count > 1 else None)
    raise UsageError(f"unknown recognizer {name!r} (one of: {', '.join(RECOGNIZERS)})")


# ----------------------------------------------------------------------------------------------- embedding

# Memory: a sample is read, decoded and cropped on a loading thread, and only its crop is kept for the batch, so a
# batch holds crops (dlib's 150x150 chips, ArcFace's 112x112), never its decoded images. The images in flight on
# the loading threads are bounded together by DECODE_BUDGET: each takes its encoded bytes plus what decoding may
# allocate (BYTES_PER_PIXEL per pixel, from the size its header declares) before it is read; one image larger than
# the budget runs alone. An image over the build's pixel limit (MAX_PIXELS), or whose member is over
# MAX_IMAGE_BYTES, is a counted skip, never decoded. Two threads: each keeps the memory of the largest image it
# decoded (glibc keeps a thread's freed blocks in its arena), so more threads mean more memory for large images.
LOAD_THREADS = 2
DECODE_BUDGET = 256 << 20
BYTES_PER_PIXEL = 13  # up to 4 (RGBA, I, F) decoded, 3 for the RGB copy, 6 while numpy takes it (PIL's tobytes)
MAX_IMAGE_BYTES = 4 * MAX_PIXELS + (1 << 20)  # a PNG of MAX_PIXELS RGBA pixels stored without compression
HEADER_BYTES = 64 << 10  # read first to learn an image's size (a JPEG's after its EXIF and other APP segments)
MAX_REASON = 200  # characters of a skip's reason kept
MODE_AND_SIZE = 64  # JSON bytes of a sample's mode and "WxH", at most
ROW_RECORD = 4 * MAX_REASON + 2 * MODE_AND_SIZE  # JSON bytes a sample's values may take in a record, besides its key


@dataclass
class Embeddings:
    """One row per sample of the dataset (in ``dataset.samples`` order)."""

    keys: list[str]
    vectors: np.ndarray  # (N, D) float32 unit rows; zero rows where ``reasons`` is not empty
    reasons: list[str]  # "" = embedded, else why not ("no face detected", "corrupt image")
    modes: list[str]
    sizes: list[str]  # "WxH"
    seconds: float = 0.0

    @property
    def ok(self) -> np.ndarray:
        return np.array([not r for r in self.reasons], dtype=bool)


class DecodeBudget:
    """Bytes of images in flight over the loading threads: :meth:`hold` waits until ``size`` more fit under the
    limit (or nothing else is held: one image larger than the limit runs alone)."""

    def __init__(self, limit: int = DECODE_BUDGET):
        self.limit, self.used = limit, 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, size: int):
        with self._changed:
            self._changed.wait_for(lambda: self.used == 0 or self.used + size <= self.limit)
            self.used += size
        try:
            yield
        finally:
            with self._changed:
                self.used -= size
                self._changed.notify_all()


def _header(head: bytes) -> tuple[int, int] | None:
    """(width, height) an image's first bytes declare, or None when they do not say."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(head)) as image:
            return image.width, image.height
    except Exception:  # cut short before the size (a JPEG with large APP segments), or not an image
        return None


def _decode(data: bytes) -> tuple[np.ndarray | None, str, str, str]:
    """(RGB array or None, mode, size, reason); an image over the build's pixel limit is not decoded."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            mode, size = image.mode, f"{image.width}x{image.height}"
            if image.width * image.height > MAX_PIXELS:
                return None, "", "", "image too large"
            rgb = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except Image.DecompressionBombError:  # PIL's own limit, above the build's
        return None, "", "", "image too large"
    except Exception as exc:  # PIL raises many types for broken files
        return None, "", "", f"corrupt image ({type(exc).__name__})"
    return rgb, mode[:16], size, ""


@dataclass
class Loaded:
    """A sample as the batch keeps it: its crop (None: not embedded, see ``reason``), mode and size."""

    crop: np.ndarray | None
    mode: str = ""
    size: str = ""
    reason: str = ""


def _load(dataset: PublishedDataset, sample, recognizer: Recognizer, budget: DecodeBudget) -> Loaded:
    """Read, decode and crop one sample within the budget (see above)."""
    try:
        size = dataset.members(sample).get(dataset.image_column, (0, 0))[1]
        if size > MAX_IMAGE_BYTES:
            return Loaded(None, reason="image too large")
        declared = _header(dataset.read(sample, dataset.image_column, length=HEADER_BYTES))
        if declared is not None and declared[0] * declared[1] > MAX_PIXELS:
            return Loaded(None, reason="image too large")
        pixels = declared[0] * declared[1] if declared is not None else MAX_PIXELS
        with budget.hold(size + BYTES_PER_PIXEL * pixels):
            rgb, mode, shape, reason = _decode(dataset.image(sample))
            if rgb is None:
                return Loaded(None, reason=reason)
            crop = recognizer.crop(rgb)
    except OSError as exc:
        return Loaded(None, reason=f"unreadable member ({exc})"[:MAX_REASON])
    return Loaded(crop, mode, shape, "" if crop is not None else "no face detected")


def _read_order(dataset: PublishedDataset) -> list[int]:
    """The samples in shard order (sequential reads); batches are cut in this order."""
    samples = dataset.samples
    return sorted(range(len(samples)), key=lambda i: (samples[i].shard, samples[i].position))


def _embed_batches(dataset: PublishedDataset, recognizer: Recognizer, order: list[int], batch_size: int,
                   batches: Iterable[int], bar) -> Iterator[tuple[int, Piece]]:
    """The piece of each batch, in order: batch ``b`` is ``order[b·B:(b+1)·B]``. The next batch is read and
    cropped on the loading threads while this one is embedded."""
    samples = dataset.samples
    budget = DecodeBudget()

    def finish(b: int, futures) -> tuple[int, Piece]:
        loaded = [f.result() for f in futures]
        vectors = np.zeros((len(loaded), recognizer.dim), np.float32)
        found = [k for k, item in enumerate(loaded) if item.crop is not None]
        if found:
            vectors[found] = recognizer.embed_crops([loaded[k].crop for k in found])
        for k in np.flatnonzero(~np.isfinite(vectors).all(axis=1)):  # a broken model's output is no embedding
            vectors[k] = 0.0
            loaded[k].reason = "embedding not finite"
        bar.update(len(loaded))
        rows = order[b * batch_size:(b + 1) * batch_size]
        return b, Piece([samples[i].key for i in rows], {"vectors": vectors},
                        {"reasons": [x.reason for x in loaded], "modes": [x.mode for x in loaded],
                         "sizes": [x.size for x in loaded]})

    with ThreadPoolExecutor(LOAD_THREADS) as pool:
        ahead = None
        for b in batches:
            futures = [pool.submit(_load, dataset, samples[i], recognizer, budget)
                       for i in order[b * batch_size:(b + 1) * batch_size]]
            if ahead is not None:
                yield finish(*ahead)
            ahead = (b, futures)
        if ahead is not None:
            yield finish(*ahead)


def _join(dataset: PublishedDataset, order: list[int], batch_size: int, pieces: list[Piece], dim: int,
          seconds: float) -> Embeddings:
    n = len(dataset.samples)
    vectors = np.zeros((n, dim), np.float32)
    reasons, modes, sizes = [""] * n, [""] * n, [""] * n
    for b, piece in enumerate(pieces):
        rows = order[b * batch_size:(b + 1) * batch_size]
        vectors[rows] = piece.arrays["vectors"]
        for i, reason, mode, size in zip(rows, piece.columns["reasons"], piece.columns["modes"],
                                         piece.columns["sizes"]):
            reasons[i], modes[i], sizes[i] = reason, mode, size
    return Embeddings([s.key for s in dataset.samples], vectors, reasons, modes, sizes, seconds)


def _bar(recognizer: Recognizer, total: int, progress: bool, ranks: Ranks | None = None):
    from tqdm.auto import tqdm

    where = ranks.describe() if ranks is not None else ""
    return tqdm(total=total, unit="sample", desc=f"report ({recognizer.name}){where}", disable=not progress,
                dynamic_ncols=True)


def embed_dataset(dataset: PublishedDataset, recognizer: Recognizer, batch_size: int = 64,
                  progress: bool = True) -> Embeddings:
    """Embed every sample in this process, nothing kept on disk (``--against``); the bar shows samples/s."""
    order = _read_order(dataset)
    started = time.perf_counter()
    n_batches = -(-len(order) // batch_size)
    with _bar(recognizer, len(order), progress) as bar:
        pieces = [piece for _, piece in _embed_batches(dataset, recognizer, order, batch_size, range(n_batches), bar)]
    return _join(dataset, order, batch_size, pieces, recognizer.dim, time.perf_counter() - started)


def _specs(dim: int) -> dict[str, ArraySpec]:
    return {"vectors": ArraySpec("float32", dim)}


def _check_columns(piece: Piece) -> Piece:
    """A report's columns: reasons, modes and sizes, short strings."""
    if set(piece.columns) != {"reasons", "modes", "sizes"}:
        raise ValueError(f"columns {sorted(piece.columns)}, expected reasons, modes, sizes")
    for name, values in piece.columns.items():
        if not all(type(v) is str and len(v) <= MAX_REASON for v in values):
            raise ValueError(f"column {name!r} holds something other than short strings")
    return piece


def _record_bytes(keys: list[str]) -> int:
    return len(dumps(keys)) + ROW_RECORD * len(keys) + (64 << 10)


def _save_embeddings(path: Path, embeddings: Embeddings, identity: dict, fingerprint: str) -> None:
    piece = Piece(embeddings.keys, {"vectors": embeddings.vectors},
                  {"reasons": embeddings.reasons, "modes": embeddings.modes, "sizes": embeddings.sizes})
    save_arrays(path, _cache_signature(identity, fingerprint), -1, piece)


def _cache_signature(identity: dict, fingerprint: str) -> dict:
    return json_safe({"recognizer": identity, "fingerprint": fingerprint})


def _load_embeddings(path: Path, identity: dict, fingerprint: str, keys: list[str], dim: int) -> Embeddings | None:
    """Cached embeddings when the shards and the recogniser are the same; else None. The file's declared sizes,
    dtype and shape are checked before its arrays are read (:func:`facegen.builders.quality.pieces.load_arrays`);
    a damaged one (NaN or infinite values, a wrong shape, sizes past what the dataset's samples can take) is said
    in one line and computed again."""
    if not path.is_file():
        return None
    try:
        piece = _check_columns(load_arrays(path, _cache_signature(identity, fingerprint), -1, keys, _specs(dim),
                                           _record_bytes(keys)))
    except OtherPass:
        return None
    except ValueError as exc:
        warn(f"facegen: cached embeddings {path} not used ({exc}); embedding again")
        return None
    c = piece.columns
    return Embeddings(piece.keys, piece.arrays["vectors"], c["reasons"], c["modes"], c["sizes"])


def cached_embeddings(dataset: PublishedDataset, recognizer: Recognizer, paths: list[Path]) -> Embeddings | None:
    """The first of ``paths`` that holds valid cached embeddings of ``dataset`` (read only), or None."""
    fingerprint, keys = dataset.fingerprint(), [s.key for s in dataset.samples]
    for path in paths:
        cached = _load_embeddings(path, recognizer.identity(), fingerprint, keys, recognizer.dim)
        if cached is not None:
            return cached
    return None


def save_embeddings(place: ReportPlace, dataset: PublishedDataset, recognizer: Recognizer,
                    embeddings: Embeddings) -> None:
    """Cache ``embeddings`` where ``place`` keeps them (recorded as facegen's in a report folder of its own)."""
    place.folder.mkdir(parents=True, exist_ok=True)
    _save_embeddings(place.embeddings, embeddings, recognizer.identity(), dataset.fingerprint())
    place.record_embeddings()


def dataset_embeddings(dataset: PublishedDataset, recognizer: Recognizer, batch_size: int = 64,
                       progress: bool = True, path: Path | None = None,
                       ranks: Ranks | None = None) -> tuple[Embeddings | None, bool]:
    """(embeddings, reused), on every process of the run (``ranks``): from the cache (``path``, default
    ``.facegen/report_embeddings.npz`` of the dataset) when valid, else computed in pieces (:func:`run_pass`; a
    rerun after an interruption reuses the pieces) and cached. The main process gets the embeddings, the others
    None."""
    ranks = ranks or Ranks()
    path = path or OutputFolder(dataset.root).report_embeddings
    fingerprint = dataset.fingerprint()
    keys = [s.key for s in dataset.samples]
    identity = recognizer.identity()
    cached = _load_embeddings(path, identity, fingerprint, keys, recognizer.dim) if ranks.main else None
    if ranks.share(cached is not None):
        return cached, True
    order = _read_order(dataset)
    n_batches = -(-len(order) // batch_size)
    signature = json_safe({"pass": "report", "recognizer": identity, "fingerprint": fingerprint,
                           "batch_size": batch_size, "samples": len(keys)})
    folder = pieces_folder(path)

    def load(piece: Path, b: int) -> Piece:
        batch_keys = [keys[i] for i in order[b * batch_size:(b + 1) * batch_size]]
        return _check_columns(load_arrays(piece, signature, b, batch_keys, _specs(recognizer.dim),
                                          _record_bytes(batch_keys)))

    started = time.perf_counter()
    mine = sum(len(order[b * batch_size:(b + 1) * batch_size]) for b in range(ranks.index, n_batches, ranks.count))
    with _bar(recognizer, mine, progress, ranks) as bar:
        result = run_pass(folder, signature, n_batches,
                          lambda batches: _embed_batches(dataset, recognizer, order, batch_size, batches, bar),
                          load, ranks, reused=lambda b: bar.update(len(order[b * batch_size:(b + 1) * batch_size])))
    if result is None:
        return None, False
    if result.reused:
        info(f"facegen report: {result.reused} of {n_batches} batches reused from an interrupted run, "
             f"{result.computed} embedded")
    embeddings = _join(dataset, order, batch_size, result.pieces, recognizer.dim, time.perf_counter() - started)
    _save_embeddings(path, embeddings, identity, fingerprint)
    remove_pieces(folder)
    return embeddings, False


# ----------------------------------------------------------------------------------------------- analysis


def nearest_other(prototypes: np.ndarray, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Each row's highest cosine to another row and that row's index, blockwise (never N x N in memory)."""
    n = len(prototypes)
    best = np.full(n, -np.inf, np.float32)
    where = np.full(n, -1, np.int64)
    for r0 in range(0, n, block):
        tile = prototypes[r0:r0 + block] @ prototypes.T
        rows = np.arange(len(tile))
        tile[rows, r0 + rows] = -np.inf  # not itself
        where[r0:r0 + block] = tile.argmax(axis=1)
        best[r0:r0 + block] = tile[rows, where[r0:r0 + block]]
    return best, where


def pairs_at_least(prototypes: np.ndarray, threshold: float, block: int = 2048) -> list[tuple[int, int, float]]:
    """Index pairs (i < j) whose cosine is >= threshold, highest first."""
    pairs = []
    n = len(prototypes)
    for r0 in range(0, n, block):
        tile = prototypes[r0:r0 + block] @ prototypes[r0:].T
        rows, cols = np.nonzero(tile >= threshold)
        for r, c in zip(rows, cols):
            i, j = r0 + int(r), r0 + int(c)
            if j > i:
                pairs.append((i, j, float(tile[r, c])))
    pairs.sort(key=lambda p: (-p[2], p[0], p[1]))
    return pairs


def cross_matches(prototypes: np.ndarray, others: np.ndarray, threshold: float,
                  block: int = 2048) -> list[tuple[int, int, float]]:
    """(row, best other row, cosine) for the rows whose best cosine to ``others`` is >= threshold."""
    found = []
    for r0 in range(0, len(prototypes), block):
        tile = prototypes[r0:r0 + block] @ others.T
        best = tile.argmax(axis=1)
        for r, j in enumerate(best):
            if tile[r, j] >= threshold:
                found.append((r0 + r, int(j), float(tile[r, j])))
    found.sort(key=lambda m: (-m[2], m[0]))
    return found


@dataclass
class Analysis:
    ids: list[str]  # identities with at least one embedded sample, in label order
    prototypes: np.ndarray  # (I, D) unit rows
    cosine: np.ndarray  # (N,) each sample's cosine to its identity's prototype (nan when not embedded)
    images: dict[str, int]  # identity -> samples in the dataset
    embedded: dict[str, int]  # identity -> embedded samples
    separability: np.ndarray  # (I,)
    nearest: np.ndarray  # (I,) index into ids


def identity_prototypes(dataset: PublishedDataset, embeddings: Embeddings) -> Analysis:
    ok = embeddings.ok
    index_of = {identity: i for i, identity in enumerate(dataset.identities)}
    rows = np.array([index_of[s.identity] for s in dataset.samples], dtype=np.int64)
    dim = embeddings.vectors.shape[1]
    sums = np.zeros((len(dataset.identities), dim), np.float64)
    np.add.at(sums, rows[ok], embeddings.vectors[ok])
    counts = np.bincount(rows[ok], minlength=len(dataset.identities))
    kept = np.nonzero(counts > 0)[0]
    prototypes = normalize(sums[kept]) if len(kept) else np.zeros((0, dim), np.float32)
    full = np.zeros((len(dataset.identities), dim), np.float32)
    full[kept] = prototypes
    cosine = np.full(len(dataset.samples), np.nan, np.float32)
    cosine[ok] = np.einsum("ij,ij->i", embeddings.vectors[ok], full[rows[ok]])
    separability, nearest = nearest_other(prototypes) if len(kept) > 1 else (
        np.full(len(kept), np.nan, np.float32), np.full(len(kept), -1))
    ids = [dataset.identities[i] for i in kept]
    return Analysis(ids, prototypes, cosine,
                    {identity: len(samples) for identity, samples in dataset.by_identity.items()},
                    {dataset.identities[i]: int(counts[i]) for i in range(len(dataset.identities))},
                    separability, nearest)


def _figures(values: np.ndarray) -> dict:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return {}
    return {"mean": float(values.mean()), "median": float(np.median(values)), "min": float(values.min()),
            "p05": float(np.percentile(values, 5)), "p95": float(np.percentile(values, 95)),
            "max": float(values.max()), "count": int(len(values))}


def analyse(dataset: PublishedDataset, embeddings: Embeddings, dedup: float,
            min_similarity: float) -> tuple[dict, Analysis]:
    """The report's fields about the dataset (all but the settings, the plots and --against), and the analysis
    behind them."""
    a = identity_prototypes(dataset, embeddings)
    by_id = {identity: i for i, identity in enumerate(a.ids)}
    near = [[a.ids[i], a.ids[j], round(c, 6)] for i, j, c in pairs_at_least(a.prototypes, dedup)]
    outliers, per_identity = [], []
    sample_index = {id(s): k for k, s in enumerate(dataset.samples)}
    for identity, samples in dataset.by_identity.items():
        cos = np.array([a.cosine[sample_index[id(s)]] for s in samples], np.float32)
        embedded = np.isfinite(cos)
        row = {"identity": identity, "cls": samples[0].cls, "images": len(samples),
               "embedded": int(embedded.sum())}
        if identity in by_id:
            k = by_id[identity]
            row.update(consistency_mean=round(float(cos[embedded].mean()), 6),
                       consistency_min=round(float(cos[embedded].min()), 6))
            if len(a.ids) > 1:
                row.update(separability=round(float(a.separability[k]), 6), nearest=a.ids[int(a.nearest[k])])
        per_identity.append(row)
        for sample, value in zip(samples, cos):
            if np.isfinite(value) and value < min_similarity:
                outliers.append({"identity": identity, "key": sample.key,
                                 "source_ref": dataset.meta(sample).get("source_ref", ""),
                                 "cosine": round(float(value), 6)})
    outliers.sort(key=lambda o: o["cosine"])
    skipped = [{"identity": s.identity, "key": s.key, "reason": r}
               for s, r in zip(dataset.samples, embeddings.reasons) if r]
    consistency_by_identity = np.array([r["consistency_mean"] for r in per_identity if "consistency_mean" in r])
    return {
        "dataset": {"name": dataset.name, "identities": len(dataset.identities), "samples": len(dataset.samples),
                    "embedded": int(embeddings.ok.sum()), "shards": len(dataset.shards),
                    "unreadable": dict(dataset.skipped)},
        "summary": {
            "sample_consistency": _figures(a.cosine),
            "identity_consistency": _figures(consistency_by_identity),
            "separability": _figures(a.separability),
            "near_duplicate_pairs": len(near),
            "identities_in_near_duplicate_pairs": len({x for pair in near for x in pair[:2]}),
            "outliers": len(outliers),
            "identities_without_a_face": sum(1 for r in per_identity if r["embedded"] == 0),
        },
        "image_modes": dict(Counter(m for m in embeddings.modes if m).most_common()),
        "image_sizes": dict(Counter(s for s in embeddings.sizes if s).most_common()),
        "skipped": dict(Counter(s["reason"] for s in skipped).most_common()),
        "skipped_samples": skipped[:LISTED],
        "near_duplicate_identities": near,
        "outliers": outliers,
        "identities": per_identity,
    }, a


# ----------------------------------------------------------------------------------------------- plots


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError(f"the report's plots need matplotlib ({REPORT_EXTRA_INSTALL})") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(out: Path, dataset: PublishedDataset, a: Analysis, identities: list[dict],
                settings: ReportSettings) -> list[str]:
    """report/consistency.png, report/separability.png, report/worst-identities.png (each recorded as facegen's
    file of ``out``; a plot of an earlier report that this one has not is removed); their relative paths."""
    plt = _pyplot()
    recognizer = settings.recognizer
    plots: dict[str, bytes] = {}

    def histogram(values, threshold, label, title, name):
        figure, axes = plt.subplots(figsize=(6, 3.2))
        values = values[np.isfinite(values)]
        span = None  # numpy's own range, unless the values are (all but) one: it cannot cut an ulp into bins
        if values.size and float(values.max() - values.min()) < 1e-6:  # e.g. one image per identity: all ~1.0
            span = (float(values.min()) - 0.01, float(values.max()) + 0.01)
        axes.hist(values, bins=min(60, max(10, len(values) // 4)), range=span, color="#4c72b0")
        axes.axvline(threshold, color="#c44e52", linestyle="--", label=label)
        axes.set_xlabel(f"cosine similarity ({recognizer})")
        axes.set_ylabel("count")
        axes.set_title(title)
        axes.legend(loc="upper left")
        plots[name] = _png(figure)
        plt.close(figure)

    histogram(a.cosine, settings.min_similarity, f"outlier below {settings.min_similarity}",
              "Consistency: each sample's cosine to its identity's prototype", CONSISTENCY_PLOT)
    if len(a.ids) > 1:
        histogram(a.separability, settings.dedup, f"near-duplicate from {settings.dedup}",
                  "Separability: each identity's highest cosine to another", SEPARABILITY_PLOT)
    worst = _worst_identities(dataset, a, identities, settings.min_similarity, plt)
    if worst is not None:
        plots[WORST_IDENTITIES_PLOT] = worst
    write_own_files(out, plots, "the report's plots")
    for name in PLOTS:
        if name not in plots:
            remove_own_file(out, name)
    return list(plots)


def _worst_identities(dataset: PublishedDataset, a: Analysis, identities: list[dict], minimum: float,
                      plt) -> bytes | None:
    """A grid: the identities with the lowest consistency (rows), some of their images with their cosines."""
    from PIL import Image

    rows = [r for r in identities if "consistency_min" in r and r["embedded"] > 1]
    rows.sort(key=lambda r: (r["consistency_min"], r["cls"]))
    rows = rows[:WORST_IDENTITIES]
    if not rows:
        return None
    index = {id(s): k for k, s in enumerate(dataset.samples)}
    figure, axes = plt.subplots(len(rows), WORST_IMAGES, figsize=(WORST_IMAGES * 1.2, len(rows) * 1.45),
                                squeeze=False)
    for r, row in enumerate(rows):
        samples = sorted(dataset.by_identity[row["identity"]], key=lambda s: np.nan_to_num(a.cosine[index[id(s)]],
                                                                                            nan=2.0))
        for c in range(WORST_IMAGES):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c >= len(samples):
                continue
            sample = samples[c]
            try:
                with Image.open(io.BytesIO(dataset.image(sample))) as image:
                    image.thumbnail((96, 96))
                    ax.imshow(np.asarray(image.convert("RGB")))
            except Exception:  # an undecodable sample stays an empty cell
                continue
            value = a.cosine[index[id(sample)]]
            bad = np.isfinite(value) and value < minimum
            ax.set_title("no face" if not np.isfinite(value) else f"{value:.3f}", fontsize=7,
                         color="#c44e52" if bad else "black")
            if bad:
                for spine in ax.spines.values():
                    spine.set_visible(True)
                    spine.set_color("#c44e52")
                    spine.set_linewidth(2)
        axes[r][0].set_ylabel(str(row["identity"])[:14], fontsize=7)
    figure.suptitle("Least consistent identities (rows): images, cosine to prototype (red: outlier)", fontsize=9)
    png = _png(figure)
    plt.close(figure)
    return png


# ----------------------------------------------------------------------------------------------- the command


def thresholds(recognizer: str, dedup: float | None, min_similarity: float | None) -> tuple[float, float]:
    if recognizer not in DEFAULTS:
        raise UsageError(f"unknown recognizer {recognizer!r} (one of: {', '.join(RECOGNIZERS)})")
    dedup = DEFAULTS[recognizer]["dedup"] if dedup is None else float(dedup)
    min_similarity = DEFAULTS[recognizer]["min_similarity"] if min_similarity is None else float(min_similarity)
    for name, value in (("--dedup", dedup), ("--min-similarity", min_similarity)):
        if not -1.0 <= value <= 1.0:
            raise UsageError(f"{name} is a cosine similarity between -1 and 1, got {value}")
    return dedup, min_similarity


def against_dataset(against: str, progress: bool = True):
    """``--against``: a facegen dataset (a folder or a Hub id), or a plain identity folder (one sub-folder of images
    per identity, read with the `folder` source); a path that does not exist is "no such folder"."""
    from facegen.published import hub_dataset

    if hub_dataset(against) is None and not OutputFolder(against).train_dir.is_dir():
        from facegen.builders.quality.identity_folder import IdentityFolder

        return IdentityFolder(against)
    return PublishedDataset(against, progress=progress)


def against_matches(a: Analysis, other: PublishedDataset, recognizer: Recognizer, threshold: float,
                    batch_size: int, progress: bool) -> dict:
    """Identities of this dataset whose prototype reaches ``threshold`` with an identity of ``other``."""
    # a local folder's own cached embeddings are used when valid (never written: that folder is not ours)
    cached = None if other.repo_id else _load_embeddings(OutputFolder(other.root).report_embeddings, recognizer.identity(),
                                                         other.fingerprint(), [s.key for s in other.samples],
                                                         recognizer.dim)
    embeddings = cached or embed_dataset(other, recognizer, batch_size=batch_size, progress=progress)
    b = identity_prototypes(other, embeddings)
    matches = cross_matches(a.prototypes, b.prototypes, threshold) if len(a.ids) and len(b.ids) else []
    return {"dataset": other.name, "identities": len(other.identities), "threshold": threshold,
            "matches": [[a.ids[i], b.ids[j], round(c, 6)] for i, j, c in matches]}


PLOTS = (CONSISTENCY_PLOT, SEPARABILITY_PLOT, WORST_IDENTITIES_PLOT)


@dataclass(frozen=True)
class ReportPlace:
    """Where a report's files go: a dataset folder's own (``.facegen/report.json`` and the cached embeddings there,
    the plots under ``report/``), or a folder of their own (``--out DIR``: ``DIR/report.json``,
    ``DIR/report_embeddings.npz``, ``DIR/report/*.png``). Either way the files outside ``.facegen/`` are recorded as
    facegen's (``.facegen/own_files.json`` of that folder) and a file facegen did not write is never replaced."""

    folder: Path  # report/*.png are written under it
    json: Path
    embeddings: Path
    in_dataset: bool

    @classmethod
    def of(cls, dataset_root: Path, report_dir: str | os.PathLike | None) -> ReportPlace:
        if report_dir is None or Path(report_dir).resolve() == dataset_root:
            paths = OutputFolder(dataset_root)
            return cls(dataset_root, paths.report_json, paths.report_embeddings, True)
        folder = Path(report_dir).resolve()
        return cls(folder, folder / REPORT_JSON, folder / REPORT_EMBEDDINGS, False)

    def own_names(self) -> list[str]:
        """The files of this report outside ``.facegen/``, relative to :attr:`folder`."""
        names = list(PLOTS)
        if not self.in_dataset:
            names += [REPORT_JSON, REPORT_EMBEDDINGS]
        return names

    def check(self) -> None:
        """Before anything is computed: a folder to write in, holding no file of the user's under the report's
        names."""
        if self.folder.exists() and not self.folder.is_dir():
            raise UsageError(f"--out {self.folder} is a file, not a folder")
        refuse_foreign_files(self.folder, self.own_names(), "the report")

    def write_json(self, report: QualityReport) -> None:
        if self.in_dataset:
            report.write(self.json)
        else:
            write_own_files(self.folder, {REPORT_JSON: report.to_json()}, "the report")

    def record_embeddings(self) -> None:
        """The cached embeddings of a report folder of its own, as written (the cache writes them itself)."""
        if not self.in_dataset and self.embeddings.is_file():
            record_files(self.folder, {REPORT_EMBEDDINGS: sha256_file(self.embeddings)})


# what a folder that cannot take the report says while it is written (a read-only mount, a full disk, a quota)
CANNOT_WRITE = (errno.EROFS, errno.ENOSPC, errno.EDQUOT)


@contextmanager
def writing_into(folder: Path, what: str):
    """Writing ``what`` into ``folder``: a folder that cannot take it is one line, not a traceback. Each file is
    written whole or not at all (``facegen.fileio``), so what was there before stays readable."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in CANNOT_WRITE:
            raise
        raise UsageError(f"cannot write {what} in {folder}: {exc.strerror or exc}; free some space or choose a "
                         "writable folder, and rerun") from None


def run_report(out, recognizer: str = "dlib", model_dir: str | None = None, detector: str = "scrfd",
               dedup: float | None = None, min_similarity: float | None = None, against: str | None = None,
               batch_size: int = 64, progress: bool = True, card: bool = True,
               report_dir: str | os.PathLike | None = None) -> QualityReport | None:
    """Compute (or reuse the embeddings of) the report of the facegen dataset ``out`` (a folder or a Hub id);
    write it into that folder (the main process holding its lock), or into ``report_dir`` (required for a Hub id:
    the Hub cache is not ours). Only the report's own files are written: a user's file under one of their names
    stops the report before anything is computed.

    On many processes (``accelerate launch``, ``torchrun``) every process takes part in the embedding pass
    (:func:`dataset_embeddings`); the main process then analyses and writes, and every process returns the
    report it wrote (the others wait for it on the file)."""
    from facegen.published import hub_dataset

    if hub_dataset(out) is not None:
        if report_dir is None:
            raise UsageError(f"{out} is a Hub dataset: pass --out DIR, a local folder for report.json and the "
                             "plots (the dataset itself is read from the Hub cache)")
    dedup, min_similarity = thresholds(recognizer, dedup, min_similarity)
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    ranks = Ranks.current()
    started = time.perf_counter()
    dataset = PublishedDataset(out)
    place = ReportPlace.of(dataset.root, report_dir)
    # not while a build (or a card, a publish) works in the dataset's folder
    busy = output_lock(dataset.root, command_breaks_locks=False) if place.in_dataset and ranks.main else nullcontext()
    with writing_into(place.folder, "the report"), busy:
        place.check()
        model = make_recognizer(recognizer, model_dir=model_dir, detector=detector, batch_size=batch_size,
                                ranks=ranks)
        before = _file_identity(place.json)
        embeddings, reused = dataset_embeddings(dataset, model, batch_size=batch_size, progress=progress,
                                                path=place.embeddings, ranks=ranks)
        if not ranks.main:  # the main process analyses and writes: wait for its report.json (a new file)
            wait_for(lambda: _file_identity(place.json) not in (None, before))
            return QualityReport.read(place.json)
        place.record_embeddings()
        report, analysis = measure(dataset, model, embeddings, reused, dedup, min_similarity, against=against,
                                   batch_size=batch_size, progress=progress,
                                   dataset_name=None if place.in_dataset else dataset.name)
        report = write_report(place, dataset, report, analysis, started)
        if card and place.in_dataset and OutputFolder(dataset.root).run_json.is_file():
            from facegen.cards import write_card

            write_card(dataset.root)
    for line in summary_lines(report, place):
        info(line)
    return report


def measure(dataset: PublishedDataset, model: Recognizer, embeddings: Embeddings, reused: bool, dedup: float,
            min_similarity: float, against: str | None = None, batch_size: int = 64, progress: bool = True,
            dataset_name: str | None = None) -> tuple[QualityReport, Analysis]:
    """The report (without plots yet) and the analysis behind it; writes nothing."""
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    settings = ReportSettings(model.name, model.model, dedup, min_similarity, DEFAULTS[model.name])
    found, analysis = analyse(dataset, embeddings, dedup, min_similarity)
    matches = None
    if against:
        from facegen.builders.quality.leakage import benchmark_leakage, is_verification_file

        matches = (benchmark_leakage(analysis.ids, analysis.prototypes, against, model, min_similarity, batch_size,
                                     progress) if is_verification_file(against) else
                   against_matches(analysis, against_dataset(against, progress), model, dedup, batch_size,
                                   progress))
    report = QualityReport(
        facegen_version=facegen.__version__, created=created, settings=settings, fingerprint=dataset.fingerprint(),
        embedding={"reused": reused, "seconds": round(embeddings.seconds, 3),
                   "samples_per_second": round(len(dataset.samples) / embeddings.seconds, 2)
                   if embeddings.seconds > 0 else None},
        **found, plots=[], seconds=0.0, dataset_name=dataset_name, against=matches)
    return report, analysis


def write_report(place: ReportPlace, dataset: PublishedDataset, report: QualityReport, analysis: Analysis,
                 started: float) -> QualityReport:
    """The plots, then report.json (which lists them); returns the report as written."""
    plots = write_plots(place.folder, dataset, analysis, report.identities, report.settings)
    report = dataclasses.replace(report, plots=plots, seconds=round(time.perf_counter() - started, 3))
    place.write_json(report)
    return report


def _file_identity(path: Path) -> tuple[int, int] | None:
    """(inode, modification time): a file written again atomically has another."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns


def summary_lines(report: QualityReport, place: ReportPlace | None = None) -> list[str]:
    s, d, settings = report.summary, report.dataset, report.settings
    consistency = s["sample_consistency"].get("median")
    separability = s["separability"].get("median")
    lines = [
        f"facegen report ({settings.recognizer}): {count(d['identities'], 'identity')}, "
        f"{count(d['samples'], 'sample')}, "
        f"{d['embedded']} embedded" + (f" ({report.embedding['samples_per_second']} samples/s)"
                                       if report.embedding.get("samples_per_second") else " (reused)"),
        f"  consistency (median cosine to own prototype): "
        f"{'n/a' if consistency is None else f'{consistency:.4f}'}; outliers (< {settings.min_similarity}): "
        f"{s['outliers']}",
        f"  separability (median highest cosine to another identity): "
        f"{'n/a' if separability is None else f'{separability:.4f}'}; near-duplicate pairs "
        f"(>= {settings.dedup}): {s['near_duplicate_pairs']}",
    ]
    if report.skipped:
        lines.append("  not embedded: " + ", ".join(f"{n} {r}" for r, n in report.skipped.items()))
    if report.against is not None:
        what = "an image of" if report.against.get("kind") == "verification images" else ""
        lines.append(f"  identities matching {what + ' ' if what else ''}{report.against['dataset']} (cosine >= "
                     f"{report.against['threshold']}): {len(report.against['matches'])}")
    if place is None or place.in_dataset:
        lines.append(f"  -> {FACEGEN_DIR}/{REPORT_JSON}, " + ", ".join(report.plots))
    else:
        lines.append(f"  -> {place.json}, " + ", ".join(str(place.folder / p) for p in report.plots))
    return lines
