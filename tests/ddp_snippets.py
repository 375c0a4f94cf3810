"""Run one of a dataset card's multi-GPU loading snippets on every rank of a real `torchrun` (gloo, CPU).

    torchrun --nproc_per_node 2 tests/ddp_snippets.py PLAN.json RESULT.json

PLAN.json: ``{"reader": "datasets"|"webdataset"|"timm", "epochs": 2, "max_workers": 2, "runs": [{"build": NAME,
"path": FOLDER, "snippet": TEXT, "batch_sizes": [...]}], "train": {...} or null}``. Each snippet is the card's code
block as rendered for that build; only these lines change: the Hub address becomes the local folder, the line that
sets the batch size, the worker cap and the epochs (or, for timm, the ranks) gets the run's values, and the loop
body (``...  # forward, backward, optimizer step``) calls ``step(epoch, batch)``. Every step does an all-reduce over
all ranks, as DDP does, so a rank with fewer steps than another leaves the others waiting (the gloo timeout then
fails the run). timm's snippet prints `train.py` arguments, which go to `timm.data.create_dataset` and
`create_loader` as `train.py` passes them.

Rank 0 writes RESULT.json: for every (build, batch size), each rank's steps per epoch, the snippet's ``steps`` and
``left_out``, the keys seen twice in an epoch and the samples not seen in it; and the training losses when asked.
"""

import contextlib
import datetime
import io
import json
import re
import shlex
import sys
import time

import torch
import torch.distributed as dist

LOOP_BODY = "...  # forward, backward, optimizer step"
SETTINGS = {  # the line of each snippet that holds what a run chooses
    "datasets": re.compile(r"^batch_size, max_workers, epochs = .*$", re.M),
    "webdataset": re.compile(r"^batch_size, max_workers, epochs = .*$", re.M),
    "timm": re.compile(r"^ranks, max_workers, batch_size = .*$", re.M),
}


def localized(snippet: str, path: str) -> str:
    """The card's snippet reading the local build folder instead of the Hub repository."""
    repo = re.search(r'hf://datasets/([^"/]+/[^"/]+)["/]', snippet).group(1)
    return snippet.replace(f"hf://datasets/{repo}", path).replace(f'"{repo}"', json.dumps(path))


def with_settings(snippet: str, reader: str, batch_size: int, max_workers: int, epochs: int, ranks: int) -> str:
    values = (f"ranks, max_workers, batch_size = {ranks}, {max_workers}, {batch_size}" if reader == "timm" else
              f"batch_size, max_workers, epochs = {batch_size}, {max_workers}, {epochs}")
    code, found = SETTINGS[reader].subn(values, snippet)
    assert found == 1, f"the card's {reader} snippet has no settings line"
    if reader != "timm":
        assert code.count(LOOP_BODY) == 1, f"the card's {reader} snippet has no loop body line"
        code = code.replace(LOOP_BODY, "step(epoch, batch)")
    return code


def key_number(key: str) -> int:
    """``{cls:06d}_{n:03d}`` as one integer (timm's loader yields only (image, target) pairs)."""
    cls, n = key.split("_")
    return int(cls) * 1000 + int(n)


def keyed_decode(decode):
    """timm's sample decoder with the sample's key as its target, to tell which samples an epoch saw (timm's loader
    yields only image and target)."""

    def keyed(sample, **kwargs):
        decoded = decode(sample, **kwargs)
        if decoded is not None:
            decoded["target"] = key_number(sample["__key__"])
        return decoded

    keyed.keyed = True
    return keyed


