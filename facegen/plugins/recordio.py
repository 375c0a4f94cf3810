"""MXNet RecordIO (``.rec`` + ``.idx``), read and written without mxnet.

The format, as dmlc-core's ``recordio.cc`` and mxnet's ``recordio.py`` write it (every insightface training set:
MS1MV2/MS1MV3, Glint360K, CASIA-WebFace, WebFace4M, DCFace):

- A record is one or more *chunks*: ``u32 magic 0xCED7230A``, ``u32 lrec = cflag << 29 | length``, ``length``
  bytes, zero padding to a multiple of 4. A payload holding the magic word at a 4-byte-aligned offset is cut there
  (the magic word itself is dropped): cflag 1 is the first part, 2 a middle one, 3 the last; the reader puts the
  magic word back between the parts. An uncut record has cflag 0. Only the record's end is padded.
- ``.idx`` is text, one ``key<TAB>byte offset`` line per record (the offset of its first chunk).
- A payload starts with an ``IRHeader``, ``<IfQQ`` (flag, label, id, id2: 24 bytes). ``flag > 0`` means ``flag``
  float32 labels follow the header (and the header's own label is 0); then come the image bytes.

The reading half is bounded: every length is checked against the file's size and a byte limit before anything is
read or allocated, so a lying ``.idx``, a bad magic, a length past the end or a flag that declares billions of
labels is a :class:`RecordError` with a short reason, never a large allocation. The writing half
(:class:`RecordWriter`, :func:`pack`) produces what mxnet 1.9.1 produces, byte for byte.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
CHUNK_HEADER = struct.Struct("<II")  # magic, lrec
IR_HEADER = struct.Struct("<IfQQ")  # mxnet's _IR_FORMAT 'IfQQ' (native order and alignment: the same 24 bytes on LE)
LENGTH_MASK = (1 << 29) - 1  # a chunk's length is below 2^29; its top 3 bits are the cflag
WHOLE, FIRST, MIDDLE, LAST = 0, 1, 2, 3  # cflag values
MAX_RECORD_BYTES = 32 << 20  # a face record is ~5-50 KB; refuse anything past this unread
MAX_IDX_BYTES = 2 << 30  # Glint360K's 17 M lines are ~400 MB of text
READ_SLACK = 32 << 10  # read a typical record (header and bytes) in one pread
HEAD_BYTES = 128  # a chunk header, an IRHeader and up to 24 labels: what planning reads of a record
MAX_CHUNKS = 1 << 16  # a real record is cut a few times at most; a chain of empty chunks is refused


class RecordError(Exception):
    """One record cannot be read: ``reason`` is a short category (counted), ``detail`` says where and why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class IdxError(ValueError):
    """The ``.idx`` file is not a list of ``key<TAB>offset`` lines."""


@dataclass
class Header:
    """An IRHeader: ``labels`` holds the float32 labels (one for flag 0, ``flag`` of them otherwise)."""

    flag: int
    labels: tuple[float, ...]
    id: int
    id2: int
    payload_size: int = -1  # bytes of the whole payload (header, labels, image), when known

    @property
    def image_size(self) -> int:
        """Bytes of the image after the header and labels (0 for insightface's header and identity records)."""
        return self.payload_size - self.size

    @property
    def size(self) -> int:
        """Bytes of the header and its labels in the payload."""
        return IR_HEADER.size + 4 * self.flag

    @property
    def label(self) -> float:
        """The class, as arcface_torch's MXFaceDataset takes it: the label, or the first of the labels."""
        return self.labels[0]


# --- writing ---------------------------------------------------------------------------------------------------


def pack_header(label: float | Sequence[float], id: int = 0, id2: int = 0) -> bytes:
    """An IRHeader and its labels: a number is a scalar label (flag 0), a sequence becomes ``flag = len`` float32
    labels after the header, whose own label field is then 0 (as mxnet's ``recordio.pack`` does)."""
    if isinstance(label, (int, float, np.integer, np.floating)):
        return IR_HEADER.pack(0, float(label), id, id2)
    labels = np.asarray(label, dtype="<f4").ravel()
    return IR_HEADER.pack(labels.size, 0.0, id, id2) + labels.tobytes()


def pack(label: float | Sequence[float], image: bytes, id: int = 0, id2: int = 0) -> bytes:
    """A record's payload: header, labels, image bytes."""
    return pack_header(label, id, id2) + bytes(image)


