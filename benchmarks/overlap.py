"""Does generation wait? An arc2face build whose generator is a stand-in that sleeps per micro-batch, as a GPU
kernel frees the CPU, streamed as `facegen build` runs it, against the same build made sequential, in one run
(issue 21 §1).

    python benchmarks/overlap.py            # CPU, tiny models; about 2 minutes on 2 cores

1. calibration: the sequential build with a stand-in that does not sleep. What passes between two generator calls
   is the rest of the pipeline's work for one micro-batch (here a call's batch is one micro-batch, so it holds the
   post-processing, the checks, the PNG encoding and the writing of one call, and the source reading and planning
   of the next); its median is the stand-in's sleep from then on: by default the wall time it takes, which on an
   idle machine is its CPU time (both are printed), and under load the time the work really takes: a CPU time
   would then leave the CPU work longer than the sleep, and the ratio would measure the load, not the overlap
   (``--sleep-from cpu`` takes the process CPU time instead).
2. rounds: the sequential build, then the streamed build, on fresh folders. ratio = the build's wall time (models
   loaded before the clock starts: a once-per-process cost) / the generator's busy time (its sleeps). A sequential
   loop scores about 2.0 (the sleep, then as much CPU work), a build in which generation never waits about 1.0
   (plus filling and draining the pipeline, and the assembly and card after the last unit).

The sequential build is the same code with each stage made in its consumer's turn: ``run_ahead`` without its thread,
the source read without read-ahead, post-processing inline. The stand-in's images are fixed noise at the tiny
model's resolution (post-processing, checks and encoding cost what they cost on any image of that size).

The last line is ``overlap: wall/generator = X.XX``: the streamed build's median over the rounds (target ≤ 1.10).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import Future
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


class StandIn:
    """``Arc2FaceGenerator.generate`` replaced: sleeps ``seconds`` per micro-batch and returns fixed images; records
    each call's wall span and the process CPU time at its ends."""

    def __init__(self, resolution: int):
        rng = np.random.default_rng(0)
        self.pool = rng.integers(0, 256, (16, resolution, resolution, 3), dtype=np.uint8)
        self.seconds = 0.0
        self.calls: list[tuple[float, float, float, float]] = []  # (start, end, cpu at start, cpu at end)

    def generate(self, generator, cond, seeds):
        cpu, start = time.process_time(), time.perf_counter()
        if self.seconds:
            time.sleep(self.seconds)
        images = self.pool[[seed % len(self.pool) for seed in seeds]]
        self.calls.append((start, time.perf_counter(), cpu, time.process_time()))
        return images

    def busy(self) -> float:
        return sum(end - start for start, end, _, _ in self.calls)

    def between_calls(self, clock: str) -> list[float]:
        """Wall or process CPU seconds from the end of each call to the start of the next."""
        if clock == "cpu":
            return [nxt[2] - prev[3] for prev, nxt in zip(self.calls, self.calls[1:])]
        return [nxt[0] - prev[1] for prev, nxt in zip(self.calls, self.calls[1:])]


