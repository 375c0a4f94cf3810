"""GPU figures in one device call: the Arc2Face ceiling, peak memory per ``images_per_batch``, the transform against
the upstream loop, ``torch.compile`` against eager, an end-to-end build, and e4e; written to the json (``--out``)
after every section, so a run cut off still reports.

    python benchmarks/gpu_check.py --out $OUT/gpu.json        # on the GPU machine, ~6 minutes
    python benchmarks/gpu_check.py --tiny --device cpu         # the same sections with tiny models: checks the script

Models: SD1.5/CLIP-L-size Arc2Face with random weights, and the full-size face models of
``facegen.testing.arcface`` (IResNet-100 recogniser, SCRFD-10G-size detector) run by ONNX Runtime on the CPU:
onnxruntime-gpu is not on the device machine and its wheel is far over what a device call may carry (64 MiB).

Sections, each time-boxed (``--budget`` seconds in all, shared in the proportions of ``SHARES``; one transform is
loaded once and its models serve every in-process section):

1. ceiling: the UNet alone, batches 16/40/80 (x2 for guidance), contiguous and channels_last, and the VAE decoder
   alone; FLOPs counted with ``FlopCounterMode``; ``ceiling_images_per_s`` = the best
   1 / (steps x UNet seconds per image + VAE seconds per image).
2. memory: ``torch.cuda.max_memory_allocated`` of ``Arc2FaceGenerator.generate`` (models loaded) per
   ``images_per_batch`` at the model's resolution and dtype, then a few sizes at 768x768: the table behind the
   out-of-memory message (``facegen.generators.arc2face.MEMORY_TABLE``). One denoising step: the peak does not
   grow with more (the solver keeps two latents-sized outputs).
3. transform: ``benchmarks/arc2face.py``'s two loops at the digi2real settings (25 steps, guidance 3, 4 latents x
   5 images, 512x512), alternated, best round of each; the post-processing cost per image alone; the projected
   GPU hours of Digi2Real-20K (400,000 images).
4. e2e_build: ``facegen build --plugin arc2face`` in a subprocess on the device, then ``load_dataset`` counts rows.
5. e4e: full widths at 1024, batched vs batch of one, both modes.
6. compile (last: a compilation cannot be cut short): the UNet under ``torch.compile`` against eager, same batch
   (2 x ``--images-per-batch``); compile time reported apart; the VAE decoder too when the section has time left.

On the device machine diffusers, datasets, webdataset and insightface (2.1: a pure-Python wheel), dill, multiprocess
and braceexpand are missing: they travel as wheels with a wheel of facegen itself (its entry points find the
plugins), installed with ``pip install --no-deps --target /tmp/site`` and ``PYTHONPATH=/tmp/site``; the run behind
``benchmarks/results/gpu.json`` was ``python3 benchmarks/gpu_check.py --out $OUT/gpu.json`` so installed, with
``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import arc2face as arc2face_bench  # noqa: E402  (benchmarks/arc2face.py: the reference loop)

SHARES = {"ceiling": 0.08, "memory": 0.12, "transform": 0.34, "e2e_build": 0.12, "e4e": 0.08, "compile": 0.26}
DIGI2REAL_IMAGES = 400_000
MEMORY_SIZES = (1, 8, 16, 40, 80, 160, 320, 640)
MEMORY_SIZES_768 = (8, 40, 160)
PACKAGES = ("torch", "triton", "diffusers", "transformers", "huggingface-hub", "onnxruntime", "onnxruntime-gpu",
            "insightface", "datasets", "pyarrow", "fsspec", "numpy", "facegen")


class Report:
    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def timed(fn, sync, repeat: int) -> float:
    """Seconds per call, best of ``repeat`` after one warm-up call."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def synchronizer(device: str):
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def unet_inputs(unet, images: int, device, dtype):
    """One denoising step's UNet inputs for ``images`` images with guidance (2 x images rows)."""
    size, hidden = unet.config.sample_size, unet.config.cross_attention_dim
    x = torch.randn(2 * images, unet.config.in_channels, size, size, device=device, dtype=dtype)
    ctx = torch.randn(2 * images, 77, hidden, device=device, dtype=dtype)
    return x, torch.tensor(500, device=device), ctx


