"""One build per output folder: ``OUT/.facegen/lock``, created exclusively and kept alive by a lease.

The lock file is created with ``O_CREAT | O_EXCL`` (atomic on local file systems, NFSv3+ and Lustre) and holds who
took it (host, pid, start time). While the build runs, a heartbeat thread renews the lease by touching the file;
when the process dies the renewals stop. Another build then:

- refuses at once (exit 2, one line naming the holder) when the holder is a live process on the same host;
- takes the lock over at once when the holder was a process on this host that is gone (or the host rebooted);
- for a holder on another host (a SLURM job requeued elsewhere), takes it over when the lease has expired, i.e. the
  file was not renewed for ``lease`` seconds. The age is measured against the file system's own clock (the mtime of
  a probe file written beside it), so clocks of different nodes need not agree; when the age cannot settle it, the
  file is watched for up to one lease: a renewal means the holder is alive (refuse), none means it is gone.

``--break-lock`` takes the lock whoever holds it; a holder that loses its lock notices at its next heartbeat, and
before committing each file (:meth:`OutputLock.check` reads the lock file again), and stops in one line. Every
removal of someone else's lock goes through a short-lived ``lock.break`` file (also created exclusively) and
re-reads the lock first, so two processes taking over the same stale lock never delete each other's fresh one.

A lock file facegen did not write is never waited on: one that is not a regular file (a FIFO, a folder, a symbolic
link, even a dangling one), larger than :data:`MAX_LOCK_BYTES`, JSON nested too deep to parse, or whose fields are
out of range (a lease that is NaN, infinite, negative or over :data:`MAX_LEASE_SECONDS`; a pid outside 1..2**22)
stops the build in one line (exit 2) that says to remove it or pass ``--break-lock`` (which removes any of them but a
folder; a link itself, never its target). Only an empty or half-written file, which a taker leaves for an instant, is
watched, for one lease of this build's.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import math
import os
import socket
import stat
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from facegen.errors import FolderBusy, UsageError
from facegen.layout import OutputFolder
from facegen.messages import warn

DEFAULT_LEASE_SECONDS = 120.0  # the longest a requeued job waits for a lock left by a holder on another node
MAX_LEASE_SECONDS = 86400.0  # a day: a longer lease is a typo (or a lock file facegen did not write)
LEASE_ENV = "FACEGEN_LOCK_LEASE"  # seconds; tests and impatient clusters shorten it
BREAK_STALE_SECONDS = 30.0  # a lock.break older than this was left by a process killed mid-take-over
MAX_LOCK_BYTES = 64 * 1024  # facegen's lock file holds about 300 bytes
MAX_PID = 1 << 22  # Linux's largest pid_max


def valid_lease(value: float) -> bool:
    return math.isfinite(value) and 0 < value <= MAX_LEASE_SECONDS


def lease_seconds() -> float:
    raw = os.environ.get(LEASE_ENV)
    if not raw:
        return DEFAULT_LEASE_SECONDS
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{LEASE_ENV}={raw!r} is not a number of seconds") from None
    if not valid_lease(value):
        raise UsageError(f"{LEASE_ENV} must be a number of seconds above 0 and at most {MAX_LEASE_SECONDS:.0f}, "
                         f"got {raw}")
    return value


class ForeignLock(Exception):
    """The lock path holds something facegen never writes there; ``what`` says what, in a few words."""

    def __init__(self, what: str, removable: bool = True):
        super().__init__(what)
        self.what, self.removable = what, removable


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux): tells a live holder from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name (in parentheses) may hold spaces
    return fields[19] if len(fields) > 19 else None


@dataclass
class Holder:
    """Who holds the lock, as written in the lock file."""

    host: str
    pid: int
    started: str  # UTC, ISO 8601
    token: str
    lease: float
    boot_id: str | None = None
    process_start: str | None = None

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"

    @classmethod
    def me(cls, lease: float) -> Holder:
        return cls(host=socket.gethostname(), pid=os.getpid(),
                   started=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                   token=uuid.uuid4().hex, lease=lease, boot_id=_boot_id(), process_start=_process_start(os.getpid()))

    @classmethod
    def parse(cls, raw: bytes) -> Holder | None:
        """None for a file being written (empty or cut short); ForeignLock for a complete JSON object that facegen
        did not write (fields missing or out of range)."""
        try:
            data = json.loads(raw.decode("utf-8"))
        except ValueError:
            return None
        except RecursionError:  # '[' nested deeper than the parser's stack: no holder wrote that
            raise ForeignLock("deeply nested JSON") from None
        try:
            holder = cls(host=str(data["host"]), pid=data["pid"], started=str(data["started"]),
                         token=str(data["token"]), lease=float(data["lease"]), boot_id=data.get("boot_id"),
                         process_start=data.get("process_start"))
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
            raise ForeignLock("missing or malformed fields") from None
        if type(holder.pid) is not int or not 0 < holder.pid <= MAX_PID:
            raise ForeignLock(f"pid {str(holder.pid)[:30]!r}, which no process has" if type(holder.pid) is not int
                              else f"pid {str(holder.pid)[:30]}, which no process has")
        if not valid_lease(holder.lease):
            raise ForeignLock(f"a lease of {holder.lease} s")
        if not all(v is None or isinstance(v, str) for v in (holder.boot_id, holder.process_start)):
            raise ForeignLock("malformed fields")
        return holder

    def is_gone(self) -> bool | None:
        """True: the holder's process no longer runs; False: it runs; None: cannot tell (another host)."""
        if self.host != socket.gethostname():
            return None
        boot = _boot_id()
        if self.boot_id and boot and self.boot_id != boot:
            return True  # the machine rebooted since
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # runs as another user
        start = _process_start(self.pid)
        if self.process_start and start and start != self.process_start:
            return True  # the pid now belongs to another process
        return False


