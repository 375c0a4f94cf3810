"""A build's totals for the card, summed from its shard and unit stats (``facegen.layout.records``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from facegen.layout.records import ShardStats, UnitStats

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


def summarise(shards: list[ShardStats], units: list[UnitStats] | None = None,
              planned_identities: int | None = None) -> Statistics:
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
        converted.update(shard.converted)
        modes.update(shard.image_modes)
        sizes.update(shard.image_sizes)
        verify.add(shard.verify)
        stats.images += shard.images
        stats.tar_bytes += shard.tar_bytes
        stats.seconds += shard.seconds
    for work in (units or shards):
        if units:
            stats.seconds += work.seconds
        for identity, n in work.images_per_identity.items():
            per_identity[identity] += n
        skipped.update(work.skipped)
        for failure in work.failures:
            if len(stats.failures) < FAILURES_SHOWN:
                stats.failures.append(failure)
        for name, q in work.quality.items():
            total = quality.setdefault(name, {"sum": 0.0, "count": 0, "min": None, "max": None})
            if not q.count:
                continue
            total["sum"] += q.sum
            total["count"] += q.count
            total["min"] = q.min if total["min"] is None else min(total["min"], q.min)
            total["max"] = q.max if total["max"] is None else max(total["max"], q.max)
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
