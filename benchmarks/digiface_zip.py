"""Passthrough build rate from DigiFace zip parts against copying the same bytes into tars.

    python benchmarks/digiface_zip.py [--images 20160] [--work DIR] [--repeat 2]

Makes (once, cached in --work) two DigiFace-layout zip parts of 112x112 PNG faces (~20-25 KB each, 72 images per
identity, deflated like the published zips), then in one run measures:
  raw      the practical limit: read each member with zipfile (inflate + CRC) and write its bytes with
           webdataset.TarWriter into tars grouped like facegen's shards, in-process
  facegen  `facegen build --source digiface --plugin passthrough` on the zips, 1 process, as the marginal rate
           between a half-size and a full-size build (fastest of --repeat runs of each size, so process start-up,
           imports and the zip index cancel out), and the rate the build itself reports (time inside its run loop)
and prints images/s and the ratios against raw (target >= 0.8x).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import webdataset as wds

from facegen.testing.digiface import part_name, write_digiface_part

BIN = Path(sys.executable).parent
IMAGES_PER_IDENTITY = 72
PARTS = 2


NOISE = 6.0  # pixel noise of the drawn faces: ~22 KB per 112x112 PNG, like DigiFace's crops


def make_source(work: Path, identities: int) -> Path:
    src = work / f"digiface-zips-{identities}-noise{NOISE:g}"
    if not (src / ".complete").exists():
        shutil.rmtree(src, ignore_errors=True)
        per_part = identities // PARTS
        for p in range(PARTS):
            ids = range(p * per_part, (p + 1) * per_part if p < PARTS - 1 else identities)
            write_digiface_part(src, ids=ids, images_per_identity=IMAGES_PER_IDENTITY,
                                name=part_name(ids[0], ids[-1], IMAGES_PER_IDENTITY), noise=NOISE)
        (src / ".complete").touch()
    return src


def raw_rate(src: Path, out: Path, identities: int, shard_size: int) -> tuple[float, float, int]:
    """zipfile reads of each member, bytes written with TarWriter, in the shards' grouping.

    Returns (images per wall second, images per CPU second, images)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    count = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    archives = [zipfile.ZipFile(p) for p in sorted(src.glob("*.zip"))]
    where = {}
    for archive in archives:
        for name in archive.namelist():
            if name.endswith(".png"):
                ident, image = name.split("/")
                where.setdefault(int(ident), []).append((int(image[:-4]), archive, name))
    ids = sorted(where)[:identities]
    for shard_start in range(0, len(ids), shard_size):
        with open(out / f"{shard_start:06d}.tar", "wb") as f:
            writer = wds.TarWriter(f, encoder=False, mtime=0)
            for cls, ident in enumerate(ids[shard_start:shard_start + shard_size], start=shard_start):
                for n, (_, archive, name) in enumerate(sorted(where[ident], key=lambda t: t[0])):
                    writer.write({"__key__": f"{cls:06d}_{n:03d}", "png": archive.read(name)})
                    count += 1
            writer.close()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    for archive in archives:
        archive.close()
    return count / seconds, count / cpu, count


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def facegen_run(src: Path, out: Path, identities: int, shard_size: int) -> tuple[float, float, float]:
    """(wall seconds of the whole command, its CPU seconds, images/s the build reports from inside its loop)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(BIN / "facegen"), "build", "--source", "digiface", "--source-path", str(src), "--plugin",
           "passthrough", "--out", str(out), "--shard-size", str(shard_size), "--limit-identities", str(identities)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    started, cpu_started = time.perf_counter(), children_cpu()
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    seconds, cpu = time.perf_counter() - started, children_cpu() - cpu_started
    inside = re.search(r"= ([0-9.]+) images/s", proc.stdout)
    return seconds, cpu, float(inside.group(1)) if inside else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_160, help="at least this many images (72 per identity)")
    parser.add_argument("--work", default="/tmp/facegen-bench-digiface")
    parser.add_argument("--shard-size", type=int, default=14, help="identities per shard (14 x 72 = 1008 images)")
    parser.add_argument("--repeat", type=int, default=5, help="best of N for each measurement")
    args = parser.parse_args()
    work = Path(args.work)
    identities = -(-args.images // IMAGES_PER_IDENTITY)
    started = time.perf_counter()
    src = make_source(work, identities)
    zips = sorted(src.glob("*.zip"))
    total_bytes = sum(p.stat().st_size for p in zips)
    print(f"source: {len(zips)} zip parts, {identities} identities x {IMAGES_PER_IDENTITY} PNG 112x112 = "
          f"{identities * IMAGES_PER_IDENTITY} images, {total_bytes / 2**20:.0f} MiB, "
          f"mean {total_bytes / (identities * IMAGES_PER_IDENTITY) / 1024:.1f} KB per member "
          f"(ready in {time.perf_counter() - started:.0f} s)")

    half = identities // 2
    raws, halves, fulls, inside = [], [], [], []
    for _ in range(args.repeat):  # interleaved, so that other load on the machine hits every measurement alike
        raws.append(raw_rate(src, work / "raw", identities, args.shard_size))
        halves.append(facegen_run(src, work / "fg-half", half, args.shard_size))
        full = facegen_run(src, work / "fg-full", identities, args.shard_size)
        fulls.append(full)
        inside.append(full[2])
    raw, raw_cpu = max(r[0] for r in raws), max(r[1] for r in raws)
    extra_images = (identities - half) * IMAGES_PER_IDENTITY
    one = extra_images / (min(f[0] for f in fulls) - min(h[0] for h in halves))
    one_cpu = extra_images / (min(f[1] for f in fulls) - min(h[1] for h in halves))
    one_inside = max(inside)
    print(f"facegen wall seconds: half ({half} identities) {', '.join(f'{h[0]:.2f}' for h in halves)}; "
          f"full ({identities}) {', '.join(f'{f[0]:.2f}' for f in fulls)}")
    print(f"raw images/s: {', '.join(f'{r[0]:.0f}' for r in raws)}")
    print(f"raw zipfile -> TarWriter copy     {raw:9.0f} images/s   ({raws[0][2]} images)")
    print(f"facegen digiface, marginal rate   {one:9.0f} images/s   {one / raw:.2f}x raw   (target >= 0.8x)")
    print(f"facegen digiface, inside the run  {one_inside:9.0f} images/s   {one_inside / raw:.2f}x raw")
    print(f"per CPU second: raw {raw_cpu:.0f}, facegen marginal {one_cpu:.0f} images/s   "
          f"{one_cpu / raw_cpu:.2f}x raw   (less sensitive to other load on the machine)")


if __name__ == "__main__":
    main()
