"""One process and two real processes (torchrun, accelerate launch) on CPU give byte-identical output."""

import json
import os
import socket
import subprocess

import datasets
import pytest

from conftest import BIN, facegen, facegen_process
from facegen.testing.folder import write_folder_source


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted((out / "data" / "train").iterdir())}


def writers(out):
    stats = [json.loads(p.read_text()) for p in (out / ".facegen" / "shards").glob("*.json")]
    return {(s["written_by"]["process"], s["written_by"]["processes"]) for s in stats}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    src = write_folder_source(root / "src", identities=23, images_per_identity=3, corrupt=1)
    out = root / "one"
    proc = facegen(*common_args(src, out))
    assert proc.returncode == 0, proc.stderr
    return src, out


def common_args(src, out):
    return ["build", "--source", "folder", "--source-path", str(src), "--plugin", "passthrough", "--out", str(out),
            "--shard-samples", "10"]  # 69 listed images: 7 shards


@pytest.mark.slow
def test_accelerate_launch_two_processes_byte_identical(reference, tmp_path):
    src, one = reference
    out = tmp_path / "acc"
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "facegen", *common_args(src, out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert writers(out) == {(0, 2), (1, 2)}
    assert shard_bytes(out) == shard_bytes(one)


def test_world_size_without_a_launcher_is_one_line_exit_2(reference, tmp_path):
    """A real process: accelerate's state is made once per process, from the environment it starts with."""
    src, _ = reference
    proc = facegen_process(*common_args(src, tmp_path / "x"), env={"WORLD_SIZE": "2", "RANK": "0"})
    assert proc.returncode == 2 and "WORLD_SIZE=2" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_world_size_seen_as_one_process_is_refused(monkeypatch):
    """Processes that accelerate cannot see as ranks would each write every shard: refuse to run."""
    import accelerate

    from facegen.builders.engine import run
    from facegen.errors import UsageError

    class SingleProcessState:  # what PartialState reports when it misses the ranks (e.g. no cpu=True on CPU)
        def __init__(self, cpu=False):
            self.num_processes = 1

    monkeypatch.setattr(accelerate, "PartialState", SingleProcessState)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="accelerate sees one process"):
        run.distributed_state()


@pytest.mark.slow
def test_units_and_assembly_under_torchrun_byte_identical(tmp_path, stylegan_checkpoints):
    """Identity-level transform (e4e, tiny checkpoint): units of work and the assembly of the published shards
    are both spread over two processes; the shards equal one process's, byte for byte."""
    e4e_path, _ = stylegan_checkpoints

    def args(out):
        return ["build", "--source", "seeds", "--source-opt", "count=10", "--plugin", "e4e", "--plugin-opt",
                f"checkpoint={e4e_path}", "--plugin-opt", "batch_size=3", "--shard-size", "3",
                "--shard-samples", "4", "--out", str(out)]

    one = tmp_path / "one"
    assert facegen(*args(one)).returncode == 0
    two = tmp_path / "two"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "--no-python",
           str(BIN / "facegen"), *args(two)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert writers(two) == {(0, 2), (1, 2)}  # the assembly too is shared
    units = [json.loads(p.read_text()) for p in (two / ".facegen" / "units").glob("*.json")]
    assert {(u["written_by"]["process"], u["written_by"]["processes"]) for u in units} == {(0, 2), (1, 2)}
    assert shard_bytes(two) == shard_bytes(one) and len(shard_bytes(one)) == 3  # 10 samples, at most 4 per shard
