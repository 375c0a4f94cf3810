"""e4e transform throughput, batched against a batch-of-one loop, in both modes, with random weights.

    python benchmarks/e4e.py [--size 256] [--width full|tiny] [--identities 8] [--batch 4] [--device cpu|cuda]

Builds a random-weight StyleGAN2 generator of ``--size`` and the e4e encoder (``--width full``: the published
config-f / IR-SE50 widths, 30M + 267M parameters; ``tiny``: the test fixtures' widths) in memory, then times the
transform's ``__call__`` (everything it does per identity: mapping, rendering, resizing, encoding, rendering again,
conversion to uint8) on the same identities with ``batch_size=--batch`` and with ``batch_size=1``:

  truncation  one seed per identity -> w_hi -> render -> e4e -> lerp -> render      (2 renders + 1 encode)
  project     one 112x112 source image per identity -> e4e -> render               (1 encode + 1 render)

and prints images/s for each and the batched / one-at-a-time ratio. A warm-up call precedes each timing.
"""

from __future__ import annotations

import argparse
import time

import torch

from facegen.generators.e4e import Encoder4Editing
from facegen.generators.stylegan2 import Generator
from facegen.plugins.e4e import E4ETransform
from facegen.records import Identity, SourceImage
from facegen.testing.folder import draw_face, encode
from facegen.testing.stylegan import TINY_ENCODER_WIDTHS, TINY_GENERATOR


class InMemoryE4E(E4ETransform):
    """The e4e transform with models handed over instead of read from checkpoint files (1.2 GB at full width)."""

    def __init__(self, encoder, generator, **options):
        super().__init__(checkpoint=__file__, **options)  # any existing file passes the option check
        self._models = (encoder, generator)

    def setup(self, device):
        encoder, generator = self._models
        self.device = torch.device(device)
        self.encoder = encoder.to(self.device)
        self.generator = generator.to(self.device)
        self.e4e_latent_avg = generator.latent_avg.expand(generator.n_latent, -1).clone()


def random_models(size: int, width: str):
    torch.manual_seed(0)
    if width == "full":
        generator, encoder = Generator(size), Encoder4Editing(size)
    else:
        generator = Generator(size, **TINY_GENERATOR)
        encoder = Encoder4Editing(size, style_dim=TINY_GENERATOR["style_dim"], widths=TINY_ENCODER_WIDTHS)
    for module in (generator, encoder):
        module.eval().requires_grad_(False)
    return encoder, generator


def identities(count: int, with_images: bool) -> list[Identity]:
    out = []
    for i in range(count):
        images = [SourceImage(f"{i}/0.png", encode(draw_face(i), "png"), "png")] if with_images else []
        out.append(Identity(str(i), i, 1000 + i, images=images))
    return out


def rate(transform, batch: list[Identity], per_call: int, device: str) -> float:
    list(transform(batch[:per_call]))  # warm-up (allocator, kernels)
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    made = 0
    for start in range(0, len(batch), per_call):
        made += sum(len(r.faces) for r in transform(batch[start:start + per_call]))
    if device == "cuda":
        torch.cuda.synchronize()
    return made / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--width", choices=("full", "tiny"), default="full")
    parser.add_argument("--identities", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    encoder, generator = random_models(args.size, args.width)
    print(f"device {args.device} ({torch.get_num_threads()} CPU threads), generator {args.size}px "
          f"({args.width} width, {sum(p.numel() for p in generator.parameters()) / 1e6:.1f}M params), e4e "
          f"{sum(p.numel() for p in encoder.parameters()) / 1e6:.1f}M params, {args.identities} identities")
    for mode in ("truncation", "project"):
        batch = identities(args.identities, with_images=mode == "project")
        rates = {}
        for per_call in (args.batch, 1):
            transform = InMemoryE4E(encoder, generator, mode=mode, batch_size=per_call,
                                    input_framing="arcface")
            transform.setup(args.device)
            rates[per_call] = rate(transform, batch, per_call, args.device)
        print(f"{mode:10s}  batch {args.batch}: {rates[args.batch]:8.2f} images/s   batch 1: {rates[1]:8.2f} images/s"
              f"   ratio {rates[args.batch] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
