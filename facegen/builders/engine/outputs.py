"""The output folder: where a build may write, and what ``--overwrite`` may remove (only what facegen wrote).

facegen writes, in ``--out``: ``data/train/train-NNNNNN.tar`` (and hidden temporaries beside them), ``.facegen/``
(records, and the units of work of identity-level transforms), ``_info.json``, the card files README.md, LICENSE
and preview.jpg, ``provenance/`` and (`facegen report`) ``report/*.png``; every one of those files outside
``.facegen/`` and the shards is recorded in ``.facegen/own_files.json`` when it is written. Anything else in the
folder is the user's and is never touched; a user's file under one of those names stops the build with one line
naming it.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from facegen.errors import UsageError
from facegen.layout import (
    LOCK_FILES,
    OUTPUT_FILES,
    SHARD_FILE,
    OutputFolder,
)
from facegen.layout.records import BuildSignature, RecordError, not_own_files, own_files, remove_own_file

NO_SPACE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EFBIG: "file too large for a file-size limit (ulimit -f)"}


def resolve_out(out_arg: str | os.PathLike) -> Path:
    """The absolute --out; a symbolic-link loop is a user's mistake, not a traceback."""
    try:
        return Path(out_arg).resolve()
    except (RuntimeError, OSError) as exc:  # Python < 3.13 raises RuntimeError for a loop, later ones OSError
        loop = isinstance(exc, RuntimeError) or exc.errno == errno.ELOOP
        raise UsageError(f"--out {out_arg} " + ("is a symbolic link loop" if loop else
                                                f"cannot be resolved: {exc.strerror or exc}")) from None


def abspath(path: str | None) -> str | None:
    """A local path made absolute; a path that is not on this machine (a Hub id given to the `facegen` source) is
    kept as it was given."""
    return os.path.abspath(path) if path and os.path.exists(path) else path


def create_output_folder(out: Path) -> None:
    """``out`` exists as a folder, and its ``data/train`` is a folder or absent."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create --out {out}: {exc.strerror or exc}") from None
    folder_paths = OutputFolder(out)
    for folder in (folder_paths.data_dir, folder_paths.train_dir):
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"{folder} is a file where facegen needs a folder (the shards go in data/train/): "
                             "move it out of --out, or choose another --out")


def refuse_out_inside_source(out: Path, source_path: str | None) -> None:
    """An --out inside the source folder would be read back as source data (an identity) by the next run."""
    if not source_path:
        return
    try:
        source = Path(source_path).resolve()
    except (RuntimeError, OSError):
        return  # the source reports its own path problems
    if out == source or source in out.parents:
        raise UsageError(f"--out {out} is inside --source-path {source}: the next run would read the output as "
                         "source data; choose an --out outside the source folder")


def foreign_files(out: Path, has_build: bool) -> list[str]:
    """Files in ``out`` under names facegen writes that facegen did not write (relative names): the card's files,
    ``_info.json``, anything under ``provenance/`` (the card writes there, and publish uploads it), and tars in
    ``data/train/`` that are not this build's shards."""
    folder = OutputFolder(out)
    names = list(OUTPUT_FILES)
    if folder.provenance_dir.is_dir():
        names += sorted(p.relative_to(out).as_posix() for p in folder.provenance_dir.rglob("*")
                        if not p.is_dir() and not p.name.startswith("."))
    found = not_own_files(out, names)
    train = folder.train_dir
    if train.is_dir():
        for path in sorted(train.iterdir()):
            ours = has_build and SHARD_FILE.fullmatch(path.name)
            if not ours and (path.suffix == ".tar" or SHARD_FILE.fullmatch(path.name)):
                found.append(path.relative_to(out).as_posix())  # `datasets` would load it as part of the dataset
    return found


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:5]) + (" …" if len(names) > 5 else "")
    return shown + (" is" if len(names) == 1 else " are")


