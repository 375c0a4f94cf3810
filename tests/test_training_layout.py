"""Training-ready shards: sized by samples, shuffled across the dataset, described by `_info.json`, checked on
resume, and read back by the readers a training run uses."""

import io
import json
import os
import subprocess
import tarfile
from collections import Counter

import datasets
import pytest

from conftest import build, facegen, run_cli
from facegen.builders.plan import sample_order, shard_lengths
from facegen.errors import UsageError
from facegen.testing.folder import write_folder_source


def shard_paths(out):
    return sorted((out / "data" / "train").glob("train-*.tar"))


def tar_keys(path):
    with tarfile.open(path) as tar:
        return [m.name.split(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".cls")]


def check_info_json_like_timm(out, split="train"):
    """What timm's ReaderWds (timm/data/readers/reader_wds.py) reads, checked without importing timm:
    `_load_info` opens ROOT/_info.json; `_parse_split_info` needs splits[split] with name, num_samples, filenames
    and shard_lengths (parallel lists); every filename is joined to ROOT."""
    info = json.loads((out / "_info.json").read_text())
    split_info = info["splits"][split]
    assert split_info["name"] == split
    filenames, lengths = split_info["filenames"], split_info["shard_lengths"]
    assert isinstance(filenames, list) and len(filenames) == len(lengths)
    assert split_info["num_samples"] == sum(lengths) > 0
    for name, length in zip(filenames, lengths):
        assert not os.path.isabs(name) and "://" not in name
        assert len(tar_keys(os.path.join(out, name))) == length
    assert [os.path.join(out, f) for f in filenames] == [str(p) for p in shard_paths(out)]
    return split_info


def check_index(out):
    """The per-shard sample index (what a `--source facegen` reader uses): each entry's bytes are the sample."""
    seen = []
    for path in shard_paths(out):
        j = int(path.stem.split("-")[1])
        index = json.loads((out / ".facegen" / "shards" / "index" / f"{j:06d}.json").read_text())
        assert index["tar"] == f"data/train/{path.name}" and index["tar_bytes"] == path.stat().st_size
        assert index["keys"] == tar_keys(path)
        data = path.read_bytes()
        for key, cls, offset, length in zip(index["keys"], index["cls"], index["offsets"], index["lengths"]):
            with tarfile.open(fileobj=io.BytesIO(data[offset:offset + length])) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            assert {name.split(".", 1)[0] for name in members} == {key}
            assert int(members[f"{key}.cls"]) == cls and int(key[:6]) == cls
        seen += index["keys"]
    return seen


# --- the layout itself ---


@pytest.mark.parametrize("samples, target, multiple, expected", [
    (21, 7, 1, [7, 7, 7]),
    (20, 7, 1, [7, 7, 6]),
    (22, 7, 1, [6, 6, 5, 5]),
    (100, 30, 4, [25, 25, 25, 25]),
    (101, 10, 4, [9, 9, 9, 9, 9, 8, 8, 8, 8, 8, 8, 8]),
    (5, 10_000, 1, [5]),
])
def test_fewest_shards_of_at_most_n_samples_differing_by_one(samples, target, multiple, expected):
    lengths = shard_lengths(samples, target, multiple)
    assert lengths == expected and sum(lengths) == samples
    assert max(lengths) - min(lengths) <= 1 and max(lengths) <= target and len(lengths) % multiple == 0


@pytest.mark.parametrize("samples, target, expected_count", [
    (20_000, 10_000, 32),  # a default build of 20,000 samples: 32 shards of 625 (8 ranks x 4 workers)
    (16_000, 10_000, 32),  # from 32 x 500 samples on: a multiple of 32
    (15_999, 10_000, 30),  # below: the largest even count of shards of at least 500 samples
    (1_000, 10_000, 2),
    (999, 10_000, 1),  # too few for two shards of 500
    (1_219_995, 20_000, 64),  # DigiFace-1M through the digiface recipe: 61 shards of at most 20,000 -> 64
    (400_000, 20_000, 32),  # digi2real: 20,000 identities x 20 images
    (425_258, 1_600, 288),  # SFHQ parts 1-4 through the sfhq recipe: 266 -> 288 shards of ~1,477
    (8_000, 100, 80),  # more shards asked for: their count, even
    (24, 5, 5),  # a small build: as asked
    (20_000, 1, 20_000),  # one sample per shard: no rounding past the samples
])
def test_the_default_layout_serves_a_node(samples, target, expected_count):
    lengths = shard_lengths(samples, target)
    assert len(lengths) == expected_count and sum(lengths) == samples and max(lengths) - min(lengths) <= 1
    assert max(lengths) <= target
    if samples >= 2 * 500 and expected_count > 1:
        assert min(lengths) >= 500 or target < 500


