"""Embedding passes on many processes, kept in pieces: the passes of `facegen report` and `facegen embed`.

A pass embeds a list of items in a fixed order (the report's samples in shard order, embed's identities in the
source's order), cut into batches at global positions: batch ``b`` holds items ``[b·B, (b+1)·B)`` whatever the
number of processes, so the recogniser sees the same batches and gives the same bits on 1 or N processes.

:func:`run_pass`, on every process of a run (alone, under ``accelerate launch`` or ``torchrun``; :class:`Ranks`):

1. process ``r`` of ``W`` takes the batches ``b ≡ r (mod W)``: it removes their pieces that do not check (an
   earlier run's with other inputs, or damaged), then computes the missing ones and writes each as one piece,
   ``.NAME.pieces/{b:06d}.npz`` beside the file the pass makes (:func:`facegen.layout.pieces_folder`), atomically
   (:func:`facegen.fileio.atomic_npz`): a killed run leaves complete pieces only, and the rerun reuses them (on any
   number of processes: a piece does not depend on who computed it);
2. the main process then waits, on the files (no collective: a long wait cannot time out), for the other
   processes' pieces, reads every piece in order (one that does not check is computed there) and returns them;
   the caller writes the result and removes the pieces (:func:`remove_pieces`);
3. the other processes wait, likewise on the files, until the pieces are gone: the result is written.

A piece is a plain npz (no pickle) of numeric arrays, one row per item, plus the member ``record``: an
:class:`facegen.layout.records.EmbeddingsRecord` (the pass's signature, the batch, the items' keys, per-item values
that are not numbers) as UTF-8 JSON in a uint8 array. Reading checks the sizes the file declares before reading
anything (:func:`load_arrays`): the file's size, each member's inflated size against what the batch can hold, then
dtype, shape, finite values, the signature and the keys; a piece that fails any check is computed again.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facegen.errors import UsageError
from facegen.fileio import atomic_npz
from facegen.generators.landmarks import load_npz_array
from facegen.layout import piece_path
from facegen.layout.records import EmbeddingsRecord, RecordError

WAIT_SECONDS = 0.5  # how often a process waiting for the others' pieces looks at the folder
NPY_HEADER = 4096  # an .npy member's header and the zip entry around it, at most (numpy pads headers to 64 bytes)


class OtherPass(ValueError):
    """A well-formed embeddings file of another pass (another recogniser, other data, another batch): not reused,
    and nothing to warn about."""


@dataclass(frozen=True)
class Ranks:
    """The processes of this run: this one's index, how many, its index on this machine (its GPU)."""

    index: int = 0
    count: int = 1
    local: int = 0
    state: object = None  # accelerate's PartialState when there are several

    @classmethod
    def current(cls) -> Ranks:
        """One process, unless a launcher (``accelerate launch``, ``torchrun``) started several: then accelerate's
        state, as the build uses it (:func:`facegen.builders.engine.run.distributed_state`)."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
        except ValueError:
            raise UsageError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from None
        if world <= 1:
            return cls()
        from facegen.builders.engine.run import distributed_state

        state = distributed_state()
        return cls(state.process_index, state.num_processes, state.local_process_index, state)

    @property
    def main(self) -> bool:
        return self.index == 0

    def gpu(self) -> int | None:
        """This process's GPU: its index on the machine, modulo the GPUs torch sees (None: no GPU)."""
        import torch

        count = torch.cuda.device_count()
        return self.local % count if count else None

    def share(self, value):
        """The main process's ``value``, on every process."""
        if self.count == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def gather(self, value) -> list:
        """Every process's ``value``, in process order, on every process."""
        if self.count == 1:
            return [value]
        from accelerate.utils import gather_object

        return gather_object([value])

    def describe(self) -> str:
        return "" if self.count == 1 else f" process {self.index + 1} of {self.count}"


@dataclass
class Piece:
    """A batch's results: numeric ``arrays`` and non-numeric ``columns``, one row or value per key."""

    keys: list[str]
    arrays: dict[str, np.ndarray]
    columns: dict[str, list]