def remove_facegen_outputs(out: Path) -> None:
    """What --overwrite removes: only the files a build (and its card, and `facegen report`) wrote, never anything
    else in the folder: every file of facegen's record that is still as facegen wrote it, the records, the shards."""
    folder = OutputFolder(out)
    for name in own_files(out).files:  # before .facegen/, which holds the record of what facegen wrote
        remove_own_file(out, name)
    for empty in (folder.provenance_dir, folder.plots_dir):
        if empty.is_dir() and not empty.is_symlink() and not any(empty.iterdir()):
            empty.rmdir()
    facegen_dir = folder.records
    if facegen_dir.is_dir():
        for path in facegen_dir.iterdir():
            if path.name in LOCK_FILES:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    train = folder.train_dir
    if train.is_dir():
        for path in train.iterdir():
            if SHARD_FILE.fullmatch(path.name):
                path.unlink()
        for empty in (train, folder.data_dir):
            if empty.is_dir() and not any(empty.iterdir()):
                empty.rmdir()


def prepare_output(out: Path, signature: BuildSignature, overwrite: bool, state) -> None:
    """Refuse a folder that holds a different build or the user's files (unless --overwrite, which still never
    removes a file facegen did not write); record the build's signature."""
    folder = OutputFolder(out)
    config_path = folder.config_json
    has_build = config_path.exists() or folder.run_json.exists()
    foreign = foreign_files(out, has_build)
    if foreign and (overwrite or has_build):
        raise UsageError(f"{out} holds a file facegen did not write where a build writes: {_names(foreign)} not "
                         "facegen's"
                         f"{' (--overwrite replaces only what facegen wrote)' if overwrite else ''}: move "
                         f"{'it' if len(foreign) == 1 else 'them'} out of --out, or choose another --out")
    if overwrite:
        if state.is_main_process:
            try:
                remove_facegen_outputs(out)
            except OSError as exc:
                raise UsageError(f"--overwrite cannot remove the earlier build in {out}: {exc.strerror or exc}") \
                    from None
        if state.num_processes > 1:
            state.wait_for_everyone()
    if config_path.exists():
        try:
            existing = BuildSignature.parse(config_path)
        except (OSError, RecordError):
            raise UsageError(f"{config_path} is damaged (or written by another version of facegen); pass "
                             "--overwrite to start this build again") from None
        changed = existing.differences(signature)
        if changed:
            raise UsageError(
                f"{out} holds a different build (differs in: {', '.join(changed)}); rerun the same command to "
                "resume it, or pass --overwrite to replace it, or choose another --out"
            )
        return
    others = sorted(p.name for p in out.iterdir() if p != folder.records)
    if others and not overwrite:
        shown = ", ".join(others[:3]) + (" …" if len(others) > 3 else "")
        if foreign:
            raise UsageError(f"{out} is not empty and holds no facegen build, and {_names(foreign)} yours where a "
                             "build writes: choose a new or empty --out")
        raise UsageError(f"{out} is not empty ({shown}) and holds no facegen build: choose a new or empty --out, "
                         "or pass --overwrite to write the build beside those files (they are kept)")
    try:
        signature.write(config_path)
    except OSError as exc:
        raise UsageError(f"cannot write to --out {out}: {exc.strerror or exc}") from None


def discard_partial_files(out: Path) -> None:
    """Remove this process's hidden temporaries (a shard, unit of work or record cut short by a full disk)."""
    suffix = f".tmp-{os.getpid()}"
    for folder in OutputFolder(out).temporaries_folders():
        if folder.is_dir():
            for path in folder.glob(f".*{suffix}"):
                path.unlink(missing_ok=True)


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def no_space_message(out: Path, exc: OSError, left: str | None, need_bytes: float | None, largest_file: int | None,
                     what: str = "shard") -> str:
    """One line for a full disk (or quota, or file-size limit): what happened, how much is needed, what to do.

    ``left`` says what remains ("the 4 images left"; None when every file is complete), ``need_bytes`` about how
    much space that takes, ``what`` the kind of file that was cut short ("shard", "unit of work")."""
    message = NO_SPACE[exc.errno]
    if exc.errno == errno.EFBIG:
        need = f"; a {what} here takes up to {_size(largest_file)}" if largest_file else ""
        return (f"{message} while writing {out}{need}; the partial {what} was discarded: raise the limit and rerun "
                "the same command to resume")
    need = ""
    if left is None:
        need = "; every shard is complete, only the build's records and card were left to write"
    elif need_bytes:
        try:
            free = shutil.disk_usage(out).free
        except OSError:
            free = None
        need = f"; {left} need about {_size(need_bytes)}"
        if free is not None:
            need += f" ({_size(free)} free)"
    return (f"{message} while writing {out}{need}; the partial {what} was discarded: free some space and rerun the "
            "same command to resume")
