"""Source `lmdb`: a Vec2Face/Vec2Face+ LMDB (HSFace10K/20K/100K/200K/300K, VFace10K/20K/100K), read in place.

The layout is what ``utils/imagelist2lmdb.py`` of Vec2Face's training repository (HaiyuWu/SOTA-Face-Recognition-
Train-and-Test) writes: one LMDB environment (a single file, ``hsface10k.lmdb``, or a folder), keys ``b"0"`` ..
``b"N-1"``, each value ``msgpack.dumps((image_bytes, int(label)))``, plus ``__keys__`` (the msgpack list of those
keys), ``__len__`` and ``__classnum__``. Its reader (``data/data_loader_train_lmdb.py``) takes image ``i`` from
``keys[i]`` and the class from the value's label.

``--source-opt mask=FILE.npy`` selects HSFace100K/200K from the 300K set, as Vec2Face's README says ("the first 100k
and 200k folders in the HSFace300k … use the indices mask"). What a mask is, from that reader
(``data/data_loader_train_lmdb.py`` at b8c42fe, lines 47-50 and 66-73): ``self.mask = np.load(mask)``,
``self.length = len(self.mask)``, and ``__getitem__`` does ``index = self.mask[index]`` before
``txn.get(self.keys[index])``: an **integer index array of positions in ``__keys__``** (not a boolean mask: a
boolean array there would read ``keys[True]`` = ``keys[1]``). Vec2Face's ``scripts/small_portion_training_mask.py``
writes its masks the same way (``np.save(…, selected_im_pos)``, a list of positions). So a mask must be a 1-D integer
array of distinct positions within ``__len__``; anything else (booleans, pickled objects, a position out of range or
repeated) is one line. It is read with ``allow_pickle=False`` after its header's shape and dtype are checked.

An identity's id is its label; its images are in key order (mask order with a mask). Planning reads each selected
value's msgpack header and label (the image bytes are skipped, not copied). Every value read is size-checked first:
a value over MAX_VALUE_BYTES, one that is not a msgpack ``(bytes, int)`` pair, or whose label changed since
planning, is a counted Skip; a value whose label cannot be read while planning is left out and reported
(``source.warnings``, the run's provenance and the card). Image bytes are kept as they are; each sample's json has
``index`` (the position in ``__keys__``) and ``channels`` (``channels=bgr`` marks a file written with swapped
channels; the bytes are not changed).
"""

from __future__ import annotations

import io
import os
import struct
import threading
from collections import Counter, defaultdict

import lmdb
import msgpack
import numpy as np
from datasets import Value

from facegen.api import (CHANNEL_ORDERS, Option, Skip, Source, SourceImage, UsageError, printable_name,
                         sniff_image, warn)
from facegen.plugins.published_sets import declare, names_read_by

MAX_VALUE_BYTES = 8 << 20  # an HSFace value is a ~5 KB JPEG and a label
MAX_KEY_BYTES = 511  # LMDB's own limit on a key
MAX_META_BYTES = 64  # __len__ and __classnum__ are msgpack integers
MAX_RECORDS = 1 << 31
MAX_MASK_HEADER_BYTES = 1 << 16
WARNING_EXAMPLES = 3
MAX_LABEL = (1 << 63) - 1  # the largest label an int64 plan holds


_ENVS: dict[str, list] = {}  # real path -> [environment, sources using it]
_ENVS_LOCK = threading.Lock()


def _acquire_env(path: str, name: str):
    key = os.path.realpath(path)
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is None:
            try:
                env = lmdb.open(path, subdir=os.path.isdir(path), readonly=True, lock=False, readahead=False,
                                meminit=False, max_dbs=0)
            except lmdb.Error as exc:
                raise UsageError(f"source 'lmdb': {name} is not a readable LMDB "
                                 f"({str(exc).splitlines()[0][:200]})") from None
            entry = _ENVS[key] = [env, 0]
        entry[1] += 1
        return entry[0]


def _release_env(path: str) -> None:
    key = os.path.realpath(path)
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                entry[0].close()
                del _ENVS[key]


class ValueFormatError(ValueError):
    """A value that is not msgpack ``(image bytes, int label)``."""


