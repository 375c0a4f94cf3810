"""The processes of a distributed build watch each other through files, so that none waits forever for a dead one.

Each process beats: a thread rewrites ``.facegen/ranks/{r:06d}.json`` (:class:`RankBeat`) every ``timeout / 12``
seconds with a counter that goes up, then ``done`` when its part is complete, or ``failed`` (and why) when it stopped
on an error. A process that waits for the others' files (:meth:`TarFiles.wait`) reads the beats of the processes
that owe a missing file and stops, in one line naming that process and saying "rerun to resume", when one of them
failed, finished without its files, or has not beaten for ``timeout`` seconds (:data:`DEFAULT_TIMEOUT_SECONDS`, 60;
``FACEGEN_RANK_TIMEOUT`` changes it): killed outright, frozen, or on a node that was lost.

Silence is measured on the waiter's own clock, from the last time it saw the counter change, so the nodes' clocks
need not agree. The file is rewritten in place, not renamed over: on NFS, opening a file revalidates it
(close-to-open consistency), where a renamed name may stay cached for a while. A half-written file reads as no
change. Each beat carries the run's token (the lock holder's, broadcast to every process), so a file left by an
earlier run counts as no beat at all. No collective of torch.distributed is involved: they block on a dead peer.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from facegen.errors import RankLost, UsageError
from facegen.layout import OutputFolder
from facegen.layout.records import RankBeat

DEFAULT_TIMEOUT_SECONDS = 60.0  # NFS may hide a file's change for a few seconds; a dead process is found in a minute
TIMEOUT_ENV = "FACEGEN_RANK_TIMEOUT"  # seconds; tests shorten it
BEATS_PER_TIMEOUT = 12


def timeout_seconds() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if not raw:
        return DEFAULT_TIMEOUT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not (math.isfinite(value) and 0 < value <= 86400):
        raise UsageError(f"{TIMEOUT_ENV} must be a number of seconds above 0 and at most 86400, got {raw}")
    return value


@dataclass
class _Seen:
    beat: int | None  # the counter last seen (None: no beat of this run yet)
    since: float  # the waiter's monotonic time when it last changed (or when it first looked)


@dataclass
class Ranks:
    """This process's beat, and what it has seen of the others'."""

    folder: OutputFolder
    run: str  # the run's token
    rank: int
    world: int
    timeout: float = field(default_factory=timeout_seconds)
    _beat: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _seen: dict[int, _Seen] = field(default_factory=dict)

    # --- this process's beat

    def _write(self, state: str, error: str = "") -> None:
        record = RankBeat(run=self.run, rank=self.rank, world=self.world, host=socket.gethostname(),
                          pid=os.getpid(), beat=self._beat, state=state, error=error[:500])
        data = record.to_json()
        path = self.folder.rank_beat(self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        # in place (see the module docstring), then the length: a reader may see a torn file, which is no beat
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)

    def start(self) -> Ranks:
        self._write("running")
        self._thread = threading.Thread(target=self._beating, name="facegen-rank-beat", daemon=True)
        self._thread.start()
        return self

    def _beating(self) -> None:
        while not self._stop.wait(self.timeout / BEATS_PER_TIMEOUT):
            self._beat += 1
            try:
                self._write("running")
            except OSError:
                pass  # a passing file-system error; the next beat tries again

    def stop(self, error: BaseException | None = None) -> None:
        """Stop beating: ``done`` (this process's part is complete), or ``failed`` with the error's first line."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        text = ""
        if error is not None:
            text = (str(error).strip().splitlines() or [type(error).__name__])[0]
            if isinstance(error, KeyboardInterrupt) or not text:
                text = type(error).__name__
        try:
            self._write("failed" if error is not None else "done", text)
        except OSError:
            pass  # the others then see no beat, and stop after the timeout

    # --- the others

    def check(self, owed: dict[int, str], still_owed: Callable[[int], str | None]) -> None:
        """Raise RankLost when a process that owes a file (``owed``: rank -> the first file it owes, e.g. "shard 3")
        failed, finished without it, or has been silent for ``timeout`` seconds; ``still_owed(rank)`` looks again
        before raising (the file may have been completed since ``owed`` was made)."""
        now = time.monotonic()
        for rank in sorted(set(owed) - {self.rank}):
            beat = RankBeat.read(self.folder.rank_beat(rank))
            if beat is not None and beat.run != self.run:
                beat = None  # left by an earlier run
            counter = beat.beat if beat is not None else None
            seen = self._seen.get(rank)
            if seen is None or seen.beat != counter:
                seen = self._seen[rank] = _Seen(counter, now)
            state = beat.state if beat is not None else "running"
            if state == "running" and now - seen.since <= self.timeout:
                continue
            missing = still_owed(rank)
            if missing is None:
                continue
            who = f"process {rank} of {self.world}" + (f" (host {beat.host}, pid {beat.pid})" if beat else "")
            if state == "failed":
                raise RankLost(f"{who} stopped on an error ({beat.error}) before writing {missing}: this process "
                               "stops too; rerun to resume (every complete file is kept)")
            if state == "done":
                raise RankLost(f"{who} finished, but {missing} is missing: this process stops too; rerun to resume")
            raise RankLost(f"{who} has given no sign of life for {self.timeout:.0f} s (killed, frozen, or its node "
                           f"lost) and {missing} is still missing: this process stops too; rerun to resume (every "
                           "complete file is kept)")
