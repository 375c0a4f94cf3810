"""The run loop: plan, distribute whole shards over processes, transform, write, resume; then provenance and card.

Works alone, under ``accelerate launch`` and under ``torchrun``. Process ``r`` of ``W`` takes the shards
``i ≡ r (mod W)`` that are not complete yet; the output does not depend on ``W``, the batch size or interruptions.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
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
from facegen.builders.options import BuildConfig
from facegen.builders.plan import Plan, identity_seed, make_plan
from facegen.builders.shards import (
    ShardWriter,
    dumps,
    shard_is_complete,
    shard_stats_path,
    write_atomic,
)
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


def _remove_facegen_outputs(out: Path) -> None:
    """What --overwrite removes: only the files a build writes, never anything else in the folder."""
    shutil.rmtree(out / ".facegen", ignore_errors=True)
    train = out / "data" / "train"
    if train.is_dir():
        for path in train.iterdir():
            if path.name.startswith(("train-", ".train-")) and ".tar" in path.name:
                path.unlink()
        for folder in (train, out / "data"):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    for name in ("README.md", "preview.jpg"):
        (out / name).unlink(missing_ok=True)
    from facegen.cards.card import LICENSE_MARKER  # in every LICENSE the card writes

    license_path = out / "LICENSE"
    if license_path.is_file() and LICENSE_MARKER in license_path.read_text(encoding="utf-8", errors="replace"):
        license_path.unlink()


def prepare_output(out: Path, signature: dict[str, Any], overwrite: bool, state) -> None:
    """Refuse a folder that holds a different build or other files (unless --overwrite); record the signature."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create --out {out}: {exc.strerror or exc}") from None
    if overwrite:
        if state.is_main_process:
            _remove_facegen_outputs(out)
        if state.num_processes > 1:
            state.wait_for_everyone()
        if (out / "LICENSE").exists():  # not ours (ours was removed): the card would have to write over it
            raise UsageError(f"{out / 'LICENSE'} was not written by facegen and the dataset card writes its licence "
                             "there: move it out of --out")
    config_path = out / ".facegen" / "config.json"
    if config_path.exists():
        try:
            existing = json.loads(config_path.read_text())
        except (OSError, ValueError):
            raise UsageError(f"{config_path} is damaged; pass --overwrite to start this build again") from None
        if existing != signature:
            changed = sorted(k for k in set(existing) | set(signature) if existing.get(k) != signature.get(k))
            raise UsageError(
                f"{out} holds a different build (differs in: {', '.join(changed)}); rerun the same command to "
                "resume it, or pass --overwrite to replace it, or choose another --out"
            )
        return
    others = sorted(p.name for p in out.iterdir() if p.name != ".facegen")
    if others and not overwrite:
        shown = ", ".join(others[:3]) + (" …" if len(others) > 3 else "")
        raise UsageError(f"{out} is not empty ({shown}) and holds no facegen build: choose a new or empty --out, "
                         "or pass --overwrite to write the build beside those files")
    try:
        write_atomic(config_path, json.dumps(signature, indent=1, sort_keys=True).encode())
    except OSError as exc:
        raise UsageError(f"cannot write to --out {out}: {exc.strerror or exc}") from None


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

    @property
    def images_per_second(self) -> float:
        return self.images_written / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{reason}: {n}" for reason, n in self.skipped.most_common()) or "none"
        return [
            f"facegen build done: {self.out}",
            f"  identities {self.identities}, images {self.images}, shards {self.shards} "
            f"({self.shards_written} written now, {self.shards - self.shards_written} already complete)",
            f"  skipped {skipped} ({reasons})",
            f"  {self.images_written} images in {self.seconds:.1f} s = {self.images_per_second:.1f} images/s",
        ]


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
        self.state = state or distributed_state()
        self.source: Source = source_cls(config.source_path, **config.source_opts)
        self.transform: Transform = transform_cls(**config.plugin_opts)
        self.plan: Plan = make_plan(self.source.identities(), config.shard_size, config.identities_file,
                                    config.limit_identities)
        self.identities_file_sha256 = _file_sha256(config.identities_file)  # the file this plan was made from
        self.format = config.format or self.transform.output_format(self.source)
        self.out = Path(config.out).resolve()

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
            writer.abort()
            raise

    def run(self) -> Summary | None:
        state, plan = self.state, self.plan
        prepare_output(self.out, self.signature(), self.config.overwrite, state)
        complete_at_start = {i for i in range(plan.num_shards) if shard_is_complete(self.out, i)}
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
                    if committing is not None:
                        committing.result()
                    committing = committer.submit(writer.commit)
                    progress.set_postfix(images=writer.images, shard=index)
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
        self._write_run_json(summary)
        from facegen.cards import write_card

        write_card(self.out)
        return summary

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
            stats = json.loads(shard_stats_path(self.out, i).read_text())
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
