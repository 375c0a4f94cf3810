"""Every reader of data facegen did not just write is bounded (issue 18 §1 and §7), end to end on real files.

- crafted tar headers (negative octal, negative base-256, past the end, …) through `build --source facegen`,
  `report` and `curate`: counted skips with their reason, in bounded time and memory;
- sample indexes that lie (labels, keys, identities, lengths running into a sparse tail of gigabytes): the shard is
  read from its headers instead, identities are never merged, nothing large is read;
- members over the cap, identities over the budget, and a read-ahead of members just under the cap: skips with
  their reason, and a build under 1.5 GB where one without the bound took 1.7 GB.

The memory cases run in one child process that resets its own peak (``/proc/self/clear_refs``) before each command
and reads it (``VmHWM``) after: ``ru_maxrss`` of a child starts from the test session's peak.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import build
from facegen.layout import OutputFolder
from facegen.layout.records import SampleIndex
from facegen.published import MAX_MEMBER_BYTES, MAX_SAMPLE_BYTES, PublishedDataset
from facegen.testing.folder import write_folder_source
from facegen.testing.hostile import TAR_CASES, crafted_tar_bytes, write_sparse_shard
from facegen.testing.output import write_output_folder

PEAK_RSS_LIMIT = 1.5e9  # bytes; the imports alone take about 0.5 GB
# Each command in-process, its peak memory reset before it and read after it, its time measured
CHILD = r"""
import json, sys, time
from pathlib import Path
from facegen.cli import main

def peak():
    status = Path("/proc/self/status").read_text()
    return int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1]) * 1024

results = []
for args in json.loads(sys.argv[1]):
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    started = time.perf_counter()
    try:
        main(args, standalone_mode=False)
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    results.append({"command": args[0], "code": code, "seconds": time.perf_counter() - started, "peak": peak()})
print(json.dumps(results))
"""


def run_measured(commands, timeout):
    """Run facegen commands (argument lists) in one child: [{command, code, seconds, peak}], its stderr."""
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps([list(map(str, c)) for c in commands])],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in results:
        print(f"{r['command']}: exit {r['code']}, {r['seconds']:.1f} s, peak RSS {r['peak'] / 1e9:.2f} GB")
    return results, proc.stderr


def run_json(out):
    return json.loads((out / ".facegen" / "run.json").read_text())


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    """A real build: 8 identities of 3 images in 4 shuffled shards, each with its sample index."""
    root = tmp_path_factory.mktemp("honest")
    src = write_folder_source(root / "src", identities=8, images_per_identity=3)
    build("--source", "folder", "--source-path", src, "--plugin", "passthrough", "--out", root / "out",
          "--shard-samples", 6)
    dataset = PublishedDataset(root / "out")
    assert dataset.indexed_shards == 4 and dataset.identities[3] == "3" and dataset.identities[7] == "7"
    return root / "out", {i: sorted(s.key for s in samples) for i, samples in dataset.by_identity.items()}


def lie(out, tmp_path, change):
    """A copy of ``out`` whose sample indexes are rewritten by ``change(index) -> index`` (where it lies)."""
    copy = tmp_path / "lying"
    shutil.copytree(out, copy)
    for path in sorted(OutputFolder(copy).shard_index_dir.glob("*.json")):
        index = SampleIndex.read(path)
        change(index).write(path)
    return copy


def with_rows(index, **columns):
    return SampleIndex(**{**{k: getattr(index, k) for k in ("tar", "tar_bytes", "keys", "identities", "cls",
                                                              "offsets", "lengths")}, **columns})


def merge_three_into_seven(index, keys=False, labels=True):
    """identity 3's rows say identity 7 (and label 7, and keys 000007_…, as asked)."""
    seven = "7"
    rows = [i for i, c in enumerate(index.cls) if c == 3]
    identities = [seven if i in rows else v for i, v in enumerate(index.identities)]
    cls = [7 if i in rows and labels else v for i, v in enumerate(index.cls)]
    names = [f"000007_{k.split('_')[1]}" if i in rows and keys else k for i, k in enumerate(index.keys)]
    return with_rows(index, identities=identities, cls=cls, keys=names)


