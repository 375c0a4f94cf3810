"""The deterministic plan: which identities, in which order, in which unit of work, with which seed; and the
published layout: how many samples in which shard, in which order.

Nothing here depends on the number of processes: unit ``i`` holds plan positions ``[i*S, (i+1)*S)``
(``S = --shard-size``), the seed of an identity derives from (run seed, identity id) only, and the published order
of the samples is one permutation seeded by the run seed.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from facegen.errors import UsageError
from facegen.messages import count
from facegen.training import NODE_SHARDS

DEFAULT_SHARD_SAMPLES = 10_000  # img2dataset's default; recipes set their own so that shards weigh ~200 MB-1 GB
# The default shard count serves a node: a multiple of NODE_SHARDS (8 ranks x 4 DataLoader workers) once the dataset
# holds that many shards of MIN_SHARD_SAMPLES; below that, the largest even count keeping shards that long (2 ranks
# or workers).
MIN_SHARD_SAMPLES = 500


def identity_seed(run_seed: int, identity_id: str) -> int:
    """A 63-bit seed from (run seed, identity id): stable across processes, batch sizes and interruptions."""
    digest = hashlib.sha256(f"facegen:{run_seed}:{identity_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class EmptyPlan(UsageError):
    """The source lists no identity."""


def read_identities_file(path: str) -> list[str]:
    """One identity id per line; blank lines and ``#`` comments ignored."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.split("#", 1)[0].strip() for line in f]
    except OSError as exc:
        raise UsageError(f"cannot read identities file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"identities file {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8, one "
                         "identity id per line") from None
    return [line for line in lines if line]


def _holds_images(folder: str) -> bool:
    try:
        with os.scandir(folder) as entries:
            return any(e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES for e in entries)
    except OSError:
        return False


def empty_plan_message(source_name: str, source_path: str | None, layout: str) -> str:
    """Why a source gave no identity, and what it expects (its description states its layout)."""
    where = f" in {source_path}" if source_path else ""
    message = f"the plan is empty: source {source_name!r} found no identities{where} (it reads: {layout})"
    if source_path and _holds_images(source_path):
        message += (f"; {source_path} holds images itself, but one sub-folder per identity is expected "
                    "(PATH/<identity>/<image>): pass the folder that holds the identity folders as --source-path")
    return message


@dataclass
class Plan:
    """The ordered identities (label ``cls`` = position) and their grouping into units of work."""

    ids: list[str]
    identities_per_unit: int  # --shard-size (the flag keeps its name)

    @property
    def num_units(self) -> int:
        return math.ceil(len(self.ids) / self.identities_per_unit)

    def unit(self, index: int) -> range:
        """Plan positions (= labels) of unit ``index``."""
        size = self.identities_per_unit
        return range(index * size, min((index + 1) * size, len(self.ids)))

    def sha256(self) -> str:
        return hashlib.sha256("\n".join(self.ids).encode()).hexdigest()


def make_plan(
    source_ids: Sequence[str],
    identities_per_unit: int,
    identities_file: str | None = None,
    limit_identities: int | None = None,
) -> Plan:
    if identities_per_unit < 1:
        raise UsageError("--shard-size must be at least 1")
    ids = list(source_ids)
    if identities_file:
        wanted = read_identities_file(identities_file)
        known = set(ids)
        missing = [i for i in wanted if i not in known]
        if missing:
            shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
            raise UsageError(
                f"{count(len(missing), 'identity')} of {os.path.basename(identities_file)} "
                f"{'is' if len(missing) == 1 else 'are'} not in the source: {shown}"
            )
        chosen = set(wanted)
        ids = [i for i in ids if i in chosen]  # the source's stable order, not the file's
    if limit_identities is not None:
        if limit_identities < 1:
            raise UsageError("--limit-identities must be at least 1")
        ids = ids[:limit_identities]
    if len(set(ids)) != len(ids):
        raise UsageError("the source lists some identity twice; identity ids must be unique")
    if not ids:
        raise EmptyPlan("the plan is empty: the source has no identities (after selection)")
    return Plan(ids, identities_per_unit)


# --- the published layout ---


def check_layout_options(shard_samples: int, multiple_of: int | None) -> None:
    if shard_samples < 1:
        raise UsageError("--shard-samples must be at least 1")
    if multiple_of is not None and multiple_of < 1:
        raise UsageError("--shards-multiple-of must be at least 1")


def shard_lengths(num_samples: int, shard_samples: int, multiple_of: int | None = None) -> list[int]:
    """Samples per published shard: the fewest shards of at most ``shard_samples``, their count rounded up to a
    multiple of ``multiple_of``, sizes differing by at most one (the longer ones first).

    ``multiple_of`` None is the default layout, which serves a node: from NODE_SHARDS x MIN_SHARD_SAMPLES samples
    on, a multiple of NODE_SHARDS; below, at least the largest even count of shards of MIN_SHARD_SAMPLES or more
    (and an even count); below 2 x MIN_SHARD_SAMPLES samples, no rounding."""
    check_layout_options(shard_samples, multiple_of)
    if num_samples < 1:
        return []
    count = math.ceil(num_samples / shard_samples)
    if multiple_of is None:
        if num_samples >= NODE_SHARDS * MIN_SHARD_SAMPLES:
            multiple = NODE_SHARDS
        elif num_samples >= 2 * MIN_SHARD_SAMPLES:
            multiple, count = 2, max(count, num_samples // (2 * MIN_SHARD_SAMPLES) * 2)
        else:
            multiple = 1
        rounded = math.ceil(count / multiple) * multiple
        count = rounded if rounded <= num_samples else count  # --shard-samples 1: one sample per shard
    else:
        count = math.ceil(count / multiple_of) * multiple_of
    if count > num_samples:
        raise UsageError(f"--shards-multiple-of {multiple_of} needs at least {count} samples (one per shard), and "
                         f"this build has {num_samples}: choose a smaller multiple")
    base, extra = divmod(num_samples, count)
    return [base + 1 if j < extra else base for j in range(count)]


def shard_bounds(lengths: Sequence[int]) -> list[tuple[int, int]]:
    """[start, stop) of each shard in the shuffled order."""
    bounds, start = [], 0
    for n in lengths:
        bounds.append((start, start + n))
        start += n
    return bounds


def sample_order(num_samples: int, run_seed: int) -> np.ndarray:
    """The published order: one permutation of all samples, seeded by the run seed only."""
    digest = hashlib.sha256(f"facegen-order:{run_seed}".encode()).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))
    return rng.permutation(num_samples)
