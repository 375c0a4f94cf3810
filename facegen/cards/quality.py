"""The card's Quality section (from ``OUT/.facegen/report.json``, written by `facegen report`) and Curation section
(from the run's source provenance, written by `facegen curate` through the `facegen` source)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from facegen.layout import CONSISTENCY_PLOT, SEPARABILITY_PLOT, WORST_IDENTITIES_PLOT, OutputFolder
from facegen.layout.records import QualityReport, RunRecord

SHOWN = 20  # near-duplicate pairs and outliers listed in the card (all are in report.json)
PLOT_TITLES = {
    CONSISTENCY_PLOT: "Consistency: each sample's cosine similarity to its identity's prototype",
    SEPARABILITY_PLOT: "Separability: each identity's highest cosine similarity to another identity",
    WORST_IDENTITIES_PLOT: "The least consistent identities, with each image's cosine to its prototype",
}


def quality_context(out) -> dict | None:
    """What the Quality section shows, or None when there is no report or it describes other shards."""
    from facegen.published import shards_fingerprint

    out = Path(out)
    report = QualityReport.read(OutputFolder(out).report_json)
    if report is None or report.fingerprint != shards_fingerprint(out):
        return None  # none, damaged, or the shards changed since: the figures are not this dataset's
    summary = report.summary
    return {
        "settings": report.settings,
        "created": report.created,
        "dataset": report.dataset,
        "consistency": summary.get("sample_consistency") or {},
        "identity_consistency": summary.get("identity_consistency") or {},
        "separability": summary.get("separability") or {},
        "near_duplicates": report.near_duplicate_identities[:SHOWN],
        "near_duplicate_count": len(report.near_duplicate_identities),
        "outliers": report.outliers[:SHOWN],
        "outlier_count": len(report.outliers),
        "without_face": summary.get("identities_without_a_face", 0),
        "modes": report.image_modes,
        "sizes": dict(list(report.image_sizes.items())[:5]),
        "sizes_more": max(0, len(report.image_sizes) - 5),
        "skipped": report.skipped,
        "against": report.against,
        "plots": [{"path": p, "title": PLOT_TITLES.get(p, p)} for p in report.plots if (out / p).is_file()],
    }


def curation_context(run: RunRecord) -> dict | None:
    """What `facegen curate` removed, as the `facegen` source recorded it."""
    curation = run.source.provenance.get("curation")
    if not curation:
        return None
    identities = curation.get("removed_identities") or []
    samples = curation.get("removed_samples") or []
    by_reason = Counter(str(r.get("reason") or "not given") for r in identities)
    samples_by_reason = Counter(str(r.get("reason") or "not given") for r in samples)
    return {
        "parent": curation.get("parent") or run.source.provenance.get("parent", "?"),
        "parent_identities": curation.get("parent_identities"),
        "settings": {k: curation[k] for k in ("recognizer", "dedup", "min_similarity", "min_images") if k in curation},
        "identities_by_reason": dict(by_reason.most_common()),
        "samples_by_reason": dict(samples_by_reason.most_common()),
        "removed_identities": len(identities),
        "removed_samples": len(samples),
        "removed_identities_shown": identities[:SHOWN],
        "removed_samples_shown": samples[:SHOWN],
    }