@pytest.mark.parametrize("lie_kind", ["label", "label and key", "identity only"])
def test_a_lying_sample_index_never_merges_two_identities(honest, tmp_path, lie_kind):
    """The index says identity 3's samples are identity 7's: by their label alone (its keys still say 3), with
    keys renamed to match (the tar's headers still say 3), or by the identity alone (label 3 then has two
    identities): each lying shard is read from its headers, and every identity keeps exactly its samples."""
    out, truth = honest
    change = {"label": lambda ix: merge_three_into_seven(ix),
              "label and key": lambda ix: merge_three_into_seven(ix, keys=True),
              "identity only": lambda ix: merge_three_into_seven(ix, labels=False)}[lie_kind]
    lying = lie(out, tmp_path, change)
    dataset = PublishedDataset(lying)
    assert {i: sorted(s.key for s in samples) for i, samples in dataset.by_identity.items()} == truth
    holding_three = sum(3 in SampleIndex.read(p).cls for p in OutputFolder(out).shard_index_dir.glob("*.json"))
    assert dataset.indexed_shards < 4 and dataset.indexed_shards >= 4 - holding_three
    assert not dataset.skipped


def test_an_index_whose_span_does_not_start_with_its_sample_is_not_used(honest, tmp_path):
    out, truth = honest
    swapped = lie(out, tmp_path, lambda ix: with_rows(ix, keys=[ix.keys[1], ix.keys[0], *ix.keys[2:]],
                                                       cls=[ix.cls[1], ix.cls[0], *ix.cls[2:]],
                                                       identities=[ix.identities[1], ix.identities[0],
                                                                   *ix.identities[2:]]))
    dataset = PublishedDataset(swapped)
    assert {i: sorted(s.key for s in samples) for i, samples in dataset.by_identity.items()} == truth
    assert dataset.indexed_shards == sum(  # shards whose first two samples share a key prefix are untouched
        SampleIndex.read(p).keys[0] == SampleIndex.read(p).keys[1] for p in OutputFolder(out).shard_index_dir.glob("*"))


