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
4. ``--against``: the prototypes of another facegen dataset; identities of this one whose prototype reaches
   ``dedup`` with any of them are listed (identity leakage, e.g. evaluation identities in a training set). An
   insightface verification file (``lfw.bin``) is compared image by image instead
   (:mod:`facegen.builders.quality.leakage`).
5. Write ``.facegen/report.json``, the plots ``report/*.png`` and re-render the card (its Quality section).

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

import datetime as _dt
import io
import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import facegen
from facegen.errors import UsageError
from facegen.fileio import atomic_file, sha256_file
from facegen.generators.embeddings import normalize
from facegen.layout import (
    CONSISTENCY_PLOT,
    FACEGEN_DIR,
    REPORT_EMBEDDINGS,
    REPORT_JSON,
    SEPARABILITY_PLOT,
    WORST_IDENTITIES_PLOT,
    OutputFolder,
)
from facegen.layout.records import QualityReport, ReportSettings
from facegen.messages import info
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
    """A face recogniser for the report: decoded RGB images in, unit embeddings (or None: no face) out."""

    name = ""
    model = ""  # what the card names (never a local path)

    def embed(self, images_rgb: list[np.ndarray]) -> list[np.ndarray | None]:
        raise NotImplementedError

    def identity(self) -> dict:
        """What must match for cached embeddings to be reused."""
        return {"name": self.name, "model": self.model}


class DlibReportRecognizer(Recognizer):
    name = "dlib"

    def __init__(self):
        from facegen.generators.dlib_recognizer import DlibRecognizer

        self._dlib = DlibRecognizer()
        self.model = DlibRecognizer.model_id

    def embed(self, images_rgb):
        return [None if v is None else normalize(v) for v in self._dlib.embed(images_rgb)]


class ArcFaceReportRecognizer(Recognizer):
    """Arc2Face's recogniser (``FaceEmbedder``): 112x112 crops as they are, other images detected and aligned."""

    name = "arcface"

    def __init__(self, model_dir: str | None, detector: str = "scrfd", det_size: int = 640, batch_size: int = 64):
        from facegen.builders.quality.identities import FaceEmbedder

        self._embedder = FaceEmbedder(model_dir, detector=detector, det_size=det_size, batch_size=batch_size)
        self.model = f"arcface.onnx ({'--model-dir' if model_dir else 'Hub'}), detector {detector}"
        self._weights = sha256_file(self._embedder.recogniser_path)  # the weights, not where they lie

    def identity(self):
        return {"name": self.name, "model": "arcface.onnx", "sha256": self._weights,
                "detector": self._embedder.detector}

    def embed(self, images_rgb):
        from facegen.generators.alignment import crop_for_recognition

        crops, slots = [], []
        for i, image in enumerate(images_rgb):
            aligner = None if image.shape[:2] == (112, 112) else self._embedder.aligner
            crop = crop_for_recognition(image, None, aligner)
            if crop is not None:
                crops.append(crop)
                slots.append(i)
        out: list[np.ndarray | None] = [None] * len(images_rgb)
        if crops:
            for i, vector in zip(slots, self._embedder.recogniser.embed(np.stack(crops))):
                out[i] = normalize(vector)
        return out


def make_recognizer(name: str, model_dir: str | None = None, detector: str = "scrfd",
                    batch_size: int = 64) -> Recognizer:
    if name == "dlib":
        return DlibReportRecognizer()
    if name == "arcface":
        return ArcFaceReportRecognizer(model_dir, detector=detector, batch_size=batch_size)
    raise UsageError(f"unknown recognizer {name!r} (one of: {', '.join(RECOGNIZERS)})")


# ----------------------------------------------------------------------------------------------- embedding


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


def _decode(data: bytes) -> tuple[np.ndarray | None, str, str, str]:
    """(RGB array or None, mode, size, reason)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            mode, size = image.mode, f"{image.width}x{image.height}"
            rgb = np.asarray(image.convert("RGB"))
    except Exception as exc:  # PIL raises many types for broken files
        return None, "", "", f"corrupt image ({type(exc).__name__})"
    return rgb, mode, size, ""


def embed_dataset(dataset: PublishedDataset, recognizer: Recognizer, batch_size: int = 64,
                  progress: bool = True) -> Embeddings:
    """Embed every sample; the bar shows samples/s. Samples are read in shard order (sequential reads)."""
    from tqdm.auto import tqdm

    samples = dataset.samples
    n = len(samples)
    vectors: np.ndarray | None = None
    reasons = [""] * n
    modes = [""] * n
    sizes = [""] * n
    order = sorted(range(n), key=lambda i: (samples[i].shard, samples[i].position))

    def load(i: int):
        try:
            return _decode(dataset.image(samples[i]))
        except OSError as exc:
            return None, "", "", f"unreadable member ({exc})"

    started = time.perf_counter()
    bar = tqdm(total=n, unit="sample", desc=f"report ({recognizer.name})", disable=not progress, dynamic_ncols=True)
    with bar, ThreadPoolExecutor(2) as pool:  # decoding overlaps the network
        for start in range(0, n, batch_size):
            chunk = order[start:start + batch_size]
            decoded = list(pool.map(load, chunk))
            images, slots = [], []
            for i, (rgb, mode, size, reason) in zip(chunk, decoded):
                modes[i], sizes[i], reasons[i] = mode, size, reason
                if rgb is not None:
                    images.append(rgb)
                    slots.append(i)
            for i, vector in zip(slots, recognizer.embed(images) if images else []):
                if vector is None:
                    reasons[i] = "no face detected"
                    continue
                if vectors is None:
                    vectors = np.zeros((n, len(vector)), np.float32)
                vectors[i] = vector
            bar.update(len(chunk))
    if vectors is None:
        vectors = np.zeros((n, 0), np.float32)
    return Embeddings([s.key for s in samples], vectors, reasons, modes, sizes, time.perf_counter() - started)


def _save_embeddings(path: Path, embeddings: Embeddings, identity: dict, fingerprint: str) -> None:
    with atomic_file(path) as f:
        np.savez(f, keys=np.array(embeddings.keys, dtype=str), vectors=embeddings.vectors,
                 reasons=np.array(embeddings.reasons, dtype=str), modes=np.array(embeddings.modes, dtype=str),
                 sizes=np.array(embeddings.sizes, dtype=str),
                 recognizer=np.array(json.dumps(identity, sort_keys=True)), fingerprint=np.array(fingerprint))


def _load_embeddings(path: Path, identity: dict, fingerprint: str, keys: list[str]) -> Embeddings | None:
    """Cached embeddings when the shards and the recogniser are the same; else None."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["fingerprint"]) != fingerprint:
                return None
            if json.loads(str(data["recognizer"])) != json.loads(json.dumps(identity, sort_keys=True)):
                return None
            cached = Embeddings([str(k) for k in data["keys"]], np.asarray(data["vectors"], np.float32),
                                [str(r) for r in data["reasons"]], [str(m) for m in data["modes"]],
                                [str(s) for s in data["sizes"]])
    except (OSError, KeyError, ValueError):
        return None
    return cached if cached.keys == keys else None


def dataset_embeddings(dataset: PublishedDataset, recognizer: Recognizer, batch_size: int = 64,
                       progress: bool = True, cache: bool = True, path: Path | None = None) -> tuple[Embeddings, bool]:
    """(embeddings, reused): from the cache (``path``, default ``.facegen/`` of the dataset) when valid, else
    computed (and cached)."""
    path = path or OutputFolder(dataset.root).report_embeddings
    fingerprint = dataset.fingerprint()
    keys = [s.key for s in dataset.samples]
    if cache:
        cached = _load_embeddings(path, recognizer.identity(), fingerprint, keys)
        if cached is not None:
            return cached, True
    embeddings = embed_dataset(dataset, recognizer, batch_size=batch_size, progress=progress)
    if cache:
        _save_embeddings(path, embeddings, recognizer.identity(), fingerprint)
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


def _save_figure(figure, path: Path) -> None:
    with atomic_file(path) as f:
        figure.savefig(f, format="png", dpi=100, bbox_inches="tight")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("the report's plots need matplotlib (`pip install 'facegen[report]'`)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(out: Path, dataset: PublishedDataset, a: Analysis, identities: list[dict],
                settings: ReportSettings) -> list[str]:
    """report/consistency.png, report/separability.png, report/worst-identities.png; their relative paths."""
    plt = _pyplot()
    recognizer = settings.recognizer
    written = []

    def histogram(values, threshold, label, title, name):
        figure, axes = plt.subplots(figsize=(6, 3.2))
        values = values[np.isfinite(values)]
        axes.hist(values, bins=min(60, max(10, len(values) // 4)), color="#4c72b0")
        axes.axvline(threshold, color="#c44e52", linestyle="--", label=label)
        axes.set_xlabel(f"cosine similarity ({recognizer})")
        axes.set_ylabel("count")
        axes.set_title(title)
        axes.legend(loc="upper left")
        _save_figure(figure, out / name)
        plt.close(figure)
        written.append(name)

    histogram(a.cosine, settings.min_similarity, f"outlier below {settings.min_similarity}",
              "Consistency: each sample's cosine to its identity's prototype", CONSISTENCY_PLOT)
    if len(a.ids) > 1:
        histogram(a.separability, settings.dedup, f"near-duplicate from {settings.dedup}",
                  "Separability: each identity's highest cosine to another", SEPARABILITY_PLOT)
    worst = _worst_identities(out, dataset, a, identities, settings.min_similarity, plt)
    if worst:
        written.append(worst)
    return written


def _worst_identities(out: Path, dataset: PublishedDataset, a: Analysis, identities: list[dict], minimum: float,
                      plt) -> str | None:
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
    _save_figure(figure, out / WORST_IDENTITIES_PLOT)
    plt.close(figure)
    return WORST_IDENTITIES_PLOT


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


def against_matches(a: Analysis, other: PublishedDataset, recognizer: Recognizer, threshold: float,
                    batch_size: int, progress: bool) -> dict:
    """Identities of this dataset whose prototype reaches ``threshold`` with an identity of ``other``."""
    # a local folder's own cached embeddings are used when valid (never written: that folder is not ours)
    cached = None if other.repo_id else _load_embeddings(OutputFolder(other.root).report_embeddings, recognizer.identity(),
                                                         other.fingerprint(), [s.key for s in other.samples])
    embeddings = cached or embed_dataset(other, recognizer, batch_size=batch_size, progress=progress)
    b = identity_prototypes(other, embeddings)
    matches = cross_matches(a.prototypes, b.prototypes, threshold) if len(a.ids) and len(b.ids) else []
    return {"dataset": other.name, "identities": len(other.identities), "threshold": threshold,
            "matches": [[a.ids[i], b.ids[j], round(c, 6)] for i, j, c in matches]}


@dataclass(frozen=True)
class ReportPlace:
    """Where a report's files go: a dataset folder's own, or a folder of their own (``--out DIR``)."""

    folder: Path  # report/*.png are written under it
    json: Path
    embeddings: Path
    in_dataset: bool

    @classmethod
    def of(cls, dataset_root: Path, report_dir: str | os.PathLike | None) -> ReportPlace:
        if report_dir is None or Path(report_dir).resolve() == dataset_root:
            paths = OutputFolder(dataset_root)
            return cls(dataset_root, paths.report_json, paths.report_embeddings, True)
        folder = Path(report_dir).resolve()  # a folder of its own: no .facegen/ in it
        return cls(folder, folder / REPORT_JSON, folder / REPORT_EMBEDDINGS, False)


def run_report(out, recognizer: str = "dlib", model_dir: str | None = None, detector: str = "scrfd",
               dedup: float | None = None, min_similarity: float | None = None, against: str | None = None,
               batch_size: int = 64, progress: bool = True, card: bool = True,
               report_dir: str | os.PathLike | None = None) -> QualityReport:
    """Compute (or reuse the embeddings of) the report of the facegen dataset ``out`` (a folder or a Hub id);
    write it into that folder, or into ``report_dir`` (required for a Hub id: the Hub cache is not ours)."""
    from facegen.published import hub_dataset

    if hub_dataset(out) is not None:
        if report_dir is None:
            raise UsageError(f"{out} is a Hub dataset: pass --out DIR, a local folder for report.json and the "
                             "plots (the dataset itself is read from the Hub cache)")
    dedup, min_similarity = thresholds(recognizer, dedup, min_similarity)
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    started = time.perf_counter()
    dataset = PublishedDataset(out)
    place = ReportPlace.of(dataset.root, report_dir)
    if place.folder.exists() and not place.folder.is_dir():
        raise UsageError(f"--out {place.folder} is a file, not a folder")
    model = make_recognizer(recognizer, model_dir=model_dir, detector=detector, batch_size=batch_size)
    embeddings, reused = dataset_embeddings(dataset, model, batch_size=batch_size, progress=progress,
                                            path=place.embeddings)
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    settings = ReportSettings(recognizer, model.model, dedup, min_similarity, DEFAULTS[recognizer])
    found, analysis = analyse(dataset, embeddings, dedup, min_similarity)
    matches = None
    if against:
        from facegen.builders.quality.leakage import benchmark_leakage, is_verification_file

        matches = (benchmark_leakage(analysis.ids, analysis.prototypes, against, model, min_similarity, batch_size,
                                     progress) if is_verification_file(against) else
                   against_matches(analysis, PublishedDataset(against, progress=progress), model, dedup, batch_size,
                                   progress))
    plots = write_plots(place.folder, dataset, analysis, found["identities"], settings)
    report = QualityReport(
        facegen_version=facegen.__version__, created=created, settings=settings, fingerprint=dataset.fingerprint(),
        embedding={"reused": reused, "seconds": round(embeddings.seconds, 3),
                   "samples_per_second": round(len(dataset.samples) / embeddings.seconds, 2)
                   if embeddings.seconds > 0 else None},
        **found, plots=plots, seconds=round(time.perf_counter() - started, 3),
        dataset_name=None if place.in_dataset else dataset.name, against=matches)
    report.write(place.json)
    if card and place.in_dataset and OutputFolder(dataset.root).run_json.is_file():
        from facegen.cards import write_card

        write_card(dataset.root)
    for line in summary_lines(report, place):
        info(line)
    return report


def summary_lines(report: QualityReport, place: ReportPlace | None = None) -> list[str]:
    s, d, settings = report.summary, report.dataset, report.settings
    consistency = s["sample_consistency"].get("median")
    separability = s["separability"].get("median")
    lines = [
        f"facegen report ({settings.recognizer}): {d['identities']} identities, {d['samples']} samples, "
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
