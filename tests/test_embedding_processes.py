"""`facegen report` and `facegen embed` on many processes (torchrun, CPU ranks), in pieces that a rerun resumes from,
and the report's embedding pass in bounded memory with its cached embeddings checked before they are read."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import BIN, run_cli
from facegen.layout import pieces_folder
from facegen.testing.hostile import write_npz_bomb

IMAGES = 2  # per identity: 9 real identities, 18 samples
VARIABLE = ("created", "seconds")  # report.json fields that differ between two runs (with samples_per_second)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, processes=2):
    return subprocess.Popen([str(BIN / "torchrun"), "--nproc_per_node", str(processes), "--master_port",
                             str(free_port()), "--no-python", str(BIN / "facegen"), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def finished(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def report_fields(folder: Path) -> dict:
    report = json.loads((folder / "report.json").read_text())
    for name in VARIABLE:
        report.pop(name)
    for name in ("seconds", "samples_per_second"):
        report["embedding"].pop(name)
    return report


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """(a facegen dataset of real faces, its source folder)."""
    from conftest import build
    from facegen.testing.real_faces import write_real_identities

    root = tmp_path_factory.mktemp("faces")
    write_real_identities(root / "src", images_per_identity=IMAGES)
    build("--source", "folder", "--source-path", root / "src", "--plugin", "passthrough", "--out", root / "out")
    return root / "out", root / "src"


def ranks_of(proc) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes."""
    found = {}
    for task in Path(f"/proc/{proc.pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for entry in environ:
                if entry.startswith(b"RANK="):
                    found[int(entry[5:])] = int(pid)
    return found


@pytest.mark.slow
def test_report_on_two_processes_killed_and_rerun_equals_one_process(faces, tmp_path, capsys):
    """One process in this one; then torchrun with 2 CPU ranks, rank 1 killed once pieces exist, and a rerun: the
    pieces are reused, and report.json (but its times) and report_embeddings.npz are the same bytes."""
    out, _ = faces
    one, two = tmp_path / "one", tmp_path / "two"
    code, _, err = run_cli(["report", out, "--out", one, "--batch-size", 2], capsys)
    assert code == 0, err
    pieces = pieces_folder(two / "report_embeddings.npz")

    proc = torchrun("report", out, "--out", two, "--batch-size", 2)
    deadline = time.monotonic() + 300
    while len(list(pieces.glob("*.npz"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    victims = ranks_of(proc)
    assert proc.poll() is None and 1 in victims, "the run ended before it could be killed"
    os.kill(victims[1], signal.SIGKILL)
    code, _, err = finished(proc)
    assert code != 0 and not (two / "report.json").exists()
    kept = len(list(pieces.glob("*.npz")))
    assert 2 <= kept < 9  # 18 samples in batches of 2

    code, stdout, err = finished(torchrun("report", out, "--out", two, "--batch-size", 2))
    assert code == 0, err[-3000:]
    assert f"{kept} of 9 batches reused from an interrupted run, {9 - kept} embedded" in stdout + err
    assert report_fields(two) == report_fields(one)
    assert report_fields(one)["embedding"] == {"reused": False}
    assert (two / "report_embeddings.npz").read_bytes() == (one / "report_embeddings.npz").read_bytes()
    assert not pieces.exists()
    assert stdout.count("facegen report (dlib)") == 1  # one summary, from the main process


@pytest.mark.slow
def test_embed_on_two_processes_is_the_same_bytes(faces, tmp_path, capsys):
    from facegen.testing.arcface import write_tiny_face_models

    _, src = faces
    models = write_tiny_face_models(tmp_path / "models")
    common = ["embed", "--source", "folder", "--source-path", src, "--model-dir", models, "--identities-per-batch", 2]
    code, _, err = run_cli([*common, "--out", tmp_path / "one.npz"], capsys)
    assert code == 0, err
    code, stdout, err = finished(torchrun(*common, "--out", tmp_path / "two.npz"))
    assert code == 0, err[-3000:]
    assert (tmp_path / "two.npz").read_bytes() == (tmp_path / "one.npz").read_bytes()
    assert stdout.count("9 prototypes from 18 images") == 1
    assert not pieces_folder(tmp_path / "two.npz").exists()


def test_embed_resumes_from_the_pieces_of_an_interrupted_run(faces, tmp_path, capsys, monkeypatch):
    from facegen.builders.quality import identities
    from facegen.testing.arcface import write_tiny_face_models

    _, src = faces
    models = write_tiny_face_models(tmp_path / "models")
    args = ["embed", "--source", "folder", "--source-path", src, "--model-dir", models, "--identities-per-batch", 2]
    code, _, err = run_cli([*args, "--out", tmp_path / "whole.npz"], capsys)
    assert code == 0, err
    embed_batches = identities._embed_batches

    def interrupted(*a, **k):  # Ctrl-C after the third batch
        for done, item in enumerate(embed_batches(*a, **k)):
            if done == 3:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(identities, "_embed_batches", interrupted)
    out = tmp_path / "resumed.npz"
    assert run_cli([*args, "--out", out], capsys)[0] == 130
    assert len(list(pieces_folder(out).glob("*.npz"))) == 3 and not out.exists()
    monkeypatch.setattr(identities, "_embed_batches", embed_batches)
    code, stdout, err = run_cli([*args, "--out", out], capsys)
    assert code == 0, err
    assert "3 of 5 batches reused from an interrupted run, 2 embedded" in stdout
    assert out.read_bytes() == (tmp_path / "whole.npz").read_bytes()
    # another recogniser's pieces are not reused
    monkeypatch.setattr(identities, "_embed_batches", interrupted)
    assert run_cli([*args, "--out", out, "--realign"], capsys)[0] == 130
    monkeypatch.setattr(identities, "_embed_batches", embed_batches)
    code, stdout, err = run_cli([*args, "--out", out], capsys)
    assert code == 0 and "reused" not in stdout
    assert out.read_bytes() == (tmp_path / "whole.npz").read_bytes()


# ------------------------------------------------------------------ bounded memory and checked caches

CHILD = """
import atexit, sys
from pathlib import Path

peak_file = Path(sys.argv[1])

def write_peak():
    status = Path("/proc/self/status").read_text()
    peak_file.write_text(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])

atexit.register(write_peak)
from facegen.cli import main
sys.argv = ["facegen", *sys.argv[2:]]
main()
"""


def measured(args, tmp_path):
    """`facegen ARGS` in a real child process: (exit code, stdout, stderr, that child's own peak RSS in bytes)."""
    peak_path = tmp_path / "peak"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(peak_path), *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    peak = int(peak_path.read_text()) * 1024  # VmHWM is in KiB
    print(f"facegen {args[0]} peak RSS: {peak / 1e9:.2f} GB")
    return proc.returncode, proc.stdout, proc.stderr, peak


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels, with one byte of pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))


def write_large_images_dataset(out: Path, large: int, side: int = 5000) -> Path:
    """A facegen dataset of ``large`` PNGs of side x side pixels (within the build's pixel limit: a dataset facegen
    builds from such a folder), one PNG declaring 6000x6000 pixels (over it), and one member of 150 MB."""
    train = out / "data" / "train"
    train.mkdir(parents=True)
    ramp = np.linspace(0, 255, side).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.broadcast_to(ramp[None, :, None], (side, side, 3)).copy()).save(buffer, format="PNG",
                                                                                          compress_level=1)
    images = [buffer.getvalue()] * large + [png_header_only(6000, 6000)]
    with open(train / "train-000000.tar", "wb") as f, tarfile.open(fileobj=f, mode="w") as tar:
        for k, data in enumerate(images):
            for name, member in ((f"{k:06d}_000.png", data), (f"{k:06d}_000.cls", b"0"),
                                 (f"{k:06d}_000.json", b'{"identity": "id0"}')):
                info = tarfile.TarInfo(name)
                info.size = len(member)
                tar.addfile(info, io.BytesIO(member))
        info = tarfile.TarInfo(f"{len(images):06d}_000.png")  # a 150 MB member, sparse on disk
        info.size = 150 << 20
        f.write(info.tobuf())
        f.seek(info.size, os.SEEK_CUR)
        tar.offset = f.tell()
        for name, member in ((f"{len(images):06d}_000.cls", b"0"), (f"{len(images):06d}_000.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(member)
            tar.addfile(info, io.BytesIO(member))
    return out


@pytest.mark.slow
def test_report_memory_is_bounded_per_batch_and_large_images_are_counted_skips(tmp_path):
    """24 PNGs of 5000x5000 in one batch (issue 18: they took 2.40 GB), one over the build's pixel limit, a member
    over the size limit; a cached report_embeddings.npz and a piece that declare 4 GB each. The pass that held a
    batch's decoded images at once peaked at 2.40 GB on these 24 (1.31 GB on 8), this one at 0.60 GB (on 8 too)."""
    out = write_large_images_dataset(tmp_path / "large", large=24)
    write_npz_bomb(out / ".facegen" / "report_embeddings.npz", key="vectors", inflated=(4 << 30) - (1 << 20))
    write_npz_bomb(pieces_folder(out / ".facegen" / "report_embeddings.npz") / "000000.npz", key="vectors",
                   inflated=(4 << 30) - (1 << 20))
    code, stdout, err, peak = measured(["report", out], tmp_path)
    assert code == 0, err[-3000:]
    assert peak < 0.9e9
    report = json.loads((out / ".facegen" / "report.json").read_text())
    assert report["skipped"] == {"no face detected": 24, "image too large": 2}
    assert report["image_sizes"] == {"5000x5000": 24}
    assert "cached embeddings" in err and "more than the" in err and err.count("cached embeddings") == 1
    assert "Traceback" not in err


def write_cache(path: Path, vectors: np.ndarray, like: Path) -> None:
    """``like`` (a report_embeddings.npz) with its vectors replaced."""
    with np.load(like) as data:
        arrays = dict(data)
    arrays["vectors"] = vectors
    np.savez(path, **arrays)


def test_cached_embeddings_with_nan_or_a_wrong_shape_are_computed_again(tmp_path, capsys):
    from facegen.builders.quality.report import _load_embeddings, dataset_embeddings, make_recognizer
    from facegen.published import PublishedDataset
    from facegen.testing.arcface import write_tiny_face_models
    from facegen.testing.output import write_output_folder

    models = write_tiny_face_models(tmp_path / "models")
    out = write_output_folder(tmp_path / "out", identities=3, images_per_identity=2, card=False)
    dataset = PublishedDataset(out)
    recognizer = make_recognizer("arcface", model_dir=str(models))
    keys = [s.key for s in dataset.samples]
    dataset_embeddings(dataset, recognizer, progress=False)
    cache = out / ".facegen" / "report_embeddings.npz"
    good = tmp_path / "good.npz"
    good.write_bytes(cache.read_bytes())
    with np.load(good) as data:
        vectors = data["vectors"]
    nan, inf = vectors.copy(), vectors.copy()
    nan[1, 3] = np.nan
    inf[5, 0] = -np.inf
    for bad, said in ((inf, "'vectors' holds NaN or infinite values"),
                      (vectors[:, :100], "(6, 100), expected float32 (6, 512)"),
                      (vectors[:4], "(4, 512), expected float32 (6, 512)"),
                      (vectors.astype(np.float64), "inflates to 24704 bytes, over the 16384")):
        write_cache(cache, bad, good)
        assert _load_embeddings(cache, recognizer.identity(), dataset.fingerprint(), keys, 512) is None
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"cached embeddings {cache} not used" in err and said in err, err
    write_cache(cache, nan, good)  # the whole command: one line, computed again, the same bytes
    code, stdout, err = run_cli(["report", out, "--recognizer", "arcface", "--model-dir", models], capsys)
    assert code == 0, err
    assert err.count(f"cached embeddings {cache} not used ('vectors' holds NaN or infinite values)") == 1
    assert "(reused)" not in stdout and cache.read_bytes() == good.read_bytes()


def test_a_symlinked_pieces_folder_is_replaced_not_followed(tmp_path, capsys):
    """A crafted dataset whose pieces folder links elsewhere: the link is removed (not followed), the pieces are
    written in a folder of their own, and nothing in the folder it pointed to is removed or written."""
    from facegen.testing.arcface import write_tiny_face_models
    from facegen.testing.output import write_output_folder

    models = write_tiny_face_models(tmp_path / "models")
    out = write_output_folder(tmp_path / "out", identities=3, images_per_identity=2, card=False)
    victim = tmp_path / "victim"
    victim.mkdir()
    for name in ("000000.npz", "other.npz", "keep.txt"):
        (victim / name).write_bytes(b"mine")
    pieces = pieces_folder(out / ".facegen" / "report_embeddings.npz")
    pieces.parent.mkdir(parents=True, exist_ok=True)
    pieces.symlink_to(victim, target_is_directory=True)
    code, _, err = run_cli(["report", out, "--recognizer", "arcface", "--model-dir", models], capsys)
    assert code == 0, err
    assert sorted(p.name for p in victim.iterdir()) == ["000000.npz", "keep.txt", "other.npz"]
    assert all(p.read_bytes() == b"mine" for p in victim.iterdir())
    assert not pieces.exists() and not pieces.is_symlink()
