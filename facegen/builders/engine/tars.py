"""The tars of a build as a set: which are complete, which this process writes, and the loop that writes them.

A build has two kinds of tar (``writer.SHARD``: the published shards; ``writer.UNIT``: the hidden units of work of
an identity-level transform). :class:`TarFiles` is one kind's set of tars, with what their stats said when the run
began (to tell at the end what this run wrote). Process ``r`` of ``W`` writes the tars ``i ≡ r (mod W)`` that are not
complete; :func:`commit_each` commits each finished tar in a thread while the next one is written. A full disk
while a tar is written raises :class:`CutShort`, which says how far the tar got (the step that wrote it turns that
into the one line that says how much space the rest needs).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from facegen.builders.engine.outputs import NO_SPACE
from facegen.builders.engine.ranks import Ranks
from facegen.builders.engine.writer import SHARD, UNIT, TarWriter, check_complete, read_stats
from facegen.errors import SampleError
from facegen.messages import count
from facegen.layout import OutputFolder, Place, shard_number
from facegen.layout.records import TarStats

NOUNS = {SHARD: "shard", UNIT: "unit of work"}
# tars checked at once on a rerun: reads and XXH3 release the GIL; more threads than cores keep a network file
# system's or an SSD's queue full
CHECK_THREADS = min(8, 2 * (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))


def check_lock(lock) -> None:
    """Stop when another build took the folder over (``lock`` is None on the processes that do not hold it)."""
    if lock is not None:
        lock.check()


@dataclass(frozen=True)
class TarFiles:
    """The ``count`` tars of one kind, and the ``started_at`` of each one's stats when this run began (main process
    only: it alone tells what this run wrote)."""

    folder: OutputFolder
    kind: str
    count: int
    before: dict[int, float | None]

    @classmethod
    def of(cls, folder: OutputFolder, kind: str, count: int, main_process: bool) -> TarFiles:
        before = {}
        if main_process:
            for i in range(count):
                stats = read_stats(folder.unit(i) if kind == UNIT else folder.shard(i), kind)
                before[i] = stats.started_at if stats is not None else None
        return cls(folder, kind, count, before)

    @property
    def noun(self) -> str:
        return NOUNS[self.kind]

    def place(self, i: int) -> Place:
        return self.folder.unit(i) if self.kind == UNIT else self.folder.shard(i)

    def stats(self, i: int) -> TarStats | None:
        return read_stats(self.place(i), self.kind)

    def problem(self, i: int, checksum: bool = True) -> str | None:
        """None when tar ``i`` is complete, else why not (see :func:`writer.check_complete`)."""
        return check_complete(self.place(i), self.kind, checksum)

    def mine(self, rank: int, world: int) -> list[int]:
        """The tars process ``rank`` of ``world`` writes: ``i ≡ rank (mod world)``."""
        return [i for i in range(self.count) if i % world == rank]

    def todo(self, mine: list[int]) -> dict[int, str | None]:
        """Which of ``mine`` are not complete (size and checksum against their stats), each with why it is redone
        (None: it was never written). A tar that fails its check loses its stats first, so that nobody takes it for
        complete while it is redone. The tars are checked on CHECK_THREADS threads at once (a rerun of a finished
        build reads every byte it kept: as fast as the disk allows)."""
        todo = {}
        with ThreadPoolExecutor(max(1, min(CHECK_THREADS, len(mine)))) as pool:
            problems = list(pool.map(self.problem, mine))
        for i, problem in zip(mine, problems):
            if problem is None:
                continue
            if problem != "missing":
                self.place(i).stats.unlink(missing_ok=True)
            todo[i] = None if problem == "missing" else problem
        return todo

    def written(self) -> dict[int, TarStats]:
        """The stats of every complete tar."""
        stats = {}
        for i in range(self.count):
            s = self.stats(i)
            if s is not None and self.problem(i, checksum=False) is None:
                stats[i] = s
        return stats

    def written_now(self, i: int, stats: TarStats) -> bool:
        return stats.started_at != self.before.get(i)

    def wait(self, lock, ranks: Ranks | None = None) -> None:
        """Wait (on the files, not a collective) until every tar is complete (size against its stats): each process
        checked its own tars' checksums. A lock lost meanwhile (another build took the folder) stops the wait, and
        so does a process that owes a tar and failed or went silent (``ranks``, in a distributed build)."""
        while True:
            missing = [i for i in range(self.count) if self.problem(i, checksum=False) is not None]
            if not missing:
                return
            check_lock(lock)
            if ranks is not None:
                owed: dict[int, str] = {}
                for i in missing:
                    owed.setdefault(i % ranks.world, f"{self.noun} {i}")
                ranks.check(owed, lambda rank: self._owed_by(rank, ranks.world))
            time.sleep(0.5)

    def _owed_by(self, rank: int, world: int) -> str | None:
        """The first tar process ``rank`` of ``world`` still owes, or None."""
        missing = next((i for i in self.mine(rank, world) if self.problem(i, checksum=False) is not None), None)
        return None if missing is None else f"{self.noun} {missing}"

    def refuse_kept_skips(self, state, planned_from: tuple[str, str] | None = None) -> None:
        """--strict on a folder whose complete tars (kept, not redone) skipped samples (an earlier run without
        --strict) stops at the first of them, as if it had been met now: a strict build's card never counts a
        skipped sample. ``planned_from`` (stats field, digest): tars planned from other inputs are redone, not
        judged. Every process judges every tar before any process changes one (then a barrier), so all stop
        alike."""
        try:
            for i in range(self.count):
                stats = self.stats(i)
                if stats is None or not stats.skipped or self.problem(i, checksum=False) is not None:
                    continue  # redone anyway (missing, damaged or cut short)
                if planned_from is not None and getattr(stats, planned_from[0]) != planned_from[1]:
                    continue
                first = stats.failures[0]
                raise SampleError(first["ref"], f"{first['reason']} (in {self.noun} {i}, kept from an earlier run "
                                                "without --strict; pass --overwrite to rebuild strictly)")
        finally:
            if state.num_processes > 1:
                state.wait_for_everyone()

    def drop_stale_shards(self, state, planned_from: tuple[str, str]) -> list[int]:
        """This process's shards, after removing the stats of those planned from other inputs (``planned_from``:
        the stats field and the digest of this run's source listing or units): they are then missing, and redone.
        The main process also removes shards past the new count (`datasets` would load them)."""
        if state.is_main_process:
            for path in self.folder.shard_tars():
                j = shard_number(path)
                if j is not None and j >= self.count:
                    stale = self.folder.shard(j)
                    for file in (stale.stats, stale.index, stale.tar, stale.skipped):  # stats first
                        file.unlink(missing_ok=True)
        mine = self.mine(state.process_index, state.num_processes)
        field, digest = planned_from
        for j in mine:
            stats = self.stats(j)
            if stats is not None and getattr(stats, field) != digest:
                self.place(j).stats.unlink(missing_ok=True)
        return mine


class CutShort(Exception):
    """A tar cut short by a full disk (or a quota, or a file-size limit), with how far it got."""

    def __init__(self, error: OSError, bytes_written: int, samples: int, identities: int):
        super().__init__(str(error))
        self.error = error
        self.bytes_written, self.samples, self.identities = bytes_written, samples, identities


def filled(writer: TarWriter, fill: Callable[[], None]) -> TarWriter:
    """``writer`` once ``fill()`` has written its samples and the tar is finished; any failure discards the tar."""
    try:
        fill()
        writer.finish()
        return writer
    except OSError as exc:
        writer.abort()
        if exc.errno in NO_SPACE:
            raise CutShort(exc, writer.bytes_written, writer.images, writer.identities) from None
        raise
    except BaseException:
        writer.abort()
        raise


def _committed(committing: Future, lock) -> None:
    """Wait for a commit. One that failed after the lock was lost (a holder frozen mid-commit while another build
    took the folder with --break-lock and removed this file's temporary) stops the build in the lock's one line."""
    try:
        committing.result()
    except Exception:
        check_lock(lock)
        raise


def commit_each(finished: Iterator[TarWriter], lock, progress) -> None:
    """Commit each finished tar (fsync, rename, records) in a committer thread while the next one is written. Once
    the previous commit is done a tar is committed only while the lock is still ours (the lock file is read again
    first); a failed commit, a lost lock or Ctrl-C discards it instead."""
    with ThreadPoolExecutor(1) as committer:
        committing = None
        for writer in finished:
            try:
                if committing is not None:
                    _committed(committing, lock)
                check_lock(lock)  # another build took the folder over: commit nothing more
                committing = committer.submit(writer.commit)
            except BaseException:
                writer.abort()
                raise
            progress.set_postfix_str(f"{writer.kind} {writer.index}: {count(writer.images, 'image')}", refresh=False)
        if committing is not None:
            _committed(committing, lock)