def sparse_tail(out, tmp_path):
    """A copy of ``out`` whose shard 0 grew a sparse tail of 3.37 GB that its index's last sample now spans (and its
    size says), and whose shard 1's last sample claims just under MAX_SAMPLE_BYTES of that kind of tail."""
    copy = tmp_path / "sparse-tail"
    shutil.copytree(out, copy)
    folder = OutputFolder(copy)
    for shard, extra in ((0, int(3.37e9)), (1, MAX_SAMPLE_BYTES - (1 << 20))):
        place = folder.shard(shard)
        with open(place.tar, "r+b") as f:
            f.truncate(place.tar.stat().st_size + extra // 512 * 512)
        index = SampleIndex.read(place.index)
        lengths = [*index.lengths[:-1], index.lengths[-1] + extra // 512 * 512 - 1024]
        with_rows(index, lengths=lengths, tar_bytes=place.tar.stat().st_size).write(place.index)
    return copy


def near_cap_dataset(root):
    """A facegen dataset whose shard 1 holds 96 images just under the member cap (1.5 GB, sparse on the disk), one
    image over the cap, and one identity of 18 near-cap images (over the identity budget at its 18th)."""
    dataset = write_output_folder(root / "near-cap", identities=2, images_per_identity=2, shard_size=2)
    under = MAX_MEMBER_BYTES - (1 << 20)
    samples = [(f"{c:06d}_000", c, f"big{c}", under) for c in range(2, 98)]
    samples.append(("000098_000", 98, "over", MAX_MEMBER_BYTES))
    write_sparse_shard(dataset / "data" / "train" / "train-000001.tar", samples)
    write_sparse_shard(dataset / "data" / "train" / "train-000002.tar",
                       [(f"000099_{n:03d}", 99, "heavy", under) for n in range(18)])
    return dataset


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    """A facegen dataset of 2 good shards and one shard of each crafted header (16 MB of good members first)."""
    root = tmp_path_factory.mktemp("crafted")
    dataset = write_output_folder(root / "dataset", identities=4, images_per_identity=3, shard_size=2)
    for number, case in enumerate(TAR_CASES, start=2):
        (dataset / "data" / "train" / f"train-{number:06d}.tar").write_bytes(
            crafted_tar_bytes(case, key=f"{900000 + number:06d}_000", padding=16 << 20))
    return dataset


@pytest.mark.slow
def test_hostile_shards_and_indexes_through_every_reader_in_bounded_time_and_memory(crafted, honest, tmp_path):
    """One child runs each command on its hostile dataset, its peak memory measured alone:

    - crafted headers: `build --source facegen`, `report` (tiny recogniser) and `curate` end in seconds with one
      unreadable shard per crafted one counted (read naively, three of them loop forever);
    - a sparse tail of 3.37 GB behind a lying index: `build --source facegen` and `card` (its preview reads spans
      from the index) read nothing of it (3.37 GB before);
    - 96 images just under the member cap, one over it, an identity over its budget: skips with their reasons,
      and the read-ahead holds the build under 1.5 GB (1.74 GB without its byte bound)."""
    from facegen.testing.arcface import write_tiny_face_models

    models = write_tiny_face_models(tmp_path / "models")
    recogniser = ["--recognizer", "arcface", "--model-dir", models, "--batch-size", 8]
    tail = sparse_tail(honest[0], tmp_path)
    near_cap = near_cap_dataset(tmp_path)
    commands = [  # the builds first: a later command's peak counts what earlier ones left loaded (the recogniser)
        ["build", "--source", "facegen", "--source-path", near_cap, "--plugin", "passthrough", "--out",
         tmp_path / "from-near-cap"],
        ["build", "--source", "facegen", "--source-path", crafted, "--plugin", "passthrough", "--out",
         tmp_path / "from-crafted"],
        ["build", "--source", "facegen", "--source-path", tail, "--plugin", "passthrough", "--out",
         tmp_path / "from-tail"],
        ["card", tail],
        ["report", crafted, *recogniser],
        ["curate", crafted, "--out", tmp_path / "curated", *recogniser, "--dedup", "1", "--min-similarity", "-1"],
    ]
    started = time.monotonic()
    # a hang shows as a timeout: over 10x what the child takes on a loaded 2-core machine
    results, err = run_measured(commands, timeout=600)
    print(f"child: {time.monotonic() - started:.1f} s")
    assert "Traceback" not in err
    assert [r["code"] for r in results] == [0] * len(commands), err[-3000:]
    for r in results:
        assert r["peak"] < PEAK_RSS_LIMIT, r
    assert all(r["seconds"] < 60 for r in results[1:]), results  # the hostile headers and indexes

    crafted_skips = {"unreadable shard": len(TAR_CASES), "truncated sample": len(TAR_CASES)}
    assert run_json(tmp_path / "from-crafted")["source"]["provenance"]["parent_unreadable"] == crafted_skips
    report = json.loads((crafted / ".facegen" / "report.json").read_text())
    assert report["dataset"]["unreadable"] == crafted_skips
    curated = run_json(tmp_path / "curated")
    assert curated["source"]["provenance"]["parent_unreadable"] == crafted_skips
    assert curated["totals"]["images"] == 4 * 3

    from_tail = run_json(tmp_path / "from-tail")
    assert from_tail["totals"]["images"] == 8 * 3 and from_tail["source"]["provenance"]["parent_unreadable"] == {}
    assert (tail / "preview.jpg").stat().st_size > 0

    near = run_json(tmp_path / "from-near-cap")
    # the heavy identity's 18 images of 15 MB: 17 fit in its 256 MiB
    assert near["totals"]["images"] == 2 * 2 + 96 + 17
    assert near["totals"]["skipped"] == {"member too large": 1, "identity over the size limit": 1}


def test_a_member_over_the_cap_is_never_read(tmp_path):
    dataset = write_output_folder(tmp_path / "dataset", identities=2, images_per_identity=1, shard_size=2)
    write_sparse_shard(dataset / "data" / "train" / "train-000001.tar", [("000005_000", 5, "huge", 3 << 30)])
    parent = PublishedDataset(dataset)
    [sample] = parent.by_identity["huge"]
    with pytest.raises(OSError, match="over the 16,777,216 a facegen dataset's member may hold"):
        parent.image(sample)


def test_the_preview_never_decodes_an_image_over_the_builds_pixel_limit(tmp_path):
    """A shard whose first image is a black PNG of 8192x4097 (just over MAX_PIXELS; small on the disk, 100 MB as RGB
    once decoded) and whose second is a black 64x64: the first tile stays blank (white), the second is drawn."""
    import io

    from PIL import Image

    from facegen.builders.engine.images import MAX_PIXELS
    from facegen.cards.preview import GAP, TILE, preview_grid
    from facegen.testing.hostile import ustar_header

    def png(width, height):
        buffer = io.BytesIO()
        Image.new("L", (width, height)).save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()

    assert 8192 * 4097 > MAX_PIXELS
    shard = tmp_path / "train-000000.tar"
    with open(shard, "wb") as f:
        for key, data in (("000000_000", png(8192, 4097)), ("000001_000", png(64, 64))):
            f.write(ustar_header(f"{key}.png", b"%011o\0" % len(data)) + data + bytes(-len(data) % 512))
        f.write(bytes(1024))
    with Image.open(io.BytesIO(preview_grid([shard], "png"))) as grid:
        grid = grid.convert("L")
        centre = 16 + GAP + TILE // 2
        assert grid.getpixel((GAP + TILE // 2, centre)) > 225  # the huge image: no tile
        assert grid.getpixel((2 * GAP + TILE + TILE // 2, centre)) < 30  # the small one: drawn
