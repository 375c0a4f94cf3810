"""Vec2Face/VFace LMDB fixtures, written exactly as Vec2Face's training repository writes them.

``utils/imagelist2lmdb.py`` of HaiyuWu/SOTA-Face-Recognition-Train-and-Test (the script Vec2Face's README points to)
opens ``lmdb.open(path, subdir=False, map_size=…, readonly=False, meminit=False, map_async=True)`` on a path that
does not exist yet (so a single-file LMDB), puts ``b"%d" % idx -> msgpack.dumps((image_bytes, int(label)))`` for
every image in list order (labels numbered by folder, in order of first appearance), then ``__keys__`` (the msgpack
list of the keys), ``__len__`` and ``__classnum__`` (max label + 1). :func:`write_vec2face_lmdb` does the same with
drawn faces; :func:`write_mask` writes an HSFace100K-style index mask; :func:`write_hostile_lmdb` breaks one value
or the metadata as HOSTILE_KINDS says.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import lmdb
import msgpack
import numpy as np

from facegen.testing.recordio import face_jpeg

HOSTILE_KINDS = {
    "not msgpack": "the value of index 1 is bytes that are not msgpack",
    "lying image length": "the value of index 1 declares an image of 2^31 bytes in a few bytes",
    "label not a number": "the value of index 1 is (image bytes, 'seven')",
    "huge value": "the value of index 1 is 9 MiB of image bytes",
    "huge keys list": "__keys__ declares a list of 2^32-1 keys in a few bytes",
}


def write_vec2face_lmdb(path: str | os.PathLike, identities: int = 3, images_per_identity: int = 2,
                        image=face_jpeg, values: dict[int, bytes] | None = None) -> Path:
    """An HSFace-style LMDB file at ``path`` with ``identities`` labels 0.. of ``images_per_identity`` images each,
    in label order. ``values`` replaces the stored value of some indices (hostile fixtures)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = identities * images_per_identity
    db = lmdb.open(str(path), subdir=os.path.isdir(path), map_size=max(64 << 20, count * 112 * 112 * 3 * 2),
                   readonly=False, meminit=False, map_async=True)
    txn = db.begin(write=True)
    for idx in range(count):
        label = idx // images_per_identity
        value = msgpack.dumps((image(label, idx % images_per_identity), int(label)))
        txn.put("{}".format(idx).encode("ascii"), (values or {}).get(idx, value))
    txn.commit()
    keys = ["{}".format(k).encode("ascii") for k in range(count)]
    with db.begin(write=True) as txn:
        txn.put(b"__keys__", msgpack.dumps(keys))
        txn.put(b"__len__", msgpack.dumps(len(keys)))
        txn.put(b"__classnum__", msgpack.dumps(int(identities)))
    db.sync()
    db.close()
    return path


def write_mask(path: str | os.PathLike, positions) -> Path:
    """A Vec2Face index mask: ``np.save`` of a list of positions in ``__keys__``."""
    path = Path(path)
    np.save(path, positions)
    return path


def write_hostile_lmdb(path: str | os.PathLike, kind: str) -> Path:
    """A 3-label, 2-image-per-label LMDB broken as ``kind`` says (HOSTILE_KINDS)."""
    if kind not in HOSTILE_KINDS:
        raise ValueError(f"unknown kind {kind!r}: {', '.join(HOSTILE_KINDS)}")
    values = {
        "not msgpack": {1: b"\xc1\xc1 not msgpack"},
        "lying image length": {1: b"\x92\xc6" + struct.pack(">I", 1 << 31) + b"\xff\xd8\xff" + b"\x00"},
        "label not a number": {1: msgpack.dumps((face_jpeg(0, 1), "seven"))},
        "huge value": {1: msgpack.dumps((b"\xff\xd8\xff" + bytes(9 << 20), 0))},
    }.get(kind)
    path = write_vec2face_lmdb(path, values=values)
    if kind == "huge keys list":
        db = lmdb.open(str(path), subdir=False, map_size=64 << 20)
        with db.begin(write=True) as txn:
            txn.put(b"__keys__", b"\xdd\xff\xff\xff\xff" + b"\xa10")
        db.close()
    return path
