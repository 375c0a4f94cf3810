"""Passthrough build rate against the practical limit: copying the same encoded bytes into tars.

    python benchmarks/passthrough.py [--images 20000] [--work DIR]

Makes (once, cached in --work) a folder source of 112x112 PNG faces of ~20-25 KB each (DigiFace-like), then in
one run measures:
  raw      webdataset.TarWriter writing the same file bytes (read from disk) into tars, in-process
  facegen  `facegen build --plugin passthrough` with 1 process and with 2 processes (torchrun), timed inside:
           images / (last shard finished - first shard started), from the shard stats, so process start-up,
           imports and the process-group rendezvous are excluded
and prints images/s and the ratios (targets: 1 process >= 0.8x raw, 2 processes >= 1.6x 1 process).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import webdataset as wds

from facegen.testing.folder import write_folder_source

BIN = Path(sys.executable).parent
IMAGES_PER_IDENTITY = 40


def make_source(work: Path, images: int) -> Path:
    src = work / f"src-{images}-v2"
    if not (src / ".complete").exists():
        shutil.rmtree(src, ignore_errors=True)
        write_folder_source(src, identities=images // IMAGES_PER_IDENTITY, images_per_identity=IMAGES_PER_IDENTITY)
        (src / ".complete").touch()
    return src


def raw_rate(src: Path, out: Path, identities: int, shard_size: int) -> float:
    """Read each file and write its bytes into tars of the same grouping as facegen's shards."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ids = sorted((d for d in os.listdir(src) if not d.startswith(".")), key=int)[:identities]
    count = 0
    started = time.perf_counter()
    for shard_start in range(0, len(ids), shard_size):
        with open(out / f"{shard_start:06d}.tar", "wb") as f:
            writer = wds.TarWriter(f, encoder=False, mtime=0)
            for cls, ident in enumerate(ids[shard_start:shard_start + shard_size], start=shard_start):
                folder = src / ident
                for n, name in enumerate(sorted(os.listdir(folder), key=lambda s: int(s.split(".")[0]))):
                    data = (folder / name).read_bytes()
                    writer.write({"__key__": f"{cls:06d}_{n:03d}", "png": data})
                    count += 1
            writer.close()
    return count / (time.perf_counter() - started)


def facegen_rate(src: Path, out: Path, identities: int, shard_size: int, processes: int) -> float:
    """facegen writes shards of the same sample count, each read from the source in the shuffled order."""
    shutil.rmtree(out, ignore_errors=True)
    args = ["build", "--source", "folder", "--source-path", str(src), "--plugin", "passthrough", "--out", str(out),
            "--shard-samples", str(shard_size * IMAGES_PER_IDENTITY), "--limit-identities", str(identities)]
    if processes == 1:
        cmd = [str(BIN / "facegen"), *args]
    else:
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(processes), "--no-python", str(BIN / "facegen"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    stats = [json.loads(p.read_text()) for p in (out / ".facegen" / "shards").glob("*.json")]
    assert {s["written_by"]["processes"] for s in stats} == {processes}
    span = max(s["finished_at"] for s in stats) - min(s["started_at"] for s in stats)
    return sum(s["images"] for s in stats) / span


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--work", default="/tmp/facegen-bench")
    parser.add_argument("--shard-size", type=int, default=50, help="identities per shard (50 x 40 = 2000 images)")
    parser.add_argument("--repeat", type=int, default=3, help="best of N for each measurement")
    args = parser.parse_args()
    work = Path(args.work)
    src = make_source(work, args.images)
    identities = args.images // IMAGES_PER_IDENTITY
    sizes = [os.path.getsize(src / "0" / name) for name in os.listdir(src / "0")]
    print(f"source: {identities} identities x {IMAGES_PER_IDENTITY} PNG 112x112, mean {sum(sizes) / len(sizes) / 1024:.1f} KB")

    raw = max(raw_rate(src, work / "raw", identities, args.shard_size) for _ in range(args.repeat))
    one = max(facegen_rate(src, work / "fg1", identities, args.shard_size, 1) for _ in range(args.repeat))
    two = max(facegen_rate(src, work / "fg2", identities, args.shard_size, 2) for _ in range(args.repeat))
    print(f"raw TarWriter copy      {raw:9.0f} images/s")
    print(f"facegen, 1 process      {one:9.0f} images/s   {one / raw:.2f}x raw   (target >= 0.8x)")
    print(f"facegen, 2 processes    {two:9.0f} images/s   {two / one:.2f}x 1 process   (target >= 1.6x)")


if __name__ == "__main__":
    main()
