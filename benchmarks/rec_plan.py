"""What planning an MS1MV2-sized RecordIO file costs the `rec` source: construction, then every identity's refs.

Writes (once, into ``--dir``) a face-layout ``train.rec`` + ``train.idx`` shaped like MS1MV2 (5,822,653 images of
85,742 identities by default) whose images are 4-byte stand-ins: planning reads no image, so their size does not
matter, only the number of records. Then, in a fresh process per layout, it measures what ``facegen build`` does
before the first image is read: ``RecSource(path)`` and ``image_refs`` of every identity, hashed as the run hashes
its listing. ``--layout plain`` reads the header of every record instead (a file without identity records)::

    python benchmarks/rec_plan.py --dir /tmp/ms1mv2-shaped            # both layouts
    python benchmarks/rec_plan.py --dir /tmp/small --images 100000 --identities 1500
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

STAND_IN = b"\xff\xd8\xff\xd9"  # an empty JPEG: planning never reads it


def write(folder: str, images: int, identities: int) -> None:
    from facegen.plugins.recordio import RecordWriter, pack

    os.makedirs(folder, exist_ok=True)
    per, extra = divmod(images, identities)
    counts = [per + (1 if i < extra else 0) for i in range(identities)]
    start = time.perf_counter()
    with RecordWriter(os.path.join(folder, "train.rec"), os.path.join(folder, "train.idx")) as writer:
        writer.write(0, pack([images + 1, images + 1 + identities], b""))
        key = 1
        for cls, count in enumerate(counts):
            for _ in range(count):
                writer.write(key, pack([cls, 1.0], STAND_IN, id=key))
                key += 1
        first = 1
        for count in counts:
            writer.write(key, pack([first, first + count], b"", id=key))
            first += count
            key += 1
    print(f"wrote {images} image records and {identities} identity records in {time.perf_counter() - start:.0f} s "
          f"({os.path.getsize(os.path.join(folder, 'train.rec')) >> 20} MiB .rec, "
          f"{os.path.getsize(os.path.join(folder, 'train.idx')) >> 20} MiB .idx)")


def measure(folder: str, layout: str) -> dict:
    import xxhash

    from facegen.plugins.rec import RecSource

    start = time.perf_counter()
    source = RecSource(folder, layout=layout)
    constructed = time.perf_counter() - start
    digest, images = xxhash.xxh3_128(), 0
    for identity in source.identities():  # what the run's listing does (facegen.builders.run.list_images)
        refs = source.image_refs(identity)
        digest.update("\0".join([identity, *refs]).encode() + b"\n")
        images += len(refs)
    return {"layout": source.layout, "identities": len(source.identities()), "images": images,
            "construct_s": round(constructed, 2), "construct_and_refs_s": round(time.perf_counter() - start, 2),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--images", type=int, default=5_822_653)
    parser.add_argument("--identities", type=int, default=85_742)
    parser.add_argument("--layout", choices=("face", "plain", "both"), default="both")
    parser.add_argument("--measure", choices=("face", "plain"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.dir, args.measure)))
        return
    if not os.path.exists(os.path.join(args.dir, "train.idx")):
        write(args.dir, args.images, args.identities)
    for layout in ("face", "plain") if args.layout == "both" else (args.layout,):
        out = subprocess.run([sys.executable, __file__, "--dir", args.dir, "--measure", layout], check=True,
                             capture_output=True, text=True).stdout
        print(out.strip())


if __name__ == "__main__":
    main()