class InTurn:
    """``run_ahead``'s interface without its thread: each item is made when the consumer asks for it."""

    def __init__(self, items, depth: int, name: str):
        self.items = iter(items)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.items)

    def close(self) -> None:
        close = getattr(self.items, "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class Inline:
    """A post-processing pool that runs each task in the caller's turn."""

    def __init__(self, workers: int):
        self._max_workers = workers

    def submit(self, fn, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future

    def shutdown(self, wait: bool = True) -> None:
        pass


@contextmanager
def sequential():
    """The build with every stage in its consumer's turn (see the module docstring)."""
    from facegen.builders.engine import work
    from facegen.plugins import arc2face

    real_setup = arc2face.Arc2FaceTransform.setup

    def setup(self, device):
        real_setup(self, device)
        self._post.shutdown()
        self._post = Inline(self.post_workers)

    def loaded_in_turn(pool, load, items, window, budget=None):  # _read_ahead's loads, each in its turn
        for item in items:
            results, _, rest = load(item)
            yield from results
            while rest:
                results, _, rest = load(rest)
                yield from results

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(work, "run_ahead", InTurn))
        stack.enter_context(mock.patch.object(work, "_read_ahead", loaded_in_turn))
        stack.enter_context(mock.patch.object(arc2face, "run_ahead", InTurn))
        stack.enter_context(mock.patch.object(arc2face.Arc2FaceTransform, "setup", setup))
        yield


def build_once(args, model_dir: Path, src: Path, out: Path, stand_in: StandIn) -> tuple[float, float, float, float]:
    """One build into ``out``: (wall seconds without the model loading, generator busy seconds, seconds before its
    first call (reading and planning the first call), seconds after its last (the last call's post-processing and
    writing, the assembly of the shards, the card))."""
    from tqdm.auto import tqdm

    from facegen.builders.engine import work
    from facegen.builders.engine.options import BuildConfig
    from facegen.builders.engine.run import build
    from facegen.plugins.arc2face import Arc2FaceTransform

    opts = {"model_dir": str(model_dir), "steps": "1", "latents": str(args.latents),
            "images_per_latent": str(args.images_per_latent), "batch_size": str(args.batch_size),
            "images_per_batch": str(args.batch_size * args.latents * args.images_per_latent),
            "det_size": str(args.det_size)}
    config = BuildConfig(source="folder", source_path=str(src), plugin="arc2face", plugin_opts=opts, out=str(out),
                         shard_size=args.shard_size)
    loading = []
    real_setup = Arc2FaceTransform.setup

    def timed_setup(self, device):
        start = time.perf_counter()
        real_setup(self, device)
        loading.append(time.perf_counter() - start)

    stand_in.calls.clear()
    with mock.patch.object(Arc2FaceTransform, "setup", timed_setup), \
            mock.patch.object(work.Step, "progress", lambda self, total, unit: tqdm(disable=True)):
        start = time.perf_counter()
        build(config)
        end = time.perf_counter()
    # the models load before the first generator call
    before = stand_in.calls[0][0] - start - sum(loading) if stand_in.calls else 0.0
    after = end - stand_in.calls[-1][1] if stand_in.calls else 0.0
    return end - start - sum(loading), stand_in.busy(), before, after


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--identities", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=2, help="identities per call (one micro-batch each)")
    parser.add_argument("--latents", type=int, default=2)
    parser.add_argument("--images-per-latent", type=int, default=4)
    parser.add_argument("--images-per-identity", type=int, default=2, help="source images per identity")
    parser.add_argument("--shard-size", type=int, default=20, help="identities per unit of work")
    parser.add_argument("--det-size", type=int, default=320, help="SCRFD input size (the stand-in detector's cost)")
    parser.add_argument("--sleep-from", choices=("wall", "cpu"), default="wall",
                        help="the rest's time per micro-batch that the stand-in sleeps (module docstring)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from facegen.generators.arc2face import Arc2FaceGenerator
    from facegen.testing.arc2face import write_tiny_arc2face
    from facegen.testing.folder import write_folder_source

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = write_tiny_arc2face(tmp / "models")
        src = write_folder_source(tmp / "src", identities=args.identities,
                                  images_per_identity=args.images_per_identity)
        stand_in = StandIn(resolution=128)  # the tiny UNet's 16 x the VAE's 8

        def generate(generator, cond, seeds):
            return stand_in.generate(generator, cond, seeds)

        with mock.patch.object(Arc2FaceGenerator, "generate", generate):
            with sequential():
                build_once(args, model_dir, src, tmp / "calibration", stand_in)
            rest = {clock: statistics.median(stand_in.between_calls(clock)) for clock in ("wall", "cpu")}
            stand_in.seconds = rest[args.sleep_from]
            print(f"{len(stand_in.calls)} micro-batches of {args.batch_size * args.latents * args.images_per_latent} "
                  f"images; the rest of the pipeline per micro-batch (median): {rest['wall'] * 1000:.1f} ms wall, "
                  f"{rest['cpu'] * 1000:.1f} ms CPU; the stand-in sleeps the {args.sleep_from} time", flush=True)
            ratios: dict[str, list[float]] = {"sequential": [], "streamed": []}
            for round_index in range(args.rounds):
                for name in ("sequential", "streamed"):
                    out = tmp / f"{name}-{round_index}"
                    with sequential() if name == "sequential" else ExitStack():
                        wall, busy, before, after = build_once(args, model_dir, src, out, stand_in)
                    ratios[name].append(wall / busy)
                    print(f"round {round_index + 1} {name:10s}: wall {wall:6.2f} s, generator {busy:6.2f} s "
                          f"(waiting {before:.2f} s before its first call, {wall - busy - before - after:.2f} s "
                          f"between calls, {after:.2f} s after its last), wall/generator {wall / busy:.2f}",
                          flush=True)
    sequential_ratio = statistics.median(ratios["sequential"])
    print(f"sequential: wall/generator = {sequential_ratio:.2f}")
    print(f"overlap: wall/generator = {statistics.median(ratios['streamed']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
