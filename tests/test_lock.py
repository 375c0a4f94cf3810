"""One build per output folder: a second build is refused naming the holder, a dead holder's lock is taken over,
a holder on another node is judged by its lease, --break-lock takes it, and distributed ranks share the main's."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import datasets
import pytest

from conftest import BIN, run_cli
from facegen.builders.engine.lock import Holder, OutputLock
from facegen.errors import UsageError
from facegen.testing.folder import write_folder_source


def build_args(src, out, *extra):
    return ["build", "--source", "folder", "--source-path", str(src), "--plugin", "passthrough", "--out", str(out),
            "--shard-size", "2", *map(str, extra)]


def slow_build_args(src, out):
    """80 samples of `slow_src` re-encoded to JPEG in 40 shards: the lock is held ~0.3 s after it appears (8 small
    PNGs held it 0.13 s, which a loaded machine's scheduler could let pass before the test acts on the holder)."""
    return build_args(src, out, "--shard-samples", 2, "--format", "jpg")


def start_build(src, out):
    return subprocess.Popen([str(BIN / "facegen"), *slow_build_args(src, out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for_lock(out, proc, timeout=120):
    lock = out / ".facegen" / "lock"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock.exists() and Holder.parse(lock.read_bytes()) is not None:
            return Holder.parse(lock.read_bytes())
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError("the first build never took the lock")


def foreign_lock(out, host="node-b", lease=120.0, age=0.0):
    """A lock file as a build on another node writes it; ``age`` seconds since its last renewal."""
    path = out / ".facegen" / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = Holder(host=host, pid=4242, started="2026-01-01 00:00:00 UTC", token="t" * 32, lease=lease)
    path.write_text(json.dumps(vars(holder)))
    if age:
        past = time.time() - age
        os.utime(path, (past, past))
    return path


@pytest.fixture
def src(tmp_path):
    return write_folder_source(tmp_path / "src", identities=8, images_per_identity=2)


@pytest.fixture
def slow_src(tmp_path):
    return write_folder_source(tmp_path / "src", identities=40, images_per_identity=2, size=448, noise=0)


def test_second_build_is_refused_with_one_line_naming_the_holder(slow_src, tmp_path, capsys):
    src, out = slow_src, tmp_path / "out"
    first = start_build(src, out)
    try:
        holder = wait_for_lock(out, first)
        first.send_signal(signal.SIGSTOP)  # a live holder in the middle of its build, deterministically
        code, stdout, err = run_cli(slow_build_args(src, out), capsys)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert f"host {socket.gethostname()}, pid {first.pid}, started {holder.started}" in err
        assert "--break-lock" in err and "done" not in stdout
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err  # the first build was not disturbed
    assert not (out / ".facegen" / "lock").exists()  # released at the end
    assert datasets.load_dataset(str(out), split="train").num_rows == 80


def test_lock_left_by_a_killed_build_is_taken_over(slow_src, tmp_path, capsys):
    src, out = slow_src, tmp_path / "out"
    first = start_build(src, out)
    wait_for_lock(out, first)
    first.kill()
    first.wait()
    code, stdout, err = run_cli(slow_build_args(src, out), capsys)
    assert code == 0, err
    assert f"left by host {socket.gethostname()}, pid {first.pid}" in err and "no longer running" in err
    assert "facegen build done" in stdout
    assert datasets.load_dataset(str(out), split="train").num_rows == 80


def test_lock_of_another_node_is_taken_over_when_its_lease_expired(src, tmp_path, capsys):
    out = tmp_path / "out"
    foreign_lock(out, age=600)  # a SLURM job killed 10 minutes ago on node-b, requeued here
    code, stdout, err = run_cli(build_args(src, out), capsys)
    assert code == 0, err
    assert "held by host node-b" in err and "lease expired" in err


def test_lock_of_another_node_is_watched_for_one_lease(tmp_path):
    # no renewal during one lease (1 s, as the holder recorded it): the holder is gone, the lock is taken over
    path = foreign_lock(tmp_path, lease=1.0)
    lock = OutputLock(tmp_path)
    started = time.monotonic()
    lock.acquire()
    assert 0.9 < time.monotonic() - started < 30
    assert Holder.parse(path.read_bytes()).token == lock.me.token
    lock.release()
    assert not path.exists()

    # renewed while watched: the holder is alive, the build is refused
    path = foreign_lock(tmp_path, lease=5.0)
    stop = threading.Event()

    def renew():
        while not stop.wait(0.2):
            os.utime(path)

    renewer = threading.Thread(target=renew)
    renewer.start()
    try:
        with pytest.raises(UsageError, match="host node-b.*renewed its lease"):
            OutputLock(tmp_path).acquire()
    finally:
        stop.set()
        renewer.join()
    assert Holder.parse(path.read_bytes()).host == "node-b"  # untouched


def test_break_lock_takes_it_and_the_old_holder_notices(src, tmp_path, capsys):
    out = tmp_path / "out"
    old = OutputLock(out, lease=0.4)
    old.acquire()  # a live holder that renews every 0.05 s
    code, _, err = run_cli(build_args(src, out), capsys)
    assert code == 2 and f"pid {os.getpid()}" in err
    code, stdout, err = run_cli(build_args(src, out, "--break-lock"), capsys)
    assert code == 0 and "--break-lock: removed the lock" in err and "facegen build done" in stdout
    deadline = time.monotonic() + 10
    while not old.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(UsageError, match="lost the lock"):
        old.check()  # the old build stops before committing anything more
    old.release()


def test_two_takers_of_one_stale_lock_never_remove_each_others(tmp_path):
    foreign_lock(tmp_path, age=600)
    locks = [OutputLock(tmp_path) for _ in range(6)]
    results = []

    def take(lock):
        try:
            lock.acquire()
            results.append(lock)
        except UsageError as exc:
            results.append(str(exc))

    threads = [threading.Thread(target=take, args=(lock,)) for lock in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, OutputLock)]
    assert len(winners) == 1, results  # the others see a live holder (this process) and are refused
    assert Holder.parse((tmp_path / ".facegen" / "lock").read_bytes()).token == winners[0].me.token
    winners[0].release()


def test_card_is_refused_while_a_build_holds_the_folder(src, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(build_args(src, out), capsys)[0] == 0
    readme = (out / "README.md").read_bytes()
    holder = OutputLock(out)
    holder.acquire()
    try:
        code, _, err = run_cli(["card", out], capsys)
        assert code == 2 and "being built by another facegen process" in err and err.count("\n") == 1
    finally:
        holder.release()
    assert (out / "README.md").read_bytes() == readme
    assert run_cli(["card", out], capsys)[0] == 0


@pytest.mark.slow
def test_distributed_ranks_refused_together_without_deadlock(src, tmp_path):
    from test_distributed import free_port

    out = tmp_path / "out"
    holder = OutputLock(out)
    holder.acquire()
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "--no-python", str(BIN / "facegen"), *build_args(src, out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        holder.release()
    assert proc.returncode != 0
    assert proc.stderr.count(f"being built by another facegen process (host {socket.gethostname()}, "
                             f"pid {os.getpid()}") == 2  # both ranks learnt the main's refusal
    assert not (out / "data").exists()  # no rank wrote anything


def lock_holding(path, case):
    """Make ``path`` (the lock file) one of the hostile cases of issue 18."""
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = {"host": socket.gethostname(), "pid": 4242, "started": "x", "token": "t" * 32, "lease": 120.0}
    if case == "fifo":
        os.mkfifo(path)
    elif case == "folder":
        path.mkdir()
    elif case == "dangling symlink":
        path.symlink_to(path.parent / "nowhere")
    elif case == "symlink to a lock":
        (path.parent / "elsewhere").write_text(json.dumps(holder))
        path.symlink_to(path.parent / "elsewhere")
    elif case == "deep json":
        path.write_text("[" * 60000)
    elif case == "gigabytes":
        with open(path, "wb") as f:
            f.truncate(3 << 30)  # sparse: nothing on the disk
    else:
        field, value = {"lease nan": ("lease", "NaN"), "lease infinity": ("lease", "Infinity"),
                        "lease negative": ("lease", "-5"), "lease huge": ("lease", "1e300"),
                        "pid -1": ("pid", "-1"), "pid 0": ("pid", "0"), "pid 10**20": ("pid", str(10**20))}[case]
        holder[field] = 0
        path.write_text(json.dumps(holder).replace(f'"{field}": 0', f'"{field}": {value}'))


LOCK_CASES = ["lease nan", "lease infinity", "lease negative", "lease huge", "pid -1", "pid 0", "pid 10**20", "fifo",
              "folder", "gigabytes", "dangling symlink", "symlink to a lock", "deep json"]


def acquire_within(lock, seconds, **kwargs):
    """``lock.acquire`` in a thread: what it raised (None), or a failure when it is still running after ``seconds``
    (a hang: the thread is left behind, a daemon)."""
    outcome = {}

    def take():
        try:
            lock.acquire(**kwargs)
            outcome["error"] = None
        except Exception as exc:  # what the test looks at
            outcome["error"] = exc

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"acquire still running after {seconds} s"
    return outcome["error"]


@pytest.mark.parametrize("case", LOCK_CASES)
def test_a_lock_file_facegen_did_not_write_is_one_line_never_a_wait(tmp_path, case):
    """Today: 'waiting up to nan s' forever (NaN, Infinity), a read that blocks forever (a FIFO), a refusal naming
    every process (pid -1, 0), a traceback (10**20, deep json), a busy loop at 100% CPU (a dangling symlink: O_EXCL
    finds it, reading finds nothing), even with --break-lock. Each is refused at once (bound 1 s, checked with 10 s) in one
    line that says what the file is; --break-lock then removes it, except a folder."""
    path = tmp_path / ".facegen" / "lock"
    lock_holding(path, case)
    started = time.monotonic()
    error = acquire_within(OutputLock(tmp_path), 10)
    assert time.monotonic() - started < 1
    assert isinstance(error, UsageError) and "\n" not in str(error), error
    assert f"{path} is not a lock facegen wrote" in str(error)
    taker = OutputLock(tmp_path)
    error = acquire_within(taker, 10, break_lock=True)
    if case == "folder":
        assert isinstance(error, UsageError) and "remove it, then rerun" in str(error)
        return
    assert error is None and Holder.parse(path.read_bytes()).token == taker.me.token
    taker.release()
    assert not path.exists() and not path.is_symlink()


def test_a_build_refused_by_a_fifo_lock_is_one_line_exit_2(src, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    lock_holding(out / ".facegen" / "lock", "fifo")
    code, _, err = run_cli(build_args(src, out), capsys)
    assert code == 2 and err.count("\n") == 1 and "(a FIFO)" in err and "Traceback" not in err
    monkeypatch.setenv("FACEGEN_LOCK_LEASE", "nan")
    code, _, err = run_cli(build_args(src, tmp_path / "other"), capsys)
    assert code == 2 and err.count("\n") == 1 and "FACEGEN_LOCK_LEASE must be a number of seconds" in err


def test_a_frozen_holder_whose_lock_was_broken_stops_in_one_line_and_the_data_stays_whole(tmp_path, capsys):
    """A build frozen (SIGSTOP) mid-run; another build takes the folder with --break-lock and finishes; the first,
    woken (SIGCONT), stops in one line before committing anything more (it died with FileNotFoundError when its
    commit was in flight), and the folder is the second build's, whole: a rerun finds every shard complete."""
    src = write_folder_source(tmp_path / "src", identities=30, images_per_identity=2)
    out = tmp_path / "out"
    args = build_args(src, out, "--shard-samples", "2")
    first = subprocess.Popen([str(BIN / "facegen"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (out / ".facegen" / "shards" / "000002.json").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.002)
        first.send_signal(signal.SIGSTOP)
        code, _, err = run_cli([*args, "--break-lock"], capsys)
        assert code == 0 and "--break-lock: removed the lock" in err, err
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("facegen: error")]
    assert first.returncode == 2 and "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and "lost the lock" in lines[0] and "rerun" in lines[0]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0 and "nothing to do: all 30 shards" in stdout, stdout + err
    assert datasets.load_dataset(str(out), split="train").num_rows == 60


def start_rank(args, rank, port, env):
    """One process of a two-process build, started as torchrun starts it (the environment of a rank), but by the
    test: torchrun's agent would kill the surviving rank itself, as a cluster's launcher on another node does not."""
    return subprocess.Popen([str(BIN / "facegen"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                 "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


@pytest.mark.slow
def test_when_a_rank_dies_the_other_stops_in_bounded_time_and_a_rerun_resumes(slow_src, tmp_path, capsys):
    """Process 1 of 2 is killed (SIGKILL) once it beats; process 0 writes its own shards, then waited forever for the
    dead one's. Now it stops once process 1 has been silent for FACEGEN_RANK_TIMEOUT (2 s here; bound 2.5 s with its
    0.5 s poll, checked with 30 s), in one line naming the process and 'rerun to resume'; the rerun keeps its shards."""
    from test_distributed import free_port, writers

    out = tmp_path / "out"
    args = slow_build_args(slow_src, out)
    env = {"OMP_NUM_THREADS": "1", "FACEGEN_RANK_TIMEOUT": "2"}
    port = free_port()
    main, other = start_rank(args, 0, port, env), start_rank(args, 1, port, env)
    try:
        beat = out / ".facegen" / "ranks" / "000001.json"
        deadline = time.monotonic() + 120
        while not beat.exists():
            assert other.poll() is None and main.poll() is None and time.monotonic() < deadline, other.communicate()
            time.sleep(0.002)
        other.kill()
        killed = time.monotonic()
        other.wait()
        _, err = main.communicate(timeout=30)
        took = time.monotonic() - killed
    finally:
        for proc in (main, other):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    with capsys.disabled():
        print(f"process 0 stopped {took:.1f} s after process 1 was killed")
    odd = [i for i in range(40) if i % 2 and not (out / ".facegen" / "shards" / f"{i:06d}.json").exists()]
    assert odd, "process 1 wrote all its shards before it was killed: the test did not act in time"
    lines = [line for line in err.splitlines() if line.startswith("facegen: error")]
    assert main.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and "process 1 of 2" in lines[0] and "no sign of life for 2 s" in lines[0], lines
    assert "rerun to resume" in lines[0] and f"shard {odd[0]} is still missing" in lines[0]
    assert writers(out) >= {(0, 2)}  # process 0's shards are complete and kept
    code, stdout, err = run_cli(args, capsys)
    assert code == 0 and "already complete" in stdout, stdout + err
    assert writers(out) >= {(0, 1), (0, 2)}
    assert datasets.load_dataset(str(out), split="train").num_rows == 80


def test_a_rank_that_failed_finished_without_its_file_or_belongs_to_an_earlier_run_is_judged_on_its_beat(tmp_path):
    """The waiting process's judgement of another's beat file: failed stops it at once with that process's error,
    done without the owed file stops it at once, a file completed meanwhile does not, and a beat of an earlier run
    is no beat (silent: stopped after the timeout)."""
    from facegen.builders.engine.ranks import Ranks
    from facegen.errors import RankLost
    from facegen.layout import OutputFolder

    folder, owed = OutputFolder(tmp_path), {1: "shard 1"}
    waiter = Ranks(folder, "run-a", 0, 2, timeout=600)
    other = Ranks(folder, "run-a", 1, 2, timeout=600).start()
    waiter.check(owed, lambda rank: "shard 1")  # running
    other.stop(OSError("disk on fire\nsecond line"))
    with pytest.raises(RankLost, match=rf"process 1 of 2 \(host .*, pid {os.getpid()}\) stopped on an error \(disk "
                                       r"on fire\) before writing shard 1: .*rerun to resume"):
        waiter.check(owed, lambda rank: "shard 1")
    waiter.check(owed, lambda rank: None)  # the file was completed meanwhile
    Ranks(folder, "run-a", 1, 2, timeout=600).stop()
    with pytest.raises(RankLost, match="process 1 of 2 .* finished, but shard 1 is missing: .*rerun to resume"):
        waiter.check(owed, lambda rank: "shard 1")
    Ranks(folder, "run-old", 1, 2, timeout=600).stop(OSError("an earlier run's failure"))
    waiter = Ranks(folder, "run-a", 0, 2, timeout=0.2)
    waiter.check(owed, lambda rank: "shard 1")  # no beat of this run yet: silent from now on
    time.sleep(0.3)
    with pytest.raises(RankLost, match=r"process 1 of 2 has given no sign of life .* shard 1 is still missing"):
        waiter.check(owed, lambda rank: "shard 1")
