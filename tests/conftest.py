"""Shared helpers and fixtures of facegen's tests.

Commands run in this process through `facegen()` (the real click group, as the console script calls it: same
argv, exit codes and output), which is seconds faster per call than a new Python process importing torch and
datasets. A real process (`facegen_process()`) is used only where one matters: kill -9 and resume, the lock
between processes, signals, torchrun/accelerate launch, limits and RSS of a process, and the console script's own
wiring (tests/test_plugins.py).

Expensive fixtures that tests only read (tiny models, checkpoints, real-face sources) are built once per session
under `tmp_path_factory`; a test that changes one copies it first.
"""

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# One OpenMP/BLAS thread in this process and in every process it starts: tiny models run thousands of tiny ops, and
# with 2 threads on a shared 2-core machine every op can wait a scheduler slice for the other thread (measured up
# to 40x slower under load). The golden outputs are recorded with one thread too. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from facegen.testing.folder import write_folder_source  # noqa: E402

BIN = Path(sys.executable).parent


@dataclass
class Result:
    """What a finished command left: like `subprocess.CompletedProcess` (returncode, stdout, stderr)."""

    returncode: int
    stdout: str
    stderr: str


def facegen(*args, env=None, cwd=None, check=False) -> Result:
    """Run `facegen ARGS` in this process, as the console script would run it: ``sys.argv`` is the command line
    (the card records it), ``env`` is added to ``os.environ`` (and ``HF_HUB_OFFLINE`` to huggingface_hub's
    constants, which it reads at import), ``cwd`` is the working folder; all restored afterwards.

    Returns a `Result` with the exit code and what the command wrote to stdout and stderr, including what a new
    process would print there too: log records nothing else handles (logging's last resort) and Python warnings
    under Python's default filters. The output is also passed on to the test's own stdout/stderr (so `capsys`
    sees it and a failing test shows it). An exception the command does not handle is raised, as the console
    script would show a traceback: the test fails on it. ``check=True`` raises AssertionError (with stderr) on a
    non-zero exit code.
    """
    from facegen.cli import main

    args = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with _command_context(args, env, cwd), _as_a_new_process_prints(err):
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                main(args, standalone_mode=False)
    except SystemExit as exc:  # the group exits like the console script on errors
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.stdout.write(out.getvalue())
        sys.stderr.write(err.getvalue())
    result = Result(code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"facegen {' '.join(args)} failed ({code}):\n{result.stderr}")
    return result


@contextlib.contextmanager
def _as_a_new_process_prints(stream):
    """Log records that reach the root logger at WARNING or above, as logging's last resort prints them in a
    process without handlers, and warnings shown by Python's default filters, go to ``stream``."""
    import logging
    import warnings

    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.resetwarnings()
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
            yield
    finally:
        root.removeHandler(handler)
        for w in caught:
            stream.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line))


@contextlib.contextmanager
def _command_context(args, env, cwd):
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    saved_env = {key: os.environ.get(key) for key in (env or {})}
    saved_offline = None
    try:
        sys.argv = ["facegen", *args]
        os.environ.update({key: str(value) for key, value in (env or {}).items()})
        if env and "HF_HUB_OFFLINE" in env:
            from huggingface_hub import constants

            saved_offline = constants.HF_HUB_OFFLINE
            constants.HF_HUB_OFFLINE = env["HF_HUB_OFFLINE"] not in ("", "0")
        if cwd is not None:
            os.chdir(cwd)
        yield
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if saved_offline is not None:
            from huggingface_hub import constants

            constants.HF_HUB_OFFLINE = saved_offline


def facegen_process(*args, env=None, check=False, timeout=600, **popen_args) -> subprocess.CompletedProcess:
    """Run the installed `facegen` console script in a real subprocess (only where a real process matters)."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([str(BIN / "facegen"), *map(str, args)], capture_output=True, text=True, env=full_env,
                          timeout=timeout, **popen_args)
    if check and proc.returncode != 0:
        raise AssertionError(f"facegen {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


# The shapes older tests call `facegen()` in (tests being written on other branches use them too).


def cli(*args):
    """`facegen ARGS` in this process; returns its exit code."""
    return facegen(*args).returncode


def build(*args):
    """`facegen build ARGS` in this process; raises on failure."""
    facegen("build", *args, check=True)


def run_cli(args, capsys):
    """`facegen ARGS` in this process; returns (exit code, stdout, stderr) and leaves capsys empty."""
    result = facegen(*args)
    capsys.readouterr()
    return result.returncode, result.stdout, result.stderr


def pytest_collection_modifyitems(items):
    """Modules holding slow tests run first, in their usual order: with `-n 2 --dist loadfile` (pyproject) each
    worker starts on long modules and the short ones fill in at the end, so both finish at about the same time."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow)  # stable: the order inside each group stays


# --- fixtures ---


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


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for the module, whatever OMP_NUM_THREADS says (see the top of this file)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_arc2face(tmp_path_factory):
    """Tiny random-weight Arc2Face + SD1.5 + face models (facegen.testing.arc2face, seed 0). Read-only."""
    from facegen.testing.arc2face import write_tiny_arc2face

    return write_tiny_arc2face(tmp_path_factory.mktemp("tiny-arc2face"))


@pytest.fixture(scope="session")
def tiny_face_models(tmp_path_factory):
    """Tiny ArcFace ONNX recogniser and SCRFD stand-in (facegen.testing.arcface). Read-only."""
    from facegen.testing.arcface import write_tiny_face_models

    return write_tiny_face_models(tmp_path_factory.mktemp("tiny-face-models"))


@pytest.fixture(scope="session")
def stylegan_checkpoints(tmp_path_factory):
    """(e4e checkpoint, StyleGAN2 checkpoint) at 32 px, seed 0 (facegen.testing.stylegan). Read-only."""
    from facegen.testing.stylegan import write_checkpoints

    return write_checkpoints(tmp_path_factory.mktemp("stylegan"))