@torch.no_grad()
def ceiling(generator, device: str, steps: int, batches, deadline: float) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    unet, vae, dtype = generator.unet, generator.vae, generator.dtype
    sync = synchronizer(device)
    out: dict = {"unet": [], "vae": []}
    x, t, ctx = unet_inputs(unet, 1, device, dtype)
    with FlopCounterMode(display=False) as counter:
        unet(x, t, encoder_hidden_states=ctx)
    out["unet_flops_per_image_step"] = counter.get_total_flops()  # both guidance rows
    size = unet.config.sample_size
    z = torch.randn(1, vae.config.latent_channels, size, size, device=device, dtype=dtype)
    with FlopCounterMode(display=False) as counter:
        vae.decode(z)
    out["vae_flops_per_image"] = counter.get_total_flops()

    best_unet = float("inf")
    for images in batches:
        for layout in ("contiguous", "channels_last"):
            if time.perf_counter() > deadline:
                out["cut_off"] = True
                break
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            unet.to(memory_format=fmt)
            x, t, ctx = unet_inputs(unet, images, device, dtype)
            x = x.contiguous(memory_format=fmt)
            seconds = timed(lambda: unet(x, t, encoder_hidden_states=ctx), sync, repeat=3)
            out["unet"].append({"images": images, "layout": layout, "seconds_per_step": seconds,
                                "seconds_per_image_step": seconds / images,
                                "tflops": out["unet_flops_per_image_step"] * images / seconds / 1e12})
            best_unet = min(best_unet, seconds / images)
    unet.to(memory_format=torch.contiguous_format)
    best_vae = float("inf")
    for images in (4, 8, 16):
        if time.perf_counter() > deadline and best_vae < float("inf"):
            out["cut_off"] = True
            break
        z = torch.randn(images, vae.config.latent_channels, size, size, device=device, dtype=dtype)
        seconds = timed(lambda: vae.decode(z), sync, repeat=2)
        out["vae"].append({"images": images, "seconds": seconds, "seconds_per_image": seconds / images,
                           "tflops": out["vae_flops_per_image"] * images / seconds / 1e12})
        best_vae = min(best_vae, seconds / images)
    out["best_unet_seconds_per_image_step"] = best_unet
    out["best_vae_seconds_per_image"] = best_vae
    if best_unet < float("inf") and best_vae < float("inf"):
        out["ceiling_images_per_s"] = 1.0 / (steps * best_unet + best_vae)
    return out


def peak_memory(generator, device: str, deadline: float) -> dict:
    """Peak allocated GPU memory of one ``generate`` call per images_per_batch, the models loaded (on a CPU the
    same calls run, which checks the section, and no memory is read)."""
    cuda = device.startswith("cuda")
    cond = torch.randn(1, 77, generator.unet.config.cross_attention_dim)
    steps, resolution = generator.steps, generator.resolution
    out = {"how": "torch.cuda.max_memory_allocated around Arc2FaceGenerator.generate (one denoising step, "
                  "guidance on, the VAE decoding 8 images at a time), models loaded; weights_gib = "
                  "torch.cuda.memory_allocated before the calls",
           "dtype": str(generator.dtype).replace("torch.", ""), "rows": []}
    if cuda:
        torch.cuda.empty_cache()
        out["weights_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)
        out["total_gib"] = round(torch.cuda.mem_get_info()[1] / 2**30, 3)
    sizes = MEMORY_SIZES if cuda else MEMORY_SIZES[:2]
    larger = resolution * 3 // 2  # 768 for SD1.5's 512: checks how the table scales with the image size
    generator.steps = 1
    try:
        for res, per_res in ((resolution, sizes), (larger, MEMORY_SIZES_768 if cuda else MEMORY_SIZES[1:2])):
            generator.resolution = res
            for per_batch in per_res:
                if time.perf_counter() > deadline:
                    out["cut_off"] = True
                    break
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                row = {"resolution": res, "images_per_batch": per_batch}
                start = time.perf_counter()
                try:
                    generator.generate(cond.expand(per_batch, -1, -1), list(range(per_batch)))
                    if cuda:
                        torch.cuda.synchronize()
                        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
                except torch.OutOfMemoryError:
                    row["oom"] = True
                row["seconds"] = round(time.perf_counter() - start, 2)
                out["rows"].append(row)
    finally:
        generator.steps, generator.resolution = steps, resolution
        if cuda:
            torch.cuda.empty_cache()
    return out


def postprocess_cost(transform, count: int) -> dict:
    """Seconds per generated image of detection + alignment, and of the recogniser, on one thread's calls."""
    rng = np.random.default_rng(0)
    size = transform.generator.resolution
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]
    transform.aligner.align(images[:1])  # warm-up
    start = time.perf_counter()
    crops = transform.aligner.align(images)
    align_s = (time.perf_counter() - start) / count
    found = np.stack([c for c in crops if c is not None])
    transform.embedder.embed(found[:1])
    start = time.perf_counter()
    transform.embedder.embed(found)
    embed_s = (time.perf_counter() - start) / len(found)
    return {"images": count, "faces_found": len(found), "detect_align_s_per_image": align_s,
            "embed_s_per_face": embed_s, "post_workers": transform.post_workers}


