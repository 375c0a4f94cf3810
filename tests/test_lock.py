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
