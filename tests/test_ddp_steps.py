"""Training that never hangs: the card's multi-GPU loading snippets (datasets, webdataset, timm), extracted from the
rendered cards, on a real `torchrun` of 2 ranks (gloo) x 2 DataLoader workers, over several batch sizes and three
builds (tiny images in a shard count the ranks do not divide, a build with skipped samples, a default build of
20,000 samples): two epochs finish on every rank with the same number of steps, no sample is seen twice in an
epoch, and the samples left out are the count the snippet states. One launch per snippet (tests/ddp_snippets.py
loops over the builds and batch sizes inside it)."""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import BIN, build
from facegen.testing.folder import write_folder_source
from test_distributed import free_port

BATCH_SIZES = [8, 9, 15, 16, 29, 100, 125]
LARGE_BATCH_SIZES = [125]  # the 20,000-sample build (two epochs of 20,000 samples per batch size): 125 uses all
HARNESS = Path(__file__).parent / "ddp_snippets.py"
SNIPPET_MARKERS = {"datasets": "split_dataset_by_node(", "webdataset": "wds.WebDataset(", "timm": "train.py --dataset"}


def card_snippets(out: Path) -> dict[str, str]:
    """The python code blocks of the card's multi-GPU section, by reader."""
    card = (out / "README.md").read_text()
    section = card[card.index("### Training on several GPUs"):card.index("## Data layout")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    found = {reader: [b for b in blocks if marker in b] for reader, marker in SNIPPET_MARKERS.items()}
    assert all(len(b) == 1 for b in found.values()), {reader: len(b) for reader, b in found.items()}
    return {reader: b[0] for reader, b in found.items()}


def write_tiny_images(root: Path, identities: int, images: int, distinct: int = 5) -> Path:
    """A folder source of 8x8 PNGs: one colour per identity plus noise (learnable labels), ``distinct`` different
    images per identity, hard-linked to make ``images`` (samples are told apart by their keys). Quicker than drawn
    faces for 20,000 images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = rng.integers(30, 226, (identities, 1, 1, 1, 3))
    pixels = np.clip(colours + rng.normal(0, 12, (identities, distinct, 8, 8, 3)), 0, 255).astype(np.uint8)
    for i in range(identities):
        (root / str(i)).mkdir(parents=True)
        for k in range(images):
            if k < distinct:
                Image.fromarray(pixels[i, k]).save(root / str(i) / f"{k}.png")
            else:
                os.link(root / str(i) / f"{k % distinct}.png", root / str(i) / f"{k}.png")
    return root


def make_build(root: Path, identities: int, images: int, *options, corrupt: int = 0) -> Path:
    if corrupt:
        src = write_folder_source(root / "src", identities=identities, images_per_identity=images, size=8,
                                  corrupt=corrupt)
    else:
        src = write_tiny_images(root / "src", identities, images)
    build("--source", "folder", "--source-path", src, "--plugin", "passthrough", "--out", root / "out", "--verify",
          "header", *options)
    return root / "out"


@pytest.fixture(scope="session")
def skipped_build(tmp_path_factory):
    """640 listed, 620 written: 8 shards, some shorter."""
    return make_build(tmp_path_factory.mktemp("skipped"), 80, 8, "--shard-samples", 80, corrupt=20)


@pytest.fixture(scope="session")
def ddp_builds(tmp_path_factory, skipped_build):
    """Three builds of 8x8 images (built once per session): tiny images in 5 shards (not a multiple of 2 ranks),
    skipped samples, and the default layout of 20,000 samples."""
    return {
        "tiny": make_build(tmp_path_factory.mktemp("tiny"), 60, 5, "--shard-samples", 61),
        "skipped": skipped_build,
        "default": make_build(tmp_path_factory.mktemp("default"), 1000, 20),
    }


@pytest.mark.slow
def test_the_builds_have_the_layouts_the_tests_need(ddp_builds):
    lengths = {name: json.loads((out / "_info.json").read_text())["splits"]["train"]["shard_lengths"]
               for name, out in ddp_builds.items()}
    assert lengths["tiny"] == [60] * 5
    assert lengths["default"] == [625] * 32
    assert sum(lengths["skipped"]) == 620 and len(set(lengths["skipped"])) > 1


def launch(reader: str, ddp_builds, tmp_path, train=None) -> tuple[list[dict], float]:
    runs = []
    for name, out in ddp_builds.items():
        runs.append({"build": name, "path": str(out), "snippet": card_snippets(out)[reader],
                     "batch_sizes": LARGE_BATCH_SIZES if name == "default" else BATCH_SIZES})
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"reader": reader, "epochs": 2, "max_workers": 2, "runs": runs, "train": train,
                                "timeout": 300}))
    result = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-cache"), "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    proc = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                           str(HARNESS), str(plan), str(result)], capture_output=True, text=True, timeout=900, env=env)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return json.loads(result.read_text()), seconds


def check_equal_steps(results, ddp_builds):
    assert [(r["build"], r["batch_size"]) for r in results] == [
        (name, b) for name in ddp_builds for b in (LARGE_BATCH_SIZES if name == "default" else BATCH_SIZES)]
    for r in results:
        where = f"{r['build']}, batch size {r['batch_size']}: {r}"
        steps = r["snippet_steps"][0]
        assert r["snippet_steps"] == [steps, steps], where  # every rank computed the same count
        assert r["steps_per_rank"] == [[steps, steps], [steps, steps]], where  # and ran it, both epochs
        assert r["batch_sizes_seen"] in ([], [r["batch_size"]]), where  # full batches only
        assert r["seen_twice"] == [0, 0], where
        assert r["unseen"] == [r["snippet_left_out"][0]] * 2, where  # the count the snippet states
    # the default layout serves 2 x 2 with whole shards: batch 125 divides each worker's 5,000 samples
    default = {r["batch_size"]: r for r in results if r["build"] == "default"}
    assert default[125]["snippet_steps"][0] == 80 and default[125]["unseen"] == [0, 0]


@pytest.mark.slow
def test_datasets_snippet_on_two_ranks_and_a_short_training_run(ddp_builds, tmp_path):
    out = ddp_builds["tiny"]
    train = {"snippet": card_snippets(out)["datasets"], "path": str(out), "batch_size": 8, "epochs": 3, "lr": 0.01,
             "classes": 60, "image_column": "png"}
    results, seconds = launch("datasets", ddp_builds, tmp_path, train=train)
    losses = results.pop()["train_losses"]
    check_equal_steps(results, ddp_builds)
    assert len(losses) == 3 * 18  # 18 steps per epoch: 5 shards of 60 on 2 ranks x 2 workers, batch size 8
    assert sum(losses[-5:]) / 5 < 0.9 * losses[0], losses
    print(f"datasets launch: {seconds:.1f} s; losses {losses[0]:.3f} -> {sum(losses[-5:]) / 5:.3f}")


@pytest.mark.slow
def test_webdataset_snippet_on_two_ranks(ddp_builds, tmp_path):
    results, seconds = launch("webdataset", ddp_builds, tmp_path)
    check_equal_steps(results, ddp_builds)
    print(f"webdataset launch: {seconds:.1f} s")


@pytest.mark.slow
def test_timm_arguments_on_two_ranks(ddp_builds, tmp_path):
    pytest.importorskip("timm", reason="timm is the `timm` extra, not `test`: it needs torchvision, which pulls a CUDA "
                        "torch beside a CPU one (README, Tests)")
    results, seconds = launch("timm", ddp_builds, tmp_path)
    check_equal_steps(results, ddp_builds)
    for r in results:  # timm's own count of batches agrees
        assert r["loader_len"] == r["snippet_steps"], r
    print(f"timm launch: {seconds:.1f} s")


@pytest.mark.parametrize("reader", ["datasets", "webdataset", "timm"])
def test_the_snippets_compute_what_facegen_training_computes(skipped_build, reader):
    """The card's few lines and `facegen.training` agree, for any ranks, workers and batch size."""
    from facegen import training

    out = skipped_build
    snippet = card_snippets(out)[reader]
    from ddp_snippets import localized, with_settings

    info = json.loads((out / "_info.json").read_text())
    for ranks in (1, 2, 3, 4, 5):
        for max_workers in (1, 2, 4):
            for batch_size in (1, 7, 16, 64):
                code = with_settings(localized(snippet, str(out)), reader, batch_size, max_workers, 1, ranks)
                code = code[:code.index({"datasets": "\nds = ", "webdataset": "\nurls = ", "timm": "\nprint("}[reader])]
                namespace = {"dist": _FakeDist(ranks)}
                exec(code.replace("import torch.distributed as dist\n", ""), namespace)
                workers = training.loader_workers(len(training.shard_lengths_of(info)), ranks, max_workers)
                assert namespace["workers"] == workers
                if namespace["steps"] == 0:  # the snippet trains nothing: the library says so
                    with pytest.raises(ValueError, match="serves"):
                        training.steps_per_epoch(info, ranks, workers, batch_size, reader)
                    continue
                steps = training.steps_per_epoch(info, ranks, workers, batch_size, reader)
                assert namespace["steps"] == steps, (ranks, max_workers, batch_size)
                assert namespace["left_out"] == training.left_out(info, ranks, steps, batch_size)


class _FakeDist:
    def __init__(self, ranks):
        self.ranks = ranks

    def get_world_size(self):
        return self.ranks

    def get_rank(self):
        return 0
