"""insightface verification ``.bin`` fixtures (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``), and hostile ones.

insightface's packers (``lfw2pack.py`` and the like) do ``pickle.dump((bins, issame_list), f,
protocol=pickle.HIGHEST_PROTOCOL)`` with ``bins`` the 2P encoded images (each pair's two images in a row) and
``issame_list`` P bools. The published files were written by Python 2, where ``bins`` are ``str`` (protocol 2,
``SHORT_BINSTRING``/``BINSTRING`` opcodes, which Python 3 reads as bytes only with ``encoding="bytes"``); later
packers append ``cv2.imencode``'s buffers, uint8 arrays of shape (N, 1). :func:`write_verification_bin` writes all
three forms with drawn faces; :func:`write_hostile_bin` writes the kinds of HOSTILE_KINDS.
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np

from facegen.testing.recordio import face_jpeg

FORMS = ("bytes", "arrays", "python2")
HOSTILE_KINDS = {
    "forbidden global": "a pickle whose bins list calls posix.system (REDUCE) to touch a file",
    "huge array": "bins holds a numpy array declaring 2^40 bytes in a few hundred",
    "lying length": "a BINBYTES8 declaring 2^40 bytes at the end of the file",
    "odd image count": "three images for two pairs",
    "not bytes": "bins holds an int where an image should be",
}


def pair_images(pairs: int, size: int = 24) -> tuple[list[bytes], list[bool]]:
    """Drawn faces: pair p shows identity p twice when it is a same pair (even p), else p and p + 1000."""
    bins, issame = [], []
    for p in range(pairs):
        same = p % 2 == 0
        bins += [face_jpeg(p, 0, size), face_jpeg(p if same else p + 1000, 1, size)]
        issame.append(same)
    return bins, issame


def python2_pickle(bins: list[bytes], issame: list[bool]) -> bytes:
    """``(bins, issame)`` as Python 2's cPickle writes it at protocol 2: str as (SHORT_)BINSTRING, memo indices from
    1, lists as EMPTY_LIST + MARK … APPENDS (batches of 1000), bools as NEWTRUE/NEWFALSE, TUPLE2."""
    memo = [1]

    def put() -> bytes:
        index = memo[0]
        memo[0] += 1
        return b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index)

    def string(data: bytes) -> bytes:
        head = b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<i", len(data))
        return head + data + put()

    def items(values, save) -> bytes:
        out = b""
        for start in range(0, len(values), 1000):
            batch = values[start:start + 1000]
            out += save(batch[0]) + b"a" if len(batch) == 1 else b"(" + b"".join(map(save, batch)) + b"e"
        return out

    out = b"\x80\x02" + b"]" + put() + items(bins, string)
    out += b"]" + put() + items(issame, lambda flag: b"\x88" if flag else b"\x89")
    return out + b"\x86" + put() + b"."


def write_verification_bin(path: str | os.PathLike, pairs: int = 3, form: str = "bytes", size: int = 24) -> Path:
    """``pairs`` verification pairs in one of FORMS: Python 3 bytes (highest protocol), ``cv2.imencode``-style
    (N, 1) uint8 arrays, or a Python 2 protocol-2 pickle of str."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}")
    bins, issame = pair_images(pairs, size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if form == "python2":
        path.write_bytes(python2_pickle(bins, issame))
    else:
        if form == "arrays":
            bins = [np.frombuffer(b, np.uint8).reshape(-1, 1).copy() for b in bins]
        with open(path, "wb") as f:
            pickle.dump((bins, issame), f, protocol=pickle.HIGHEST_PROTOCOL)
    return path


class _System:
    """Pickles as ``posix.system(command)``: what an attacker's pickle does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def write_hostile_bin(path: str | os.PathLike, kind: str, marker: str | os.PathLike = "/nonexistent") -> Path:
    """A two-pair ``.bin`` broken as ``kind`` says (HOSTILE_KINDS); ``forbidden global`` would create ``marker``."""
    if kind not in HOSTILE_KINDS:
        raise ValueError(f"unknown kind {kind!r}: {', '.join(HOSTILE_KINDS)}")
    bins, issame = pair_images(2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "forbidden global":
        data = pickle.dumps(([_System(f"touch {marker}")] + bins[1:], issame), protocol=2)
    elif kind == "huge array":  # numpy's own pickle of a 4-byte array, its shape (4,) made (2^40,)
        data = pickle.dumps(([np.zeros(4, np.uint8)] + bins[1:], issame), protocol=2)
        shape_four = b"K\x04\x85"  # BININT1 4, TUPLE1
        assert data.count(shape_four) == 1
        data = data.replace(shape_four, b"\x8a\x06" + (1 << 40).to_bytes(6, "little") + b"\x85")
    elif kind == "lying length":
        data = pickle.dumps((bins, issame), protocol=4)[:-1] + b"\x8e" + struct.pack("<Q", 1 << 40) + b"."
    elif kind == "odd image count":
        data = pickle.dumps((bins[:3], issame), protocol=pickle.HIGHEST_PROTOCOL)
    else:
        data = pickle.dumps(([7] + bins[1:], issame), protocol=pickle.HIGHEST_PROTOCOL)
    path.write_bytes(data)
    return path
