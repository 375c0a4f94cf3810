"""Generation never waits (issue 21 §1): the run's stages overlap through bounded queues, across batches, calls and
units, and a failure, Ctrl-C or a full disk inside that pipeline still keeps every complete file and discards the
partial one.

Overlap is shown by ordering, not by timing: a stage blocks until the event that only an overlapping pipeline
produces in time (the next batch's generation, the next call's planning) has happened; a sequential loop would
never produce it, and the wait would run out (WAIT, far above the milliseconds it takes)."""

import os
import signal
import sys
import threading
import time

import pytest

from conftest import run_cli
from facegen import registry
from facegen.api import Face, IdentityResult, Transform, UsageError
from facegen.builders.engine import writer
from facegen.streams import run_ahead, stop_if_closed
from facegen.testing.folder import write_folder_source

WAIT = 10.0  # seconds a stage waits for an event an overlapping pipeline produces within milliseconds


# --- the stage ---


def test_run_ahead_keeps_order_bounds_its_queue_and_raises_in_place():
    made = []

    def items():
        for n in range(8):
            made.append(n)
            if n == 6:
                raise ValueError("item 6 is broken")
            yield n

    got = []
    with run_ahead(items(), depth=2, name="test-ahead") as ahead:
        with pytest.raises(ValueError, match="item 6 is broken"):
            for item in ahead:
                time.sleep(0.01)  # a slow consumer: the producer fills the queue, then waits
                # at most depth items queued, plus the one being put
                assert len(made) <= len(got) + 1 + 2 + 1
                got.append(item)
    assert got == [0, 1, 2, 3, 4, 5]


def test_closing_it_stops_the_thread_and_runs_the_generators_cleanup_on_it():
    cleanup = []

    def endless():
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            cleanup.append(threading.current_thread().name)

    ahead = run_ahead(endless(), depth=1, name="test-endless")
    assert [next(ahead), next(ahead)] == [0, 1]
    ahead.close()  # the producer is blocked on the full queue: closing frees it
    assert cleanup == ["test-endless"] and not ahead._thread.is_alive()
    assert next(ahead, "over") == "over"


def test_closing_it_stops_long_work_within_a_step():
    """A long item (a diffusion loop, here 10,000 steps of 10 ms) checks ``stop_if_closed`` between its steps:
    closing the stage (Ctrl-C) does not wait for the item. A consumer that is itself a stage's thread stops waiting
    for its own producer once its stage is closed."""
    started = threading.Event()

    def long_items():
        started.set()
        for _ in range(10_000):
            time.sleep(0.01)
            stop_if_closed()
        yield "made"

    def waiting(upstream):
        yield from upstream  # blocks in upstream's __next__ while the long item is made

    upstream = run_ahead(long_items(), depth=1, name="test-long")
    downstream = run_ahead(waiting(upstream), depth=1, name="test-waiting")
    assert started.wait(WAIT)
    start = time.monotonic()
    downstream.close()  # its thread stops waiting (within a poll), not after the long item
    upstream.close()  # the long item stops within a step
    assert time.monotonic() - start < 5.0  # the item alone would take 100 s
    assert not downstream._thread.is_alive() and not upstream._thread.is_alive()
    stop_if_closed()  # not a stage's thread: nothing to stop


# --- the run loop ---


def main_thread_waits_for_results() -> bool:
    """Whether the main thread is blocked waiting for the transform's next result (inside the stage's ``__next__``)."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None:
        if frame.f_code.co_name == "__next__" and frame.f_code.co_filename.endswith(os.path.join("facegen",
                                                                                                 "streams.py")):
            return True
        frame = frame.f_back
    return False


class CopyWithEvents(Transform):
    """Identity-level stand-in: copies each identity's images; marks when each batch starts being generated."""

    name = "copy-with-events"
    description = "test stand-in"
    batch_size = 2
    started: dict[int, threading.Event] = {}
    fail_at: int | None = None  # batch that raises instead
    interrupt_at: int | None = None  # batch at which the process gets a real SIGINT, once the writer waits for it

    def __call__(self, batch):
        index = batch[0].cls // self.batch_size
        self.started.setdefault(index, threading.Event()).set()
        if index == self.fail_at:
            raise UsageError(f"stand-in failed at batch {index}")
        if index == self.interrupt_at:
            deadline = time.monotonic() + WAIT
            while not main_thread_waits_for_results() and time.monotonic() < deadline:
                time.sleep(0.001)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the kernel may hand it to this thread, not the main one
            time.sleep(0.5)  # the results are late: the main thread handles the signal while it waits
        for identity in batch:
            yield IdentityResult(identity, [Face(image=i.data, ext=i.ext, ref=i.ref) for i in identity.images])


