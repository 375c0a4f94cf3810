"""The run loop: plan, distribute the work over processes, transform, write, resume; then provenance and card.

Works alone, under ``accelerate launch`` and under ``torchrun``. Per-image transforms (passthrough) write the
published shards directly, each reading its samples from the source in the shuffled order. Identity-level
transforms (arc2face, e4e) write units of ``--shard-size`` identities under ``.facegen/units/``; once all are
complete, the published shards are assembled from them. Process ``r`` of ``W`` takes the units and shards
``i ≡ r (mod W)`` that are not complete yet; the output does not depend on ``W``, the batch size or interruptions.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from tqdm.auto import tqdm

import facegen
from facegen import registry
from facegen.api import Source, Transform
from facegen.builders.engine.images import VERIFY_LEVELS, check_source_images
from facegen.builders.engine.lock import output_lock
from facegen.builders.engine.options import BuildConfig
from facegen.builders.engine.outputs import (
    NO_SPACE,
    create_output_folder,
    discard_partial_files,
    no_space_message,
    prepare_output,
    refuse_out_inside_source,
    resolve_out,
)
from facegen.builders.plan import (
    DEFAULT_SHARD_SAMPLES,
    EmptyPlan,
    Plan,
    check_layout_options,
    empty_plan_message,
    identity_seed,
    make_plan,
    sample_order,
    shard_bounds,
    shard_lengths,
    shards_of,
)
from facegen.builders.engine.writer import (
    ShardWriter,
    check_place,
    dumps,
    read_stats,
    write_atomic,
)
from facegen.builders.engine.skipped import gather_skipped
from facegen.errors import OutOfSpace, SampleError, UsageError
from facegen.layout import INFO, OutputFolder, shard_number
from facegen.records import Identity, SourceImage, Skip

# identities are read ahead and their images checked by threads: file reads, zlib and PIL decodes release the GIL
LOAD_THREADS = max(4, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 4))
LOAD_CHUNK = 16  # single images (per-image transforms) are read ahead in chunks: a thread task costs ~20 µs


def distributed_state():
    """accelerate's process state; on a machine without CUDA it needs ``cpu=True`` to see the ranks."""
    import torch
    from accelerate import PartialState

    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        state = PartialState(cpu=not torch.cuda.is_available())
    except (ValueError, RuntimeError) as exc:  # e.g. WORLD_SIZE set by hand without a launcher's rendezvous
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot join the {world} processes of WORLD_SIZE={world}: {first_line}") from None
    if world > 1 and state.num_processes == 1:
        raise UsageError(
            f"WORLD_SIZE={world} but accelerate sees one process: every process would write every shard; "
            "launch with `accelerate launch --multi_gpu --num_processes N` or `torchrun --nproc_per_node N`"
        )
    return state


def _json_safe(value: Any) -> Any:
    return json.loads(dumps(value).decode()) if value is not None else None


def _plugin_record(plugin: Source | Transform, kind: str) -> dict[str, Any]:
    entry = registry.discover(kind).get(plugin.name)
    dist = entry.distribution if entry else "?"
    version = None
    if entry is not None and entry.entry_point.dist is not None:
        version = entry.entry_point.dist.version
    lic = plugin.license
    record = {
        "name": plugin.name,
        "description": plugin.description,
        "card_description": plugin.card_description,
        "homepage": plugin.homepage,
        "citation": plugin.citation,
        "distribution": dist,
        "version": version,
        "license": None if lic is None else {
            "id": lic.id, "name": lic.name, "link": lic.link, "text": lic.text,
            "commercial_use": lic.commercial_use, "note": lic.note,
        },
        "options": _json_safe(plugin.opts),
        "columns": dict(plugin.columns),
        "provenance": _json_safe(plugin.provenance()),
        "synthetic": getattr(plugin, "synthetic", None),  # the card calls images synthetic only when stated
    }
    if isinstance(plugin, Transform):
        record["models"] = [_json_safe(vars(m)) for m in plugin.models()]
    return record


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
    json_fields.update(transform.json_features(source))
    columns: dict[str, Any] = {image_format: Image(), "cls": Value("int64"), "json": json_fields}
    columns.update(transform.extra_features(source))
    columns["__key__"] = Value("string")
    columns["__url__"] = Value("string")
    return Features(columns)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


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
            lines.append(f"  {n} {kind}{'s' if n != 1 else ''} failed {'their' if n != 1 else 'its'} check "
                         f"(size or XXH3-128 against its stats) and {'were' if n != 1 else 'was'} redone")
        lines.append(f"  skipped {skipped} ({self.reasons() or 'none'}){where}")
        if self.shards_written:
            lines.append(f"  {self.images_written} images in {_count(self.shards_written, 'shard')} written now in "
                         f"{self.seconds:.1f} s = {self.images_per_second:.1f} images/s"
                         + (f"; {self.images - self.images_written} images in {_count(kept, 'shard')} kept from an "
                            "earlier run" if kept else ""))
        elif self.units_written:  # units redone to the same bytes: the shards made from them stand
            lines.append(f"  {_count(self.units_written, 'unit')} of work written again in {self.seconds:.1f} s; "
                         f"all {self.shards} shards ({self.images} images) were already complete and kept")
        else:
            lines.append(f"  nothing to do: all {self.shards} shards ({self.images} images) were already complete "
                         "and kept")
        return lines

    def nothing_written(self) -> str:
        """The one line of a build in which no image was written."""
        if self.skipped:
            return (f"no image was written to {self.out}: all {sum(self.skipped.values())} samples were skipped "
                    f"({self.reasons(3)}); every skipped file is listed in {self.skipped_list}")
        return f"no image was written to {self.out}: the {self.identities} identities of the plan hold no image"