def label_of(value: memoryview) -> tuple[int, int, int]:
    """(image start, image length, label) of a msgpack ``(bytes, int)`` value, reading its headers only: the image
    is skipped, not copied. Accepts bin (msgpack >= 1.0) and raw str (older msgpack) images."""
    size = len(value)
    if size < 2:
        raise ValueFormatError(f"a value of {size} bytes")
    first = value[0]
    if first == 0x92:
        at = 1
    elif first == 0xDC and size >= 3 and struct.unpack_from(">H", value, 1)[0] == 2:
        at = 3
    elif first == 0xDD and size >= 5 and struct.unpack_from(">I", value, 1)[0] == 2:
        at = 5
    else:
        raise ValueFormatError("not a msgpack pair")
    if at >= size:
        raise ValueFormatError(f"a value of {size} bytes")
    kind = value[at]
    if 0xA0 <= kind <= 0xBF:
        length, at = kind & 0x1F, at + 1
    elif kind in (0xC4, 0xD9):
        length, at = (value[at + 1] if at + 1 < size else -1), at + 2
    elif kind in (0xC5, 0xDA) and at + 3 <= size:
        length, at = struct.unpack_from(">H", value, at + 1)[0], at + 3
    elif kind in (0xC6, 0xDB) and at + 5 <= size:
        length, at = struct.unpack_from(">I", value, at + 1)[0], at + 5
    else:
        raise ValueFormatError("the pair's first item is not image bytes")
    if length < 0 or at + length >= size:
        raise ValueFormatError(f"the image declares {max(length, 0)} bytes, more than the value's {size}")
    try:
        label = msgpack.unpackb(value[at + length:], max_str_len=0, max_bin_len=0, max_array_len=0,
                                max_map_len=0, max_ext_len=0)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ValueFormatError(f"the label is not a msgpack integer ({type(exc).__name__})") from None
    if type(label) is not int or label < 0:
        raise ValueFormatError(f"the label is {label!r}, not a class number")
    return at, length, label


