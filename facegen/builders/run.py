"""The run loop: plan, distribute whole shards over processes, transform, write, resume; then provenance and card.

Works alone, under ``accelerate launch`` and under ``torchrun``. Process ``r`` of ``W`` takes the shards
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

from tqdm.auto import tqdm

import facegen
from facegen import registry
from facegen.api import Source, Transform
from facegen.builders.lock import output_lock
from facegen.builders.options import BuildConfig
from facegen.builders.outputs import (
    NO_SPACE,
    create_output_folder,
    discard_partial_files,
    no_space_message,
    prepare_output,
    refuse_out_inside_source,
    resolve_out,
)
from facegen.builders.plan import EmptyPlan, Plan, empty_plan_message, identity_seed, make_plan
from facegen.builders.shards import (
    ShardWriter,
    dumps,
    shard_is_complete,
    shard_stats_path,
    write_atomic,
)
from facegen.builders.skipped import gather_skipped
from facegen.errors import SampleError, UsageError
from facegen.records import Identity, SourceImage, Skip

LOAD_THREADS = 4  # identities are read ahead by threads: file and zip reads release the GIL


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

    json_fields = {"identity": Value("string"), "source": Value("string"), "source_ref": Value("string")}
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
        if self.shards_written:
            work = (f"  {self.images_written} images in {_count(self.shards_written, 'shard')} written now in "
                    f"{self.seconds:.1f} s = {self.images_per_second:.1f} images/s"
                    + (f"; {self.images - self.images_written} images in {_count(kept, 'shard')} kept from an "
                       "earlier run" if kept else ""))
        else:
            work = f"  nothing to do: all {self.shards} shards ({self.images} images) were already complete and kept"
        return [
            f"facegen build done: {self.out}",
            f"  identities {self.identities}, images {self.images}, shards {self.shards} "
            f"({self.shards_written} written now, {kept} already complete)",
            f"  skipped {skipped} ({self.reasons() or 'none'}){where}",
            work,
        ]

    def nothing_written(self) -> str:
        """The one line of a build in which no image was written."""
        if self.skipped:
            return (f"no image was written to {self.out}: all {sum(self.skipped.values())} samples were skipped "
                    f"({self.reasons(3)}); every skipped file is listed in {self.skipped_list}")
        return f"no image was written to {self.out}: the {self.identities} identities of the plan hold no image"


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
        source_cls = registry.get_source(config.source)
        transform_cls = registry.get_transform(config.plugin)
        if source_cls.needs_path and not config.source_path:
            raise UsageError(f"missing --source-path (source {config.source!r} reads files)")
        if not source_cls.needs_path:
            config.source_path = None  # not read, so not part of the build's identity
        self.out = resolve_out(config.out)
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
        self.lock = None  # the output folder's lock, held by the main process while it runs
        self.partial = (0, 0)  # bytes and identities of a shard cut short (a full disk): sizes what is needed

    def signature(self) -> dict[str, Any]:
        c = self.config
        return _json_safe({
            "source": c.source, "source_path": _abspath(c.source_path), "source_opts": self.source.opts,
            "plugin": c.plugin, "plugin_opts": self.transform.opts, "plan_sha256": self.plan.sha256(),
            "identities": len(self.plan.ids), "shard_size": c.shard_size, "seed": c.seed, "format": self.format,
        })

    def _identities(self, positions: range, pool: ThreadPoolExecutor) -> Iterator[Identity]:
        """The shard's identities in plan order, loaded ahead by a few threads."""
        ids = self.plan.ids
        window = max(2 * self.transform.batch_size, 8)
        pending: deque = deque()
        todo = iter(positions)
        for pos in todo:
            pending.append((pos, pool.submit(self.source.load, ids[pos])))
            if len(pending) >= window:
                break
        while pending:
            pos, future = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(self.source.load, ids[nxt])))
            items = future.result()
            yield Identity(
                id=ids[pos], cls=pos, seed=identity_seed(self.config.seed, ids[pos]),
                images=[i for i in items if isinstance(i, SourceImage)],
                skipped=[i for i in items if isinstance(i, Skip)],
            )

    def _batches(self, identities: Iterator[Identity]) -> Iterator[list[Identity]]:
        batch: list[Identity] = []
        for identity in identities:
            batch.append(identity)
            if len(batch) >= self.transform.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def write_shard(self, index: int, pool: ThreadPoolExecutor, progress) -> ShardWriter:
        """Write shard ``index`` under its temporary name; the caller commits the returned, finished writer."""
        writer = ShardWriter(self.out, index, self.format, self.source.name,
                             getattr(self.transform, "quality_fields", ()),
                             rank=(self.state.process_index, self.state.num_processes))
        try:
            for batch in self._batches(self._identities(self.plan.shard(index), pool)):
                results = iter(self.transform(batch))
                for identity in batch:
                    result = next(results, None)
                    if result is None or result.identity.id != identity.id:
                        raise RuntimeError(f"transform {self.transform.name!r} did not return identity "
                                           f"{identity.id} in order")
                    result.skipped = identity.skipped + result.skipped
                    writer.write(result)  # adds a skip for a sample it cannot encode
                    if self.config.strict and result.skipped:  # the shard is aborted: nothing of it remains
                        bad = result.skipped[0]
                        raise SampleError(bad.ref, f"{bad.reason}{': ' + bad.detail if bad.detail else ''}")
                    progress.update(1)
            writer.finish()
            return writer
        except BaseException:
            self.partial = (writer._tar.size, writer.identities)
            writer.abort()
            raise

    def run(self) -> Summary | None:
        """The build, holding the output folder's lock throughout; a full disk stops it in one line, data intact."""
        create_output_folder(self.out)
        with output_lock(self.out, self.state, self.config.break_lock) as self.lock:
            try:
                return self._run()
            except OSError as exc:
                if exc.errno not in NO_SPACE:
                    raise
                discard_partial_files(self.out)
                raise UsageError(self._no_space_message(exc)) from None

    def _run(self) -> Summary | None:
        state, plan = self.state, self.plan
        prepare_output(self.out, self.signature(), self.config.overwrite, state)
        complete_at_start = {i for i in range(plan.num_shards) if shard_is_complete(self.out, i)}
        if self.config.strict:
            refuse_kept_skips(self.out, sorted(complete_at_start))
        mine = [i for i in plan.shards_of(state.process_index, state.num_processes) if i not in complete_at_start]
        if mine:  # nothing to do (a finished build rerun) loads no model
            self.transform.setup(state.device)
        started = time.perf_counter()
        progress = tqdm(total=sum(len(plan.shard(i)) for i in mine), unit="id", dynamic_ncols=True,
                        desc=f"facegen {self.config.plugin}", disable=not state.is_main_process)
        try:
            # a shard's fsync + rename + stats run in a committer thread while the next shard is written
            with progress, ThreadPoolExecutor(LOAD_THREADS) as pool, ThreadPoolExecutor(1) as committer:
                committing = None
                for index in mine:
                    writer = self.write_shard(index, pool, progress)
                    try:
                        if committing is not None:
                            committing.result()
                        if self.lock is not None:
                            self.lock.check()  # another build took the folder over: commit nothing more
                        committing = committer.submit(writer.commit)
                    except BaseException:  # Ctrl-C, a failed commit: the finished shard is not committed
                        writer.abort()
                        raise
                    progress.set_postfix_str(f"shard {index}: {writer.images} images", refresh=False)
                if committing is not None:
                    committing.result()
        finally:  # open files and HDF5 handles are released even when a bad sample stops the run
            self.transform.close()
            self.source.close()
        if not state.is_main_process:
            return None
        self._wait_for_all_shards()
        seconds = time.perf_counter() - started
        summary = self._summarise(complete_at_start, seconds)
        listed = gather_skipped(self.out, plan.num_shards)
        summary.skipped_list = str(listed) if listed else None
        self._write_run_json(summary)
        if summary.images == 0:  # nothing to publish: no card, and not "done"
            raise UsageError(summary.nothing_written())
        from facegen.cards import write_card

        write_card(self.out)
        return summary

    def _no_space_message(self, exc: OSError) -> str:
        """The full-disk line, with the space the rest of the build needs (from the shards written so far)."""
        sizes, identities, done = [], 0, set()
        for i in range(self.plan.num_shards):
            try:
                stats = json.loads(shard_stats_path(self.out, i).read_text())
            except (OSError, ValueError):
                continue
            sizes.append(int(stats.get("tar_bytes", 0)))
            identities += int(stats.get("identities", 0))
            done.add(i)
        partial_bytes, partial_identities = self.partial
        known = identities + partial_identities
        per_identity = (sum(sizes) + partial_bytes) / known if known else None
        left = sum(len(self.plan.shard(i)) for i in range(self.plan.num_shards) if i not in done)
        return no_space_message(self.out, exc, per_identity, left, max(sizes + [partial_bytes]) or None)

    def _wait_for_all_shards(self) -> None:
        """The main process waits (on the files, not a collective) for shards of other processes."""
        while True:
            missing = [i for i in range(self.plan.num_shards) if not shard_is_complete(self.out, i)]
            if not missing:
                return
            time.sleep(0.5)

    def _summarise(self, complete_at_start: set[int], seconds: float) -> Summary:
        summary = Summary(shards=self.plan.num_shards, seconds=seconds, out=str(self.out))
        for i in range(self.plan.num_shards):
            path = shard_stats_path(self.out, i)
            try:
                stats = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raise UsageError(f"{path} is damaged (not complete JSON): delete it and rerun the same command, which "
                                 f"then writes shard {i} again") from None
            summary.identities += stats["identities"]
            summary.images += stats["images"]
            summary.skipped.update(stats["skipped"])
            if i not in complete_at_start:
                summary.shards_written += 1
                summary.images_written += stats["images"]
        return summary

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
                "seed": c.seed, "format": self.format, "strict": c.strict,
            },
            "plan": {"identities": len(self.plan.ids), "shards": self.plan.num_shards,
                     "plan_sha256": self.plan.sha256()},
            "source": _plugin_record(self.source, "source"),
            "transform": _plugin_record(self.transform, "transform"),
            "features": features.to_dict(),
            "image_column": self.format,
            "quality_fields": list(getattr(self.transform, "quality_fields", ())),
            "totals": {"identities": summary.identities, "images": summary.images,
                       "skipped": dict(summary.skipped), "shards": summary.shards},
        }
        write_atomic(self.out / ".facegen" / "run.json", json.dumps(run, indent=1).encode())


def refuse_kept_skips(out: Path, kept: list[int]) -> None:
    """--strict on a folder whose complete shards skipped samples (an earlier run without --strict) stops at the
    first of them, as if it had been met now: a strict build's card never counts a skipped sample."""
    for i in kept:
        try:
            stats = json.loads(shard_stats_path(out, i).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # the summary reports a damaged stats file
        if stats.get("skipped"):
            first = (stats.get("failures") or [{}])[0]
            raise SampleError(first.get("ref", f"shard {i}"),
                              f"{first.get('reason', 'skipped')} (in shard {i}, kept from an earlier run without "
                              "--strict; pass --overwrite to rebuild strictly)")


def _abspath(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


def _file_sha256(path: str | None) -> str | None:
    if not path:
        return None
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def build(config: BuildConfig, state=None) -> Summary | None:
    """Run (or resume) a build in this process. Returns the summary on the main process, None elsewhere."""
    return Builder(config, state).run()
