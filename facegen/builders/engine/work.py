"""The work of a build, in this process: three steps, each made with what it needs and then run once.

- :class:`ShardWork` (per-image transforms such as passthrough): the published shards are the units of work; each
  reads its samples from the source, in the shuffled order, and transforms and writes them.
- :class:`UnitWork` (identity-level transforms such as arc2face and e4e): units of ``--shard-size`` identities
  under ``.facegen/units/``, transformed in batches.
- :class:`Assembly`: once every unit is complete, the published shards are copied together from the units, each a
  series of preads of whole samples in the shuffled order.

Process ``r`` of ``W`` takes the units and shards ``i ≡ r (mod W)`` that are not complete yet. A full disk stops a
step in one line that says how much space the rest needs, measured on the tars written so far.

Memory: the source is read ahead by threads, in bytes as well as in counts (:func:`_read_ahead`: about
:data:`READ_AHEAD_BYTES` of loaded images, a thread task of single images stops past :data:`CHUNK_BYTES`), and a
transform's batch is cut short past :data:`BATCH_BYTES`; so even images just under a source's per-file cap (8-32 MB)
keep a build under 1.5 GB. Outputs never depend on how the reading or the batches were cut.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import xxhash
from tqdm.auto import tqdm

from facegen.builders.engine.images import check_source_images
from facegen.builders.engine.outputs import NO_SPACE, discard_partial_files, no_space_message
from facegen.builders.engine.ranks import Ranks
from facegen.builders.engine.tars import CutShort, TarFiles, commit_each, filled
from facegen.builders.engine.writer import SHARD, UNIT, ImageInfo, TarWriter
from facegen.builders.plan import identity_seed, sample_order, shard_bounds
from facegen.errors import OutOfSpace, SampleError, UsageError
from facegen.layout.records import SampleIndex
from facegen.records import Identity, SourceImage, Skip
from facegen.streams import Ahead, run_ahead

# identities are read ahead and their images checked by threads: file reads, zlib and PIL decodes release the GIL
LOAD_THREADS = max(4, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 4))
LOAD_CHUNK = 16  # single images (per-image transforms) are read ahead in chunks: a thread task costs ~20 µs
READ_AHEAD_BYTES = 192 << 20  # loaded images waiting for the transform, besides the batch it works on
CHUNK_BYTES = 32 << 20  # a chunk's task stops past this; the rest of its images are the next task
BATCH_BYTES = 128 << 20  # a batch is handed to the transform early past this


@dataclass(frozen=True)
class Published:
    """What the work leaves for the main process to finish: the published shards, and how they were made."""

    shards: TarFiles
    layout: list[int]  # planned samples per shard
    units: TarFiles | None = None  # identity-level transforms: the units of work the shards were assembled from
    units_xxh3_128: str | None = None
    identities_without_images: tuple[str, ...] = ()  # per-image transforms: what the source listed no image for
    assembly_seconds: float = 0.0  # this process's time assembling shards from units


class Step:
    """One step of the work. ``run`` turns a full disk into one line (the partial tar discarded); each step says
    what is left and how much it weighs."""

    what = "shard"  # the kind of file a full disk cuts short here

    def __init__(self, build, lock, ranks: Ranks | None = None):
        self.build, self.lock, self.ranks = build, lock, ranks

    def run(self):
        try:
            return self.work()
        except (CutShort, OSError) as exc:
            error = exc.error if isinstance(exc, CutShort) else exc
            if error.errno not in NO_SPACE:
                raise
            discard_partial_files(self.build.out)
            raise OutOfSpace(self.no_space(error, exc if isinstance(exc, CutShort) else None)) from None

    def work(self):
        raise NotImplementedError

    def no_space(self, error: OSError, cut: CutShort | None) -> str:
        raise NotImplementedError

    def progress(self, total: int, unit: str):
        return tqdm(total=total, unit=unit, dynamic_ncols=True, desc=f"facegen {self.build.options.plugin}",
                    disable=not self.build.state.is_main_process)

    def writer(self, files: TarFiles, i: int, redone_because: str | None, **stats_fields) -> TarWriter:
        return TarWriter(self.build.folder, files.kind, i, self.build.samples, self.build.rank, redone_because,
                         **stats_fields)

    def space_left(self, error: OSError, files: TarFiles, amounts: dict[int, int], counted: str, cut_amount: int,
                   cut: CutShort | None, noun: str, per: float | None = None, then: int = 0) -> str:
        """The full-disk line: ``amounts`` (identities or images) of the tars not complete, at the bytes per
        identity or image of those written so far (``per`` when known otherwise), plus ``then`` more of them for
        what comes after."""
        done = files.written()
        cut_bytes = cut.bytes_written if cut else 0
        sizes = [s.tar_bytes for s in done.values()]
        left = sum(n for i, n in amounts.items() if i not in done)
        largest = max(sizes + [cut_bytes]) or None
        if per is None:
            known = sum(getattr(s, counted) for s in done.values()) + cut_amount
            per = (sum(sizes) + cut_bytes) / known if known else None
        need = per * (left + then) if per else None
        if need is not None and then:
            noun += " (and the assembly of the shards)"
        return no_space_message(self.build.out, error, f"the {left} {noun} left", need, largest, self.what)


# --- reading and transforming the source ---


def _held(value) -> int:
    """Bytes an image or extra holds in memory (encoded bytes, an array, a PIL image); 0 for small values."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    if isinstance(value, np.ndarray):
        return value.nbytes
    size, bands = getattr(value, "size", None), getattr(value, "getbands", None)
    if isinstance(size, tuple) and len(size) == 2 and bands is not None:  # a PIL image
        return size[0] * size[1] * len(bands())
    return 0