def test_layout_options_are_checked():
    with pytest.raises(UsageError, match="--shards-multiple-of 8 needs at least 8 samples"):
        shard_lengths(5, 10, 8)
    with pytest.raises(UsageError, match="--shard-samples must be at least 1"):
        shard_lengths(5, 0, 1)


def test_the_order_is_one_permutation_seeded_by_the_run_seed():
    order = sample_order(1000, 0)
    assert sorted(order.tolist()) == list(range(1000))
    assert (order == sample_order(1000, 0)).all() and not (order == sample_order(1000, 1)).all()


# --- a passthrough build: shuffled, equal shards, _info.json, index, resume checks ---


def test_passthrough_shards_are_shuffled_equal_and_described(tmp_path):
    src = write_folder_source(tmp_path / "src", identities=10, images_per_identity=6, size=16)
    out = tmp_path / "out"
    build("--source", "folder", "--source-path", src, "--plugin", "passthrough", "--out", out,
          "--shard-samples", 16, "--shards-multiple-of", 2, "--seed", 3)
    lengths = [len(tar_keys(p)) for p in shard_paths(out)]
    assert lengths == [15, 15, 15, 15]  # 60 samples: 4 shards of at most 16 (a multiple of 2), equal
    info = check_info_json_like_timm(out)
    assert info["shard_lengths"] == lengths and info["num_samples"] == 60
    keys = check_index(out)
    assert sorted(keys) == sorted(f"{c:06d}_{n:03d}" for c in range(10) for n in range(6))
    # shuffled: the first shard holds most identities, not the first few
    assert len({k[:6] for k in tar_keys(shard_paths(out)[0])}) >= 7
    # the seed decides the order; the same command gives the same bytes
    again = tmp_path / "again"
    build("--source", "folder", "--source-path", src, "--plugin", "passthrough", "--out", again,
          "--shard-samples", 16, "--shards-multiple-of", 2, "--seed", 3)
    assert [p.read_bytes() for p in shard_paths(out)] == [p.read_bytes() for p in shard_paths(again)]
    card = (out / "README.md").read_text()
    assert "4 shards of 15 samples" in card and "split_dataset_by_node" in card and "hf://datasets/" in card


def test_a_truncated_shard_fails_its_check_and_is_redone(tmp_path, capsys):
    src = write_folder_source(tmp_path / "src", identities=8, images_per_identity=4, size=32)
    out = tmp_path / "out"
    args = ["build", "--source", "folder", "--source-path", src, "--plugin", "passthrough", "--out", out,
            "--shard-samples", 8]
    assert run_cli(args, capsys)[0] == 0
    reference = [p.read_bytes() for p in shard_paths(out)]
    victim = out / "data" / "train" / "train-000001.tar"
    subprocess.run(["truncate", "-s", "3000", str(victim)], check=True)
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0
    assert "1 shard failed its check (size or XXH3-128 against its stats) and was redone" in stdout
    assert "1 written now, 3 already complete" in stdout
    assert [p.read_bytes() for p in shard_paths(out)] == reference
    stats = json.loads((out / ".facegen" / "shards" / "000001.json").read_text())
    assert stats["redone_because"].startswith("3000 bytes")
    # same size, one byte flipped: the checksum catches it
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0xFF
    victim.write_bytes(bytes(data))
    code, stdout, _ = run_cli(args, capsys)
    assert "1 shard failed its check" in stdout and victim.read_bytes() == reference[1]
    assert datasets.load_dataset(str(out), split="train").num_rows == 32
    # nothing changed: nothing is redone
    code, stdout, _ = run_cli(args, capsys)
    assert "0 written now, 4 already complete" in stdout and "failed its check" not in stdout


