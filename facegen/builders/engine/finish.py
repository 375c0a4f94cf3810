"""The finish of a build, on the main process once every process's shards are complete: what this run did (the
summary it prints), the list of skipped samples, ``.facegen/run.json``, ``_info.json`` and the card."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import facegen
from facegen import registry
from facegen.api import Source, Transform, declared_paths
from facegen.builders.engine.outputs import NO_SPACE, abspath, discard_partial_files, no_space_message
from facegen.builders.engine.skipped import gather_skipped
from facegen.builders.engine.tars import check_lock
from facegen.builders.engine.work import Published
from facegen.errors import OutOfSpace, UsageError
from facegen.messages import count
from facegen.layout import INFO, OutputFolder
from facegen.layout.records import (
    ExpectedCountsRecord,
    LayoutRecord,
    LicenseRecord,
    ModelRecord,
    PathOptionRecord,
    PlanRecord,
    PluginRecord,
    RunOptions,
    RunRecord,
    ShardStats,
    Totals,
    json_safe,
)
from facegen.messages import warn


@dataclass
class Summary:
    identities: int = 0
    images: int = 0
    skipped: Counter = field(default_factory=Counter)
    shards: int = 0
    shards_written: int = 0
    images_written: int = 0
    seconds: float = 0.0
    out: str = ""
    units: int = 0  # identity-level transforms: hidden units of work, assembled into the shards
    units_written: int = 0
    assembly_seconds: float = 0.0  # this process's time assembling shards from units
    redone: Counter = field(default_factory=Counter)  # "shard"/"unit" -> files that failed their check, redone
    skipped_list: str | None = None  # where every skipped sample is listed

    @property
    def images_per_second(self) -> float:
        return self.images_written / self.seconds if self.seconds > 0 else 0.0

    def reasons(self, top: int | None = None) -> str:
        shown = self.skipped.most_common(top)
        more = len(self.skipped) - len(shown)
        return ", ".join(f"{reason}: {n}" for reason, n in shown) + (f", {more} other reasons" if more > 0 else "")

    def lines(self) -> list[str]:
        skipped = sum(self.skipped.values())
        kept = self.shards - self.shards_written
        where = f"; every skipped file is listed in {self.skipped_list}" if self.skipped_list else ""
        lines = [
            f"facegen build done: {self.out}",
            f"  identities {self.identities}, images {self.images}, shards {self.shards} "
            f"({self.shards_written} written now, {kept} already complete)",
        ]
        if self.units:
            share = 100 * self.assembly_seconds / self.seconds if self.seconds > 0 else 0.0
            lines.append(f"  units of work {self.units} ({self.units_written} written now); assembling the shards "
                         f"took {self.assembly_seconds:.1f} s = {share:.0f}% of the run")
        for kind, n in sorted(self.redone.items()):
            lines.append(f"  {count(n, kind)} failed {'their' if n != 1 else 'its'} check "
                         f"(size or XXH3-128 against its stats) and {'were' if n != 1 else 'was'} redone")
        lines.append(f"  skipped {skipped} ({self.reasons() or 'none'}){where}")
        if self.shards_written:
            lines.append(f"  {count(self.images_written, 'image')} in {count(self.shards_written, 'shard')} written "
                         f"now in {self.seconds:.1f} s = {self.images_per_second:.1f} images/s"
                         + (f"; {count(self.images - self.images_written, 'image')} in {count(kept, 'shard')} kept "
                            "from an earlier run" if kept else ""))
        elif self.units_written:  # units redone to the same bytes: the shards made from them stand
            lines.append(f"  {count(self.units_written, 'unit of work')} written again in {self.seconds:.1f} s; "
                         f"all {count(self.shards, 'shard')} ({count(self.images, 'image')}) were already complete "
                         "and kept")
        else:
            lines.append(f"  nothing to do: all {count(self.shards, 'shard')} ({count(self.images, 'image')}) were "
                         "already complete and kept")
        return lines

    def nothing_written(self) -> str:
        """The one line of a build in which no image was written."""
        if self.skipped:
            return (f"no image was written to {self.out}: all {count(sum(self.skipped.values()), 'sample')} were "
                    f"skipped ({self.reasons(3)}); every skipped file is listed in {self.skipped_list}")
        return f"no image was written to {self.out}: the plan's {count(self.identities, 'identity')} hold no image"


def finish(build, published: Published, lock, started: float, ranks=None) -> Summary:
    """Wait until every shard is complete (``ranks``: stop when a process that owes one is lost), then say what this
    run did and write the build's records and card."""
    published.shards.wait(lock, ranks)
    summary = summarise(build, published, time.perf_counter() - started)
    differs = counts_differ(build, summary)
    if differs:
        warn(differs)
    check_lock(lock)  # another build took the folder over: its records are its own
    try:
        # the skips are listed by the tars that met them: the shards (per-image) or the units of work
        lists = published.units or published.shards
        listed = gather_skipped(build.folder, [lists.place(i).skipped for i in range(lists.count)])
        summary.skipped_list = str(listed) if listed else None
        run_record(build, published, summary).write(build.folder.run_json)
        if summary.images == 0:  # nothing to publish: no _info.json, no card, and not "done"
            raise UsageError(summary.nothing_written())
        write_info_json(build.folder.root, f"{build.source.name}-{build.transform.name}")
        from facegen.cards import write_card

        write_card(build.out)
    except OSError as exc:
        if exc.errno not in NO_SPACE:
            raise
        discard_partial_files(build.out)
        raise OutOfSpace(no_space_message(build.out, exc, None, None, None)) from None
    return summary


