"""A build, as its steps: plan, work (per-image shards, or identity units then their assembly), finish.

Works alone, under ``accelerate launch`` and under ``torchrun``. :meth:`Build.prepare` checks the options, makes the
plugins and the plan, and fixes everything the build is; :meth:`Build.run` holds the output folder's lock and runs:

1. the work (``work.py``): per-image transforms (passthrough) write the published shards directly, each reading its
   samples from the source in the shuffled order; identity-level transforms (arc2face, e4e) write units of
   ``--shard-size`` identities under ``.facegen/units/``, and once all are complete the published shards are
   assembled from them. Process ``r`` of ``W`` takes the units and shards ``i ≡ r (mod W)`` that are not complete;
   the output does not depend on ``W``, the batch size or interruptions;
2. the finish (``finish.py``), on the main process once every shard is complete: the summary, ``run.json``,
   ``_info.json`` and the card.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

from facegen import registry
from facegen.api import CHANNEL_ORDERS, Source, Transform, check_provenance_files
from facegen.builders.engine.finish import Summary, finish
from facegen.builders.engine.images import VERIFY_LEVELS
from facegen.builders.engine.lock import output_lock
from facegen.builders.engine.options import BuildConfig
from facegen.builders.engine.ranks import Ranks
from facegen.builders.engine.outputs import (
    abspath,
    create_output_folder,
    prepare_output,
    refuse_out_inside_source,
    resolve_out,
)
from facegen.builders.engine.work import Assembly, ShardWork, UnitWork
from facegen.builders.engine.writer import SampleFormat
from facegen.builders.plan import (
    DEFAULT_SHARD_SAMPLES,
    EmptyPlan,
    Plan,
    check_layout_options,
    empty_plan_message,
    make_plan,
    shard_lengths,
)
from facegen.errors import UsageError
from facegen.fileio import sha256_file
from facegen.layout import OutputFolder
from facegen.layout.records import BuildSignature, json_safe


def build(config: BuildConfig, state=None) -> Summary | None:
    """Run (or resume) a build in this process. Returns the summary on the main process, None elsewhere."""
    return Build.prepare(config, state).run()


def _channels(source: Source, transform: Transform, options: BuildConfig) -> dict:
    """How the source's declared channel order is stored: marked in each sample's json, and BGR converted to RGB
    only when ``--format png`` asks for it. A transform that decodes the images would read BGR as RGB: refused."""
    channels = source.channels
    if channels is None:
        return {}
    if channels not in CHANNEL_ORDERS:
        raise UsageError(f"source {source.name!r} declares channel order {channels!r}; expected one of "
                         f"{', '.join(CHANNEL_ORDERS)}")
    if channels == "bgr" and not transform.copies_source_images:
        raise UsageError(f"source {source.name!r} holds BGR images and transform {transform.name!r} decodes them as "
                         "RGB: convert them first (--plugin passthrough --format png writes them as RGB PNGs), then "
                         "build from that dataset with --source facegen")
    return {"channels": channels, "to_rgb": channels == "bgr" and options.format == "png"}


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


class Models:
    """The transform's models, loaded on this process's device the first time they are needed: a process with
    nothing to generate loads none (and its run.json keeps what the run that generated recorded as loaded)."""

    def __init__(self, transform: Transform, device, check=None):
        self.transform, self.device, self.check = transform, device, check
        self.loaded = False

    def load(self) -> None:
        """Load the models; ``check`` (``BuildConfig.check_models``) sees what was loaded before any use."""
        if not self.loaded:
            self.transform.setup(self.device)
            self.loaded = True
            if self.check is not None:
                self.check(self.transform.models())


@dataclass(frozen=True)
class Build:
    """One process's part of a build: what it is, fixed before anything is written."""

    options: BuildConfig  # the caller's config with its defaults filled in (a copy: the caller's is never changed)
    out: Path
    folder: OutputFolder
    state: object  # accelerate's PartialState
    source: Source
    transform: Transform
    models: Models
    plan: Plan
    samples: SampleFormat  # how every sample is stored
    per_image: bool  # the transform works image by image: the published shards are the units of work
    identities_file_sha256: str | None  # of the file the plan was made from

    @classmethod
    def prepare(cls, config: BuildConfig, state=None) -> Build:
        """The plan: check the options, make the plugins and the plan (one clear line for any mistake)."""
        missing = [flag for flag, value in (("--source", config.source), ("--plugin", config.plugin),
                                            ("--out", config.out)) if not value]
        if missing:
            raise UsageError(f"missing {', '.join(missing)} (give it on the command line or in a --recipe)")
        if config.format not in (None, "png", "jpg"):
            raise UsageError(f"--format must be png or jpg, got {config.format!r}")
        if config.verify not in VERIFY_LEVELS:
            raise UsageError(f"--verify must be full or header, got {config.verify!r}")
        shard_samples = DEFAULT_SHARD_SAMPLES if config.shard_samples is None else config.shard_samples
        check_layout_options(shard_samples, config.shards_multiple_of)
        source_cls = registry.get_source(config.source)
        transform_cls = registry.get_transform(config.plugin)
        if source_cls.needs_path and not config.source_path:
            raise UsageError(f"missing --source-path (source {config.source!r} reads files)")
        # a path the source does not read is not part of the build's identity
        options = dataclasses.replace(config, shard_samples=shard_samples,
                                      source_path=config.source_path if source_cls.needs_path else None)
        out = resolve_out(options.out)
        refuse_out_inside_source(out, options.source_path)
        state = state or distributed_state()
        source = source_cls(options.source_path, **options.source_opts)
        transform = transform_cls(**options.plugin_opts)
        check_provenance_files(source, transform)
        try:
            plan = make_plan(source.identities(), options.shard_size, options.identities_file,
                             options.limit_identities)
        except EmptyPlan:
            raise UsageError(empty_plan_message(source.name, options.source_path, source_cls.description)) \
                from None
        samples = SampleFormat(options.format or transform.output_format(source), source.name,
                               tuple(transform.quality_fields), options.verify,
                               lossy_allowed=options.format == "jpg", **_channels(source, transform, options))
        return cls(options, out, OutputFolder(out), state, source, transform,
                   Models(transform, state.device, options.check_models), plan,
                   samples, bool(transform.per_image),
                   sha256_file(options.identities_file) if options.identities_file else None)

    @property
    def rank(self) -> tuple[int, int]:
        return self.state.process_index, self.state.num_processes

    @property
    def image_format(self) -> str:
        return self.samples.image_format

    def layout(self, num_samples: int) -> list[int]:
        """Samples per published shard."""
        return shard_lengths(num_samples, self.options.shard_samples, self.options.shards_multiple_of)

    def signature(self) -> BuildSignature:
        """What a rerun must match to resume this build."""
        o = self.options
        return BuildSignature(
            source=o.source, source_path=abspath(o.source_path), source_opts=json_safe(self.source.opts),
            plugin=o.plugin, plugin_opts=json_safe(self.transform.opts), plan_sha256=self.plan.sha256(),
            identities=len(self.plan.ids), shard_size=o.shard_size, shard_samples=o.shard_samples,
            shards_multiple_of=o.shards_multiple_of, seed=o.seed, format=self.image_format, verify=o.verify)

    def run(self) -> Summary | None:
        """The build, holding the output folder's lock throughout (work, records, card); a full disk stops it in one
        line, with every complete file intact and the partial one discarded."""
        create_output_folder(self.out)
        with output_lock(self.out, self.state, self.options.break_lock,
                         command_breaks_locks=self.options.offers_break_lock) as lock:
            prepare_output(self.out, self.signature(), self.options.overwrite, self.state)
            ranks = self.ranks(lock)
            started = time.perf_counter()
            try:
                if self.per_image:  # the published shards are the units of work, read from the source
                    published = ShardWork(self, lock, ranks).run()
                else:  # units of identities, then the published shards assembled from them
                    units = UnitWork(self, lock, ranks).run()
                    self.transform.close()  # the models are not needed for the assembly
                    published = Assembly(self, lock, units, ranks).run()
            except BaseException as exc:  # the other processes stop at once instead of after the timeout
                if ranks is not None:
                    ranks.stop(exc)
                raise
            finally:  # open files and HDF5 handles are released even when a bad sample stops the run
                self.transform.close()
                self.source.close()
            if ranks is not None:
                ranks.stop()  # this process's part is complete
            if not self.state.is_main_process:
                return None
            return finish(self, published, lock, started, ranks)

    def ranks(self, lock) -> Ranks | None:
        """In a distributed build, this process's heartbeat (every process learns the run's token from the main,
        in one broadcast while all of them are known to be alive); None for a single process."""
        if self.state.num_processes == 1:
            return None
        from accelerate.utils import broadcast_object_list

        run = broadcast_object_list([lock.me.token if lock is not None else None], from_process=0)[0]
        return Ranks(self.folder, run, *self.rank).start()