# --- the readers of a training run ---


def loader_batches(out, num_workers=2, batch_size=4):
    """PyTorch DataLoader workers over streaming `datasets` with torch formatting and the default collate."""
    import torch

    ds = datasets.load_dataset(str(out), split="train", streaming=True).with_format("torch")
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    return list(loader)


def split_counts(out, world_size):
    """Keys each rank reads with `split_dataset_by_node`."""
    from datasets.distributed import split_dataset_by_node

    ds = datasets.load_dataset(str(out), split="train", streaming=True).select_columns(["__key__"])
    return [[row["__key__"] for row in split_dataset_by_node(ds, rank=r, world_size=world_size)]
            for r in range(world_size)]


def check_training_readers(out, image_column):
    """DataLoader(num_workers=2) + default_collate; split_dataset_by_node for 2 and 4 ranks."""
    import torch

    check_info_json_like_timm(out)
    keys = check_index(out)
    batches = loader_batches(out)
    seen = [k for b in batches for k in b["__key__"]]
    assert sorted(seen) == sorted(keys)
    first = batches[0]
    assert first[image_column].dtype == torch.uint8 and first[image_column].ndim == 4
    assert first["cls"].dtype == torch.int64
    assert first["json"]["width"].dtype == torch.int64  # collated: every field present, never null
    balance = {}
    for world_size in (2, 4):
        per_rank = split_counts(out, world_size)
        flat = [k for rank in per_rank for k in rank]
        assert sorted(flat) == sorted(keys) and len(set(flat)) == len(flat)  # every sample exactly once
        counts = [len(rank) for rank in per_rank]
        assert max(counts) <= 1.2 * min(counts), counts
        balance[world_size] = counts
    return balance


def test_digiface_recipe_output_trains(tmp_path):
    from facegen.testing.digiface import write_digiface_part

    src = tmp_path / "digiface"
    write_digiface_part(src, ids=range(6), images_per_identity=6, name="subjects_0-1999_72_imgs")
    out = tmp_path / "out"
    build("--recipe", "digiface", "--source-path", src, "--out", out, "--shard-samples", 9,
          "--shards-multiple-of", 4)
    assert [len(tar_keys(p)) for p in shard_paths(out)] == [9, 9, 9, 9]
    balance = check_training_readers(out, "png")
    assert balance == {2: [18, 18], 4: [9, 9, 9, 9]}


def test_disco_recipe_output_trains(tmp_path):
    from facegen.testing.disco import write_disco_source

    src = write_disco_source(tmp_path / "disco", identities=4, augmentations=5)
    out = tmp_path / "out"
    build("--recipe", "disco", "--source-path", src, "--out", out, "--shards-multiple-of", 4)
    check_training_readers(out, "png")
    import torch

    batch = loader_batches(out)[0]
    assert batch["embedding.npy"].dtype == torch.float32 and batch["embedding.npy"].shape[1] == 512


def test_sfhq_recipe_output_trains(tmp_path):
    from facegen.testing.sfhq import write_sfhq_source

    src = write_sfhq_source(tmp_path / "sfhq", parts=(1, 2), images_per_part=10, size=64,
                            feature_dims={"clip_vitl_14_336": 8})
    out = tmp_path / "out"
    build("--recipe", "sfhq", "--source-path", src, "--out", out, "--shards-multiple-of", 4)
    check_training_readers(out, "jpg")
    batch = loader_batches(out)[0]
    assert tuple(batch["landmarks.npy"].shape[1:]) == (110, 2)