def transform_vs_reference(transform, device: str, args, deadline: float) -> dict:
    settings = {"steps": args.steps, "guidance": transform.generator.guidance, "latents": 4, "images_per_latent": 5,
                "resolution": transform.generator.resolution, "batch_size": args.batch_size,
                "images_per_batch": args.images_per_batch, "identities": args.identities,
                "face_models": ("tiny ONNX stand-ins" if args.tiny else
                                "full-size random-weight IResNet-100 + SCRFD-10G (facegen.testing.arcface)") +
                               " on the CPU through onnxruntime (CPU build; onnxruntime-gpu is not carried: its "
                               "wheel is far over the device call's 64 MiB)",
                "models": "tiny random weights" if args.tiny else "SD1.5/CLIP-L-size random weights"}
    out: dict = {"settings": settings}
    out["postprocess"] = postprocess_cost(transform, 4 if args.tiny else 16)
    sync = synchronizer(device)
    with tempfile.TemporaryDirectory() as tmp:
        identities = arc2face_bench.source_identities(os.path.join(tmp, "src"), args.identities, 5)
        arc2face_bench.run_transform(transform, identities[:1])  # warm-up
        arc2face_bench.run_reference(transform, identities[:1], 4, 5)
        best = {"transform": float("inf"), "reference": float("inf")}
        made = {}
        for _ in range(args.rounds):  # alternated, best round of each
            for name in ("reference", "transform"):
                if time.perf_counter() > deadline and all(v < float("inf") for v in best.values()):
                    out["cut_off"] = True
                    break
                sync()
                start = time.perf_counter()
                if name == "reference":
                    made[name] = arc2face_bench.run_reference(transform, identities, 4, 5)
                else:
                    made[name] = arc2face_bench.run_transform(transform, identities)
                sync()
                best[name] = min(best[name], time.perf_counter() - start)
                print(f"  {name}: {made[name]} images, best {made[name] / best[name]:.2f} images/s", flush=True)
    out["transform_images_per_s"] = made["transform"] / best["transform"]
    out["reference_images_per_s"] = made["reference"] / best["reference"]
    out["projected_digi2real20k_gpu_hours"] = DIGI2REAL_IMAGES / out["transform_images_per_s"] / 3600
    return out


@torch.no_grad()
def compile_speedup(generator, device: str, args, deadline: float) -> dict:
    """Eager against ``torch.compile`` on the same UNet batch (and the VAE decoder when time is left)."""
    unet, vae, dtype = generator.unet, generator.vae, generator.dtype
    sync = synchronizer(device)
    images = args.images_per_batch
    out: dict = {"backend": args.compile_backend, "mode": "default", "images_per_batch": images,
                 "layout": "contiguous"}
    x, t, ctx = unet_inputs(unet, images, device, dtype)
    eager = timed(lambda: unet(x, t, encoder_hidden_states=ctx), sync, repeat=3)
    compiled_unet = torch.compile(unet, backend=args.compile_backend, dynamic=False)
    start = time.perf_counter()
    compiled_unet(x, t, encoder_hidden_states=ctx)
    sync()
    out["unet_compile_seconds"] = time.perf_counter() - start
    compiled = timed(lambda: compiled_unet(x, t, encoder_hidden_states=ctx), sync, repeat=3)
    out.update(unet_eager_seconds_per_step=eager, unet_compiled_seconds_per_step=compiled,
               unet_speedup=eager / compiled)
    size = unet.config.sample_size
    z = torch.randn(generator.vae_batch, vae.config.latent_channels, size, size, device=device, dtype=dtype)
    vae_eager = timed(lambda: vae.decode(z), sync, repeat=2) / len(z)
    vae_compiled = vae_eager
    if deadline - time.perf_counter() > 2 * out["unet_compile_seconds"] / 3:  # the decoder compiles faster
        decode = torch.compile(vae.decode, backend=args.compile_backend, dynamic=False)
        start = time.perf_counter()
        decode(z)
        sync()
        out["vae_compile_seconds"] = time.perf_counter() - start
        vae_compiled = timed(lambda: decode(z), sync, repeat=2) / len(z)
        out.update(vae_eager_seconds_per_image=vae_eager, vae_compiled_seconds_per_image=vae_compiled,
                   vae_speedup=vae_eager / vae_compiled)
    else:
        out["vae"] = "not compiled: too little time left in the section"
    steps = args.steps
    out["eager_images_per_s"] = 1.0 / (steps * eager / images + vae_eager)
    out["compiled_images_per_s"] = 1.0 / (steps * compiled / images + vae_compiled)
    out["images_per_s_speedup"] = out["compiled_images_per_s"] / out["eager_images_per_s"]
    return out


