"""The card's section on training with several ranks: what the layout serves, and one worked example of the steps
every rank runs (the snippets compute them for the reader's own ranks, workers and batch size)."""

from __future__ import annotations

from facegen.layout.records import RunRecord
from facegen.training import (
    NODE_RANKS,
    NODE_SHARDS,
    NODE_WORKERS,
    left_out,
    loader_workers,
    steps_per_epoch,
    timm_num_samples,
)

EXAMPLE_RANKS, EXAMPLE_MAX_WORKERS, EXAMPLE_BATCH = NODE_RANKS, NODE_WORKERS, 256


def _steps_or_none(info: dict, ranks: int, workers: int, reader: str) -> int:
    try:
        return steps_per_epoch(info, ranks, workers, EXAMPLE_BATCH, reader)
    except ValueError:  # a worker's shards hold fewer samples than a batch: the card gives no example
        return 0


def loading_context(run: RunRecord, shard_lengths: list[int], image_sizes: dict[str, int], repo_id: str) -> dict:
    """``serves``: the most ranks x DataLoader workers that each read whole shards of their own (the shard count);
    ``example``: steps and samples left out per epoch for one node (None when a worker's shards hold fewer samples
    than a batch); ``timm_*``: the values timm's train.py needs besides the shard list."""
    num_shards = len(shard_lengths)
    info = {"splits": {"train": {"num_samples": sum(shard_lengths), "shard_lengths": list(shard_lengths)}}}
    example = None
    ranks = min(EXAMPLE_RANKS, num_shards)
    if ranks:
        workers = loader_workers(num_shards, ranks, EXAMPLE_MAX_WORKERS)
        readers = {reader: _steps_or_none(info, ranks, workers, reader) for reader in ("datasets", "webdataset", "timm")}
        if any(readers.values()):
            groups = {}  # readers that run the same steps, together
            for reader, steps in readers.items():
                groups.setdefault(steps, []).append(reader)
            example = {"ranks": ranks, "workers": workers, "batch_size": EXAMPLE_BATCH,
                       "groups": [{"readers": names, "steps": steps,
                                   "left_out": left_out(info, ranks, steps, EXAMPLE_BATCH)}
                                  for steps, names in groups.items()],
                       "timm_num_samples": timm_num_samples(info, ranks, workers, EXAMPLE_BATCH)}
    sizes = list(image_sizes)
    width, height = (int(v) for v in sizes[0].split("x")) if len(sizes) == 1 else (None, None)
    return {
        "serves": num_shards,
        "node_shards": NODE_SHARDS,
        "example": example,
        "timm_name": repo_id.split("/")[-1],
        "timm_classes": run.plan.identities,
        "timm_input_size": f"3 {height} {width}" if width else None,
    }