def _cannot_write(out: Path, exc: OSError) -> UsageError:
    return UsageError(f"cannot write to {out}: {exc.strerror or exc} (facegen keeps its lock, records and card in "
                      "that folder; a finished build in it can be read as it is)")


class OutputLock:
    """The exclusive lock of one output folder, held by one process (a distributed run's main process)."""

    def __init__(self, out: Path, lease: float | None = None, command_breaks_locks: bool = True):
        self.out = Path(out)
        self.command_breaks_locks = command_breaks_locks  # the command has --break-lock (its refusal may name it)
        paths = OutputFolder(self.out)
        self.folder = paths.records
        self.path = paths.lock
        self.breaker = paths.lock_break
        self.lease = lease if lease is not None else lease_seconds()
        self.me = Holder.me(self.lease)
        self.lost: str | None = None  # set by the heartbeat when another process took the lock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._made_folder = False  # .facegen/ did not exist: a refused build leaves no trace of it

    # --- reading the file and the file system's clock ---

    def _read(self) -> tuple[bytes, int] | None:
        """The lock file's bytes and mtime (ns); None when there is no lock file; ForeignLock when the path holds
        something else (opened without blocking: a FIFO never stalls the reader)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            raise ForeignLock("a folder", removable=False) from None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            # facegen never writes a link there; a dangling one would fail O_EXCL yet read as absent: a busy loop
            raise ForeignLock("a symbolic link") from None
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise ForeignLock("a folder", removable=False)
            if not stat.S_ISREG(info.st_mode):
                kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode) \
                    else "a device"
                raise ForeignLock(kind)
            if info.st_size > MAX_LOCK_BYTES:
                raise ForeignLock(f"{info.st_size:,} bytes")
            return os.read(fd, MAX_LOCK_BYTES + 1), info.st_mtime_ns
        finally:
            os.close(fd)

    def _fs_now_ns(self) -> int:
        """Now, by the clock that stamps files in this folder (the NFS server's, not this node's)."""
        probe = self.folder / f".clock-{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"t")
        finally:
            os.close(fd)
        try:
            return os.stat(probe).st_mtime_ns
        finally:
            probe.unlink(missing_ok=True)

    # --- taking, renewing, releasing ---

    def _create(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, json.dumps(asdict(self.me), indent=1).encode() + b"\n")
            os.fsync(fd)
        except BaseException:  # a full disk: leave no empty lock that others would have to wait out
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)

    def _remove_if_unchanged(self, seen: tuple[bytes, int], check_mtime: bool) -> bool:
        """Delete the lock file if it is still the one judged stale; False (after a short pause) when it changed
        or another process is taking it over right now."""
        removed = self._remove_once(seen, check_mtime)
        if not removed:
            time.sleep(0.05)
        return removed

    def _remove_once(self, seen: tuple[bytes, int], check_mtime: bool) -> bool:
        if not self._take_breaker():
            return False
        try:
            try:
                now = self._read()
            except ForeignLock:
                return False  # replaced meanwhile: judge it again
            if now is not None and (now[0] != seen[0] or (check_mtime and now[1] != seen[1])):
                return False  # renewed or replaced meanwhile: judge it again
            self.path.unlink(missing_ok=True)
            return True
        finally:
            self.breaker.unlink(missing_ok=True)

    def _take_breaker(self) -> bool:
        """Create ``lock.break`` (the right to remove a lock); False when another process holds it (one left by a
        process killed mid-take-over is removed once stale)."""
        breaker = self.breaker
        try:
            os.close(os.open(breaker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            return True
        except FileExistsError:
            try:
                if (self._fs_now_ns() - breaker.stat().st_mtime_ns) / 1e9 > BREAK_STALE_SECONDS:
                    breaker.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            return False

    def acquire(self, break_lock: bool = False) -> None:
        """Take the lock or raise a one-line UsageError naming the holder."""
        try:
            self._made_folder = not self.folder.exists()
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _cannot_write(self.out, exc) from None
        watched: tuple[int, float] | None = None  # (mtime seen, when) while watching a holder on another host
        while True:
            try:
                self._create()
                break
            except FileExistsError:
                pass
            except OSError as exc:
                raise _cannot_write(self.out, exc) from None
            try:
                seen = self._read()
                holder = Holder.parse(seen[0]) if seen is not None else None
            except ForeignLock as exc:
                if not (break_lock and exc.removable):
                    raise self._foreign(exc) from None
                if self._remove_foreign():
                    warn(f"facegen: --break-lock: removed {self.path}, which was not a lock facegen wrote ({exc.what})")
                continue
            if seen is None:
                continue  # released meanwhile
            who = holder.describe() if holder else "an unreadable lock file"
            if break_lock:
                if self._remove_if_unchanged(seen, check_mtime=False):
                    warn(f"facegen: --break-lock: removed the lock of {self.out} held by {who}")
                continue
            gone = holder.is_gone() if holder else None
            if gone is False:
                raise self._held(holder)
            if gone:
                if self._remove_if_unchanged(seen, check_mtime=True):
                    warn(f"facegen: taking over the lock of {self.out} left by {who}, which is no longer running")
                continue
            lease = holder.lease if holder else self.lease
            try:
                age = (self._fs_now_ns() - seen[1]) / 1e9
            except OSError as exc:
                raise _cannot_write(self.out, exc) from None
            if age > lease:
                if self._remove_if_unchanged(seen, check_mtime=True):
                    warn(f"facegen: taking over the lock of {self.out} held by {who}: its lease expired "
                         f"{age - lease:.0f} s ago (not renewed for {age:.0f} s)")
                continue
            if watched is None:
                watched = (seen[1], time.monotonic())
                warn(f"facegen: {self.out} is locked by {who}; waiting up to {lease:.0f} s to see whether that build "
                     "still renews its lease")
            elif seen[1] != watched[0]:
                raise self._held(holder, "it renewed its lease just now")
            elif time.monotonic() - watched[1] > lease:
                if self._remove_if_unchanged(seen, check_mtime=True):
                    warn(f"facegen: taking over the lock of {self.out} held by {who}: not renewed for {lease:.0f} s")
                continue
            time.sleep(min(1.0, lease / 10))
        self._thread = threading.Thread(target=self._heartbeat, name="facegen-lock-lease", daemon=True)
        self._thread.start()

    def _foreign(self, exc: ForeignLock) -> UsageError:
        if not exc.removable:
            return UsageError(f"{self.path} is not a lock facegen wrote ({exc.what}): remove it, then rerun")
        return UsageError(f"{self.path} is not a lock facegen wrote ({exc.what}): if no facegen command is using "
                          f"{self.out}, remove it (a build's --break-lock does), then rerun")

    def _remove_foreign(self) -> bool:
        """--break-lock on a lock path that holds no lock: remove it under ``lock.break`` like any other."""
        if not self._take_breaker():
            time.sleep(0.05)
            return False
        try:
            self.path.unlink(missing_ok=True)
            return True
        finally:
            self.breaker.unlink(missing_ok=True)

    def _held(self, holder: Holder | None, why: str = "") -> FolderBusy:
        who = holder.describe() if holder else "another process"
        then = ("if that process is gone, rerun with --break-lock" if self.command_breaks_locks else
                "then rerun this command (if that process hangs, stop it first)")
        return FolderBusy(f"{self.out} is being built by another facegen process ({who}{'; ' + why if why else ''}):"
                          f" wait for it to finish; {then}")

    def _still_mine(self) -> bool | None:
        """Whether the lock file is still this process's: True, False (then ``lost`` says why), or None when it
        cannot be read just now (a passing file-system error)."""
        try:
            seen = self._read()
            holder = Holder.parse(seen[0]) if seen else None
        except ForeignLock as exc:
            self.lost = f"replaced by {exc.what}"
            return False
        except OSError:
            return None
        if holder is None or holder.token != self.me.token:
            self.lost = f"taken by {holder.describe()}" if holder else "the lock file was removed"
            return False
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease / 8):
            mine = self._still_mine()
            if mine is False:
                return
            if mine:
                try:
                    os.utime(self.path)  # the server's time on NFS: the lease is judged by the file system's clock
                except OSError:
                    pass  # a passing file-system error; the next beat tries again

    def check(self) -> None:
        """Raise when another process has taken this lock (--break-lock, or a lease that expired meanwhile): what
        the heartbeat saw, or the lock file read now (a holder that was frozen, then woken, learns it before its
        heartbeat runs again)."""
        if self.lost or self._still_mine() is False:
            raise FolderBusy(f"lost the lock of {self.out} ({self.lost}); stopped without writing more: rerun the "
                             "same command once the other build is done")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._still_mine():
            try:
                self.path.unlink(missing_ok=True)
                if self._made_folder:
                    self.folder.rmdir()  # only when empty: a build that wrote nothing (refused) leaves none
            except OSError:
                pass


@contextmanager
def output_lock(out: Path, state=None, break_lock: bool = False, command_breaks_locks: bool = True):
    """Hold ``out``'s lock for the block. In a distributed run the main process takes it and every rank learns the
    outcome (one broadcast) before anything is written, so no rank waits for a lock that was refused.
    ``command_breaks_locks``: False for a command without ``--break-lock`` (its refusal does not name the option)."""
    lock, refusal, kind = None, None, UsageError
    if state is None or state.is_main_process:
        try:
            lock = OutputLock(out, command_breaks_locks=command_breaks_locks)
            lock.acquire(break_lock=break_lock)
        except UsageError as exc:
            lock, refusal, kind = None, str(exc), type(exc)
        except OSError as exc:  # every rank must hear of it, or the others would wait for the main forever
            lock, refusal = None, f"cannot take the lock of {out}: {exc.strerror or exc}"
    if state is not None and state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list([refusal], from_process=0)[0]
    if refusal:
        if lock is not None:
            lock.release()
        raise kind(refusal)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
