"""Images/s of the `arc2face` transform against the upstream way of running Arc2Face, measured in one run.

Reference loop (upstream Arc2Face README/demo): one identity at a time, its latents' prompt embeddings passed to
diffusers' ``StableDiffusionPipeline(prompt_embeds=…, num_images_per_prompt=k)``, then detection, alignment and
embedding of each output one after the other. Transform: identities batched across calls' micro-batches, one
noise seed per image, post-processing on a worker thread overlapping generation. Same models, steps, guidance,
resolution, latents and images per latent.

CPU, tiny random-weight models (what this repository's CI can run)::

    python benchmarks/arc2face.py

GPU with SD1.5/CLIP-L full-size architectures (random weights; the speed is that of real Arc2Face)::

    python benchmarks/arc2face.py --full-size --device cuda --identities 32 --batch-size 8 --images-per-batch 80

On an H100 the compute bound is about 18.5 images/s (42.7 TFLOP per 512x512 image at 25 steps with guidance,
at ~790 dense fp16 TFLOP/s); the script prints the fraction reached when ``--peak-images-per-s`` is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch


def source_identities(root: str, count: int, images: int):
    from facegen.plugins.folder import FolderSource
    from facegen.records import Identity, SourceImage
    from facegen.testing.folder import write_folder_source

    source = FolderSource(write_folder_source(root, identities=count, images_per_identity=images))
    out = []
    for cls, identity_id in enumerate(source.identities()):
        items = source.load(identity_id)
        out.append(Identity(identity_id, cls, 1000 + cls, images=[i for i in items if isinstance(i, SourceImage)]))
    return out


def run_transform(transform, identities) -> int:
    made = 0
    for start in range(0, len(identities), transform.batch_size):
        for result in transform(identities[start:start + transform.batch_size]):
            made += len(result.faces) + len(result.skipped)
    return made


def run_reference(transform, identities, latents: int, per_latent: int) -> int:
    """Upstream style: per identity one pipeline call with num_images_per_prompt, then serial post-processing."""
    from facegen.generators import arc2face as a2f
    from facegen.generators.embeddings import normalize
    from facegen.plugins.arc2face import encode_png

    gen = transform.generator
    pipeline = gen.pipeline.diffusers_pipeline()
    made = 0
    for identity in identities:
        plan = transform.plan_identities([identity])[0]
        cond = a2f.apply_shift(gen.project(np.stack([v.embedding for v in plan.variations])), transform.delta,
                               transform.opts["shift_scale"])
        generator = torch.Generator(gen.device).manual_seed(identity.seed)
        images = pipeline(prompt_embeds=cond, num_images_per_prompt=per_latent, num_inference_steps=gen.steps,
                          guidance_scale=gen.guidance, height=gen.resolution, width=gen.resolution,
                          generator=generator).images
        for image in images:
            crop = transform.aligner.align_one(np.asarray(image)) if transform.aligner else np.asarray(image)
            if crop is not None:
                if transform.aligner:
                    float(normalize(transform.embedder.embed(crop[None]))[0] @ plan.prototype)
                encode_png(crop)
            made += 1
    return made


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--identities", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="alternating timed rounds; the best of each counts")
    parser.add_argument("--latents", type=int, default=4)
    parser.add_argument("--images-per-latent", type=int, default=5)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=4, help="identities per transform call")
    parser.add_argument("--images-per-batch", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full-size", action="store_true", help="SD1.5-size random-weight models (GPU)")
    parser.add_argument("--model-dir", help="existing model folder (skips writing the random-weight models)")
    parser.add_argument("--peak-images-per-s", type=float, help="compute bound to compare with (H100: 18.5)")
    args = parser.parse_args(argv)

    from facegen.plugins.arc2face import Arc2FaceTransform
    from facegen.testing.arc2face import write_tiny_arc2face

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or str(write_tiny_arc2face(os.path.join(tmp, "models"),
                                                              full_size=args.full_size))
        identities = source_identities(os.path.join(tmp, "src"), args.identities, 5)
        transform = Arc2FaceTransform(model_dir=model_dir, steps=args.steps, latents=args.latents,
                                      images_per_latent=args.images_per_latent, batch_size=args.batch_size,
                                      images_per_batch=args.images_per_batch)
        transform.setup(args.device)
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

        # warm-up (allocator, kernels) on one identity each way, not timed
        run_transform(transform, identities[:1])
        run_reference(transform, identities[:1], args.latents, args.images_per_latent)

        # alternate the two ways so that load from other processes hits both alike; keep each one's best round
        ref_s = ours_s = float("inf")
        for round_index in range(args.rounds):
            sync()
            start = time.perf_counter()
            made_ref = run_reference(transform, identities, args.latents, args.images_per_latent)
            sync()
            ref_s = min(ref_s, time.perf_counter() - start)
            start = time.perf_counter()
            made = run_transform(transform, identities)
            sync()
            ours_s = min(ours_s, time.perf_counter() - start)
            print(f"round {round_index + 1}: reference {made_ref / ref_s:.2f}, transform {made / ours_s:.2f} "
                  "images/s (best so far)", flush=True)
        transform.close()

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    models = "SD1.5-size random weights" if args.full_size else "tiny random weights"
    print(f"device: {device}; models: {models}; resolution {transform.generator.resolution}, {args.steps} steps, "
          f"guidance {transform.generator.guidance}, {args.identities} identities x {args.latents} latents x "
          f"{args.images_per_latent} images")
    print(f"reference (one identity per pipeline call, num_images_per_prompt): {made_ref} images in {ref_s:.2f} s "
          f"= {made_ref / ref_s:.2f} images/s")
    print(f"transform (batch_size={args.batch_size}, images_per_batch={args.images_per_batch}, overlapped "
          f"post-processing): {made} images in {ours_s:.2f} s = {made / ours_s:.2f} images/s")
    print(f"speed-up: {(made / ours_s) / (made_ref / ref_s):.2f}x")
    if args.peak_images_per_s:
        print(f"fraction of the compute bound ({args.peak_images_per_s} images/s): "
              f"{made / ours_s / args.peak_images_per_s:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
