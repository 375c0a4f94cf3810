"""What a model load actually read: a Hub snapshot (repo@commit) or a local folder (its name and file hashes).

``describe_loaded(path, files)`` is what a transform records in ``setup()`` for each model it loads, so that the
dataset card states what was used, not what a default names:

- a path inside the Hub cache (``…/models--org--name/snapshots/<commit>/…``) -> ``{"hub": "org/name",
  "commit": "<commit>"}``: the commit pins every byte;
- any other path -> ``{"folder": "<folder name>", "sha256": {"<file>": "<hex>", …}}``: the folder's *name* (never
  its path) and the sha256 of each weight file, which is the LFS ``oid`` the Hub shows for that file;
- either way, ``"test_model": "<text>"`` when the folder carries :data:`TEST_MODEL_MARKER` (written by the
  tiny random-weight model writers of ``facegen.testing``), so a card can say its images come from noise.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from facegen.fileio import sha256_file

TEST_MODEL_MARKER = "FACEGEN_TEST_MODEL.txt"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".msgpack", ".dat", ".npz")
MARKER_LEVELS = 3  # a weight file may sit a few folders below the model folder that holds the marker


def hub_snapshot(path: str | os.PathLike) -> tuple[str, str] | None:
    """(repo id, commit) when ``path`` lies in a Hub cache snapshot, else None."""
    parts = Path(os.path.abspath(path)).parts
    if "snapshots" not in parts:
        return None
    at = len(parts) - 1 - parts[::-1].index("snapshots")
    if at < 1 or at + 1 >= len(parts) or "--" not in parts[at - 1]:
        return None
    kind_and_name = parts[at - 1].split("--")
    if kind_and_name[0] not in ("models", "datasets", "spaces") or len(kind_and_name) < 2:
        return None
    return "/".join(kind_and_name[1:]), parts[at + 1]


def random_weights_note(path: str | os.PathLike) -> str | None:
    """The marker text of a facegen test model, looked for in ``path`` and a few folders above it."""
    folder = Path(path)
    if not folder.is_dir():
        folder = folder.parent
    for candidate in [folder, *list(folder.parents)[:MARKER_LEVELS]]:
        marker = candidate / TEST_MODEL_MARKER
        if marker.is_file():
            return marker.read_text(encoding="utf-8", errors="replace").strip()[:300] or "facegen test model"
    return None


def describe_loaded(path: str | os.PathLike, files: Iterable[str] | None = None) -> dict:
    """What was read from ``path`` (a folder, or one file); ``files`` limits the hashed files of a folder."""
    path = Path(path)
    record: dict = {}
    snapshot = hub_snapshot(path)
    if snapshot is not None:
        record.update(hub=snapshot[0], commit=snapshot[1])
    else:
        record["folder"] = path.name if path.is_dir() else path.parent.name
        if path.is_file():
            record["sha256"] = {path.name: sha256_file(path)}
        else:
            names = list(files) if files is not None else sorted(
                p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
            record["sha256"] = {name: sha256_file(path / name) for name in names
                                if name.endswith(WEIGHT_SUFFIXES) and (path / name).is_file()}
    note = random_weights_note(path)
    if note:
        record["test_model"] = note
    return record


def write_test_model_marker(folder: str | os.PathLike, what: str) -> Path:
    """Mark ``folder`` as holding random test weights (the card of any dataset made with them says so)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / TEST_MODEL_MARKER
    marker.write_text(f"{what}: tiny random-weight test models written by facegen.testing; images made with them "
                      "are noise and their quality figures measure nothing.\n", encoding="utf-8")
    return marker
