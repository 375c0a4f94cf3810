"""Planning cost of the arc2face transform per identity: prototype from 5 DigiFace images vs all 72.

Planning = decode each source PNG, embed every crop of the call in one batched recogniser call, average into the
prototype, draw the SLERP variations (``Arc2FaceTransform.plan_identities``). Measured on a DigiFace-layout zip
part (72 images per identity) read through the digiface source with ``max_images=5`` and ``max_images=0`` (all).

    python benchmarks/prototype_images.py                       # tiny random-weight recogniser, CPU
    python benchmarks/prototype_images.py --model-dir DIR       # DIR/arc2face/arcface.onnx: the real ArcFace R100

Prints ms per identity for both and their ratio, and the time of the recogniser call alone, so the cost of the
real R100 (about 24 GFLOP per crop) can be told apart from decoding.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def identities(source):
    from facegen.records import Identity, SourceImage

    out = []
    for cls, identity_id in enumerate(source.identities()):
        images = [i for i in source.load(identity_id) if isinstance(i, SourceImage)]
        out.append(Identity(identity_id, cls, cls, images=images))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, default=8, help="identities per call (the transform's batch_size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model-dir", help="folder holding arc2face/arcface.onnx (default: tiny random weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--source-threads", type=int, nargs="+", default=[1, 0],
                        help="decoding threads to compare (0: the transform's default, min(8, CPU cores))")
    args = parser.parse_args()

    import torch

    from facegen.plugins import arc2face
    from facegen.plugins.arc2face import Arc2FaceTransform
    from facegen.plugins.digiface import DigiFaceSource
    from facegen.testing.arc2face import write_tiny_arc2face
    from facegen.testing.digiface import write_digiface_part

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as tmp:
        part = os.path.join(tmp, "digiface")
        write_digiface_part(part, ids=range(args.identities), images_per_identity=72)
        model_dir = args.model_dir or str(write_tiny_arc2face(os.path.join(tmp, "models")))
        transform = Arc2FaceTransform(model_dir=model_dir, align="off")
        transform.setup(args.device)
        print(f"recogniser: {transform._sources['recogniser']}")
        default_threads = arc2face.SOURCE_THREADS
        for threads in args.source_threads:
            arc2face.SOURCE_THREADS = threads or default_threads
            print(f"decoding threads: {arc2face.SOURCE_THREADS}")
            results = {}
            for label, max_images in (("5 images", 5), ("all 72", 0)):
                batch = identities(DigiFaceSource(part, max_images=max_images))
                crops = sum(len(i.images) for i in batch)
                embed = transform.embedder.embed
                embed_seconds = []

                def timed_embed(images, embed=embed, embed_seconds=embed_seconds):
                    start = time.perf_counter()
                    out = embed(images)
                    embed_seconds.append(time.perf_counter() - start)
                    return out

                transform.embedder.embed = timed_embed
                transform.plan_identities(batch)  # warm-up
                embed_seconds.clear()
                start = time.perf_counter()
                for _ in range(args.repeats):
                    transform.plan_identities(batch)
                seconds = (time.perf_counter() - start) / args.repeats
                transform.embedder.embed = embed
                results[label] = 1000 * seconds / len(batch)
                print(f"  {label}: {crops} crops for {len(batch)} identities, plan {results[label]:.1f} ms per "
                      f"identity (recogniser call {1000 * np.mean(embed_seconds) / len(batch):.1f} ms of it)")
            print(f"  all 72 / 5 images: {results['all 72'] / results['5 images']:.1f}x per identity")
        transform.close()


if __name__ == "__main__":
    main()
