"""kill -9 at random moments, then rerun: the final shards equal an uninterrupted run, byte for byte."""

import os
import random
import re
import signal
import subprocess
import tarfile
import time

import datasets
import pytest

from conftest import BIN, facegen
from facegen.testing.folder import write_folder_source


def build_args(src, out):
    return ["build", "--source", "folder", "--source-path", str(src), "--plugin", "passthrough", "--out", str(out),
            "--shard-samples", "64", "--format", "jpg"]  # re-encoding: the work dominates


@pytest.mark.slow
def test_kill_9_then_resume_is_byte_identical(tmp_path):
    # noise=0: noisy PNGs took 11 s to write; the build's JPEG re-encoding still takes ~0.1 s per shard of 64
    src = write_folder_source(tmp_path / "src", identities=240, images_per_identity=8, size=160, noise=0)
    ref = tmp_path / "ref"
    facegen(*build_args(src, ref), check=True)  # the reference, uninterrupted

    out = tmp_path / "out"
    data = out / "data" / "train"

    def complete_shards():
        return len([n for n in os.listdir(data) if not n.startswith(".")]) if data.exists() else 0

    rng = random.Random(1234)
    kills, partial_states = 0, 0
    # kill during start-up, then each time a little after a given number of shards is complete (mid-shard,
    # between tar rename and stats, …): each rerun resumes where the last one was killed
    for target in (None, 2, 7, 13, 20, 26):
        proc = subprocess.Popen([str(BIN / "facegen"), *build_args(src, out)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if target is None:
            time.sleep(0.8)
        else:
            while proc.poll() is None and complete_shards() < target:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.06))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        if not data.exists():
            continue
        visible = sorted(n for n in os.listdir(data) if not n.startswith("."))
        assert all(re.fullmatch(r"train-\d{6}\.tar", n) for n in visible), visible
        for name in visible:  # every visible shard is a complete tar
            with tarfile.open(data / name) as tar:
                assert len(tar.getmembers()) > 0
        if 0 < len(visible) < 30:
            partial_states += 1
    print(f"{kills} kills, {partial_states} partial states")
    assert kills >= 5 and partial_states >= 4, (kills, partial_states)

    facegen(*build_args(src, out), check=True)  # the last rerun completes the build
    visible = sorted(n for n in os.listdir(data) if not n.startswith("."))
    assert visible == sorted(os.listdir(ref / "data" / "train"))
    assert not [n for n in os.listdir(data) if n.startswith(".")]  # temporaries of killed attempts cleaned up
    for name in visible:
        assert (data / name).read_bytes() == (ref / "data" / "train" / name).read_bytes(), name
    ds = datasets.load_dataset(str(out), split="train")
    keys = ds["__key__"]
    assert len(keys) == len(set(keys)) == 240 * 8
