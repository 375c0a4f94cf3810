"""The full list of skipped samples: one JSON line per sample, one file per file that skipped samples (beside its
records: ``.facegen/skipped/`` for published shards written from the source, ``.facegen/units/skipped/`` for units
of work of identity-level transforms), gathered into ``.facegen/skipped.jsonl`` when the build ends (the stats keep
only the first few). An assembled shard copies samples and skips none: its units hold the lists."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from facegen.builders.engine.writer import dumps, write_atomic
from facegen.layout import OutputFolder


def write_skipped_list(path: Path, kind: str, index: int, failures: list[dict]) -> None:
    """A file's skipped samples (written before its stats file, which marks the file complete); ``kind`` is
    ``shard`` or ``unit``, each line saying which one skipped it."""
    if failures:
        write_atomic(path, b"".join(dumps({kind: index, **f}) + b"\n" for f in failures))
    else:
        path.unlink(missing_ok=True)  # from an earlier attempt at this file


def gather_skipped(out: Path, parts: Iterable[Path]) -> Path | None:
    """Concatenate the lists ``parts`` (in that order: shard or unit order); None when nothing was skipped."""
    parts = [p for p in parts if p.is_file()]
    target = OutputFolder(out).skipped_list
    if not parts:
        target.unlink(missing_ok=True)
        return None
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:  # streamed: a source with millions of bad files must not fill the memory
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, f)
    except BaseException:  # a full disk leaves no half-written temporary behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)
    return target