def e2e_build(model_dir: str, device: str, tiny: bool, timeout: float) -> dict:
    from facegen.testing.folder import write_folder_source

    with tempfile.TemporaryDirectory() as tmp:
        src = write_folder_source(os.path.join(tmp, "src"), identities=3, images_per_identity=5)
        out = os.path.join(tmp, "out")
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
        if not device.startswith("cuda"):
            env["CUDA_VISIBLE_DEVICES"] = ""
        cmd = [sys.executable, "-m", "facegen", "build", "--source", "folder", "--source-path", str(src),
               "--plugin", "arc2face", "--plugin-opt", f"model_dir={model_dir}", "--plugin-opt", "latents=2",
               "--plugin-opt", "images_per_latent=2", "--out", out]
        if tiny:
            cmd += ["--plugin-opt", "steps=2"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 60), env=env)
        result = {"seconds": time.perf_counter() - start, "returncode": proc.returncode, "loaded": False,
                  "rows": 0}
        if proc.returncode != 0:
            result["stderr_tail"] = proc.stderr[-2000:]
            return result
        from datasets import load_dataset

        ds = load_dataset(out, split="train", cache_dir=os.path.join(tmp, "cache"))
        result.update(rows=len(ds), loaded=True)
        return result


def e4e(device: str, tiny: bool, deadline: float) -> dict:
    import e4e as e4e_bench  # benchmarks/e4e.py

    size, width, count, per_call = (64, "tiny", 4, 2) if tiny else (1024, "full", 8, 4)
    encoder, generator = e4e_bench.random_models(size, width)
    out: dict = {"size": size, "width": width, "identities": count, "batch": per_call}
    for mode in ("truncation", "project"):
        batch = e4e_bench.identities(count, with_images=mode == "project")
        for calls in (per_call, 1):
            if time.perf_counter() > deadline:
                out["cut_off"] = True
                return out
            transform = e4e_bench.InMemoryE4E(encoder, generator, mode=mode, batch_size=calls,
                                              input_framing="arcface")
            transform.setup(device)
            key = f"{mode}_batch{calls}_images_per_s"
            out[key] = e4e_bench.rate(transform, batch, calls, "cuda" if device.startswith("cuda") else "cpu")
    return out


