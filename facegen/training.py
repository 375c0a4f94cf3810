"""How many optimizer steps every rank can surely run per epoch, so that no rank waits for another at the end.

Each reader splits the shards between ranks and `DataLoader` workers by its own rule, and each worker makes its own
batches, so two ranks can get different batch counts (a DDP run then hangs in its last collective). Every rank
computes the same number of steps from ``_info.json``'s shard lengths, batches with ``drop_last`` in each worker,
and stops after that many (``itertools.islice``): samples may be left out of an epoch, none is repeated. The
dataset card's loading snippets compute the same numbers in a few lines, without facegen.

The rules, read in (and measured with) datasets 5.2, webdataset 1.0.2 and timm 1.0.31:

- ``datasets.distributed.split_dataset_by_node``: when the shard count is a multiple of the ranks, rank ``r`` reads
  shards ``r, r + ranks, …``; otherwise every rank reads every shard and keeps one sample in ``ranks``. Then worker
  ``w`` reads every ``workers``-th shard (``w, w + workers, …``) of its rank's list. The shard list is reshuffled
  before the split every epoch (``shuffle(seed)``, ``set_epoch``), so a worker's count is bounded by its smallest
  possible shards.
- webdataset ``split_by_node`` then ``split_by_worker``: rank ``r`` reads shards ``r, r + ranks, …`` whatever their
  count, its worker ``w`` every ``workers``-th of those; the shard shuffle comes after the split, so the assignment
  is the same every epoch.
- timm's ``ReaderWds``: global worker ``rank * workers + w`` reads every ``ranks * workers``-th shard of a list
  reshuffled each epoch, and every worker yields ``--train-num-samples / (ranks * workers)`` samples (rounded up
  to a multiple of the batch size), cycling over its shards when they hold fewer: a count no worker can run out of
  keeps every sample once.
"""

from __future__ import annotations

READERS = ("datasets", "webdataset", "timm")
# one node: 8 GPUs (ranks) x 4 DataLoader workers each; the default layout (builders/plan.py) and the card serve it
NODE_RANKS, NODE_WORKERS = 8, 4
NODE_SHARDS = NODE_RANKS * NODE_WORKERS


def shard_lengths_of(info: dict, split: str = "train") -> list[int]:
    """The shard lengths of ``_info.json`` (timm's format, as facegen writes it)."""
    return list(info["splits"][split]["shard_lengths"])


def loader_workers(num_shards: int, ranks: int, max_workers: int = 4) -> int:
    """DataLoader workers per rank that keep every worker on whole shards of its own (at least one)."""
    return max(1, min(max_workers, num_shards // ranks))


def _per_worker_shards(num_shards: int, workers: int) -> list[int]:
    """How many of ``num_shards`` shards each worker reads when worker ``w`` takes ``w, w + workers, …``."""
    return [len(range(w, num_shards, workers)) for w in range(workers)]


def steps_per_epoch(info: dict, ranks: int, workers: int, batch_size: int, reader: str = "datasets") -> int:
    """Full batches (``drop_last`` in each worker) that every rank gets from ``reader`` in every epoch.

    ValueError when that is none (an epoch of no steps would train nothing), naming what serves one step."""
    if min(ranks, workers, batch_size) < 1:
        raise ValueError("ranks, workers and batch_size must be at least 1")
    if reader not in READERS:
        raise ValueError(f"reader must be one of {', '.join(READERS)}, got {reader!r}")
    steps = _full_batches(info, ranks, workers, batch_size, reader)
    if steps:
        return steps
    samples = sum(shard_lengths_of(info))
    served = next((b for b in range(batch_size - 1, 0, -1) if _full_batches(info, ranks, workers, b, reader)), None)
    hint = (f"a batch_size of at most {served} serves one step" if served else
            "no batch_size serves one: use fewer ranks or workers")
    raise ValueError(f"{reader}: {ranks} ranks x {workers} workers with batch_size {batch_size} get no full batch "
                     f"from {samples} samples in {len(shard_lengths_of(info))} shards; {hint}")


def _full_batches(info: dict, ranks: int, workers: int, batch_size: int, reader: str) -> int:
    lengths = shard_lengths_of(info)
    if reader == "datasets":
        ordered = sorted(lengths)  # any shard order: count each worker's smallest shards
        shards, keep = (len(ordered) // ranks, 1) if len(ordered) % ranks == 0 else (len(ordered), ranks)
        return sum(sum(ordered[:count]) // keep // batch_size for count in _per_worker_shards(shards, workers))
    if reader == "webdataset":
        per_rank = [lengths[rank::ranks] for rank in range(ranks)]
        return min(sum(sum(mine[w::workers]) // batch_size for w in range(workers)) for mine in per_rank)
    return timm_num_samples(info, ranks, workers, batch_size) // (ranks * batch_size)


def timm_num_samples(info: dict, ranks: int, workers: int, batch_size: int) -> int:
    """``--train-num-samples`` for timm's ``train.py``: ``ranks * workers`` workers, each yielding a multiple of
    ``batch_size`` no larger than its smallest possible shards hold."""
    if min(ranks, workers, batch_size) < 1:
        raise ValueError("ranks, workers and batch_size must be at least 1")
    ordered = sorted(shard_lengths_of(info))
    per_worker = sum(ordered[:len(ordered) // (ranks * workers)]) // batch_size * batch_size
    return per_worker * ranks * workers


def left_out(info: dict, ranks: int, steps: int, batch_size: int) -> int:
    """Samples an epoch of ``steps`` full batches on every rank leaves out."""
    return info["splits"]["train"]["num_samples"] - ranks * steps * batch_size
