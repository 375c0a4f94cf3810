"""`facegen demo OUT`: the whole Digi2Real pipeline end to end, offline, on generated data and RANDOM-WEIGHT models.

Steps (each is what the corresponding command does, called as a library):

1. ``OUT/source``: a folder source of drawn 112x112 faces (``facegen.testing.folder``), standing in for DigiFace;
   ``OUT/real``: drawn 256x256 faces standing in for the real set (they go through face detection).
2. ``OUT/models``: tiny random-weight models in the Hub folder layout (``facegen.testing.arc2face``: SD1.5 VAE +
   tokenizer + scheduler config, Arc2Face UNet + CLIP text encoder, ``arcface.onnx``) and the SCRFD-shaped detector
   stand-in (``facegen.testing.arcface``).
3. ``facegen embed`` -> ``OUT/prototypes.npz``; ``facegen select-identities`` -> ``OUT/ids.txt``;
   ``facegen estimate-shift`` -> ``OUT/delta.safetensors``.
4. ``facegen build --plugin arc2face`` with those files -> ``OUT/dataset`` (a Hugging Face dataset folder).

Because the weights are random, the generated "faces" are noise; the demo shows the commands, the files and the
dataset layout, not image quality.
"""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from facegen.errors import UsageError
from facegen.messages import count, info

RANDOM_WEIGHTS_WARNING = (
    "NOTE: the demo models have RANDOM weights, so the generated faces are noise. "
    "It shows the pipeline, the files and the dataset layout, not image quality."
)


@dataclass
class DemoSettings:
    identities: int = 6
    images_per_identity: int = 3
    keep: int = 4  # identities kept by select-identities
    latents: int = 2
    images_per_latent: int = 2
    steps: int = 4  # DPM-Solver++ steps (the paper setting is 25; 4 keeps the demo fast on a CPU)
    seed: int = 0


@dataclass
class DemoResult:
    out: Path
    dataset: Path
    commands: list[str] = field(default_factory=list)
    seconds: float = 0.0


def run_demo(out: str | os.PathLike, settings: DemoSettings | None = None, overwrite: bool = False,
             progress: bool = False) -> DemoResult:
    from facegen.builders.quality.identities import FaceEmbedder, embed_source, open_source, select_least_similar, write_ids
    from facegen.builders.engine.options import BuildConfig
    from facegen.builders.engine.run import build
    from facegen.builders.quality.shift import estimate_shift, parse_source_spec
    from facegen.testing.arc2face import write_tiny_arc2face
    from facegen.testing.folder import write_folder_source

    settings = settings or DemoSettings()
    start = time.perf_counter()
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        if not (out / "models").is_dir() or not (out / "source").is_dir():
            raise UsageError(f"{out} is not empty and holds no earlier demo; choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    info(RANDOM_WEIGHTS_WARNING)
    result = DemoResult(out=out, dataset=out / "dataset")

    # 1-2. data and models
    source_dir = write_folder_source(out / "source", identities=settings.identities,
                                     images_per_identity=settings.images_per_identity)
    real_dir = write_folder_source(out / "real", identities=3, images_per_identity=2, size=256, start=1000)
    model_dir = write_tiny_arc2face(out / "models", seed=settings.seed)
    info(f"wrote a generated folder source ({count(settings.identities, 'identity')} x "
         f"{count(settings.images_per_identity, 'image')}) to {source_dir}, random-weight models to {model_dir}")

    # 3. prototypes, selection, shift
    prototypes_path, ids_path, delta_path = out / "prototypes.npz", out / "ids.txt", out / "delta.safetensors"
    embedder = FaceEmbedder(str(model_dir))
    prototypes = embed_source(open_source("folder", str(source_dir)), embedder, progress=progress)
    prototypes.save(prototypes_path)
    result.commands.append(f"facegen embed --source folder --source-path {q(source_dir)} --model-dir {q(model_dir)} "
                           f"--out {q(prototypes_path)}")
    info(f"embed: {count(len(prototypes.ids), 'prototype')} -> {prototypes_path}")

    selection = select_least_similar(prototypes.ids, prototypes.embeddings, settings.keep)
    write_ids(ids_path, selection, [f"facegen demo: {settings.keep} of {count(selection.total, 'identity')}"])
    result.commands.append(f"facegen select-identities --prototypes {q(prototypes_path)} --count {settings.keep} "
                           f"--out {q(ids_path)}")
    info(f"select-identities: kept {len(selection.ids)} of {selection.total} -> {ids_path}")

    estimate = estimate_shift([parse_source_spec(f"folder:{real_dir}")], [parse_source_spec(f"folder:{source_dir}")],
                              model_dir=str(model_dir), max_images=8, seed=settings.seed, device="cpu",
                              progress=progress)
    estimate.save(delta_path)
    result.commands.append(f"facegen estimate-shift --real folder:{q(real_dir)} --synthetic folder:{q(source_dir)} "
                           f"--model-dir {q(model_dir)} --max-images 8 --out {q(delta_path)}")
    info(f"estimate-shift: {estimate.real_count} real, {estimate.synthetic_count} synthetic images, "
         f"|delta| = {estimate.norms()['delta_norm']:.3f} -> {delta_path}")

    # 4. the build
    plugin_opts = {"model_dir": str(model_dir), "shift": str(delta_path), "latents": str(settings.latents),
                   "images_per_latent": str(settings.images_per_latent), "steps": str(settings.steps)}
    config = BuildConfig(source="folder", source_path=str(source_dir), plugin="arc2face", plugin_opts=plugin_opts,
                         out=str(result.dataset), identities_file=str(ids_path), seed=settings.seed,
                         overwrite=overwrite, command=["facegen", "demo", str(out)])
    opts = " ".join(f"--plugin-opt {k}={q(v)}" for k, v in plugin_opts.items())
    result.commands.append(f"facegen build --source folder --source-path {q(source_dir)} --plugin arc2face {opts} "
                           f"--identities-file {q(ids_path)} --out {q(result.dataset)}")
    summary = build(config)
    if summary is not None:
        for line in summary.lines():
            info(line)
    result.seconds = time.perf_counter() - start
    info("")
    info("The same, step by step:")
    for command in result.commands:
        info(f"  {command}")
    info(f"Load it: datasets.load_dataset({str(result.dataset)!r}, split='train')")
    info(RANDOM_WEIGHTS_WARNING)
    return result


def q(value) -> str:
    return shlex.quote(str(value))