def chunks(payload: bytes) -> list[tuple[int, bytes]]:
    """The (cflag, bytes) chunks dmlc's writer makes of ``payload``: cut at each magic word found at an aligned
    offset, the magic word itself left out."""
    if len(payload) > LENGTH_MASK:
        raise ValueError(f"a record holds less than 2^29 bytes, got {len(payload)}")
    view = memoryview(payload)
    cuts = []
    at = payload.find(MAGIC_BYTES)
    while at >= 0:
        if at % 4 == 0:
            cuts.append(at)
            at = payload.find(MAGIC_BYTES, at + 4)
        else:
            at = payload.find(MAGIC_BYTES, at + 1)
    parts, start = [], 0
    for at in cuts:
        parts.append((FIRST if start == 0 else MIDDLE, bytes(view[start:at])))
        start = at + 4
    parts.append((LAST if cuts else WHOLE, bytes(view[start:])))
    return parts


def encode_record(payload: bytes) -> bytes:
    """The bytes of one record on disk: its chunks, each with magic and lrec, padded to a multiple of 4 at the end."""
    out = bytearray()
    for cflag, part in chunks(payload):
        out += CHUNK_HEADER.pack(MAGIC, cflag << 29 | len(part)) + part
    out += bytes(-len(out) % 4)
    return bytes(out)


class RecordWriter:
    """Appends records to a ``.rec`` and their ``key<TAB>offset`` lines to its ``.idx``, as
    ``mx.recordio.MXIndexedRecordIO(idx, rec, 'w').write_idx(key, payload)`` does. ``idx_path`` None: a ``.rec``
    without index (``mx.recordio.MXRecordIO``), as DALI's shuffled files are."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self._rec = open(rec_path, "wb")
        self._idx = open(idx_path, "w", encoding="ascii", newline="\n") if idx_path is not None else None
        self.offset = 0

    def write(self, key: int, payload: bytes) -> int:
        """Write one record; returns its offset."""
        data = encode_record(payload)
        offset = self.offset
        self._rec.write(data)
        self.offset += len(data)
        if self._idx is not None:
            self._idx.write(f"{int(key)}\t{offset}\n")
        return offset

    def close(self) -> None:
        self._rec.close()
        if self._idx is not None:
            self._idx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- reading ---------------------------------------------------------------------------------------------------


def read_idx(path: str | os.PathLike, max_bytes: int = MAX_IDX_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """The keys and offsets of an ``.idx`` file, in its line order (int64 arrays).

    Raises :class:`IdxError` for a file over ``max_bytes`` (unread), a line that is not two non-negative
    integers separated by a tab, or a key listed twice."""
    import pandas as pd  # a dependency of `datasets`: its C parser reads 5.8 M lines in about a second

    size = os.path.getsize(path)
    if size > max_bytes:
        raise IdxError(f"{size} bytes, over the {max_bytes} bytes limit of an index")
    if size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    try:
        table = pd.read_csv(path, sep="\t", header=None, index_col=None, dtype=np.int64, engine="c",
                            na_filter=False, skip_blank_lines=True)
    except (ValueError, OverflowError, pd.errors.ParserError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IdxError(f"not key<TAB>offset lines ({first[:200]})") from None
    if table.shape[1] != 2:
        raise IdxError(f"not key<TAB>offset lines ({table.shape[1]} fields on a line)")
    keys = table[0].to_numpy(np.int64)
    offsets = table[1].to_numpy(np.int64)
    if len(keys) and (keys.min() < 0 or offsets.min() < 0):
        raise IdxError("a negative key or offset")
    ordered = np.sort(keys)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if len(repeated):
        raise IdxError(f"key {int(repeated[0])} is listed more than once")
    return keys, offsets


def _read_exact(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:  # the file shrank since its size was taken
        raise RecordError("record past the end of the file", f"{size} bytes at offset {offset}: got {len(data)}")
    return data


def read_record(fd: int, offset: int, file_size: int, max_bytes: int = MAX_RECORD_BYTES) -> bytes:
    """The payload of the record whose first chunk is at ``offset``, its parts joined with the magic word put back.

    One ``pread`` for a record of up to READ_SLACK bytes; more only for larger or cut records. Every chunk's
    framing and length are checked (magic, cflag order, end of file, ``max_bytes`` for the whole record, at most
    MAX_CHUNKS chunks) before its bytes are read."""
    joined = bytearray()
    position = offset
    buffer, buffer_at = b"", offset
    for count in range(MAX_CHUNKS):
        if position + CHUNK_HEADER.size > file_size:
            raise RecordError("record past the end of the file",
                              f"a chunk header at offset {position}, past the end ({file_size} bytes)")
        if position + CHUNK_HEADER.size > buffer_at + len(buffer):
            buffer_at = position
            buffer = os.pread(fd, min(READ_SLACK, file_size - position), position)
            if len(buffer) < CHUNK_HEADER.size:
                raise RecordError("record past the end of the file", f"the file ends at offset {position}")
        magic, lrec = CHUNK_HEADER.unpack_from(buffer, position - buffer_at)
        if magic != MAGIC:
            raise RecordError("bad record framing", f"no RecordIO magic at offset {position} (found {magic:#010x})")
        cflag, length = lrec >> 29, lrec & LENGTH_MASK
        if cflag > LAST or (cflag in (WHOLE, FIRST)) != (count == 0):
            raise RecordError("bad record framing", f"chunk flag {cflag} out of order at offset {position}")
        start = position + CHUNK_HEADER.size
        if start + length > file_size:
            raise RecordError("record past the end of the file",
                              f"a chunk of {length} bytes at offset {position} ends past the end ({file_size} bytes)")
        if len(joined) + length + (4 if cflag in (MIDDLE, LAST) else 0) > max_bytes:
            raise RecordError("record too large", f"over the {max_bytes} bytes limit at offset {position}")
        if cflag in (MIDDLE, LAST):
            joined += MAGIC_BYTES
        if start + length <= buffer_at + len(buffer):
            part = buffer[start - buffer_at:start - buffer_at + length]
        else:
            part = _read_exact(fd, length, start)
        if cflag == WHOLE:
            return part
        joined += part
        if cflag == LAST:
            return bytes(joined)
        position = start + length + (-length % 4)
    raise RecordError("bad record framing", f"more than {MAX_CHUNKS} chunks in the record at offset {offset}")


def unpack_header(payload: bytes | memoryview, payload_size: int | None = None) -> Header:
    """The IRHeader at the start of ``payload`` (the start of a payload of ``payload_size`` bytes, by default all
    of it); a flag that declares more labels than the payload holds is a RecordError, found before any label is
    read."""
    size = len(payload) if payload_size is None else payload_size
    if len(payload) < IR_HEADER.size:
        raise RecordError("bad record header", f"a payload of {len(payload)} bytes holds no IRHeader")
    flag, label, id_, id2 = IR_HEADER.unpack_from(payload)
    if flag == 0:
        return Header(0, (label,), id_, id2, size)
    if IR_HEADER.size + 4 * flag > min(size, len(payload)):
        raise RecordError("bad record header",
                          f"the header declares {flag} labels, more than the {size} bytes of the record hold")
    labels = struct.unpack_from(f"<{flag}f", payload, IR_HEADER.size)
    return Header(flag, labels, id_, id2, size)


def unpack(payload: bytes) -> tuple[Header, bytes]:
    """The header and the image bytes of a record's payload."""
    header = unpack_header(payload)
    return header, payload[header.size:]