@dataclass(frozen=True)
class ArraySpec:
    """What an array of an embeddings file must be: its dtype and the width of a row (None: one value a row)."""

    dtype: str
    width: int | None = None

    def bytes(self, rows: int) -> int:
        return rows * (self.width or 1) * np.dtype(self.dtype).itemsize + NPY_HEADER

    def check(self, name: str, array: np.ndarray, rows: int) -> None:
        shape = (rows,) if self.width is None else (rows, self.width)
        if array.dtype != np.dtype(self.dtype) or array.shape != shape:
            raise ValueError(f"{name!r} is {array.dtype} {array.shape}, expected {np.dtype(self.dtype)} {shape}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ValueError(f"{name!r} holds NaN or infinite values")


def save_arrays(path: Path, signature: dict, batch: int, piece: Piece) -> None:
    """Write an embeddings file (a piece, or a whole pass's file with ``batch`` -1) atomically."""
    record = EmbeddingsRecord(signature, batch, list(piece.keys), piece.columns)
    atomic_npz(path, {"record": np.frombuffer(record.to_json(), np.uint8), **piece.arrays})


def load_arrays(path: Path, signature: dict, batch: int, keys: list[str], specs: dict[str, ArraySpec],
                record_bytes: int) -> Piece:
    """The embeddings file at ``path`` when it is the one expected, with one row per key of ``keys`` (in order);
    :class:`OtherPass` when it is another pass's, ValueError (one line) when it is damaged.

    ``record_bytes``: the most its record may take. Sizes come first: the file's own (a regular file, no larger
    than its rows can take), then each member's declared inflated size
    (:func:`facegen.generators.landmarks.load_npz_array`), so nothing larger than the batch can hold is read.
    """
    rows = len(keys)
    limit = record_bytes + sum(spec.bytes(rows) for spec in specs.values()) + NPY_HEADER
    try:
        info = path.lstat()  # a symbolic link is not followed (not a regular file)
    except OSError as exc:
        raise ValueError(f"cannot read it ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError("not a regular file")
    if info.st_size > limit:
        raise ValueError(f"{info.st_size:,} bytes, more than the {limit:,} its {rows} rows can take")
    raw = load_npz_array(path, "record", record_bytes)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise ValueError(f"'record' is {raw.dtype} {raw.shape}, expected uint8 bytes")
    try:
        record = EmbeddingsRecord.from_dict(json.loads(raw.tobytes()), "record")
    except (ValueError, RecordError, RecursionError) as exc:  # UnicodeDecodeError and JSON errors are ValueErrors
        raise ValueError(f"'record': {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if record.signature != signature:
        raise OtherPass("made by another recogniser, from other data or with another batch size")
    if record.batch != batch:
        raise OtherPass(f"it holds batch {record.batch}, not {batch}")
    if record.keys != keys:
        raise OtherPass(f"its {len(record.keys)} keys are not the {rows} expected")
    for name, values in record.columns.items():
        if len(values) != rows:
            raise ValueError(f"column {name!r} has {len(values)} values for {rows} rows")
    arrays = {}
    for name, spec in specs.items():
        array = load_npz_array(path, name, spec.bytes(rows))
        spec.check(name, array, rows)
        arrays[name] = array
    return Piece(record.keys, arrays, record.columns)


Compute = Callable[[Iterable[int]], Iterator[tuple[int, Piece]]]  # batches in -> (batch, its piece), in order


@dataclass
class PassResult:
    pieces: list[Piece]  # every batch's, in order
    reused: int  # batches whose piece an earlier, interrupted run had written
    computed: int  # batches computed in this run


def run_pass(folder: Path, signature: dict, count: int, compute: Compute, load: Callable[[Path, int], Piece],
             ranks: Ranks, reused: Callable[[int], object] = lambda b: None) -> PassResult | None:
    """Run a pass of ``count`` batches on every process (see the module docstring); the main process gets every
    piece, the others None once the main process has removed the pieces. ``compute`` yields the pieces of the
    batches it is given, in order (it may read the next batch ahead while it embeds one); ``load(path, b)`` reads a
    piece, ValueError when it is not valid; ``reused(b)`` is called for each of this process's batches whose piece
    is kept (for a progress bar)."""

    def valid(b: int) -> Piece | None:
        try:
            return load(piece_path(folder, b), b)
        except ValueError:
            return None

    own_folder(folder)
    pieces: dict[int, Piece] = {}
    todo = []
    mine = range(ranks.index, count, ranks.count)
    for b in mine:
        piece = valid(b)
        if piece is None:
            piece_path(folder, b).unlink(missing_ok=True)
            todo.append(b)
            continue
        reused(b)
        if ranks.main:
            pieces[b] = piece
    # a collective while every process starts (a short wait): no stale piece is left when any process computes
    kept = sum(ranks.gather(len(mine) - len(todo)))
    for b, piece in compute(todo):
        save_arrays(piece_path(folder, b), signature, b, piece)
        if ranks.main:
            pieces[b] = piece
    if not ranks.main:
        wait_for(lambda: not any(folder.glob("*.npz")))  # the main process has joined them
        return None
    waiting = [b for b in range(count) if b not in pieces]
    while waiting:
        present = [b for b in waiting if piece_path(folder, b).is_file()]
        broken = []
        for b in present:  # written in this run (stale ones were removed before the collective above)
            piece = valid(b)
            if piece is None:
                broken.append(b)
            else:
                pieces[b] = piece
        for b, piece in compute(broken):  # a piece that does not check is computed here
            save_arrays(piece_path(folder, b), signature, b, piece)
            pieces[b] = piece
        waiting = [b for b in waiting if b not in pieces]
        if waiting:
            time.sleep(WAIT_SECONDS)
    return PassResult([pieces[b] for b in range(count)], kept, count - kept)


def own_folder(folder: Path) -> None:
    """The pieces folder as a real folder: a symbolic link or a file there (a crafted dataset's, pointing anywhere)
    is removed as itself (never followed), so that no piece is read, written or removed outside it."""
    try:
        info = folder.lstat()
    except FileNotFoundError:
        info = None
    if info is not None and not stat.S_ISDIR(info.st_mode):
        folder.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)


def wait_for(done: Callable[[], object]) -> None:
    """Wait, on the files (a collective would time out during a long wait), until ``done()``."""
    while not done():
        time.sleep(WAIT_SECONDS)


def remove_pieces(folder: Path) -> None:
    """The pieces are in the result now: remove them (only the piece files and their folder)."""
    try:
        if not stat.S_ISDIR(folder.lstat().st_mode):  # a symbolic link is not followed
            return
    except OSError:
        return
    for path in folder.iterdir():
        if path.suffix == ".npz" or ".tmp-" in path.name:
            path.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:  # something else was put there: leave it
        pass