def _identity_bytes(identity: Identity) -> int:
    return sum(_held(image.data) + sum(_held(v) for v in image.extras.values()) for image in identity.images)


_END = object()


def _read_ahead(pool: ThreadPoolExecutor, load, items, window: int, budget: int = READ_AHEAD_BYTES) -> Iterator:
    """The results of ``load(item)`` for each item, in order, loaded ahead in ``pool``.

    ``load`` returns (results, bytes they hold, rest): a load may stop early, leaving ``rest`` of its item, which
    is loaded next, before anything else. At most ``window`` loads are ahead, and, by bytes, a load starts only
    while the bytes of the loads done plus the largest load seen so far for each one still running (and the new
    one) fit in ``budget``; until a first load is done, one runs at a time. One load always runs."""
    pending: deque = deque()
    todo = iter(items)
    largest: int | None = None

    def room() -> bool:
        nonlocal largest
        if not pending:
            return True
        if len(pending) >= window:
            return False
        held = running = 0
        for future in pending:
            if future.done() and future.exception() is None:
                size = future.result()[1]
                held += size
                largest = size if largest is None else max(largest, size)
            else:
                running += 1
        return largest is not None and held + (running + 1) * largest <= budget

    def fill() -> None:
        while room():
            item = next(todo, _END)
            if item is _END:
                return
            pending.append(pool.submit(load, item))

    fill()
    while pending:
        results, size, rest = pending.popleft().result()
        largest = size if largest is None else max(largest, size)
        if rest:
            pending.appendleft(pool.submit(load, rest))
        fill()
        yield from results


def _batches(items: Iterator[tuple[Identity, int]], size: int, max_bytes: int = BATCH_BYTES) -> Iterator[list]:
    """Batches of ``size`` identities, handed over early once they hold ``max_bytes``."""
    batch: list = []
    held = 0
    for item in items:
        batch.append(item)
        held += _identity_bytes(item[0])
        if len(batch) >= size or held >= max_bytes:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


def _identity(build, pos: int, items: list) -> Identity:
    """Plan position ``pos`` with the images (and skips) the source gave for it; when the transform writes the
    source's images as they are, each is checked here, on the loading thread (PIL and zlib release the GIL), and
    not again by the writer."""
    identity_id = build.plan.ids[pos]
    if build.transform.copies_source_images:
        items = check_source_images(items, build.options.verify)
    return Identity(id=identity_id, cls=pos, seed=identity_seed(build.options.seed, identity_id),
                    images=[i for i in items if isinstance(i, SourceImage)],
                    skipped=[i for i in items if isinstance(i, Skip)])


# how far each stage of the stream may run ahead of the next (bounded: memory stays flat, a slow stage holds the
# others back): batches read and cut ahead of the transform, results made ahead of the writer
BATCHES_AHEAD = 2
RESULTS_AHEAD_BATCHES = 2  # x the transform's batch size, in results


def _generate(transform, batches) -> Iterator:
    """The transform's stream, made (and so started) on the generation thread itself."""
    yield from transform.stream(batches)