@pytest.fixture
def stand_in(monkeypatch):
    get_transform = registry.get_transform
    monkeypatch.setattr(registry, "get_transform",
                        lambda name: CopyWithEvents if name == CopyWithEvents.name else get_transform(name))
    monkeypatch.setattr(CopyWithEvents, "started", {})
    return CopyWithEvents


def build_args(src, out):
    """8 identities, units of 2 identities: each unit is one batch, so the next batch is the next unit's."""
    return ["build", "--source", "folder", "--source-path", src, "--plugin", CopyWithEvents.name, "--out", out,
            "--shard-size", "2", "--shard-samples", "4"]


@pytest.fixture
def src(tmp_path):
    return write_folder_source(tmp_path / "src", identities=8, images_per_identity=2)


def test_the_next_batch_is_generated_while_this_one_is_written(stand_in, src, tmp_path, capsys, monkeypatch):
    real_write = writer.TarWriter.write
    overlapped = []

    def write(self, result, first=0):
        batch = result.identity.cls // stand_in.batch_size
        if result.identity.cls % stand_in.batch_size == 1 and batch + 1 < 4:  # the batch's last result
            overlapped.append(stand_in.started.setdefault(batch + 1, threading.Event()).wait(WAIT))
        return real_write(self, result, first)

    monkeypatch.setattr(writer.TarWriter, "write", write)
    code, stdout, err = run_cli(build_args(src, tmp_path / "out"), capsys)
    assert code == 0 and "units of work 4 (4 written now)" in stdout, err
    # batch b's writing ended after batch b+1's generation began, for every b, across the units
    assert overlapped == [True, True, True]


def units_written(out):
    """{path: bytes} of the tars and sample indexes of the complete units (those with stats); checks that no
    partial (hidden temporary) file is left anywhere."""
    assert not [p for p in out.rglob(".*") if p != out / ".facegen"]
    units = out / ".facegen" / "units"
    complete = sorted(p.stem for p in units.glob("*.json"))
    return {f"{kind}{n}": (units / kind / f"{n}.{ext}").read_bytes()
            for n in complete for kind, ext in (("", "tar"), ("index/", "json"))}


def no_pipeline_threads():
    return not [t for t in threading.enumerate() if t.name.startswith(("facegen-", "arc2face-plan"))]


@pytest.mark.parametrize("stop", ["failure", "ctrl-c"])
def test_a_failure_or_ctrl_c_inside_the_pipeline_keeps_complete_units_then_resumes(stop, stand_in, src, tmp_path,
                                                                                 capsys, monkeypatch):
    reference = tmp_path / "reference"
    assert run_cli(build_args(src, reference), capsys)[0] == 0
    out = tmp_path / "out"
    # batch 3 (unit 3) stops the build while the units before are written; Ctrl-C comes while the writer waits
    monkeypatch.setattr(stand_in, "fail_at" if stop == "failure" else "interrupt_at", 3)
    code, stdout, err = run_cli(build_args(src, out), capsys)
    assert code == (2 if stop == "failure" else 130), err
    assert ("stand-in failed at batch 3" if stop == "failure" else "interrupted") in err and "Traceback" not in err
    assert no_pipeline_threads()
    kept = units_written(out)
    assert sorted(kept) == ["000000", "000001", "000002", "index/000000", "index/000001", "index/000002"]
    expected = units_written(reference)
    assert all(kept[name] == expected[name] for name in kept)  # as an uninterrupted build wrote them

    monkeypatch.setattr(stand_in, "fail_at", None)
    monkeypatch.setattr(stand_in, "interrupt_at", None)
    code, stdout, err = run_cli(build_args(src, out), capsys)
    assert code == 0 and "units of work 4 (1 written now)" in stdout, err
    train = sorted((out / "data" / "train").iterdir())
    assert [p.read_bytes() for p in train] == [p.read_bytes() for p in sorted((reference / "data" / "train").iterdir())]
