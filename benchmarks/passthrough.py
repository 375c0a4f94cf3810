"""Passthrough build rate against the practical limit: copying the same encoded bytes into tars.

    python benchmarks/passthrough.py [--images 20000] [--rounds 3] [--processes 1,2] [--work DIR]

Makes (once, cached in --work) a folder source of 112x112 PNG faces of ~20-25 KB each (DigiFace-like), then
alternates, round after round (so that a slow spell of a shared machine hits every measurement alike):
  raw      webdataset.TarWriter writing the same file bytes (read from disk) into tars, in-process
  facegen  `facegen build --plugin passthrough` with --verify full (every image decoded once) and --verify header,
           each with 1 process and with 2 processes (torch.distributed.run), timed inside:
           images / (last shard finished - first shard started), from the shard stats, so process start-up,
           imports and the process-group rendezvous are excluded
and prints, per configuration, the median over rounds of images/s and of the ratio to that round's raw copy
(targets: --verify header >= 0.8x raw and --verify full >= 0.35x raw with 1 process; 2 processes >= 1.6x 1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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


def facegen_rate(src: Path, out: Path, identities: int, shard_size: int, processes: int, verify: str) -> float:
    """facegen writes shards of the same sample count, each read from the source in the shuffled order."""
    shutil.rmtree(out, ignore_errors=True)
    args = ["build", "--source", "folder", "--source-path", str(src), "--plugin", "passthrough", "--out", str(out),
            "--shard-samples", str(shard_size * IMAGES_PER_IDENTITY), "--limit-identities", str(identities),
            "--verify", verify]
    if processes == 1:
        cmd = [str(BIN / "facegen"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--no-python",
               str(BIN / "facegen"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    stats = [json.loads(p.read_text()) for p in (out / ".facegen" / "shards").glob("*.json")]
    assert {s["written_by"]["processes"] for s in stats} == {processes}
    assert {s["verify"] for s in stats} == {verify}
    span = max(s["finished_at"] for s in stats) - min(s["started_at"] for s in stats)
    return sum(s["images"] for s in stats) / span


CONFIGS = [("full", 1), ("header", 1), ("full", 2), ("header", 2)]
TARGETS = {("full", 1): "target >= 0.35x raw", ("header", 1): "target >= 0.8x raw"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--work", default="/tmp/facegen-bench")
    parser.add_argument("--shard-size", type=int, default=50,
                        help="identities per raw tar; facegen's shards hold as many samples (50 x 40 = 2000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of raw and every configuration, alternated")
    parser.add_argument("--processes", default="1,2", help="process counts to measure (1 alone on a small machine)")
    args = parser.parse_args()
    counts = {int(n) for n in args.processes.split(",")}
    configs = [(verify, processes) for verify, processes in CONFIGS if processes in counts]
    work = Path(args.work)
    src = make_source(work, args.images)
    identities = args.images // IMAGES_PER_IDENTITY
    sizes = [os.path.getsize(src / "0" / name) for name in os.listdir(src / "0")]
    print(f"source: {identities} identities x {IMAGES_PER_IDENTITY} PNG 112x112, "
          f"mean {sum(sizes) / len(sizes) / 1024:.1f} KB; {os.cpu_count()} CPUs; {args.rounds} rounds")

    raw: list[float] = []
    rates: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    for round_ in range(args.rounds):
        raw.append(raw_rate(src, work / "raw", identities, args.shard_size))
        line = [f"round {round_ + 1}: raw {raw[-1]:.0f}"]
        for verify, processes in configs:
            rate = facegen_rate(src, work / f"fg-{verify}-{processes}", identities, args.shard_size, processes,
                                verify)
            rates[verify, processes].append(rate)
            line.append(f"{verify}/{processes}p {rate:.0f} ({rate / raw[-1]:.2f}x)")
        print(", ".join(line), flush=True)

    print(f"raw TarWriter copy                 {statistics.median(raw):9.0f} images/s (median)")
    for verify, processes in configs:
        ratios = [rate / base for rate, base in zip(rates[verify, processes], raw)]
        target = TARGETS.get((verify, processes), "")
        if processes == 2 and (verify, 1) in rates:
            scaling = statistics.median(r2 / r1 for r2, r1 in zip(rates[verify, 2], rates[verify, 1]))
            target = f"{scaling:.2f}x 1 process (target >= 1.6x)"
        print(f"facegen --verify {verify:<6} {processes} proc  {statistics.median(rates[verify, processes]):9.0f} "
              f"images/s   median {statistics.median(ratios):.2f}x raw (rounds: "
              f"{', '.join(f'{r:.2f}' for r in ratios)})   {target}")


if __name__ == "__main__":
    main()
