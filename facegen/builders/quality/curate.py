"""`facegen curate`: drop near-duplicate identities, outlier samples and thin identities; build the rest anew.

Steps (each visible in :func:`curate`):

1. The report of OUT, in memory (:func:`facegen.builders.quality.report.measure`): its embeddings come from a
   valid cache (NEW's from an earlier curate, or OUT's own from `facegen report OUT`, only read) when the shards
   and the recogniser are unchanged, so only the thresholds are applied again; else they are computed.
2. The decisions (:func:`decide`), in this order:
   - near-duplicate groups are the connected components of the graph "prototype cosine >= dedup"; each keeps one
     identity, the one with the most images, ties going to the first in OUT's plan (lowest label);
   - outlier samples (cosine to their prototype < min_similarity) of the kept identities are dropped;
   - identities left with fewer than ``min_images`` images are dropped.
   A curation that would remove more than ``max_removed`` of the identities (default half), or all of them, is
   refused, as is a NEW that holds another build or other decisions: before anything is written anywhere.
3. NEW is built from OUT through the `facegen` source with these drops (``curation=NEW/.facegen/curation.json``)
   and the passthrough transform: image bytes are copied, labels are contiguous, the card cites OUT, inherits its
   licence and lists what was removed and why. OUT's report (report.json, the cached embeddings, the plots) is
   kept in ``NEW/.facegen/parent-report/``: OUT itself, a local folder or a Hub dataset (``ORG/NAME``,
   ``hf://datasets/ORG/NAME``, read from the Hub cache), is never written to.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from facegen.builders.engine.options import BuildConfig
from facegen.errors import UsageError
from facegen.fileio import atomic_write
from facegen.layout import OutputFolder
from facegen.layout.records import Curation, QualityReport, RecordError
from facegen.messages import count, info
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
                    "detail": f"kept {keep} ({count(images[keep], 'image')}) of a group of {len(group)}; cosine "
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


def _check_new(new: Path, curation: Curation, overwrite: bool) -> None:
    """Everything that would refuse NEW, found before anything is written: a file, a folder being built, another
    build or other decisions there (unless --overwrite), a folder of other files, a user's file where the build
    writes."""
    from facegen.builders.engine.lock import output_lock
    from facegen.builders.engine.outputs import foreign_files

    folder = OutputFolder(new)
    if new.exists() and not new.is_dir():
        raise UsageError(f"--out {new} is a file, not a folder")
    if not new.is_dir():
        return
    if folder.records.is_dir():
        with output_lock(new, command_breaks_locks=False):  # only a probe: the build takes the lock itself
            pass
    has_build = folder.config_json.is_file() or folder.run_json.is_file()
    foreign = foreign_files(new, has_build)
    if foreign and (overwrite or has_build):
        raise UsageError(f"{new} holds a file facegen did not write where a build writes: {foreign[0]}: move it out "
                         "of --out, or choose another --out")
    if overwrite:
        return
    if has_build:
        try:
            previous = Curation.read(folder.curation_file).decisions()
        except (OSError, RecordError):
            previous = None
        if previous != curation.decisions():
            raise UsageError(f"{new} holds another build or other curation decisions; pass --overwrite to replace "
                             "it, or choose another --out")
    elif any(p != folder.records for p in new.iterdir()):
        raise UsageError(f"{new} is not empty and holds no facegen build: choose a new or empty --out, or pass "
                         "--overwrite to write the build beside those files (they are kept)")


def _removed_identities(curation: Curation, total: int, max_removed: float) -> None:
    """Refuse a curation that removes more than ``max_removed`` of the identities (a threshold that does not fit
    these faces removes most of them)."""
    kept = curation.counts["identities_kept"]
    removed = total - kept
    if kept == 0:
        raise UsageError(f"curation would remove all {count(total, 'identity')}; nothing to build (check the report's "
                         "figures and the thresholds --dedup, --min-similarity, --min-images)")
    if removed > max_removed * total:
        raise UsageError(f"curation would remove {removed} of {count(total, 'identity')} ({removed / total:.0%}), "
                         f"more than --max-removed {max_removed:g} allows: check the report's figures and the "
                         "thresholds (--dedup, --min-similarity, --min-images), or raise --max-removed; nothing "
                         "was written")


def curate(out, new, recognizer: str = "dlib", model_dir: str | None = None, detector: str = "scrfd",
           dedup: float | None = None, min_similarity: float | None = None, min_images: int = 1,
           batch_size: int = 64, overwrite: bool = False, progress: bool = True, command: list[str] | None = None,
           max_removed: float = 0.5):
    """Curate the facegen dataset ``out`` (a folder or a Hub id) into the new dataset ``new``; returns
    (curation, summary). Nothing is written anywhere until every check has passed (a refused curate changes
    nothing); OUT itself is never written to."""
    from facegen.builders.engine.run import build
    from facegen.builders.quality.report import (
        ReportPlace,
        cached_embeddings,
        embed_dataset,
        make_recognizer,
        measure,
        save_embeddings,
        summary_lines,
        thresholds,
        write_report,
        writing_into,
    )
    from facegen.published import hub_dataset

    if min_images < 1:
        raise UsageError("--min-images must be at least 1")
    if not 0 <= max_removed <= 1:
        raise UsageError(f"--max-removed is a share of the identities between 0 and 1, got {max_removed:g}")
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    dedup, min_similarity = thresholds(recognizer, dedup, min_similarity)
    started = time.perf_counter()
    new_path = Path(new).resolve()
    local = hub_dataset(out) is None
    if local:
        out_path = Path(out).resolve()
        if new_path == out_path or out_path in new_path.parents:
            raise UsageError("--out must be a folder outside the dataset being curated")
    # the id as given: the build reads it the same way
    source_path = str(out_path) if local else str(out)
    if new_path.exists() and not new_path.is_dir():
        raise UsageError(f"--out {new} is a file, not a folder")

    # 1. the report of OUT, kept in memory: its embeddings from a cache (NEW's, or OUT's own) or computed
    dataset = PublishedDataset(source_path)
    place = ReportPlace.of(dataset.root, OutputFolder(new_path).parent_report_dir)
    place.check()
    model = make_recognizer(recognizer, model_dir=model_dir, detector=detector, batch_size=batch_size)
    caches = [place.embeddings] + ([OutputFolder(dataset.root).report_embeddings] if local else [])
    embeddings = cached_embeddings(dataset, model, caches)
    reused = embeddings is not None
    if embeddings is None:
        embeddings = embed_dataset(dataset, model, batch_size=batch_size, progress=progress)
    report, analysis = measure(dataset, model, embeddings, reused, dedup, min_similarity, dataset_name=dataset.name)

    # 2. the decisions, and every refusal before anything is written
    curation = decide(dataset, report, min_images)
    _removed_identities(curation, len(dataset.identities), max_removed)
    _check_new(new_path, curation, overwrite)
    counts = curation.counts
    info(f"curate: keeping {counts['identities_kept']} of {count(len(dataset.identities), 'identity')}; removing "
         f"{count(counts['near_duplicate'], 'near-duplicate identity')}, {counts['too_few_images']} with fewer "
         f"than {count(min_images, 'image')}, {count(counts['outlier'], 'outlier sample')}")

    # 3. NEW: the report (NEW/.facegen/parent-report/), the decisions, then the build through the `facegen` source
    def write_records() -> QualityReport:
        with writing_into(new_path, "the curation's records"):
            place.check()
            save_embeddings(place, dataset, model, embeddings)
            written = write_report(place, dataset, report, analysis, started)
            atomic_write(OutputFolder(new_path).curation_file, curation.to_json())
        return written

    for line in summary_lines(write_records(), place):
        info(line)
    config = BuildConfig(source="facegen", source_path=source_path,
                         source_opts={"curation": str(OutputFolder(new_path).curation_file)},
                         plugin="passthrough", out=str(new_path), overwrite=overwrite,
                         command=command or ["facegen", *sys.argv[1:]])
    summary = build(config)
    if overwrite:  # the build's --overwrite cleared NEW/.facegen/ after reading the decisions
        write_records()
    return curation, summary