class LmdbSource(Source):
    name = "lmdb"
    description = "Vec2Face/VFace LMDB: msgpack (image bytes, label) values (HSFace10K-300K, VFace), read in place"
    card_description = (
        "Images read in place from a Vec2Face-style LMDB (msgpack `(image bytes, label)` values with `__keys__`, "
        "`__len__` and `__classnum__`); each image's bytes are kept as stored, and identities are the labels."
    )
    columns = {
        "json.index": "the image's position in the source LMDB's __keys__",
    }
    options = {
        "mask": Option("", "a .npy array of positions in __keys__ to read (Vec2Face's hsface100k_mask.npy, "
                       "hsface200k_mask.npy): only those records", path=True),
        "channels": Option("rgb", "channel order of the stored images: rgb, or bgr (bytes kept, marked in the json)",
                           choices=CHANNEL_ORDERS),
        "dataset": Option(None, "a published set this file holds (its licence, citation and counts go to the card): "
                          f"{', '.join(names_read_by('lmdb'))}", choices=names_read_by("lmdb")),
    }

    def __init__(self, path, **options):
        super().__init__(path, **options)
        declare(self, self.opts["dataset"])
        self.channels = self.opts["channels"]  # marked in each sample's json by the build, bytes kept
        self.lmdb_name = printable_name(os.path.basename(os.path.normpath(self.path)))
        self._env_value = None
        self._env_lock = threading.Lock()
        self.warnings: list[str] = []
        self.unplaced: Counter = Counter()
        self._unplaced_examples: dict[str, list[str]] = defaultdict(list)
        with self._env().begin(buffers=True) as txn:
            self.length = self._meta_int(txn, b"__len__")
            self.classnum = self._meta_int(txn, b"__classnum__")
            self._explicit_keys = self._read_keys(txn)
            positions = self._read_mask() if self.opts["mask"] else np.arange(self.length, dtype=np.int64)
            labels = self._labels(txn, positions)
        placed = np.flatnonzero(labels >= 0)
        order = placed[np.argsort(labels[placed], kind="stable")]
        values, starts = np.unique(labels[order], return_index=True)
        self._positions = positions[order]
        self._ids = [str(v) for v in values.tolist()]
        self._classes = dict(zip(self._ids, values.tolist()))
        ends = np.append(starts[1:], len(order)).tolist()
        self._bounds = dict(zip(self._ids, zip(starts.tolist(), ends)))
        for reason, count in sorted(self.unplaced.items()):
            self.warnings.append(f"lmdb: {self.lmdb_name}: left out {count} record{'s' if count != 1 else ''} "
                                 f"({reason}), e.g. {', '.join(self._unplaced_examples[reason])}")
        if self.classnum != len(self._ids) and not self.opts["mask"]:
            self.warnings.append(f"lmdb: {self.lmdb_name}: __classnum__ is {self.classnum}, the values hold "
                                 f"{len(self._ids)} labels")
        if not self._ids:
            raise UsageError(f"source 'lmdb': no record of {self.lmdb_name} has a readable label "
                             f"({'; '.join(self.warnings) or 'it holds none'})")
        if os.environ.get("RANK", "0") == "0":
            for line in self.warnings:
                warn(line)
        self._image_format: str | None = None
        self._close_env()  # opened again on the first image read

    # --- construction ---

    def _env(self):
        """The LMDB environment, opened on first use; shared by every source on that file in this process (LMDB
        refuses a second open of one environment in a process)."""
        with self._env_lock:
            if self._env_value is None:
                self._env_value = _acquire_env(self.path, self.lmdb_name)
            return self._env_value

    def _close_env(self) -> None:
        with self._env_lock:
            if self._env_value is not None:
                _release_env(self.path)
            self._env_value = None

    def _meta(self, txn, key: bytes, max_bytes: int) -> memoryview:
        value = txn.get(key)
        if value is None:
            raise UsageError(f"source 'lmdb': {self.lmdb_name} has no {key.decode()} key (not a Vec2Face LMDB)")
        if len(value) > max_bytes:
            raise UsageError(f"source 'lmdb': {self.lmdb_name}: {key.decode()} holds {len(value)} bytes, over the "
                             f"{max_bytes} bytes limit")
        return value

    def _meta_int(self, txn, key: bytes) -> int:
        try:
            value = msgpack.unpackb(self._meta(txn, key, MAX_META_BYTES))
        except (ValueError, msgpack.UnpackException):
            value = None
        if type(value) is not int or not 0 <= value < MAX_RECORDS:
            raise UsageError(f"source 'lmdb': {self.lmdb_name}: {key.decode()} is not a msgpack count")
        return value

    def _read_keys(self, txn) -> list[bytes] | None:
        """``__keys__``, streamed: None when it is Vec2Face's ``b"0" .. b"N-1"`` (nothing kept), else the list."""
        raw = self._meta(txn, b"__keys__", 5 + self.length * (MAX_KEY_BYTES + 5))
        unpacker = msgpack.Unpacker(io.BytesIO(raw), raw=True, max_buffer_size=max(len(raw), 1),
                                    max_bin_len=MAX_KEY_BYTES, max_str_len=MAX_KEY_BYTES, max_array_len=self.length,
                                    max_map_len=0, max_ext_len=0)
        problem = f"source 'lmdb': {self.lmdb_name}: __keys__ is not a msgpack list of its __len__ ({self.length}) keys"
        try:
            if unpacker.read_array_header() != self.length:
                raise UsageError(problem)
            keys, canonical = [], True
            for position in range(self.length):
                key = unpacker.unpack()
                if type(key) is not bytes or not key:
                    raise UsageError(problem)
                if canonical and key != b"%d" % position:
                    canonical, keys = False, [b"%d" % p for p in range(position)]
                if not canonical:
                    keys.append(key)
        except (ValueError, msgpack.UnpackException):
            raise UsageError(problem) from None
        return None if canonical else keys

    def _key(self, position: int) -> bytes:
        return b"%d" % position if self._explicit_keys is None else self._explicit_keys[position]

    def _read_mask(self) -> np.ndarray:
        """Vec2Face's mask: a 1-D integer array of distinct positions in ``__keys__`` (header checked first)."""
        path = self.opts["mask"]
        name = printable_name(os.path.basename(path))
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                try:
                    version = np.lib.format.read_magic(f)
                    shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                             else np.lib.format.read_array_header_2_0(f, max_header_size=
                                                                                      MAX_MASK_HEADER_BYTES))
                except ValueError as exc:
                    raise UsageError(f"source 'lmdb': mask {name} is not a .npy file ({exc})") from None
                if dtype.hasobject:
                    raise UsageError(f"source 'lmdb': mask {name} holds Python objects; a mask is an integer array "
                                     "of positions in __keys__")
                if dtype.kind == "b":
                    raise UsageError(f"source 'lmdb': mask {name} is a boolean array; Vec2Face's masks are integer "
                                     "arrays of positions in __keys__ (its loader does keys[mask[i]])")
                if dtype.kind not in "iu" or len(shape) != 1:
                    raise UsageError(f"source 'lmdb': mask {name} is a {dtype} array of shape {shape}; a mask is a "
                                     "1-D integer array of positions in __keys__")
                if shape[0] > self.length or shape[0] * dtype.itemsize > size:
                    raise UsageError(f"source 'lmdb': mask {name} declares {shape[0]} positions: more than the "
                                     f"{self.length} records of {self.lmdb_name}, or than the file holds")
                f.seek(0)
                mask = np.load(f, allow_pickle=False)
        except OSError as exc:
            raise UsageError(f"source 'lmdb': cannot read mask {name}: {exc.strerror or exc}") from None
        mask = mask.astype(np.int64)
        if len(mask) and (mask.min() < 0 or mask.max() >= self.length):
            raise UsageError(f"source 'lmdb': mask {name} holds positions outside 0..{self.length - 1}")
        if len(np.unique(mask)) != len(mask):
            raise UsageError(f"source 'lmdb': mask {name} repeats positions (each would be published twice)")
        return mask

    def _leave_out(self, reason: str, position: int) -> None:
        self.unplaced[reason] += 1
        if len(self._unplaced_examples[reason]) < WARNING_EXAMPLES:
            self._unplaced_examples[reason].append(f"index {position}")

    def _labels(self, txn, positions: np.ndarray) -> np.ndarray:
        """Each position's label (-1 where it cannot be read), from the value's headers only."""
        labels = np.full(len(positions), -1, np.int64)
        for row, position in enumerate(positions.tolist()):
            value = txn.get(self._key(position))
            if value is None:
                self._leave_out("key missing", position)
                continue
            try:
                label = label_of(value)[2]
            except ValueFormatError:
                self._leave_out("value is not msgpack (image bytes, label)", position)
                continue
            if label > MAX_LABEL:  # msgpack holds up to 2**64 - 1; the plan holds int64
                self._leave_out("label is not a class number", position)
                continue
            labels[row] = label
        return labels

    # --- the Source API ---

    @property
    def image_format(self) -> str:
        """``jpg`` or ``png``: the encoding of the first readable image."""
        if self._image_format is None:
            self._image_format = "jpg"
            for row in range(min(len(self._positions), 16)):
                item = self._read(row, None)
                if isinstance(item, SourceImage):
                    self._image_format = item.ext
                    break
        return self._image_format

    def identities(self):
        return self._ids

    def image_refs(self, identity_id):
        start, stop = self._bounds[identity_id]
        return [f"{self.lmdb_name}:{p}" for p in self._positions[start:stop].tolist()]

    def load(self, identity_id):
        start, stop = self._bounds[identity_id]
        return self.load_images(identity_id, range(stop - start))

    def load_images(self, identity_id, indices):
        start, _ = self._bounds[identity_id]
        return [self._read(start + i, self._classes[identity_id]) for i in indices]

    def _read(self, row: int, expected: int | None) -> SourceImage | Skip:
        position = int(self._positions[row])
        ref = f"{self.lmdb_name}:{position}"
        try:
            with self._env().begin(buffers=True) as txn:
                value = txn.get(self._key(position))
                if value is None:
                    return Skip(ref, "key missing", f"no value for index {position}")
                if len(value) > MAX_VALUE_BYTES:
                    return Skip(ref, "value too large", f"{len(value)} bytes, over the {MAX_VALUE_BYTES} bytes limit")
                value = bytes(value)
        except lmdb.Error as exc:
            return Skip(ref, "unreadable file", str(exc).splitlines()[0][:200])
        try:
            image, label = msgpack.unpackb(value, raw=True, max_bin_len=MAX_VALUE_BYTES, max_str_len=MAX_VALUE_BYTES,
                                           max_array_len=2, max_map_len=0, max_ext_len=0)
        except (ValueError, TypeError, msgpack.UnpackException):
            return Skip(ref, "value is not msgpack (image bytes, label)", f"index {position}")
        if type(image) is not bytes or type(label) is not int:
            return Skip(ref, "value is not msgpack (image bytes, label)", f"index {position}")
        if expected is not None and label != expected:
            return Skip(ref, "label disagrees with its identity",
                        f"index {position} is labelled {label}, planned as {expected}")
        ext = sniff_image(image)
        if ext is None:
            return Skip(ref, "not an image", f"index {position}: neither JPEG nor PNG bytes")
        return SourceImage(ref=ref, data=image, ext=ext, meta={"index": position})

    def json_features(self):
        return {"index": Value("int64")}

    def provenance(self):
        return {
            "file": self.lmdb_name,
            "records": self.length,
            "classnum": self.classnum,
            "mask": printable_name(os.path.basename(self.opts["mask"])) if self.opts["mask"] else None,
            "identities": len(self._ids),
            "images": int(len(self._positions)),
            "channels": self.opts["channels"],
            "left_out": dict(sorted(self.unplaced.items())),
            "warnings": list(self.warnings),
        }

    def close(self):
        self._close_env()
