"""GPU figures in one device call: the Arc2Face ceiling, the transform against the upstream loop, an end-to-end
build, and e4e; written to ``benchmarks/results/gpu.json`` after every section, so a run cut off still reports.

    python benchmarks/gpu_check.py                       # on the GPU machine, ~6 minutes
    python benchmarks/gpu_check.py --tiny --device cpu   # the same sections with tiny models: checks the script

Sections, each time-boxed (``--budget`` seconds in all, shared in the proportions of ``SHARES``):

1. ceiling: the full-size (SD1.5) UNet alone, fp16, SDPA, batches 16/40/80 (x2 for guidance), contiguous and
   channels_last, and the VAE decoder alone; FLOPs counted with ``FlopCounterMode``; ``ceiling_images_per_s`` =
   the best 1 / (steps x UNet seconds per image + VAE seconds per image); peak memory per ``images_per_batch``.
2. transform vs reference: ``benchmarks/arc2face.py``'s two loops at the digi2real settings (25 steps, guidance 3,
   4 latents x 5 images, 512²), alternated, and the projected GPU hours of Digi2Real-20K (400,000 images).
   The face models (SCRFD, ArcFace) are the tiny ONNX stand-ins: post-processing costs less than with the real
   ResNet-100 / SCRFD-10G, which flatters the transform (said in the json's settings).
3. e2e_build: ``facegen build --plugin arc2face`` in a subprocess on the device, then ``load_dataset`` counts rows.
4. e4e: full widths at 1024, batched vs batch of one, both modes.

The device machine lacks diffusers, datasets and webdataset: carry them and facegen as wheels (see the device README).
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

import torch

sys.path.insert(0, str(Path(__file__).parent))
import arc2face as arc2face_bench  # noqa: E402  (benchmarks/arc2face.py: the reference loop)

SHARES = {"ceiling": 0.30, "transform": 0.35, "e2e_build": 0.15, "e4e": 0.20}
DIGI2REAL_IMAGES = 400_000


class Report:
    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in ("torch", "diffusers", "transformers", "onnxruntime", "onnxruntime-gpu", "datasets", "facegen"):
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


@torch.no_grad()
def ceiling(model_dir: str, device: str, steps: int, batches, deadline: float) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from facegen.generators import arc2face as a2f

    dtype = a2f.default_dtype(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    unet = UNet2DConditionModel.from_pretrained(Path(model_dir) / a2f.ARC2FACE_DIRNAME, subfolder="arc2face",
                                                torch_dtype=dtype).to(device).eval()
    vae = AutoencoderKL.from_pretrained(Path(model_dir) / a2f.BASE_DIRNAME, subfolder="vae",
                                        torch_dtype=dtype).to(device).eval()
    size, hidden = unet.config.sample_size, unet.config.cross_attention_dim
    out: dict = {"unet": [], "vae": [], "memory": []}

    def unet_inputs(images: int):
        x = torch.randn(2 * images, unet.config.in_channels, size, size, device=device, dtype=dtype)  # x2: guidance
        ctx = torch.randn(2 * images, 77, hidden, device=device, dtype=dtype)
        return x, torch.tensor(500, device=device), ctx

    x, t, ctx = unet_inputs(1)
    with FlopCounterMode(display=False) as counter:
        unet(x, t, encoder_hidden_states=ctx)
    out["unet_flops_per_image_step"] = counter.get_total_flops()
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
            unet.to(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
            x, t, ctx = unet_inputs(images)
            if layout == "channels_last":
                x = x.to(memory_format=torch.channels_last)
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            seconds = timed(lambda: unet(x, t, encoder_hidden_states=ctx), sync, repeat=3)
            row = {"images": images, "layout": layout, "seconds_per_step": seconds,
                   "seconds_per_image_step": seconds / images,
                   "tflops": out["unet_flops_per_image_step"] * images / seconds / 1e12}
            if device.startswith("cuda"):
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            out["unet"].append(row)
            best_unet = min(best_unet, seconds / images)
    unet.to(memory_format=torch.contiguous_format)
    best_vae = float("inf")
    for images in (4, 8, 16):
        if time.perf_counter() > deadline:
            out["cut_off"] = True
            break
        z = torch.randn(images, vae.config.latent_channels, size, size, device=device, dtype=dtype)
        seconds = timed(lambda: vae.decode(z), sync, repeat=2)
        out["vae"].append({"images": images, "seconds": seconds, "seconds_per_image": seconds / images})
        best_vae = min(best_vae, seconds / images)
    if best_unet < float("inf") and best_vae < float("inf"):
        out["ceiling_images_per_s"] = 1.0 / (steps * best_unet + best_vae)
    del unet, vae
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def peak_memory(model_dir: str, device: str, sizes, deadline: float) -> list:
    """Peak GPU memory of one transform call at each ``images_per_batch`` (one identity's worth of images each)."""
    from facegen.plugins.arc2face import Arc2FaceTransform

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for per_batch in sizes:
            if time.perf_counter() > deadline:
                break
            latents = max(1, per_batch // 5)
            transform = Arc2FaceTransform(model_dir=model_dir, steps=2, latents=latents, images_per_latent=5,
                                          batch_size=1, images_per_batch=per_batch)
            transform.setup(device)
            identity = arc2face_bench.source_identities(os.path.join(tmp, f"src{per_batch}"), 1, 5)
            torch.cuda.reset_peak_memory_stats()
            try:
                arc2face_bench.run_transform(transform, identity)
                rows.append({"images_per_batch": per_batch, "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
            except torch.cuda.OutOfMemoryError:
                rows.append({"images_per_batch": per_batch, "peak_gib": None, "oom": True})
            transform.close()
            del transform
            torch.cuda.empty_cache()
    return rows


def transform_vs_reference(model_dir: str, device: str, args, deadline: float) -> dict:
    from facegen.plugins.arc2face import Arc2FaceTransform

    settings = {"steps": args.steps, "guidance": 3.0, "latents": 4, "images_per_latent": 5,
                "batch_size": args.batch_size, "images_per_batch": args.images_per_batch,
                "identities": args.identities, "face_models": "tiny ONNX stand-ins (post-processing flattered)",
                "models": "tiny random weights" if args.tiny else "SD1.5-size random weights"}
    out: dict = {"settings": settings}
    with tempfile.TemporaryDirectory() as tmp:
        identities = arc2face_bench.source_identities(os.path.join(tmp, "src"), args.identities, 5)
        transform = Arc2FaceTransform(model_dir=model_dir, steps=args.steps, latents=4, images_per_latent=5,
                                      batch_size=args.batch_size, images_per_batch=args.images_per_batch)
        transform.setup(device)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
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
        transform.close()
    out["transform_images_per_s"] = made["transform"] / best["transform"]
    out["reference_images_per_s"] = made["reference"] / best["reference"]
    out["projected_digi2real20k_gpu_hours"] = DIGI2REAL_IMAGES / out["transform_images_per_s"] / 3600
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
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 30), env=env)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny models and counts (checks the script on CPU)")
    parser.add_argument("--budget", type=float, default=330, help="seconds for all sections together")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--identities", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--images-per-batch", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model-dir", help="an existing full-size model folder (skips writing one)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu.json"))
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.identities, args.batch_size, args.images_per_batch = 2, 2, 2, 8

    started = time.perf_counter()
    report = Report(Path(args.out))
    cuda = args.device.startswith("cuda")
    report.data = {"device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)",
                   "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "versions": versions(),
                   "arc2face": {}, "e2e_build": {}, "e4e": {}}
    report.save()

    def deadline(section: str) -> float:
        return time.perf_counter() + SHARES[section] * args.budget

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            from facegen.testing.arc2face import write_tiny_arc2face

            model_dir = str(write_tiny_arc2face(os.path.join(tmp, "models"), full_size=not args.tiny))
        report.data["models_written_s"] = round(time.perf_counter() - started, 1)
        arc = report.data["arc2face"]
        sections = [
            ("ceiling", lambda d: arc.update(ceiling(model_dir, args.device, args.steps,
                                                     (2, 4) if args.tiny else (16, 40, 80), d))),
            ("transform", lambda d: arc.update(transform_vs_reference(model_dir, args.device, args, d))),
            ("e2e_build", lambda d: report.data["e2e_build"].update(
                e2e_build(model_dir, args.device, args.tiny, d - time.perf_counter()))),
            ("e4e", lambda d: report.data["e4e"].update(e4e(args.device, args.tiny, d))),
        ]
        for name, run in sections:
            section_start = time.perf_counter()
            try:
                run(deadline(name))
                if name == "ceiling" and cuda:
                    arc["memory"] = peak_memory(model_dir, args.device, (40, 80, 160), deadline(name))
            except Exception as exc:  # a section that fails must not lose the others' figures
                report.data.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[:2000]
            report.data.setdefault("section_seconds", {})[name] = round(time.perf_counter() - section_start, 1)
            report.save()
            print(f"[{time.perf_counter() - started:6.1f} s] {name} done", flush=True)

    if arc.get("ceiling_images_per_s") and arc.get("transform_images_per_s"):
        arc["transform_fraction_of_ceiling"] = arc["transform_images_per_s"] / arc["ceiling_images_per_s"]
    if arc.get("reference_images_per_s") and arc.get("transform_images_per_s"):
        arc["transform_vs_reference"] = arc["transform_images_per_s"] / arc["reference_images_per_s"]
    report.save()
    print(f"{'figure':36s} value")
    for key in ("ceiling_images_per_s", "transform_images_per_s", "reference_images_per_s",
                "transform_fraction_of_ceiling", "transform_vs_reference", "projected_digi2real20k_gpu_hours"):
        if key in arc:
            print(f"{key:36s} {arc[key]:.3f}")
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