class Transformed:
    """The transform's results for this process's tars, streamed so that generation never waits (issue 21 §1):

    1. read: a thread loads each tar's identities (through the loading pool) and cuts them into the transform's
       batches, per tar, exactly as a call per batch would get them (the output does not depend on the number of
       processes, the batch size or what was already written);
    2. generate: a thread iterates ``Transform.stream`` over those batches, which may itself plan ahead and
       post-process on its own threads;
    3. write: the calling thread takes each result, in order, and checks, encodes and writes it into its tar
       (:meth:`write`), while the committer thread commits the tar before (``commit_each``).

    The stages hand over through bounded queues (``BATCHES_AHEAD`` batches, ``RESULTS_AHEAD_BATCHES`` batches'
    worth of results) and start with the first tar written (a process with nothing to write starts no stream).
    Closing it (a failure, a full disk, Ctrl-C: the tar being written is discarded by ``filled``) stops the
    generation, then the reading, each after the item in progress.
    """

    def __init__(self, build, tars: Iterator[Iterator[tuple[Identity, int]]]):
        self.build, self.tars = build, tars
        # what was handed to the transform, in order, with the number of its first sample: the writer matches
        # each result against it (appended by the reading thread before the transform can see the batch)
        self.fed: deque[tuple[Identity, int]] = deque()
        self.batches: Ahead | None = None
        self.results: Ahead | None = None

    def start(self) -> None:
        transform = self.build.transform
        self.batches = run_ahead(self._batches(self.tars, transform.batch_size), BATCHES_AHEAD, "facegen-read")
        self.results = run_ahead(_generate(transform, self.batches),
                                 RESULTS_AHEAD_BATCHES * max(1, transform.batch_size), "facegen-generate")

    def _batches(self, tars: Iterator[Iterator[tuple[Identity, int]]], size: int) -> Iterator[list[Identity]]:
        for identities in tars:
            for batch in _batches(identities, size):
                self.fed.extend(batch)
                yield [identity for identity, _ in batch]

    def write(self, writer: TarWriter, count: int, progress) -> None:
        """The next ``count`` identities' results, in order, into ``writer``; under --strict the first skip stops the
        build (the tar is then discarded)."""
        build = self.build
        if self.results is None:
            self.start()
        for _ in range(count):
            result = next(self.results, None)
            identity, first = self.fed.popleft() if self.fed else (None, 0)
            if result is None or identity is None or result.identity.id != identity.id:
                expected = "every identity" if identity is None else f"identity {identity.id}"
                raise RuntimeError(f"transform {build.transform.name!r} did not return {expected} in order")
            result.skipped = identity.skipped + result.skipped
            writer.write(result, first)  # adds a skip for a sample it cannot encode
            if build.options.strict and result.skipped:
                bad = result.skipped[0]
                raise SampleError(bad.ref, f"{bad.reason}{': ' + bad.detail if bad.detail else ''}")
            progress.update(1)

    def close(self) -> None:
        try:
            if self.results is not None:
                self.results.close()  # the generation first: it may be waiting for a batch
        finally:
            if self.batches is not None:
                self.batches.close()

    def __enter__(self) -> Transformed:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# --- per-image transforms: the published shards from the source ---


@dataclass(frozen=True)
class Listing:
    """Every source image of the plan, from the source's listing (no image is read): one row per image, in plan
    order, with its label and its position among its identity's images."""

    cls: np.ndarray
    number: np.ndarray
    xxh3_128: str  # of every listed ref: a shard planned from another listing is not reused
    identities_without_images: tuple[str, ...]

    @classmethod
    def of(cls, source, plan) -> Listing:
        digest = xxhash.xxh3_128()

        def count(identity_id: str) -> int:
            refs = source.image_refs(identity_id)
            digest.update("\0".join([identity_id, *refs]).encode("utf-8", "surrogateescape") + b"\n")
            return len(refs)

        counts = np.fromiter((count(i) for i in plan.ids), dtype=np.int64, count=len(plan.ids))
        labels = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        starts = np.cumsum(counts) - counts
        number = np.arange(len(labels), dtype=np.int64) - np.repeat(starts, counts)
        without = tuple(plan.ids[i] for i in np.flatnonzero(counts == 0))
        return cls(labels, number, digest.hexdigest(), without)

    def __len__(self) -> int:
        return len(self.cls)