def summarise(build, published: Published, seconds: float) -> Summary:
    """What the build holds, and what of it this run wrote (a file whose stats are newer than when it began)."""
    shards, units = published.shards, published.units
    summary = Summary(shards=shards.count, seconds=seconds, out=str(build.out),
                      assembly_seconds=published.assembly_seconds, units=units.count if units else 0)
    for j, stats in shards.written().items():
        summary.images += stats.images
        if shards.written_now(j, stats):
            summary.shards_written += 1
            summary.images_written += stats.images
            if stats.redone_because:
                summary.redone["shard"] += 1
    per_identity: Counter = Counter({i: 0 for i in published.identities_without_images})
    for i, stats in (units or shards).written().items():  # the tars that met the source
        per_identity.update(stats.images_per_identity)
        summary.skipped.update(stats.skipped)
        if units and units.written_now(i, stats):
            summary.units_written += 1
            if stats.redone_because:
                summary.redone["unit"] += 1
    summary.identities = len(per_identity)
    return summary


def counts_differ(build, summary: Summary) -> str | None:
    """A line when the whole source was read and its counts (images written or skipped) differ from what the
    dataset's publisher states it holds; None otherwise."""
    expected, options = build.source.expected_counts, build.options
    if expected is None or options.limit_identities is not None or options.identities_file:
        return None
    found = {"identities": summary.identities, "images": summary.images + sum(summary.skipped.values())}
    stated = {what: getattr(expected, what) for what in found if getattr(expected, what) is not None}
    if all(found[what] == count for what, count in stated.items()):
        return None
    name = build.source.dataset_name or build.source.name
    holds = " and ".join(f"{found[what]:,} {what}" for what in stated)
    states = " and ".join(f"{count:,} {what}" for what, count in stated.items())
    return (f"{name}: the source holds {holds}, but its publisher states {states}"
            + (f" ({expected.stated_by})" if expected.stated_by else "") + ": a partial download, or another "
            "release? The card states the counts of this build.")


# --- run.json ---


def _plugin_record(plugin: Source | Transform, kind: str) -> PluginRecord:
    entry = registry.discover(kind).get(plugin.name)
    version = None
    if entry is not None and entry.entry_point.dist is not None:
        version = entry.entry_point.dist.version
    lic = plugin.license
    return PluginRecord(
        name=plugin.name, description=plugin.description, card_description=plugin.card_description,
        homepage=plugin.homepage, citation=plugin.citation, distribution=entry.distribution if entry else "?",
        version=version,
        license=None if lic is None else LicenseRecord(id=lic.id, name=lic.name, link=lic.link, text=lic.text,
                                                       commercial_use=lic.commercial_use, note=lic.note),
        options=json_safe(plugin.opts), columns=plugin.column_descriptions(),
        provenance=json_safe(plugin.provenance()),
        synthetic=plugin.synthetic,  # the card calls images synthetic only when stated
        # what cards, publish and --from-card hide, publish and ask again (never known by the option's name)
        path_options={name: PathOptionRecord(**declared) for name, declared in declared_paths(plugin).items()},
        dataset_name=(plugin.dataset_name or plugin.name) if isinstance(plugin, Source) else None,
        identity_noun=plugin.identity_noun if isinstance(plugin, Source) else None,
        channels=plugin.channels if isinstance(plugin, Source) else None,
        expected_counts=ExpectedCountsRecord(**dataclasses.asdict(plugin.expected_counts))
        if isinstance(plugin, Source) and plugin.expected_counts is not None else None,
        models=[ModelRecord(**json_safe(vars(m))) for m in plugin.models()] if isinstance(plugin, Transform) else [],
        copies_source_images=plugin.copies_source_images if isinstance(plugin, Transform) else None,
    )


