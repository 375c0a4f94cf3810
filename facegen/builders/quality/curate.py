"""`facegen curate`: drop near-duplicate identities, outlier samples and thin identities; build the rest anew.

Steps (each visible in :func:`curate`):

1. The report of OUT (:func:`facegen.builders.quality.report.run_report`): its cached embeddings are reused when the
   shards and the recogniser are unchanged, so only the thresholds are applied again.
2. The decisions (:func:`decide`), in this order:
   - near-duplicate groups are the connected components of the graph "prototype cosine >= dedup"; each keeps one
     identity, the one with the most images, ties going to the first in OUT's plan (lowest label);
   - outlier samples (cosine to their prototype < min_similarity) of the kept identities are dropped;
   - identities left with fewer than ``min_images`` images are dropped.
OUT may be a Hub dataset (``ORG/NAME``, ``hf://datasets/ORG/NAME``): it is read from the Hub cache, and its report
(report.json, the cached embeddings, the plots) is kept in ``NEW/.facegen/parent-report/`` instead of OUT's folder.

3. NEW is built from OUT through the `facegen` source with these drops (``curation=NEW/.facegen/curation.json``)
   and the passthrough transform: image bytes are copied, labels are contiguous, the card cites OUT, inherits its
   licence and lists what was removed and why.
"""

from __future__ import annotations

import sys
from pathlib import Path

from facegen.builders.engine.options import BuildConfig
from facegen.errors import UsageError
from facegen.fileio import atomic_write
from facegen.layout import OutputFolder
from facegen.layout.records import Curation, QualityReport, RecordError
from facegen.messages import info
from facegen.published import PublishedDataset



def near_duplicate_groups(pairs: list[list], order: dict[str, int]) -> list[list[str]]:
    """Connected components (of two or more identities) of the pair graph, each in plan order."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b, _ in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb, key=order.get)] = min(ra, rb, key=order.get)
    groups: dict[str, list[str]] = {}
    for x in parent:
        groups.setdefault(root(x), []).append(x)
    return sorted((sorted(g, key=order.get) for g in groups.values() if len(g) > 1), key=lambda g: order[g[0]])


def decide(dataset: PublishedDataset, report: QualityReport, min_images: int) -> Curation:
    """What to remove from ``dataset`` given its ``report``; the curation file's content."""
    order = {identity: i for i, identity in enumerate(dataset.identities)}
    images = {identity: len(samples) for identity, samples in dataset.by_identity.items()}
    settings = report.settings
    removed_identities: list[dict] = []
    best_pair: dict[str, tuple[str, float]] = {}
    for a, b, cosine in report.near_duplicate_identities:
        for x, y in ((a, b), (b, a)):
            if x not in best_pair or cosine > best_pair[x][1]:
                best_pair[x] = (y, cosine)
    for group in near_duplicate_groups(report.near_duplicate_identities, order):
        keep = max(group, key=lambda x: (images[x], -order[x]))  # most images; ties: first in the plan
        for identity in group:
            if identity != keep:
                other, cosine = best_pair[identity]
                removed_identities.append({
                    "identity": identity, "reason": "near-duplicate",
                    "detail": f"kept {keep} ({images[keep]} images) of a group of {len(group)}; cosine "
                              f"{cosine:.4f} to {other}"})
    gone = {r["identity"] for r in removed_identities}
    by_key = {s.key: s for s in dataset.samples}
    removed_samples = [{"identity": o["identity"], "key": o["key"], "source_ref": dataset.ref(by_key[o["key"]]),
                        "reason": "outlier", "cosine": o["cosine"]}
                       for o in report.outliers if o["identity"] not in gone]
    dropped_per_identity: dict[str, int] = {}
    for sample in removed_samples:
        dropped_per_identity[sample["identity"]] = dropped_per_identity.get(sample["identity"], 0) + 1
    too_few = []
    for identity in dataset.identities:
        left = images[identity] - dropped_per_identity.get(identity, 0)
        if identity not in gone and left < min_images:
            too_few.append({"identity": identity, "reason": "too few images",
                            "detail": f"{left} of {images[identity]} left after dropping outliers"})
    removed_identities += too_few
    gone |= {r["identity"] for r in too_few}
    removed_samples = [s for s in removed_samples if s["identity"] not in gone]  # their identity went entirely
    removed_identities.sort(key=lambda r: order[r["identity"]])
    return Curation(
        parent=dataset.name,
        parent_fingerprint=dataset.fingerprint(),
        parent_identities=len(dataset.identities),
        parent_samples=len(dataset.samples),
        recognizer=settings.recognizer,
        dedup=settings.dedup,
        min_similarity=settings.min_similarity,
        min_images=min_images,
        report_created=report.created,
        counts={"near_duplicate": len(removed_identities) - len(too_few), "too_few_images": len(too_few),
                "outlier": len(removed_samples), "identities_kept": len(dataset.identities) - len(gone)},
        removed_identities=removed_identities,
        removed_samples=removed_samples,
    )


