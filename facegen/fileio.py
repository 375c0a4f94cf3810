"""Writing and hashing files: the one implementation of each that every part of facegen uses.

- :func:`atomic_write` / :func:`atomic_file`: a file appears complete or not at all. The bytes go to a hidden
  temporary beside the target (``.NAME.tmp-PID``, which ``--overwrite`` and a full disk's clean-up know), are
  flushed and fsynced, renamed over the target, and the folder is fsynced so that the rename survives a crash.
  A failure (a full disk, Ctrl-C) removes the temporary and leaves the previous file as it was.
- :func:`atomic_npz`: an ``.npz`` written atomically whose bytes depend on its arrays alone (``np.savez`` dates
  each zip entry with the current time, so the same arrays saved twice differ).
- :func:`sha256_file`, :func:`xxh3_128_file`: streamed in 8 MiB blocks, never the whole file in memory; threads may
  hash several files at once (reads and both hashes release the GIL).
- :func:`sorted_safetensors`: a safetensors file's bytes with its metadata in one order (the safetensors library
  writes them from a hash map, in another order on every run), so that the same file has the same hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import xxhash

BLOCK = 8 << 20


def temporary_name(path: str | os.PathLike, pid: int | None = None) -> Path:
    """The hidden name ``path`` is written under until it is complete."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid() if pid is None else pid}")


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename or a new name in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder: the rename itself is still atomic
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike, durable: bool = True) -> Iterator[BinaryIO]:
    """``with atomic_file(path) as f: f.write(...)``: the file gets its name only when the block ends normally.

    ``durable=False`` skips the fsyncs: the file still appears whole or not at all to any process, and a killed
    process never leaves a partial file under the name, but a power loss may (for many small files, such as an
    image-folder export, whose writer makes everything durable once at the end with :func:`sync_all`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_folder(path.parent)


def sync_all() -> None:
    """Make every write so far durable (after many :func:`atomic_file` writes with ``durable=False``)."""
    os.sync()


def atomic_write(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path, durable) as f:
        f.write(data)


NPZ_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can hold, as reproducible builds use


def atomic_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez(path, **arrays)`` (uncompressed, no pickle) atomically, with every entry dated :data:`NPZ_DATE`:
    the same arrays give the same bytes."""
    with atomic_file(path) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=NPZ_DATE)
            with archive.open(entry, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


Progress = Callable[[int], object]  # called with the bytes of each block read (e.g. a tqdm bar's update)


def _digest_file(path: str | os.PathLike, digest, progress: Progress | None):
    """Streamed into one reused buffer (no allocation per block); reading and hashing release the GIL, so threads
    hash files in parallel."""
    buffer = bytearray(BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            if progress is not None:
                progress(n)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike, progress: Progress | None = None) -> str:
    """The file's sha256 (hex), as the Hub's LFS object id of the same file."""
    return _digest_file(path, hashlib.sha256(), progress)


def xxh3_128_file(path: str | os.PathLike, progress: Progress | None = None) -> str:
    """The file's XXH3-128 (hex): what the shard and unit stats record (fast enough to check every resume)."""
    return _digest_file(path, xxhash.xxh3_128(), progress)


def sorted_safetensors(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its ``__metadata__`` keys sorted; the tensors and their entries unchanged."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    if isinstance(header.get("__metadata__"), dict):
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the library's own padding: the tensors start 8-byte aligned
    return len(text).to_bytes(8, "little") + text + data[8 + size:]
