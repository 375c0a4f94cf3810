"""Speed of `facegen report`'s embedding pass (the whole cost of a report) on 112x112 real-face crops.

    python benchmarks/report.py --recognizer dlib --samples 10000
    python benchmarks/report.py --recognizer arcface --samples 1000            # ArcFace R100-size random weights
    python benchmarks/report.py --recognizer arcface --tiny --samples 10000    # the tests' tiny model (plumbing)
    python benchmarks/report.py --samples 400 --processes 1,2                 # `facegen report` under torchrun

The dataset is a facegen build (passthrough) of real faces (facegen.testing.real_faces: dlib-aligned crops of the
photos shipped in insightface and scikit-image, augmented), 50 images per identity, made once in --workdir.
Prints, measured in this run: samples/s of the batched pass (``embed_dataset``, what the report runs, reading and
decoding included) and of a baseline that embeds one image per network call, on --baseline-samples samples.
With ``--processes 1,2``: the whole `facegen report` command under ``torchrun --nproc_per_node N`` (CPU ranks
where there is no GPU) for each N, its pass's samples/s as report.json records it (the main process's wall time
of the embedding pass, which includes waiting for the others' pieces), the speed-up over the first N, and what
400,000 images would take at that rate.
The full-size ArcFace is insightface's IResNet-100 layout (the architecture of antelopev2's recogniser) with
random weights (``facegen.testing.arcface.write_arcface_r100``): its speed is the real model's, its embeddings are
meaningless.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np


def make_dataset(workdir: Path, samples: int) -> Path:
    from PIL import Image

    from facegen.builders.engine.options import BuildConfig
    from facegen.builders.engine.run import build
    from facegen.testing.real_faces import augment, real_face_crops

    out = workdir / f"faces-{samples}"
    if (out / "README.md").is_file():
        return out
    crops = list(real_face_crops().values())
    rng = np.random.default_rng(0)
    src = workdir / f"src-{samples}"
    for i in range(samples):
        folder = src / f"id{i // 50:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(augment(crops[(i // 50) % len(crops)], rng)).save(folder / f"{i % 50:02d}.png")
    build(BuildConfig(source="folder", source_path=str(src), plugin="passthrough", out=str(out)))
    return out


def arcface_models(args) -> Path | None:
    """The --model-dir of an arcface run (the tiny or the R100-size random weights), written once; None for dlib."""
    if args.recognizer != "arcface":
        return None
    model_dir = args.workdir / ("tiny-models" if args.tiny else "r100-models")
    if args.tiny:
        from facegen.testing.arcface import write_tiny_face_models

        write_tiny_face_models(model_dir)
    elif not (model_dir / "arc2face" / "arcface.onnx").is_file():
        from facegen.testing.arcface import write_arcface_r100

        write_arcface_r100(model_dir / "arc2face" / "arcface.onnx")
    return model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recognizer", choices=["dlib", "arcface"], default="dlib")
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--baseline-samples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="arcface: the tests' tiny random-weight model")
    parser.add_argument("--workdir", type=Path, default=Path("benchmark-report"))
    parser.add_argument("--processes", help="comma-separated process counts: run `facegen report` under torchrun")
    args = parser.parse_args()
    if args.processes:
        return processes(args, [int(n) for n in args.processes.split(",")])

    from facegen.builders.quality.report import _decode, embed_dataset, make_recognizer
    from facegen.published import PublishedDataset

    print(f"cpu cores visible: {os.cpu_count()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'default')}")
    dataset = PublishedDataset(make_dataset(args.workdir, args.samples))
    model_dir = arcface_models(args)
    recognizer = make_recognizer(args.recognizer, model_dir=str(model_dir) if model_dir else None,
                                 batch_size=args.batch_size)
    what = {"dlib": "dlib ResNet (real weights)",
            "arcface": "ArcFace tiny random weights" if args.tiny else "ArcFace IResNet-100 random weights"}

    subset = dataset.samples[:args.baseline_samples]
    start = time.perf_counter()
    for sample in subset:  # baseline: one image per call
        rgb = _decode(dataset.image(sample))[0]
        recognizer.embed([rgb])
    baseline = len(subset) / (time.perf_counter() - start)

    start = time.perf_counter()
    embeddings = embed_dataset(dataset, recognizer, batch_size=args.batch_size, progress=True)
    seconds = time.perf_counter() - start
    rate = len(dataset.samples) / seconds
    print(f"{what[args.recognizer]}: {len(dataset.samples)} samples in {seconds:.1f} s = {rate:.1f} samples/s "
          f"({int(embeddings.ok.sum())} embedded); one image per call: {baseline:.1f} samples/s "
          f"-> batched/baseline {rate / baseline:.2f}x")


def processes(args, counts: list[int]) -> None:
    """`facegen report` under torchrun for each process count (see the module docstring)."""
    import json
    import shutil
    import socket
    import subprocess
    import sys

    dataset = make_dataset(args.workdir, args.samples)
    model_dir = arcface_models(args)
    bin_dir = Path(sys.executable).parent
    print(f"cpu cores visible: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}")
    first = None
    for n in counts:
        folder = args.workdir / f"report-{args.samples}-{n}"
        shutil.rmtree(folder, ignore_errors=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        extra = ["--recognizer", args.recognizer, "--batch-size", str(args.batch_size)]
        if model_dir is not None:
            extra += ["--model-dir", str(model_dir)]
        started = time.perf_counter()
        subprocess.run([str(bin_dir / "torchrun"), "--nproc_per_node", str(n), "--master_port", str(port),
                        "--no-python", str(bin_dir / "facegen"), "report", str(dataset), "--out", str(folder),
                        *extra], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        wall = time.perf_counter() - started
        rate = json.loads((folder / "report.json").read_text())["embedding"]["samples_per_second"]
        first = first or rate
        print(f"{n} process(es): {rate:.2f} samples/s in the pass ({wall:.0f} s for the command), "
              f"{rate / first:.2f}x; 400,000 images: {400_000 / rate / 3600:.1f} h; "
              f"load average now: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
