"""MXNet RecordIO fixtures: insightface's face layout written with facegen's own writer, and hostile files.

The reference fixtures that mxnet itself wrote are in ``tests/fixtures/recordio/`` (with the script that wrote
them); facegen's writer reproduces mxnet's bytes exactly (``tests/test_recordio.py``), so the writers here make
files of any size in the same layout:

- :func:`write_face_rec`: ``train.rec`` + ``train.idx`` + ``property`` as ``face2rec2.py`` writes them (record 0,
  image records labelled ``[class, 1.0]`` or with a scalar class, identity records), drawn faces as JPEGs;
- :func:`write_hostile_rec`: a face-layout file with one kind of broken framing, as an attacker or a bad disk would
  make it (see HOSTILE_KINDS).
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

from PIL import Image

from facegen.plugins.recordio import CHUNK_HEADER, IR_HEADER, MAGIC, RecordWriter, pack
from facegen.testing.folder import draw_face

HOSTILE_KINDS = {
    "bad magic": "record 2's magic word overwritten",
    "length past the end": "record 6 declares a chunk of 2^29-1 bytes in a file of a few KB",
    "lying idx": "the .idx points record 2 into the middle of record 1",
    "offset past the end": "the .idx points record 2 past the end of the .rec",
    "huge label count": "record 2's header declares 2^32-1 labels",
    "chunk out of order": "record 2's chunk flag is 2 (a middle part) with no first part",
    "record 0 declares billions": "record 0's labels declare 2^31 images",
    "record 0 huge label count": "record 0's header declares 2^32-1 labels",
}


def face_jpeg(identity: int, image: int, size: int = 24, quality: int = 80) -> bytes:
    buf = io.BytesIO()
    draw_face(identity, image, size=112, noise=0).resize((size, size), Image.LANCZOS).save(buf, "JPEG",
                                                                                              quality=quality)
    return buf.getvalue()


def write_face_rec(folder: str | os.PathLike, identities: int = 3, images_per_identity: int = 2,
                   vector_labels: bool = True, size: int = 24, image=face_jpeg) -> Path:
    """insightface's face layout: record 0, ``identities * images_per_identity`` image records (class i for the
    i-th identity), one identity record per class. ``image(identity, n)`` makes each image's bytes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = identities * images_per_identity
    with RecordWriter(folder / "train.rec", folder / "train.idx") as writer:
        writer.write(0, pack([n + 1, n + 1 + identities], b""))
        key = 1
        for cls in range(identities):
            for k in range(images_per_identity):
                label = [cls, 1.0] if vector_labels else float(cls)
                writer.write(key, pack(label, image(cls, k), id=key))
                key += 1
        for cls in range(identities):
            start = 1 + cls * images_per_identity
            writer.write(key, pack([start, start + images_per_identity], b"", id=key))
            key += 1
    (folder / "property").write_text(f"{identities},{size},{size}\n")
    return folder


def _offsets(folder: Path) -> dict[int, int]:
    lines = (folder / "train.idx").read_text().splitlines()
    return {int(k): int(v) for k, v in (line.split("\t") for line in lines)}


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def write_hostile_rec(folder: str | os.PathLike, kind: str) -> Path:
    """A 3-identity face-layout file (2 images each, records 1..6) broken as ``kind`` says (HOSTILE_KINDS)."""
    if kind not in HOSTILE_KINDS:
        raise ValueError(f"unknown kind {kind!r}: {', '.join(HOSTILE_KINDS)}")
    folder = write_face_rec(folder, identities=3, images_per_identity=2)
    rec, idx = folder / "train.rec", folder / "train.idx"
    offsets = _offsets(folder)
    if kind == "bad magic":
        _patch(rec, offsets[2], b"JUNK")
    elif kind == "length past the end":
        _patch(rec, offsets[6] + 4, struct.pack("<I", (1 << 29) - 1))  # a chunk of 512 MiB in a tiny file
    elif kind in ("lying idx", "offset past the end"):
        offsets[2] = offsets[1] + 12 if kind == "lying idx" else rec.stat().st_size + 4096
        idx.write_text("".join(f"{k}\t{v}\n" for k, v in offsets.items()))
    elif kind == "huge label count":
        _patch(rec, offsets[2] + CHUNK_HEADER.size, struct.pack("<I", 0xFFFFFFFF))
    elif kind == "chunk out of order":
        length = struct.unpack_from("<I", rec.read_bytes(), offsets[2] + 4)[0] & ((1 << 29) - 1)
        _patch(rec, offsets[2] + 4, struct.pack("<I", 2 << 29 | length))
    elif kind == "record 0 declares billions":
        _patch(rec, offsets[0] + CHUNK_HEADER.size + IR_HEADER.size, struct.pack("<2f", 2.0**31, 2.0**31 + 3))
    elif kind == "record 0 huge label count":
        _patch(rec, offsets[0] + CHUNK_HEADER.size, struct.pack("<I", 0xFFFFFFFF))
    assert struct.unpack_from("<I", rec.read_bytes(), offsets[0])[0] == MAGIC
    return folder