def _git_revision() -> str | None:
    package_dir = Path(facegen.__file__).resolve().parent.parent
    if not (package_dir / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(package_dir), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def dataset_features(source: Source, transform: Transform, image_format: str):
    """Every column of the published dataset, so `datasets` never infers a schema from the first shard."""
    from datasets import Features, Image, Value

    json_fields = {"identity": Value("string"), "source": Value("string"), "source_ref": Value("string"),
                   "width": Value("int32"), "height": Value("int32")}  # of the stored pixels
    if source.channels is not None:
        json_fields["channels"] = Value("string")  # of the stored pixels: rgb, or bgr as the source holds them
    json_fields.update(transform.json_features(source))
    columns: dict[str, Any] = {image_format: Image(), "cls": Value("int64"), "json": json_fields}
    columns.update(transform.extra_features(source))
    columns["__key__"] = Value("string")
    columns["__url__"] = Value("string")
    return Features(columns)


def run_record(build, published: Published, summary: Summary) -> RunRecord:
    """``.facegen/run.json``: the build's full provenance (never uploaded; the card shows it scrubbed)."""
    o, plan, units = build.options, build.plan, published.units
    transform = _plugin_record(build.transform, "transform")
    if not build.models.loaded:  # this process loaded no model (a rerun with nothing to generate)
        transform = _keep_loaded_models(build.folder.run_json, transform)
    return RunRecord(
        facegen_version=facegen.__version__,
        git_revision=_git_revision(),
        command=o.command or ["facegen", "build"],
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        python=sys.version.split()[0],
        options=RunOptions(
            source=o.source, source_path=abspath(o.source_path), source_opts=json_safe(build.source.opts),
            plugin=o.plugin, plugin_opts=json_safe(build.transform.opts),
            recipe=os.path.abspath(o.recipe) if o.recipe and os.path.isfile(o.recipe) else o.recipe,
            limit_identities=o.limit_identities, identities_file=o.identities_file,
            identities_file_sha256=build.identities_file_sha256, shard_size=o.shard_size,
            shard_samples=o.shard_samples, shards_multiple_of=o.shards_multiple_of, seed=o.seed,
            format=build.image_format, strict=o.strict, verify=o.verify, out=str(build.out)),
        plan=PlanRecord(identities=len(plan.ids), shards=len(published.layout), plan_sha256=plan.sha256()),
        layout=LayoutRecord(
            mode="units" if units else "per-image",
            units=units.count if units else None,
            identities_per_unit=plan.identities_per_unit if units else None,
            planned_shard_lengths=published.layout,
            order="one permutation of all samples, seeded by --seed (facegen.builders.plan.sample_order)",
            units_xxh3_128=published.units_xxh3_128,
            identities_without_images=list(published.identities_without_images[:100])),
        source=_plugin_record(build.source, "source"),
        transform=transform,
        features=dataset_features(build.source, build.transform, build.image_format).to_dict(),
        image_column=build.image_format,
        quality_fields=list(build.samples.quality_fields),
        totals=Totals(identities=summary.identities, images=summary.images, skipped=dict(summary.skipped),
                      shards=summary.shards),
        channels=build.samples.channels and ("rgb" if build.samples.to_rgb else build.samples.channels),
    )


def _keep_loaded_models(run_json: Path, transform: PluginRecord) -> PluginRecord:
    """A rerun that loaded no model keeps what the run that made the shards recorded as loaded."""
    before = RunRecord.read(run_json)
    if before is None:
        return transform
    loaded = {(m.id, m.role): m.loaded for m in before.transform.models}
    models = [m if m.loaded or not loaded.get((m.id, m.role)) else
              dataclasses.replace(m, loaded=loaded[(m.id, m.role)]) for m in transform.models]
    return dataclasses.replace(transform, models=models)


def write_info_json(out: Path, name: str) -> dict:
    """``OUT/_info.json`` in the format of timm's WebDataset reader (``timm/data/readers/reader_wds.py``):
    ``splits.train.{name, num_samples, filenames, shard_lengths}``, file names relative to ``OUT`` (where timm's
    ``--data-dir`` points) and lengths as written (skipped samples make a shard shorter)."""
    shards = sorted((s for s in map(ShardStats.read, OutputFolder(out).shard_stats_files()) if s is not None),
                    key=lambda s: s.shard)
    info = {
        "name": name,
        "splits": {"train": {
            "name": "train",
            "num_samples": sum(s.images for s in shards),
            "filenames": [s.tar for s in shards],
            "shard_lengths": [s.images for s in shards],
        }},
    }
    from facegen.cards.card import write_recorded

    write_recorded(out, INFO, json.dumps(info, indent=1).encode())  # a user's _info.json is refused, kept
    return info