@dataclass
class SampleTable:
    """Every sample of the published dataset, in plan order, with what it takes to fetch it.

    Per-image transforms: one row per source image (label, image number within its identity). Identity-level
    transforms: one row per sample written to a unit (unit, offset and length of its members there, key).
    """

    cls: np.ndarray  # label of each sample
    number: np.ndarray  # per-image: position of the image in the source's list of the identity
    unit: np.ndarray | None = None
    offset: np.ndarray | None = None
    length: np.ndarray | None = None
    keys: list[str] | None = None
    images: list | None = None  # identity-level: (mode, "WxH", changes) of each sample's image, as its unit says

    def __len__(self) -> int:
        return len(self.cls)


def _snapshot(places) -> dict:
    """What each file's stats said before this run (to tell at the end what this run wrote)."""
    return {key: (read_stats(place.stats) or {}).get("started_at") for key, place in places.items()}


class Builder:
    """One process's part of a build."""

    def __init__(self, config: BuildConfig, state=None):
        self.config = config
        missing = [flag for flag, value in (("--source", config.source), ("--plugin", config.plugin),
                                            ("--out", config.out)) if not value]
        if missing:
            raise UsageError(f"missing {', '.join(missing)} (give it on the command line or in a --recipe)")
        if config.format not in (None, "png", "jpg"):
            raise UsageError(f"--format must be png or jpg, got {config.format!r}")
        if config.verify not in VERIFY_LEVELS:
            raise UsageError(f"--verify must be full or header, got {config.verify!r}")
        if config.shard_samples is None:
            config.shard_samples = DEFAULT_SHARD_SAMPLES
        check_layout_options(config.shard_samples, config.shards_multiple_of)
        source_cls = registry.get_source(config.source)
        transform_cls = registry.get_transform(config.plugin)
        if source_cls.needs_path and not config.source_path:
            raise UsageError(f"missing --source-path (source {config.source!r} reads files)")
        if not source_cls.needs_path:
            config.source_path = None  # not read, so not part of the build's identity
        self.out = resolve_out(config.out)
        self.folder = OutputFolder(self.out)
        refuse_out_inside_source(self.out, config.source_path)
        self.state = state or distributed_state()
        self.source: Source = source_cls(config.source_path, **config.source_opts)
        self.transform: Transform = transform_cls(**config.plugin_opts)
        try:
            self.plan: Plan = make_plan(self.source.identities(), config.shard_size, config.identities_file,
                                        config.limit_identities)
        except EmptyPlan:
            raise UsageError(empty_plan_message(self.source.name, config.source_path, source_cls.description)) \
                from None
        self.identities_file_sha256 = _file_sha256(config.identities_file)  # the file this plan was made from
        self.format = config.format or self.transform.output_format(self.source)
        self.per_image = bool(getattr(self.transform, "per_image", False))
        self._set_up = False
        self.lock = None  # the output folder's lock, held by the main process while it runs
        self.phase = "units"  # what is being written: "units", "assembly" or "shards" (sizes a full-disk message)
        self.partial = (0, 0, 0)  # bytes, samples, identities of a file cut short (a full disk): sizes what is needed

    def signature(self) -> dict[str, Any]:
        c = self.config
        return _json_safe({
            "source": c.source, "source_path": _abspath(c.source_path), "source_opts": self.source.opts,
            "plugin": c.plugin, "plugin_opts": self.transform.opts, "plan_sha256": self.plan.sha256(),
            "identities": len(self.plan.ids), "shard_size": c.shard_size, "shard_samples": c.shard_samples,
            "shards_multiple_of": c.shards_multiple_of, "seed": c.seed, "format": self.format,
            "verify": c.verify,
        })

    def _setup(self) -> None:
        if not self._set_up:  # a process with nothing to generate loads no model
            self.transform.setup(self.state.device)
            self._set_up = True

    def _writer(self, index: int, unit: bool) -> ShardWriter:
        writer = ShardWriter(self.out, index, self.format, self.source.name,
                             getattr(self.transform, "quality_fields", ()),
                             rank=(self.state.process_index, self.state.num_processes), unit=unit,
                             verify=self.config.verify, lossy_allowed=self.config.format == "jpg")
        reason = self._redo_reasons.get(("unit" if unit else "shard", index))
        if reason:  # said in the stats, so that the main process's summary can count it
            writer.extra_stats["redone_because"] = reason
        return writer

    def _todo(self, places: dict[int, Any], mine: list[int], kind: str) -> list[int]:
        """This process's files that are not complete (size and checksum against their stats); a file that fails
        its check loses its stats first, so that nobody takes it for complete while it is redone."""
        todo = []
        for i in mine:
            problem = check_place(places[i])
            if problem is None:
                continue
            if problem != "missing":
                self._redo_reasons[(kind, i)] = problem
                places[i].stats.unlink(missing_ok=True)
            todo.append(i)
        return todo

    # --- writing samples: the transform on batches, with read-ahead ---

    def _identities(self, positions: range, pool: ThreadPoolExecutor) -> Iterator[tuple[Identity, int]]:
        """A unit's identities in plan order, loaded ahead by a few threads."""
        ids = self.plan.ids

        def load(pos: int) -> tuple[Identity, int]:
            items = self._checked(self.source.load(ids[pos]))
            return Identity(
                id=ids[pos], cls=pos, seed=identity_seed(self.config.seed, ids[pos]),
                images=[i for i in items if isinstance(i, SourceImage)],
                skipped=[i for i in items if isinstance(i, Skip)],
            ), 0

        return _read_ahead(pool, load, positions, max(2 * self.transform.batch_size, 8))

    def _single_images(self, table: SampleTable, rows: np.ndarray,
                       pool: ThreadPoolExecutor) -> Iterator[tuple[Identity, int]]:
        """One identity holding one image per sample of ``rows``, in that (the published) order."""
        ids = self.plan.ids

        def load(chunk: list[int]) -> list[tuple[Identity, int]]:
            loaded = []
            for row in chunk:
                pos, number = int(table.cls[row]), int(table.number[row])
                items = self._checked(self.source.load_images(ids[pos], [number]))
                loaded.append((Identity(
                    id=ids[pos], cls=pos, seed=identity_seed(self.config.seed, ids[pos]),
                    images=[i for i in items if isinstance(i, SourceImage)],
                    skipped=[i for i in items if isinstance(i, Skip)],
                ), number))
            return loaded

        rows = rows.tolist()
        chunks = [rows[k:k + LOAD_CHUNK] for k in range(0, len(rows), LOAD_CHUNK)]  # one thread task per chunk
        for loaded in _read_ahead(pool, load, chunks, max(2 * self.transform.batch_size // LOAD_CHUNK, 8)):
            yield from loaded

    def _checked(self, items: list[SourceImage | Skip]) -> list[SourceImage | Skip]:
        """A source's items, with every image checked here, on the loading thread (PIL and zlib release the GIL),
        when the transform writes them as they are; a checked image is not checked again by the writer."""
        if self.transform.copies_source_images:
            items = check_source_images(items, self.config.verify)
        return items

    def _write(self, writer: ShardWriter, identities: Iterator[tuple[Identity, int]], progress) -> ShardWriter:
        """Transform and write ``identities`` (with the number of their first sample); the caller commits."""
        try:
            for batch in _batches(identities, self.transform.batch_size):
                results = iter(self.transform([identity for identity, _ in batch]))
                for identity, first in batch:
                    result = next(results, None)
                    if result is None or result.identity.id != identity.id:
                        raise RuntimeError(f"transform {self.transform.name!r} did not return identity "
                                           f"{identity.id} in order")
                    result.skipped = identity.skipped + result.skipped
                    writer.write(result, first)  # adds a skip for a sample it cannot encode
                    if self.config.strict and result.skipped:  # the file is aborted: nothing of it remains
                        bad = result.skipped[0]
                        raise SampleError(bad.ref, f"{bad.reason}{': ' + bad.detail if bad.detail else ''}")
                    progress.update(1)
            writer.finish()
            return writer
        except BaseException:
            self.partial = (writer._tar.size, writer.images, writer.identities)
            writer.abort()
            raise

    def write_shard(self, index: int, pool: ThreadPoolExecutor, progress) -> ShardWriter:
        """Write unit of work ``index`` (identities ``[i·S, (i+1)·S)``) under its temporary name."""
        self._setup()
        return self._write(self._writer(index, unit=True), self._identities(self.plan.unit(index), pool), progress)

    def _write_files(self, jobs: list, progress) -> None:
        """Run ``(index, make_writer)`` jobs; a file's fsync + rename + stats run in a committer thread while the
        next one is written."""
        with ThreadPoolExecutor(LOAD_THREADS) as pool, ThreadPoolExecutor(1) as committer:
            committing = None
            for index, make in jobs:
                writer = make(index, pool)
                committing = self._commit(writer, committing, committer)
                progress.set_postfix_str(f"{'unit' if writer.unit else 'shard'} {index}: {writer.images} images",
                                         refresh=False)
            if committing is not None:
                committing.result()

    def _commit(self, writer: ShardWriter, committing, committer: ThreadPoolExecutor):
        """Once the previous file's commit is done, submit ``writer``'s (a finished file) to the committer thread;
        a failed earlier commit, a lost lock or Ctrl-C discards ``writer``'s file instead."""
        try:
            if committing is not None:
                committing.result()
            if self.lock is not None:
                self.lock.check()  # another build took the folder over: commit nothing more
            return committer.submit(writer.commit)
        except BaseException:  # Ctrl-C, a failed commit: the finished file is not committed
            writer.abort()
            raise

    # --- the two ways to the published shards ---

    def list_images(self) -> SampleTable:
        """Per-image transforms: every source image of the plan, from the source's listing (no image is read)."""
        digest = xxhash.xxh3_128()  # of every listed ref: a shard planned from another listing is not reused

        def count(identity_id: str) -> int:
            refs = self.source.image_refs(identity_id)
            digest.update("\0".join([identity_id, *refs]).encode("utf-8", "surrogateescape") + b"\n")
            return len(refs)

        counts = np.fromiter((count(i) for i in self.plan.ids), dtype=np.int64, count=len(self.plan.ids))
        self.listing_digest = digest.hexdigest()
        cls = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        starts = np.cumsum(counts) - counts
        number = np.arange(len(cls), dtype=np.int64) - np.repeat(starts, counts)
        self.identities_without_images = [self.plan.ids[i] for i in np.flatnonzero(counts == 0)]
        return SampleTable(cls=cls, number=number)

    def _run_per_image(self, progress_total) -> None:
        """The published shards are the units of work: each reads its samples from the source, shuffled."""
        state = self.state
        table = self.list_images()
        if not len(table):
            raise UsageError("the source lists no image for the identities of the plan")
        self.phase = "shards"
        self.layout = self._layout(len(table))
        places = {j: self.folder.shard(j) for j in range(len(self.layout))}
        self.snapshot = _snapshot(places) if state.is_main_process else {}
        if self.config.strict:
            self._refuse_kept_skips(places, "shard", "listing_xxh3_128", self.listing_digest)
        mine = self._stale_removed(places, "listing_xxh3_128", self.listing_digest)
        mine = self._todo(places, mine, "shard")
        order = sample_order(len(table), self.config.seed)
        bounds = shard_bounds(self.layout)

        def make(j, pool):
            self._setup()
            rows = order[bounds[j][0]:bounds[j][1]]
            writer = self._writer(j, unit=False)
            writer.extra_stats["listing_xxh3_128"] = self.listing_digest
            return self._write(writer, self._single_images(table, rows, pool), progress)

        if mine:
            self._setup()  # before the progress bar: a model that fails to load says so in one line
        progress = progress_total(sum(self.layout[j] for j in mine), "img")
        with progress:
            self._write_files([(j, make) for j in mine], progress)

    def _run_units(self, progress_total) -> None:
        """Identity-level transforms: units of --shard-size identities under .facegen/units, then assembly."""
        state, plan = self.state, self.plan
        units = {i: self.folder.unit(i) for i in range(plan.num_units)}
        self.unit_snapshot = _snapshot(units) if state.is_main_process else {}
        if self.config.strict:  # the units hold the skips (an assembled shard copies samples and skips none)
            self._refuse_kept_skips(units, "unit of work")
        mine = self._todo(units, plan.units_of(state.process_index, state.num_processes), "unit")
        if mine:
            self._setup()  # before the progress bar: a model that fails to load says so in one line
        progress = progress_total(sum(len(plan.unit(i)) for i in mine), "id")
        with progress:
            self._write_files([(i, lambda i, pool: self.write_shard(i, pool, progress)) for i in mine], progress)
        self.transform.close()  # the models are not needed for the assembly
        _wait_for(units, self.lock)
        self._assemble(units, progress_total)

    def read_units(self, units: dict) -> tuple[SampleTable, str]:
        """Every sample of every unit, in unit order, and a digest of the units' checksums."""
        parts, digest = [], xxhash.xxh3_128()
        for i in sorted(units):
            index = json.loads(units[i].index.read_bytes())
            digest.update((read_stats(units[i].stats) or {}).get("tar_xxh3_128", "").encode())
            parts.append((i, index))
        cls = np.array([c for _, ix in parts for c in ix["cls"]], dtype=np.int64)
        table = SampleTable(
            cls=cls, number=np.zeros(len(cls), dtype=np.int64),
            unit=np.array([i for i, ix in parts for _ in ix["keys"]], dtype=np.int64),
            offset=np.array([o for _, ix in parts for o in ix["offsets"]], dtype=np.int64),
            length=np.array([n for _, ix in parts for n in ix["lengths"]], dtype=np.int64),
            keys=[k for _, ix in parts for k in ix["keys"]],
            images=[info for _, ix in parts for info in _images_info(ix)],
        )
        return table, digest.hexdigest()

    def _assemble(self, units: dict, progress_total) -> None:
        """The published shards from the units: process r of W assembles shards j ≡ r (mod W), each a series of
        preads of whole samples (headers included: keys do not change) in the shuffled order."""
        state = self.state
        started = time.perf_counter()
        table, units_digest = self.read_units(units)
        self.phase = "assembly"
        self.units_bytes = sum((read_stats(place.stats) or {}).get("tar_bytes", 0) for place in units.values())
        self.units_samples = len(table)
        # every sample skipped: no shard (those of an earlier build are removed); the run says so in one line
        self.layout = self._layout(len(table))
        places = {j: self.folder.shard(j) for j in range(len(self.layout))}
        self.snapshot = _snapshot(places) if state.is_main_process else {}
        mine = self._todo(places, self._stale_removed(places, "units_xxh3_128", units_digest), "shard")
        order = sample_order(len(table), self.config.seed)
        bounds = shard_bounds(self.layout)
        ids = self.plan.ids
        fds = {i: os.open(units[i].tar, os.O_RDONLY) for i in units}
        progress = progress_total(sum(self.layout[j] for j in mine), "img")
        try:
            with progress, ThreadPoolExecutor(1) as committer:
                committing = None
                for j in mine:
                    writer = self._writer(j, unit=False)
                    writer.extra_stats.update(assembled_from_units=len(units), units_xxh3_128=units_digest)
                    try:
                        for row in order[bounds[j][0]:bounds[j][1]].tolist():
                            block = os.pread(fds[int(table.unit[row])], int(table.length[row]), int(table.offset[row]))
                            cls = int(table.cls[row])
                            writer.copy(table.keys[row], ids[cls], cls, block, table.images[row])
                            progress.update(1)
                        writer.finish()
                    except BaseException:
                        self.partial = (writer._tar.size, writer.images, writer.identities)
                        writer.abort()
                        raise
                    committing = self._commit(writer, committing, committer)
                    progress.set_postfix_str(f"shard {j}: {writer.images} images", refresh=False)
                if committing is not None:
                    committing.result()
        finally:
            for fd in fds.values():
                os.close(fd)
        self.assembly_seconds = time.perf_counter() - started
        self.units_digest = units_digest

    def _stale_removed(self, places: dict, field: str, digest: str) -> list[int]:
        """This process's shards, after removing the stats of those made from other inputs (a source listing or
        units that changed since): they are then missing, and redone. The main process also removes shards past
        the new count (`datasets` would load them)."""
        if self.state.is_main_process:
            for path in self.folder.shard_tars():
                j = shard_number(path)
                if j is not None and j >= len(places):
                    stale = self.folder.shard(j)
                    # stats first: never complete-looking
                    for file in (stale.stats, stale.index, stale.tar, stale.skipped):
                        file.unlink(missing_ok=True)
        mine = shards_of(len(places), self.state.process_index, self.state.num_processes)
        for j in mine:
            if (read_stats(places[j].stats) or {}).get(field, digest) != digest:
                places[j].stats.unlink(missing_ok=True)
        return mine

    def _refuse_kept_skips(self, places: dict, kind: str, field: str | None = None, digest: str | None = None
                           ) -> None:
        """--strict on a folder whose complete files (kept, not redone) skipped samples (an earlier run without
        --strict) stops at the first of them, as if it had been met now: a strict build's card never counts a
        skipped sample. Every process judges every file before any process changes one (then a barrier), so all
        stop alike."""
        try:
            for i, place in places.items():
                stats = read_stats(place.stats)
                if not stats or not stats.get("skipped") or check_place(place, verify=False) is not None:
                    continue  # redone anyway (missing, damaged or cut short)
                if field is not None and stats.get(field) != digest:
                    continue  # planned from another listing: redone
                first = (stats.get("failures") or [{}])[0]
                raise SampleError(first.get("ref", f"{kind} {i}"),
                                  f"{first.get('reason', 'skipped')} (in {kind} {i}, kept from an earlier run "
                                  "without --strict; pass --overwrite to rebuild strictly)")
        finally:
            if self.state.num_processes > 1:
                self.state.wait_for_everyone()

    def _layout(self, num_samples: int) -> list[int]:
        return shard_lengths(num_samples, self.config.shard_samples, self.config.shards_multiple_of)

    # --- the run ---

    def run(self) -> Summary | None:
        """The build, holding the output folder's lock throughout (units, assembly, records, card); a full disk
        stops it in one line, with every complete file intact and the partial one discarded."""
        create_output_folder(self.out)
        with output_lock(self.out, self.state, self.config.break_lock) as self.lock:
            try:
                return self._run()
            except OSError as exc:
                if exc.errno not in NO_SPACE:
                    raise
                discard_partial_files(self.out)
                raise OutOfSpace(self._no_space_message(exc)) from None

    def _run(self) -> Summary | None:
        state = self.state
        prepare_output(self.out, self.signature(), self.config.overwrite, state)
        self._redo_reasons: dict[tuple[str, int], str] = {}
        self.assembly_seconds = 0.0
        self.units_digest = None
        self.listing_digest = None
        self.identities_without_images: list[str] = []
        self.unit_snapshot: dict = {}
        started = time.perf_counter()

        def progress_total(total: int, unit: str):
            return tqdm(total=total, unit=unit, dynamic_ncols=True, desc=f"facegen {self.config.plugin}",
                        disable=not state.is_main_process)

        try:
            if self.per_image:
                self._run_per_image(progress_total)
            else:
                self._run_units(progress_total)
        finally:  # open files and HDF5 handles are released even when a bad sample stops the run
            self.transform.close()
            self.source.close()
        if not state.is_main_process:
            return None
        places = {j: self.folder.shard(j) for j in range(len(self.layout))}
        _wait_for(places, self.lock)
        seconds = time.perf_counter() - started
        summary = self._summarise(places, seconds)
        self.phase = "records"
        if self.lock is not None:
            self.lock.check()  # another build took the folder over: its records are its own
        # the skips are listed by the files that met them: the shards (per-image) or the units of work
        lists = places if self.per_image else {i: self.folder.unit(i) for i in range(self.plan.num_units)}
        listed = gather_skipped(self.out, [lists[i].skipped for i in sorted(lists)])
        summary.skipped_list = str(listed) if listed else None
        self._write_run_json(summary)
        if summary.images == 0:  # nothing to publish: no _info.json, no card, and not "done"
            raise UsageError(summary.nothing_written())
        write_info_json(self.out, self._info_name())
        from facegen.cards import write_card

        write_card(self.out)
        return summary

    def _no_space_message(self, exc: OSError) -> str:
        """The full-disk line, with the space the rest of the build needs (measured on the files written so far)."""
        plan, partial_bytes, partial_samples, partial_identities = self.plan, *self.partial
        if self.phase == "units":
            files = {i: self.folder.unit(i) for i in range(plan.num_units)}
            amount = {i: len(plan.unit(i)) for i in files}  # identities
            what, counted, noun = "unit of work", "identities", "identities"
            partial_amount = partial_identities
        elif self.phase in ("shards", "assembly"):
            files = {j: self.folder.shard(j) for j in range(len(self.layout))}
            amount = dict(enumerate(self.layout))  # samples (skipped ones make a shard shorter: an upper bound)
            what, counted, noun = "shard", "images", "images"
            partial_amount = partial_samples
        else:  # records and card: every file is complete
            return no_space_message(self.out, exc, None, None, None)
        sizes, measured, done = [], 0, set()
        for i, place in files.items():
            stats = read_stats(place.stats)
            if stats is None or check_place(place, verify=False) is not None:
                continue
            sizes.append(int(stats.get("tar_bytes", 0)))
            measured += int(stats.get(counted, 0))
            done.add(i)
        left = sum(n for i, n in amount.items() if i not in done)
        largest = max(sizes + [partial_bytes]) or None
        if self.phase == "assembly":  # every sample is in a unit: the shards take about as much again
            per = self.units_bytes / self.units_samples if self.units_samples else None
        else:
            known = measured + partial_amount
            per = (sum(sizes) + partial_bytes) / known if known else None
        need = per * left if per else None
        if need is not None and self.phase == "units":
            need += per * len(plan.ids)  # the assembly then copies every sample into the published shards
            noun = "identities (and the assembly of the shards)"
        return no_space_message(self.out, exc, f"the {left} {noun} left", need, largest, what)

    def _summarise(self, places: dict, seconds: float) -> Summary:
        summary = Summary(shards=len(places), seconds=seconds, out=str(self.out),
                          assembly_seconds=self.assembly_seconds)
        per_identity: Counter = Counter({i: 0 for i in self.identities_without_images})
        work = places
        if not self.per_image:
            work = {i: self.folder.unit(i) for i in range(self.plan.num_units)}
            summary.units = len(work)
        for j, place in places.items():
            stats = read_stats(place.stats) or {}
            summary.images += stats.get("images", 0)
            if stats.get("started_at") != self.snapshot.get(j):
                summary.shards_written += 1
                summary.images_written += stats.get("images", 0)
                if stats.get("redone_because"):
                    summary.redone["shard"] += 1
        for i, place in work.items():
            stats = read_stats(place.stats) or {}
            per_identity.update(stats.get("images_per_identity", {}))
            summary.skipped.update(stats.get("skipped", {}))
            if not self.per_image and stats.get("started_at") != self.unit_snapshot.get(i):
                summary.units_written += 1
                if stats.get("redone_because"):
                    summary.redone["unit"] += 1
        summary.identities = len(per_identity)
        return summary

    def _info_name(self) -> str:
        return f"{self.source.name}-{self.transform.name}"

    def _write_run_json(self, summary: Summary) -> None:
        c = self.config
        features = dataset_features(self.source, self.transform, self.format)
        run = {
            "facegen_version": facegen.__version__,
            "git_revision": _git_revision(),
            "command": c.command or ["facegen", "build"],
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "python": sys.version.split()[0],
            "options": {
                "source": c.source, "source_path": _abspath(c.source_path),
                "source_opts": _json_safe(self.source.opts), "plugin": c.plugin,
                "plugin_opts": _json_safe(self.transform.opts), "recipe": c.recipe,
                "limit_identities": c.limit_identities, "identities_file": c.identities_file,
                "identities_file_sha256": self.identities_file_sha256, "shard_size": c.shard_size,
                "shard_samples": c.shard_samples, "shards_multiple_of": c.shards_multiple_of,
                "seed": c.seed, "format": self.format, "strict": c.strict, "verify": c.verify,
            },
            "plan": {"identities": len(self.plan.ids), "shards": len(self.layout),
                     "plan_sha256": self.plan.sha256()},
            "layout": {
                "mode": "per-image" if self.per_image else "units",
                "units": None if self.per_image else self.plan.num_units,
                "identities_per_unit": None if self.per_image else self.plan.shard_size,
                "planned_shard_lengths": self.layout,
                "order": "one permutation of all samples, seeded by --seed (facegen.builders.plan.sample_order)",
                "units_xxh3_128": self.units_digest,
                "identities_without_images": self.identities_without_images[:100],
            },
            "source": _plugin_record(self.source, "source"),
            "transform": _plugin_record(self.transform, "transform"),
            "features": features.to_dict(),
            "image_column": self.format,
            "quality_fields": list(getattr(self.transform, "quality_fields", ())),
            "totals": {"identities": summary.identities, "images": summary.images,
                       "skipped": dict(summary.skipped), "shards": summary.shards},
        }
        if not self._set_up:  # this process loaded no model (a rerun with nothing to generate)
            _keep_loaded_models(self.out, run)
        write_atomic(self.folder.run_json, json.dumps(run, indent=1).encode())


def _keep_loaded_models(out: Path, run: dict) -> None:
    """A rerun that loaded no model keeps what the run that made the shards recorded as loaded."""
    try:
        before = json.loads(OutputFolder(out).run_json.read_text())
    except (OSError, ValueError):
        return
    loaded = {(m.get("id"), m.get("role")): m.get("loaded") for m in (before.get("transform") or {}).get("models", [])}
    for model in run["transform"].get("models") or []:
        if not model.get("loaded") and loaded.get((model.get("id"), model.get("role"))):
            model["loaded"] = loaded[(model.get("id"), model.get("role"))]


def write_info_json(out: Path, name: str) -> dict:
    """``OUT/_info.json`` in the format of timm's WebDataset reader (``timm/data/readers/reader_wds.py``):
    ``splits.train.{name, num_samples, filenames, shard_lengths}``, file names relative to ``OUT`` (where timm's
    ``--data-dir`` points) and lengths as written (skipped samples make a shard shorter)."""
    shards = []
    for stats_path in OutputFolder(out).shard_stats_files():
        stats = read_stats(stats_path)
        if stats is not None:
            shards.append(stats)
    shards.sort(key=lambda s: s["shard"])
    info = {
        "name": name,
        "splits": {"train": {
            "name": "train",
            "num_samples": sum(s["images"] for s in shards),
            "filenames": [s["tar"] for s in shards],
            "shard_lengths": [s["images"] for s in shards],
        }},
    }
    from facegen.cards.card import write_recorded

    write_recorded(out, INFO, json.dumps(info, indent=1).encode())  # a user's _info.json is refused, kept
    return info


def _read_ahead(pool: ThreadPoolExecutor, load, items, window: int) -> Iterator:
    """``load(item)`` for each item, in order, with up to ``window`` loads running ahead in ``pool``."""
    pending: deque = deque()
    todo = iter(items)
    for item in todo:
        pending.append(pool.submit(load, item))
        if len(pending) >= window:
            break
    while pending:
        future = pending.popleft()
        nxt = next(todo, None)
        if nxt is not None:
            pending.append(pool.submit(load, nxt))
        yield future.result()


def _images_info(index: dict) -> list:
    """Each sample's (mode, "WxH", changes) from a unit's index; None for each of a unit written without them."""
    modes, sizes, changes = index.get("image_modes"), index.get("image_sizes"), index.get("changes")
    if modes is None or sizes is None or changes is None:
        return [None] * len(index["keys"])
    return list(zip(modes, sizes, changes))


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _wait_for(places: dict, lock=None) -> None:
    """Wait (on the files, not a collective) until every file is complete (size against its stats): the ranks
    each check their own files' checksums. A lock lost meanwhile (another build took the folder) stops the wait."""
    while True:
        missing = [i for i, place in places.items() if check_place(place, verify=False) is not None]
        if not missing:
            return
        if lock is not None:
            lock.check()
        time.sleep(0.5)


def _abspath(path: str | None) -> str | None:
    # a path that is not on this machine (a Hub id given to the `facegen` source) is kept as it was given
    return os.path.abspath(path) if path and os.path.exists(path) else path


def _file_sha256(path: str | None) -> str | None:
    if not path:
        return None
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def build(config: BuildConfig, state=None) -> Summary | None:
    """Run (or resume) a build in this process. Returns the summary on the main process, None elsewhere."""
    return Builder(config, state).run()
