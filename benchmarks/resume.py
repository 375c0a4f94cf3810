"""What rerunning a finished build costs against the build itself (the XXH3-128 check of every kept file).

    python benchmarks/resume.py [--images 20000] [--work DIR] [--modes shards,units] [--rounds 2]

Makes (once, cached in --work) a folder source of 112x112 PNG faces of ~20-25 KB each (DigiFace-like; the same as
benchmarks/passthrough.py), then for each mode builds it with `facegen build --plugin passthrough` in a fresh
process and reruns the same command on the finished folder, twice per round:

  shards  passthrough as it is: the published shards are the units of work (a rerun checks every shard)
  units   passthrough run as an identity-level transform (units of work under .facegen/units/, then the shards
          assembled from them; a rerun checks every unit and every shard): the path of arc2face and e4e, whose
          generation would otherwise dominate the build's time

and prints each run's wall time (process start to exit, imports included) and the rerun's share of the build. The
page cache is warm for the rerun (the build has just written the files), as for a rerun right after an
interruption; `--drop-caches` (root) measures a rerun that reads every file from the disk.
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

from facegen.testing.folder import write_folder_source

IMAGES_PER_IDENTITY = 40
UNITS = """
import sys
from facegen.plugins.passthrough import Passthrough
Passthrough.per_image = False  # as an identity-level transform: units of work, then the assembly
from facegen.cli import main
sys.argv = ["facegen", *sys.argv[1:]]
main()
"""


def make_source(work: Path, images: int) -> Path:
    src = work / f"src-{images}-v2"
    if not (src / ".complete").exists():
        shutil.rmtree(src, ignore_errors=True)
        write_folder_source(src, identities=images // IMAGES_PER_IDENTITY, images_per_identity=IMAGES_PER_IDENTITY)
        (src / ".complete").touch()
    return src


def timed(mode: str, args: list[str], drop_caches: bool = False) -> tuple[float, str]:
    if drop_caches:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    command = [sys.executable, "-c", UNITS, *args] if mode == "units" else [sys.executable, "-m", "facegen", *args]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"facegen failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/facegen-resume-bench"))
    parser.add_argument("--modes", default="shards,units")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--drop-caches", action="store_true")
    options = parser.parse_args()
    src = make_source(options.work, options.images)
    data_bytes = sum(p.stat().st_size for p in src.rglob("*.png"))
    results = {}
    for mode in options.modes.split(","):
        builds, reruns = [], []
        for _ in range(options.rounds):
            out = options.work / f"out-{mode}"
            shutil.rmtree(out, ignore_errors=True)
            args = ["build", "--source", "folder", "--source-path", str(src), "--plugin", "passthrough", "--out",
                    str(out), "--shard-size", "100", "--shard-samples", "2000"]
            seconds, _ = timed(mode, args)
            builds.append(seconds)
            for _ in range(2):
                seconds, stdout = timed(mode, args, options.drop_caches)
                assert "nothing to do" in stdout, stdout
                reruns.append(seconds)
        kept = sum(p.stat().st_size for p in out.rglob("*.tar"))
        results[mode] = {"build_s": statistics.median(builds), "rerun_s": statistics.median(reruns),
                         "rerun_share": statistics.median(reruns) / statistics.median(builds),
                         "tar_bytes_checked": kept}
    print(json.dumps({"images": options.images, "source_bytes": data_bytes, "cpus": os.cpu_count(),
                      "load": os.getloadavg(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