def run_timm(namespace: dict, printed: str, epochs: int, step) -> int:
    """timm's train.py data path for the printed arguments: create_dataset, create_loader, _set_loader_epoch."""
    import argparse

    from timm.data import create_dataset, create_loader
    from timm.data.readers import reader_wds

    parser = argparse.ArgumentParser()
    for flag in ("--dataset", "--data-dir", "--train-split", "--val-split"):
        parser.add_argument(flag)
    parser.add_argument("--train-num-samples", type=int)
    parser.add_argument("-b", "--batch-size", type=int)
    parser.add_argument("-j", "--workers", type=int)
    parser.add_argument("--num-classes", type=int)
    parser.add_argument("--input-size", type=int, nargs=3)
    words = shlex.split(printed)
    assert words[0] == "train.py", printed
    args = parser.parse_args(words[1:])
    assert args.val_split == ""  # no validation split: train.py builds no eval loader

    if not getattr(reader_wds._decode, "keyed", False):
        reader_wds._decode = keyed_decode(reader_wds._decode)
    try:
        dataset = create_dataset(args.dataset, root=args.data_dir, split=args.train_split, is_training=True,
                                 class_map="", download=False, batch_size=args.batch_size, seed=42, repeats=0.0,
                                 input_img_mode="RGB", input_key=None, target_key=None,
                                 num_samples=args.train_num_samples)
    except RuntimeError as exc:  # the card's count of 0: train.py stops at start on every rank, nothing hangs
        assert args.train_num_samples == 0 and "num_samples not specified" in str(exc), exc
        return 0
    loader = create_loader(dataset, input_size=tuple(args.input_size), batch_size=args.batch_size,
                           is_training=True, interpolation="random", num_workers=args.workers,
                           device=torch.device("cpu"), distributed=True, use_prefetcher=True)
    for epoch in range(epochs):
        if hasattr(loader.dataset, "set_epoch"):  # train.py's _set_loader_epoch
            loader.dataset.set_epoch(epoch)
        for images, target in loader:
            step(epoch, {"__key__": [f"{t // 1000:06d}_{t % 1000:03d}" for t in target.tolist()],
                         "images": images})
    return len(loader)


def run(reader: str, snippet: str, path: str, batch_size: int, epochs: int, max_workers: int, step) -> dict:
    ranks = dist.get_world_size()
    code = with_settings(localized(snippet, path), reader, batch_size, max_workers, epochs, ranks)
    namespace = {"step": step, "__name__": "__snippet__"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"<card {reader} snippet>", "exec"), namespace)
    loader_len = None
    if reader == "timm":
        loader_len = run_timm(namespace, printed.getvalue().strip(), epochs, step)
    return {"snippet_steps": namespace["steps"], "left_out": namespace["left_out"], "loader_len": loader_len}


def main():
    plan = json.loads(open(sys.argv[1]).read())
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=plan.get("timeout", 300)))
    rank, reader, epochs = dist.get_rank(), plan["reader"], plan["epochs"]
    torch.set_num_threads(1)
    results = []
    for entry in plan["runs"]:
        num_samples = json.loads(open(f"{entry['path']}/_info.json").read())["splits"]["train"]["num_samples"]
        for batch_size in entry["batch_sizes"]:
            seen, steps, sizes = [[] for _ in range(epochs)], [0] * epochs, set()

            def step(epoch, batch):
                seen[epoch].extend(batch["__key__"])
                steps[epoch] += 1
                sizes.add(len(batch["__key__"]))
                dist.all_reduce(torch.ones(1))  # what DDP's backward does: every rank must take part

            start = time.perf_counter()
            out = run(reader, entry["snippet"], entry["path"], batch_size, epochs, plan["max_workers"], step)
            seconds = time.perf_counter() - start
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, {"seen": seen, "steps": steps, "sizes": sorted(sizes), **out})
            if rank == 0:
                per_epoch = [[k for g in gathered for k in g["seen"][e]] for e in range(epochs)]
                results.append({
                    "build": entry["build"], "batch_size": batch_size,
                    "steps_per_rank": [g["steps"] for g in gathered],
                    "batch_sizes_seen": sorted({s for g in gathered for s in g["sizes"]}),
                    "snippet_steps": [g["snippet_steps"] for g in gathered],
                    "snippet_left_out": [g["left_out"] for g in gathered],
                    "loader_len": [g["loader_len"] for g in gathered],
                    "seen_twice": [len(keys) - len(set(keys)) for keys in per_epoch],
                    "unseen": [num_samples - len(set(keys)) for keys in per_epoch],
                    "seconds": round(seconds, 2),
                })
    if plan.get("train"):
        results.append({"train_losses": train(reader, plan["train"], plan["max_workers"])})
    if rank == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def train(reader: str, spec: dict, max_workers: int) -> list[float]:
    """The card's snippet as a training loop: a small CNN under DDP, cross-entropy over `cls`."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, spec["classes"])))
    optimizer = torch.optim.Adam(model.parameters(), lr=spec["lr"])
    losses = []

    def step(epoch, batch):
        images = batch[spec["image_column"]].float() / 255
        loss = nn.functional.cross_entropy(model(images), batch["cls"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    run(reader, spec["snippet"], spec["path"], spec["batch_size"], spec["epochs"], max_workers, step)
    return losses


if __name__ == "__main__":
    main()
