"""Read a build's own records (``OUT/.facegen``) and summarise them for the card."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from facegen.errors import UsageError
from facegen.layout import OutputFolder

FAILURES_SHOWN = 10


@dataclass
class Statistics:
    identities: int = 0
    images: int = 0
    shards: int = 0
    tar_bytes: int = 0
    seconds: float = 0.0
    per_identity_min: int = 0
    per_identity_mean: float = 0.0
    per_identity_max: int = 0
    identities_without_images: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count, most frequent first
    failures: list[dict] = field(default_factory=list)  # a few examples (ref, reason, detail)
    quality: dict[str, dict] = field(default_factory=dict)  # name -> {mean, min, max, count}
    converted: dict[str, int] = field(default_factory=dict)  # re-encode reason -> images, most frequent first
    image_modes: dict[str, int] = field(default_factory=dict)  # PIL mode -> images, most frequent first
    image_sizes: dict[str, int] = field(default_factory=dict)  # "WxH" -> images, most frequent first
    verify: list[str] = field(default_factory=list)  # the image checks the shards were written with

    @property
    def converted_total(self) -> int:
        return sum(self.converted.values())

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


def load_run(out: Path) -> dict:
    path = OutputFolder(out).run_json
    if not path.is_file():
        raise UsageError(f"{out} has no .facegen/run.json: not a finished facegen build (run `facegen build` first)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON ({exc}); rerun the build to rewrite it") from None


def load_shard_stats(out: Path) -> list[dict]:
    """Every published shard's stats file, in shard order."""
    return _load_stats(OutputFolder(out).shard_stats_dir, "shard")


def load_unit_stats(out: Path) -> list[dict]:
    """Every unit of work's stats file (identity-level transforms; none for per-image ones), in unit order."""
    return _load_stats(OutputFolder(out).units_dir, "unit")


def _load_stats(folder: Path, what: str) -> list[dict]:
    stats = []
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith("."):
            continue  # a temporary file of an unfinished write
        try:
            stats.append(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path} is not valid JSON ({exc}); delete it and rerun the build") from None
    return sorted(stats, key=lambda s: s.get("shard", 0))


def summarise(shards: list[dict], units: list[dict] | None = None, planned_identities: int | None = None
              ) -> Statistics:
    """Totals of a build. Images, bytes, image checks, modes, sizes and conversions come from the published shards
    (an assembled shard counts those of the samples it copied); identities, skips and quality from
    the units of work when there are some (identity-level transforms), else from the shards. A shard holds
    samples of many identities (shuffled), so per-identity counts are summed across files."""
    stats = Statistics(shards=len(shards))
    per_identity: Counter = Counter()
    skipped: Counter = Counter()
    quality: dict[str, dict] = {}
    converted: Counter = Counter()
    modes: Counter = Counter()
    sizes: Counter = Counter()
    verify: set[str] = set()
    for shard in shards:
        # image checks, modes, sizes and conversions of the published images (assembled shards carry their units')
        converted.update(shard.get("converted") or {})
        modes.update(shard.get("image_modes") or {})
        sizes.update(shard.get("image_sizes") or {})
        verify.add(shard.get("verify") or "header")  # shards written before --verify existed had PIL's check
        stats.images += shard.get("images", 0)
        stats.tar_bytes += shard.get("tar_bytes", 0)
        stats.seconds += shard.get("seconds", 0.0)
    for work in (units or shards):
        if units:
            stats.seconds += work.get("seconds", 0.0)
        for identity, n in work.get("images_per_identity", {}).items():
            per_identity[identity] += n
        skipped.update(work.get("skipped", {}))
        for failure in work.get("failures", []):
            if len(stats.failures) < FAILURES_SHOWN:
                stats.failures.append(failure)
        for name, q in (work.get("quality") or {}).items():
            total = quality.setdefault(name, {"sum": 0.0, "count": 0, "min": None, "max": None})
            if not q.get("count"):
                continue
            total["sum"] += q["sum"]
            total["count"] += q["count"]
            total["min"] = q["min"] if total["min"] is None else min(total["min"], q["min"])
            total["max"] = q["max"] if total["max"] is None else max(total["max"], q["max"])
    counts = list(per_identity.values())
    if planned_identities is not None and planned_identities > len(counts):
        counts += [0] * (planned_identities - len(counts))  # identities the source listed no image for
    stats.identities = len(counts)
    if counts:
        stats.per_identity_min = min(counts)
        stats.per_identity_max = max(counts)
        stats.per_identity_mean = sum(counts) / len(counts)
        stats.identities_without_images = sum(1 for n in counts if n == 0)
    stats.skipped = dict(skipped.most_common())
    stats.converted = dict(converted.most_common())
    stats.image_modes = dict(modes.most_common())
    stats.image_sizes = dict(sizes.most_common())
    stats.verify = sorted(verify)
    stats.quality = {
        name: {"mean": q["sum"] / q["count"], "min": q["min"], "max": q["max"], "count": q["count"]}
        for name, q in sorted(quality.items()) if q["count"]
    }
    return stats


def size_category(n: int) -> str:
    """The Hub's `size_categories` bucket of a number of examples."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
    for bound, name in bounds:
        if n < bound:
            return name
    return "1B<n<10B"
