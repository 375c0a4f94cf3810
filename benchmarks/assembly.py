"""What a second copy of every byte costs: passthrough writing the published shards directly (per-image, what
facegen does) against the same passthrough forced through units of work + assembly (what identity-level
transforms do).

    python benchmarks/assembly.py [--images 20000] [--work DIR] [--rounds 3]

Both builds run in this process on the same folder source (112x112 PNGs of ~20-25 KB, cached in --work), in
alternating rounds; it prints the median of each: images/s, and for the units build the assembly's share of its
time (the summary's figure). The shards of the two builds hold the same samples in the same order.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from passthrough import IMAGES_PER_IDENTITY, make_source  # noqa: E402

from facegen.builders.engine.options import BuildConfig  # noqa: E402
from facegen.builders.engine.run import Build  # noqa: E402
from facegen.plugins.passthrough import Passthrough  # noqa: E402


class SingleProcess:
    process_index, num_processes, is_main_process, device = 0, 1, True, "cpu"


def one_build(src: Path, out: Path, images: int, shard_samples: int, per_image: bool):
    shutil.rmtree(out, ignore_errors=True)
    Passthrough.per_image = per_image
    try:
        config = BuildConfig(source="folder", source_path=str(src), plugin="passthrough", out=str(out),
                             shard_size=50, shard_samples=shard_samples,
                             limit_identities=images // IMAGES_PER_IDENTITY)
        summary = Build.prepare(config, SingleProcess()).run()  # its seconds: planning to the last shard, no card
        return summary.images / summary.seconds, summary.assembly_seconds / summary.seconds
    finally:
        Passthrough.per_image = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--work", default="/tmp/facegen-bench")
    parser.add_argument("--shard-samples", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(args.work)
    src = make_source(work, args.images)
    direct, units, shares = [], [], []
    for _ in range(args.rounds):
        direct.append(one_build(src, work / "direct", args.images, args.shard_samples, True)[0])
        rate, share = one_build(src, work / "units", args.images, args.shard_samples, False)
        units.append(rate)
        shares.append(share)
    d, u = statistics.median(direct), statistics.median(units)
    print(f"per-image, shards written directly   {d:8.0f} images/s (median of {args.rounds})")
    print(f"units + assembly (a second copy)     {u:8.0f} images/s = {u / d:.2f}x; assembly "
          f"{100 * statistics.median(shares):.0f}% of that run")


if __name__ == "__main__":
    main()