class ShardWork(Step):
    """Per-image transforms: process r of W writes the published shards j ≡ r (mod W) that are not complete, each
    reading its samples from the source in the shuffled order."""

    def __init__(self, build, lock, ranks: Ranks | None = None):
        super().__init__(build, lock, ranks)
        self.listing = Listing.of(build.source, build.plan)
        if not len(self.listing):
            raise UsageError("the source lists no image for the identities of the plan")
        self.layout = build.layout(len(self.listing))
        self.shards = TarFiles.of(build.folder, SHARD, len(self.layout), build.state.is_main_process)
        self.planned_from = ("listing_xxh3_128", self.listing.xxh3_128)

    def work(self) -> Published:
        build, state = self.build, self.build.state
        if build.options.strict:
            self.shards.refuse_kept_skips(state, self.planned_from)
        todo = self.shards.todo(self.shards.drop_stale_shards(state, self.planned_from))
        order = sample_order(len(self.listing), build.options.seed)
        bounds = shard_bounds(self.layout)
        if todo:
            build.models.load()  # before the progress bar: a model that fails to load says so in one line
        with self.progress(sum(self.layout[j] for j in todo), "img") as progress, \
                ThreadPoolExecutor(LOAD_THREADS) as pool, \
                Transformed(build, (self.images(order[bounds[j][0]:bounds[j][1]], pool) for j in todo)) as stream:

            def shard(j: int) -> TarWriter:
                writer = self.writer(self.shards, j, todo[j], listing_xxh3_128=self.listing.xxh3_128)
                return filled(writer, lambda: stream.write(writer, bounds[j][1] - bounds[j][0], progress))

            commit_each((shard(j) for j in todo), self.lock, progress)
        return Published(self.shards, self.layout, identities_without_images=self.listing.identities_without_images)

    def images(self, rows: np.ndarray, pool: ThreadPoolExecutor) -> Iterator[tuple[Identity, int]]:
        """One identity holding one image per sample of ``rows``, in that (the published) order."""
        build, listing = self.build, self.listing

        def load(chunk: list[int]) -> tuple[list[tuple[Identity, int]], int, list[int]]:
            loaded, held = [], 0
            for k, row in enumerate(chunk):
                pos, number = int(listing.cls[row]), int(listing.number[row])
                identity = _identity(build, pos, build.source.load_images(build.plan.ids[pos], [number]))
                loaded.append((identity, number))
                held += _identity_bytes(identity)
                if held >= CHUNK_BYTES:  # large images: the rest of the chunk is the next task
                    return loaded, held, chunk[k + 1:]
            return loaded, held, []

        rows = rows.tolist()
        chunks = [rows[k:k + LOAD_CHUNK] for k in range(0, len(rows), LOAD_CHUNK)]  # one thread task per chunk
        return _read_ahead(pool, load, chunks, max(2 * build.transform.batch_size // LOAD_CHUNK, 8))

    def no_space(self, error: OSError, cut: CutShort | None) -> str:
        # skipped samples make a shard shorter: its planned length is an upper bound
        return self.space_left(error, self.shards, dict(enumerate(self.layout)), "images",
                               cut.samples if cut else 0, cut, "images")


# --- identity-level transforms: units of work, then the assembly ---


class UnitWork(Step):
    """Identity-level transforms: process r of W writes the units i ≡ r (mod W) that are not complete (identities
    ``[i·S, (i+1)·S)``, ``S = --shard-size``), then waits until every process's units are."""

    what = "unit of work"

    def __init__(self, build, lock, ranks: Ranks | None = None):
        super().__init__(build, lock, ranks)
        self.units = TarFiles.of(build.folder, UNIT, build.plan.num_units, build.state.is_main_process)

    def work(self) -> TarFiles:
        build, state, plan = self.build, self.build.state, self.build.plan
        if build.options.strict:  # the units hold the skips (an assembled shard copies samples and skips none)
            self.units.refuse_kept_skips(state)
        todo = self.units.todo(self.units.mine(state.process_index, state.num_processes))
        if todo:
            build.models.load()  # before the progress bar: a model that fails to load says so in one line
        with self.progress(sum(len(plan.unit(i)) for i in todo), "id") as progress, \
                ThreadPoolExecutor(LOAD_THREADS) as pool, \
                Transformed(build, (self.identities(i, pool) for i in todo)) as stream:

            def unit(i: int) -> TarWriter:
                writer = self.writer(self.units, i, todo[i])
                return filled(writer, lambda: stream.write(writer, len(plan.unit(i)), progress))

            commit_each((unit(i) for i in todo), self.lock, progress)
        self.units.wait(self.lock, self.ranks)
        return self.units

    def identities(self, i: int, pool: ThreadPoolExecutor) -> Iterator[tuple[Identity, int]]:
        """Unit ``i``'s identities in plan order (each numbering its samples from 0), loaded ahead by threads."""
        build = self.build

        def load(pos: int) -> tuple[list[tuple[Identity, int]], int, None]:
            identity = _identity(build, pos, build.source.load(build.plan.ids[pos]))
            return [(identity, 0)], _identity_bytes(identity), None

        return _read_ahead(pool, load, build.plan.unit(i), max(2 * build.transform.batch_size, 8))

    def no_space(self, error: OSError, cut: CutShort | None) -> str:
        plan = self.build.plan
        # the assembly then copies every sample into the published shards: as much again
        return self.space_left(error, self.units, {i: len(plan.unit(i)) for i in range(plan.num_units)},
                               "identities", cut.identities if cut else 0, cut, "identities", then=len(plan.ids))


@dataclass(frozen=True)
class UnitSamples:
    """Every sample of every unit, in unit order: where it lies (unit, offset, length), its key and label, and its
    image's (mode, "WxH", changes) as the unit recorded them."""

    unit: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    cls: np.ndarray
    keys: list[str]
    images: list[ImageInfo]
    xxh3_128: str  # of the units' checksums: shards assembled from other units are redone
    tar_bytes: int  # of all units (sizes what the assembly needs)

    @classmethod
    def read(cls, units: TarFiles) -> UnitSamples:
        digest, indexes, tar_bytes = xxhash.xxh3_128(), [], 0
        for i in range(units.count):
            place, stats = units.place(i), units.stats(i)
            index = SampleIndex.read(place.index)
            if stats is None or index is None or index.image_modes is None:
                raise UsageError(f"unit of work {i} changed while the build ran ({place.index} or its stats are "
                                 "unreadable): rerun the same command to redo it")
            digest.update(stats.tar_xxh3_128.encode())
            tar_bytes += stats.tar_bytes
            indexes.append((i, index))
        return cls(
            unit=np.array([i for i, ix in indexes for _ in ix.keys], dtype=np.int64),
            offset=np.array([o for _, ix in indexes for o in ix.offsets], dtype=np.int64),
            length=np.array([n for _, ix in indexes for n in ix.lengths], dtype=np.int64),
            cls=np.array([c for _, ix in indexes for c in ix.cls], dtype=np.int64),
            keys=[k for _, ix in indexes for k in ix.keys],
            images=[info for _, ix in indexes for info in zip(ix.image_modes, ix.image_sizes, ix.changes)],
            xxh3_128=digest.hexdigest(), tar_bytes=tar_bytes)

    def __len__(self) -> int:
        return len(self.keys)


class Assembly(Step):
    """The published shards from the units: process r of W assembles shards j ≡ r (mod W), each a series of preads
    of whole samples (headers included: keys do not change) in the shuffled order."""

    def __init__(self, build, lock, units: TarFiles, ranks: Ranks | None = None):
        super().__init__(build, lock, ranks)
        self.started = time.perf_counter()
        self.units = units
        self.samples = UnitSamples.read(units)
        # every sample skipped: no shard (those of an earlier build are removed); the run says so in one line
        self.layout = build.layout(len(self.samples))
        self.shards = TarFiles.of(build.folder, SHARD, len(self.layout), build.state.is_main_process)
        self.planned_from = ("units_xxh3_128", self.samples.xxh3_128)

    def work(self) -> Published:
        build, samples = self.build, self.samples
        todo = self.shards.todo(self.shards.drop_stale_shards(build.state, self.planned_from))
        order = sample_order(len(samples), build.options.seed)
        bounds = shard_bounds(self.layout)
        ids = build.plan.ids
        fds = {i: os.open(self.units.place(i).tar, os.O_RDONLY) for i in range(self.units.count)}
        try:
            with self.progress(sum(self.layout[j] for j in todo), "img") as progress:

                def copy(writer: TarWriter, rows: list[int]) -> None:
                    for row in rows:
                        block = os.pread(fds[int(samples.unit[row])], int(samples.length[row]),
                                         int(samples.offset[row]))
                        label = int(samples.cls[row])
                        writer.copy(samples.keys[row], ids[label], label, block, samples.images[row])
                        progress.update(1)

                def shard(j: int) -> TarWriter:
                    writer = self.writer(self.shards, j, todo[j], assembled_from_units=self.units.count,
                                         units_xxh3_128=samples.xxh3_128)
                    return filled(writer, lambda: copy(writer, order[bounds[j][0]:bounds[j][1]].tolist()))

                commit_each((shard(j) for j in todo), self.lock, progress)
        finally:
            for fd in fds.values():
                os.close(fd)
        return Published(self.shards, self.layout, units=self.units, units_xxh3_128=samples.xxh3_128,
                         assembly_seconds=time.perf_counter() - self.started)

    def no_space(self, error: OSError, cut: CutShort | None) -> str:
        # every sample is in a unit: the shards take about as much again
        per = self.samples.tar_bytes / len(self.samples) if len(self.samples) else None
        return self.space_left(error, self.shards, dict(enumerate(self.layout)), "images",
                               cut.samples if cut else 0, cut, "images", per=per)