@pytest.mark.slow
def test_sfhq_truncation_recipe_output_trains(tmp_path, stylegan_checkpoints):
    """e4e (identity-level): units of work, then the published shards assembled from them; a damaged unit is
    redone and the shards stay byte-identical."""
    e4e_path, _ = stylegan_checkpoints
    out = tmp_path / "out"
    args = ["build", "--recipe", "sfhq-truncation", "--source-opt", "count=12", "--plugin-opt",
            f"checkpoint={e4e_path}", "--shard-size", 5, "--shards-multiple-of", 4, "--out", out]
    proc = facegen(*args)
    assert proc.returncode == 0, proc.stderr
    assert "units of work 3 (3 written now); assembling the shards took" in proc.stdout
    assert sorted(p.name for p in (out / ".facegen" / "units").glob("*.tar")) == [
        "000000.tar", "000001.tar", "000002.tar"]
    check_training_readers(out, "jpg")
    rows = list(datasets.load_dataset(str(out), split="train", streaming=True))
    assert all("psi" in r["json"] and None not in r["json"].values() for r in rows)
    reference = [p.read_bytes() for p in shard_paths(out)]
    unit = out / ".facegen" / "units" / "000001.tar"
    subprocess.run(["truncate", "-s", "2048", str(unit)], check=True)
    proc = facegen(*args)
    assert proc.returncode == 0 and "1 unit failed its check" in proc.stdout
    assert [p.read_bytes() for p in shard_paths(out)] == reference