def _prepare_new(new: Path, curation: Curation, overwrite: bool) -> Path:
    """Write NEW/.facegen/curation.json, refusing to change the decisions under an existing build."""
    from facegen.builders.engine.outputs import remove_facegen_outputs

    path = OutputFolder(new).curation_file
    if new.exists() and not new.is_dir():
        raise UsageError(f"--out {new} is a file, not a folder")
    if overwrite and new.is_dir():
        remove_facegen_outputs(new)
    elif OutputFolder(new).config_json.is_file():
        try:
            previous = Curation.read(path).decisions()
        except (OSError, RecordError):
            previous = None
        if previous != curation.decisions():
            raise UsageError(f"{new} holds another build or other curation decisions; pass --overwrite to replace "
                             "it, or choose another --out")
    _write_curation(path, curation)
    return path


def _write_curation(path: Path, curation: Curation) -> None:
    atomic_write(path, curation.to_json())


def curate(out, new, recognizer: str = "dlib", model_dir: str | None = None, detector: str = "scrfd",
           dedup: float | None = None, min_similarity: float | None = None, min_images: int = 1,
           batch_size: int = 64, overwrite: bool = False, progress: bool = True, command: list[str] | None = None):
    """Curate the facegen dataset in folder ``out`` into the new dataset ``new``; returns (curation, summary)."""
    from facegen.builders.quality.report import run_report
    from facegen.builders.engine.run import build

    if min_images < 1:
        raise UsageError("--min-images must be at least 1")
    from facegen.published import hub_dataset

    new_path = Path(new).resolve()
    if hub_dataset(out) is None:
        out_path = Path(out).resolve()
        if new_path == out_path or out_path in new_path.parents:
            raise UsageError("--out must be a folder outside the dataset being curated")
        source_path, report_dir = str(out_path), None
    else:
        # the id as given: the build reads it; its report goes beside NEW's records (the Hub cache is not ours)
        source_path, report_dir = str(out), OutputFolder(new_path).parent_report_dir
    if new_path.exists() and not new_path.is_dir():
        raise UsageError(f"--out {new} is a file, not a folder")
    report = run_report(source_path, recognizer=recognizer, model_dir=model_dir, detector=detector, dedup=dedup,
                        min_similarity=min_similarity, batch_size=batch_size, progress=progress,
                        report_dir=report_dir)
    dataset = PublishedDataset(source_path)
    curation = decide(dataset, report, min_images)
    counts = curation.counts
    if counts["identities_kept"] == 0:
        raise UsageError("curation would remove every identity; nothing to build (lower --min-images?)")
    info(f"curate: keeping {counts['identities_kept']} of {len(dataset.identities)} identities; removing "
         f"{counts['near_duplicate']} near-duplicate identities, {counts['too_few_images']} with fewer than "
         f"{min_images} images, {counts['outlier']} outlier samples")
    curation_path = _prepare_new(new_path, curation, overwrite)
    config = BuildConfig(source="facegen", source_path=source_path, source_opts={"curation": str(curation_path)},
                         plugin="passthrough", out=str(new_path), overwrite=overwrite,
                         command=command or ["facegen", *sys.argv[1:]])
    summary = build(config)
    if not curation_path.is_file():  # --overwrite let the build clear .facegen/ after reading the file
        _write_curation(curation_path, curation)
    return curation, summary