def read_header(fd: int, offset: int, file_size: int) -> Header:
    """The IRHeader of the record at ``offset``. An uncut record whose header and labels fit in HEAD_BYTES costs
    one small pread (what planning does for every record of a file without identity records); any other record
    is read whole, within MAX_RECORD_BYTES."""
    if offset + CHUNK_HEADER.size > file_size:
        raise RecordError("record past the end of the file", f"offset {offset} is past the end ({file_size} bytes)")
    head = os.pread(fd, min(HEAD_BYTES, file_size - offset), offset)
    if len(head) < CHUNK_HEADER.size:
        raise RecordError("record past the end of the file", f"the file ends at offset {offset}")
    magic, lrec = CHUNK_HEADER.unpack_from(head)
    if magic != MAGIC:
        raise RecordError("bad record framing", f"no RecordIO magic at offset {offset} (found {magic:#010x})")
    cflag, length = lrec >> 29, lrec & LENGTH_MASK
    payload = head[CHUNK_HEADER.size:CHUNK_HEADER.size + length]
    if cflag == WHOLE and len(payload) >= IR_HEADER.size:
        if offset + CHUNK_HEADER.size + length > file_size:
            raise RecordError("record past the end of the file",
                              f"a record of {length} bytes at offset {offset} ends past the end ({file_size} bytes)")
        flag = IR_HEADER.unpack_from(payload)[0]
        if IR_HEADER.size + 4 * flag > length:
            raise RecordError("bad record header",
                              f"the header declares {flag} labels, more than the {length} bytes of the record hold")
        if IR_HEADER.size + 4 * flag <= len(payload):
            return unpack_header(payload, length)
    return unpack_header(read_record(fd, offset, file_size))


def label_class(header: Header) -> int | None:
    """The class a record's label names (MXFaceDataset: the label or its first entry), or None when it is not a
    whole non-negative number that an int64 holds."""
    value = header.label
    if not math.isfinite(value) or value < 0 or value != int(value) or value >= 2**53:
        return None
    return int(value)

