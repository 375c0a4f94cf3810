"""The full list of skipped samples: one JSON line per sample under ``.facegen/skipped/``, one file per shard,
gathered into ``.facegen/skipped.jsonl`` when the build ends (the shard stats keep only the first few)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from facegen.builders.shards import dumps, write_atomic


def shard_skipped_path(out: Path, index: int) -> Path:
    return out / ".facegen" / "skipped" / f"{index:06d}.jsonl"


def skipped_list_path(out: Path) -> Path:
    return out / ".facegen" / "skipped.jsonl"


def write_shard_skipped(out: Path, index: int, failures: list[dict]) -> None:
    """The shard's skipped samples (written before its stats file, which marks the shard complete)."""
    path = shard_skipped_path(out, index)
    if failures:
        write_atomic(path, b"".join(dumps({"shard": index, **f}) + b"\n" for f in failures))
    else:
        path.unlink(missing_ok=True)  # from an earlier attempt at this shard


def gather_skipped(out: Path, num_shards: int) -> Path | None:
    """Concatenate the shards' lists in shard order; None when nothing was skipped."""
    parts = [shard_skipped_path(out, i) for i in range(num_shards)]
    parts = [p for p in parts if p.is_file()]
    target = skipped_list_path(out)
    if not parts:
        target.unlink(missing_ok=True)
        return None
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:  # streamed: a source with millions of bad files must not fill the memory
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, f)
    os.replace(tmp, target)
    return target
