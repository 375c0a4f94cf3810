"""The full list of skipped samples: one JSON line per sample, one file per tar that skipped samples (beside its
records: ``.facegen/skipped/`` for published shards written from the source, ``.facegen/units/skipped/`` for units
of work of identity-level transforms), gathered into ``.facegen/skipped.jsonl`` when the build ends (the stats keep
only the first few). An assembled shard copies samples and skips none: its units hold the lists."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from facegen.fileio import atomic_file, atomic_write
from facegen.layout import OutputFolder
from facegen.layout.records import dumps


def write_skipped_list(path: Path, kind: str, index: int, failures: list[dict]) -> None:
    """A tar's skipped samples (written before its stats file, which marks the tar complete); ``kind`` is
    ``shard`` or ``unit``, each line saying which one skipped it."""
    if failures:
        atomic_write(path, b"".join(dumps({kind: index, **f}) + b"\n" for f in failures))
    else:
        path.unlink(missing_ok=True)  # from an earlier attempt at this file


def gather_skipped(folder: OutputFolder, parts: Iterable[Path]) -> Path | None:
    """Concatenate the lists ``parts`` (in that order: shard or unit order); None when nothing was skipped."""
    parts = [p for p in parts if p.is_file()]
    target = folder.skipped_list
    if not parts:
        target.unlink(missing_ok=True)
        return None
    with atomic_file(target) as f:  # streamed: a source with millions of bad files must not fill the memory
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, f)
    return target
