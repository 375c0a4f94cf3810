import os
import subprocess
import sys
from pathlib import Path

import pytest

from facegen.testing.folder import write_folder_source

BIN = Path(sys.executable).parent


def run_facegen(*args, env=None, check=False, timeout=600):
    """Run the installed `facegen` console script in a real subprocess."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([str(BIN / "facegen"), *map(str, args)], capture_output=True, text=True, env=full_env,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"facegen {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture
def folder_source(tmp_path):
    return write_folder_source(tmp_path / "src", identities=12, images_per_identity=3)


@pytest.fixture(autouse=True)
def isolated_datasets_cache(tmp_path, monkeypatch):
    """`datasets` caches a local folder by its name and README, not its path: two test outputs both named `out`
    would otherwise load each other's cached rows. Each test gets its own cache."""
    import datasets

    cache = tmp_path / "hf-datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))


def build(*args):
    """Run `facegen build` in-process through the click group called with an argument list; raise on failure."""
    from facegen.cli import main

    try:
        main(["build", *map(str, args)], standalone_mode=False)
    except SystemExit as exc:  # the group exits like the console script on errors
        if exc.code not in (0, None):
            raise


def run_cli(args, capsys):
    """The real click group in this process; returns (exit code, stdout, stderr)."""
    from facegen.cli import main

    try:
        main(list(map(str, args)), standalone_mode=False)
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run thousands of tiny ops: with 2 OpenMP threads on a shared 2-core machine every op can wait a
    scheduler slice for the other thread, which made such tests up to 40x slower under load."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli(*args):
    """Run any facegen command in-process; returns its exit code (0 when the command returned normally)."""
    from facegen.cli import main

    try:
        main([*map(str, args)], standalone_mode=False)
    except SystemExit as exc:
        return exc.code or 0
    return 0