@pytest.mark.slow
def test_digi2real_recipe_output_trains(tmp_path, tiny_arc2face):
    """Arc2Face (identity-level, tiny random-weight models) through the digi2real recipe."""
    from facegen.testing.digiface import write_digiface_part

    tiny = tiny_arc2face
    src = tmp_path / "digiface"
    write_digiface_part(src, ids=range(4), images_per_identity=5, name="subjects_0-1999_72_imgs")
    ids = tmp_path / "ids.txt"
    ids.write_text("0\n1\n2\n3\n")
    out = tmp_path / "out"
    args = ["build", "--recipe", "digi2real", "--source-path", src, "--identities-file", ids, "--out", out,
            "--shard-size", 2, "--shards-multiple-of", 4]
    for opt in (f"model_dir={tiny}", "shift=none", "steps=2", "latents=1", "images_per_latent=2",
                "batch_size=2"):
        args += ["--plugin-opt", opt]
    proc = facegen(*args, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    check_training_readers(out, "png")


@pytest.mark.slow
def test_shuffle_buffer_mixes_identities(tmp_path):
    """400 identities x 20 images: a 256-sample batch after a 1000-sample streaming shuffle holds >= 150
    identities (with identity-sorted shards it held about 40)."""
    import webdataset as wds

    src = write_folder_source(tmp_path / "src", identities=400, images_per_identity=20, size=8, noise=0)
    out = tmp_path / "out"
    build("--source", "folder", "--source-path", src, "--plugin", "passthrough", "--out", out,
          "--shard-samples", 1000)
    ds = datasets.load_dataset(str(out), split="train", streaming=True).select_columns(["cls"])
    distinct = []
    for seed in range(3):
        batch = [row["cls"] for _, row in zip(range(256), ds.shuffle(seed=seed, buffer_size=1000))]
        distinct.append(len(set(batch)))
    assert min(distinct) >= 150, distinct
    urls = [str(p) for p in shard_paths(out)]
    stream = wds.WebDataset(urls, shardshuffle=False).shuffle(1000, seed=0)  # webdataset's defaults (initial 100)
    batch = [int(s["cls"]) for _, s in zip(range(256), stream)]
    wds_distinct = len(set(batch))
    assert wds_distinct >= 150, wds_distinct
    unshuffled = [row["cls"] for _, row in zip(range(256), ds)]
    print(f"distinct identities in 256: datasets shuffle(1000) {distinct}, webdataset shuffle(1000) "
          f"{wds_distinct}, no shuffle {len(set(unshuffled))}")
    counts = Counter(len(tar_keys(p)) for p in shard_paths(out))
    assert counts == {500: 16}  # 8,000 samples: the default layout's even count of shards of at least 500


def test_a_changed_source_listing_redoes_the_shards_and_drops_surplus_ones(tmp_path, capsys):
    """Images removed from an identity folder: the plan (identity ids) is the same command, but the shards were
    planned from another listing: they are redone, and the shards past the new count are removed."""
    src = write_folder_source(tmp_path / "src", identities=6, images_per_identity=4, size=16)
    out = tmp_path / "out"
    args = ["build", "--source", "folder", "--source-path", src, "--plugin", "passthrough", "--out", out,
            "--shard-samples", 5]
    assert run_cli(args, capsys)[0] == 0
    assert len(shard_paths(out)) == 5  # 24 samples
    for name in ("2.png", "3.png"):
        (src / "5" / name).unlink()
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0 and "shards 5 (5 written now" in stdout  # 22 samples: still 5 shards, all replanned
    for name in ("0.png", "1.png"):  # not identity 5's last images: an empty folder would leave the plan
        (src / "4" / name).unlink()
    assert run_cli(args, capsys)[0] == 0
    assert len(shard_paths(out)) == 4  # 20 samples: train-000004.tar is gone
    check_info_json_like_timm(out)
    assert sorted(check_index(out)) == sorted([f"{c:06d}_{n:03d}" for c in range(4) for n in range(4)]
                                              + [f"{c:06d}_{n:03d}" for c in (4, 5) for n in range(2)])


# --- the steps every rank can run (facegen.training; the card's snippets compute the same, tests/test_ddp_steps.py) ---


def rank_batches(order, ranks, workers, batch_size, reader):
    """Each rank's full batches for one shard order, by the reader's rule (see facegen/training.py)."""
    counts = []
    for rank in range(ranks):
        if reader == "webdataset" or len(order) % ranks == 0:
            mine = order[rank::ranks]
            per_worker = [sum(mine[w::workers]) for w in range(workers)]
        else:  # datasets: every rank reads every shard, keeps one sample in `ranks`
            per_worker = [len(range(rank, sum(order[w::workers]), ranks)) for w in range(workers)]
        counts.append(sum(n // batch_size for n in per_worker))
    return counts


def test_no_step_per_epoch_is_an_error_naming_what_serves_one():
    from facegen import training

    info = {"splits": {"train": {"num_samples": 16, "shard_lengths": [2] * 8}}}
    with pytest.raises(ValueError, match="batch_size 256 get no full batch from 16 samples in 8 shards; "
                                         "a batch_size of at most 2 serves one step"):
        training.steps_per_epoch(info, ranks=8, workers=4, batch_size=256, reader="datasets")
    assert training.steps_per_epoch(info, ranks=8, workers=4, batch_size=2, reader="datasets") == 1


@pytest.mark.parametrize("lengths", [[60] * 5, [80, 78, 80, 77, 80, 75, 80, 70], [625] * 32, [9, 1, 5, 7, 3, 8]])
def test_every_rank_gets_the_steps_whatever_the_shard_order(lengths):
    import itertools
    import random

    from facegen import training

    info = {"splits": {"train": {"num_samples": sum(lengths), "shard_lengths": lengths}}}
    rng = random.Random(0)
    orders = [lengths] + [rng.sample(lengths, len(lengths)) for _ in range(30)]
    def steps_per_epoch(*args):  # none is a ValueError (tested below): 0 steps here
        try:
            return training.steps_per_epoch(info, *args)
        except ValueError:
            return 0

    for ranks, workers, batch_size in itertools.product((1, 2, 3, 4), (1, 2, 4), (1, 4, 16, 29)):
        steps = steps_per_epoch(ranks, workers, batch_size, "datasets")
        assert all(min(rank_batches(o, ranks, workers, batch_size, "datasets")) >= steps for o in orders)
        if len(set(lengths)) == 1 and len(lengths) % (ranks * workers) == 0:  # an even split: nothing to spare
            assert rank_batches(lengths, ranks, workers, batch_size, "datasets") == [steps] * ranks
        steps = steps_per_epoch(ranks, workers, batch_size, "webdataset")
        assert min(rank_batches(lengths, ranks, workers, batch_size, "webdataset")) == steps  # a fixed split
        if len(lengths) >= ranks * workers:  # timm: no worker's shards run short of its count (no repeats)
            per_worker = training.timm_num_samples(info, ranks, workers, batch_size) // (ranks * workers)
            assert per_worker % batch_size == 0
            assert all(sum(o[g::ranks * workers]) >= per_worker for o in orders for g in range(ranks * workers))