TARGETS = (  # (figure, target, what it is)
    ("transform_fraction_of_ceiling", 0.85, "Arc2Face transform / UNet+VAE ceiling, same run"),
    ("transform_vs_reference", 1.0, "transform / upstream per-identity loop"),
    ("compile_images_per_s_speedup", 1.1, "torch.compile / eager, images/s at the same batch"),
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny models and counts (checks the script on CPU)")
    parser.add_argument("--budget", type=float, default=270, help="seconds for all sections together")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--identities", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--images-per-batch", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--model-dir", help="an existing full-size model folder (skips writing one)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu.json"))
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.identities, args.batch_size, args.images_per_batch = 2, 2, 2, 8
        args.compile_backend = "eager"  # checks the section's path; inductor on CPU needs minutes and a compiler

    started = time.perf_counter()
    report = Report(Path(args.out))
    cuda = args.device.startswith("cuda")
    report.data = {"device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)",
                   "cpu_cores": os.cpu_count(),
                   "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "versions": versions(),
                   "budget_s": args.budget, "arc2face": {}, "e2e_build": {}, "e4e": {}}
    report.save()

    from facegen.plugins.arc2face import Arc2FaceTransform

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            from facegen.testing.arc2face import write_tiny_arc2face

            model_dir = str(write_tiny_arc2face(os.path.join(tmp, "models"), full_size=not args.tiny))
        report.data["models_written_s"] = round(time.perf_counter() - started, 1)
        transform = Arc2FaceTransform(model_dir=model_dir, steps=args.steps, latents=4, images_per_latent=5,
                                      batch_size=args.batch_size, images_per_batch=args.images_per_batch)
        load_start = time.perf_counter()
        transform.setup(args.device)
        report.data["models_loaded_s"] = round(time.perf_counter() - load_start, 1)
        generator = transform.generator
        print(f"[{time.perf_counter() - started:6.1f} s] models written and loaded", flush=True)

        end = time.perf_counter() + args.budget
        arc = report.data["arc2face"]
        sections = [
            ("ceiling", lambda d: arc.update(ceiling(generator, args.device, args.steps,
                                                     (2, 4) if args.tiny else (16, 40, 80), d))),
            ("memory", lambda d: arc.update(memory=peak_memory(generator, args.device, d))),
            ("transform", lambda d: arc.update(transform_vs_reference(transform, args.device, args, d))),
            ("e2e_build", lambda d: report.data["e2e_build"].update(
                e2e_build(model_dir, args.device, args.tiny, d - time.perf_counter()))),
            ("e4e", lambda d: report.data["e4e"].update(e4e(args.device, args.tiny, d))),
            # last: its compile time cannot be cut short, so an overrun costs no other section its figures
            ("compile", lambda d: arc.update(compile=compile_speedup(generator, args.device, args, d))),
        ]
        for name, run in sections:
            section_start = time.perf_counter()
            if section_start > end and name != "compile":
                report.data.setdefault("skipped", {})[name] = "the budget was spent by the sections before"
                continue
            if name == "e2e_build" and cuda:
                torch.cuda.empty_cache()  # the build's process loads the models again beside these
            try:
                run(min(end, section_start + SHARES[name] * args.budget))
            except Exception as exc:  # a section that fails must not lose the others' figures
                report.data.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[:2000]
            report.data.setdefault("section_seconds", {})[name] = round(time.perf_counter() - section_start, 1)
            report.save()
            print(f"[{time.perf_counter() - started:6.1f} s] {name} done", flush=True)
        transform.close()

    if arc.get("ceiling_images_per_s") and arc.get("transform_images_per_s"):
        arc["transform_fraction_of_ceiling"] = arc["transform_images_per_s"] / arc["ceiling_images_per_s"]
    if arc.get("reference_images_per_s") and arc.get("transform_images_per_s"):
        arc["transform_vs_reference"] = arc["transform_images_per_s"] / arc["reference_images_per_s"]
    if isinstance(arc.get("compile"), dict) and "images_per_s_speedup" in arc["compile"]:
        arc["compile_images_per_s_speedup"] = arc["compile"]["images_per_s_speedup"]
    report.data["targets"] = {key: {"target": target, "value": arc.get(key), "met": key in arc and arc[key] >= target,
                                    "what": what} for key, target, what in TARGETS}
    report.data["total_s"] = round(time.perf_counter() - started, 1)
    report.save()
    print(f"{'figure':36s} value")
    for key in ("ceiling_images_per_s", "transform_images_per_s", "reference_images_per_s",
                "transform_fraction_of_ceiling", "transform_vs_reference", "compile_images_per_s_speedup",
                "projected_digi2real20k_gpu_hours"):
        if key in arc:
            print(f"{key:36s} {arc[key]:.3f}")
    if isinstance(arc.get("memory"), dict):
        print("memory (images_per_batch: peak GiB): " + ", ".join(
            f"{r['resolution']}/{r['images_per_batch']}: {r.get('peak_gib', 'OOM' if r.get('oom') else '-')}"
            for r in arc["memory"]["rows"]))
    print(f"{'e2e rows loaded':36s} {report.data['e2e_build'].get('rows')}")
    for key, value in report.data["e4e"].items():
        if key.endswith("images_per_s"):
            print(f"{'e4e ' + key:36s} {value:.3f}")
    for name, error in report.data.get("errors", {}).items():
        print(f"error in {name}: {error.splitlines()[0]}")
    print(f"wrote {args.out}")
    return 1 if report.data.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
