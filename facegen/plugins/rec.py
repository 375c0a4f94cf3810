"""Source `rec`: an MXNet RecordIO training set (``train.rec`` + ``train.idx``), read in place without mxnet.

Every face-recognition trainer reads this format (insightface's arcface_torch, AdaFace, CVLface), and MS1MV2/MS1MV3,
Glint360K, CASIA-WebFace, WebFace4M and DCFace are distributed in it. ``--source-path`` is the folder holding the
``.rec`` and its ``.idx`` (``train.rec``, else ``file.rec``, else the only ``.rec`` there), or the ``.rec`` itself.
The format is in :mod:`facegen.plugins.recordio`; the layouts found in the wild are:

- ``face`` (insightface: ``face2rec2.py``, ``rec_builder.py``): record 0 holds no image and the labels
  ``[N+1, N+1+C]``; records 1..N are the images, labelled with their class (a scalar, or ``[class, …]``); records
  N+1..N+C are one identity record per class run, labelled ``[start, end)`` over image keys. Planning reads record
  0, the C identity records and the header of each run's first image (its class): nothing of the N images. Images
  that no identity record covers are placed by their own label.
- ``plain`` (``im2rec``, shuffled files, CVLface): every key of the ``.idx`` is an image; planning reads the header of
  each record (one small ``pread``) for its class.
- ``list`` (DCFace: ``file.rec`` + ``file.idx`` + ``list.txt``): ``list.txt`` has ``index<TAB>path`` lines and the
  class is the path's folder (DCFace writes label 0 in every header); nothing of the records is read to plan.

``layout=auto`` (the default) takes ``list`` when a list file is there, else ``face`` when record 0 is such a header
record (flag > 0, two whole labels, no image), else ``plain``. An identity's id is its original class label (the
label number, or DCFace's folder name); its images are in key order within a run, in ``.idx`` order for ``plain``,
in list order for ``list``. A record's image bytes are kept as they are (``jpg`` or ``png`` by their first bytes);
each sample's json has ``record`` (the key), ``channels`` (``channels=bgr`` marks a file known to hold BGR images,
as AdaFace's converter writes them; the bytes are not changed) and, for ``list``, the list's ``path``.

Reading costs one ``pread`` per image through the index (the per-image source API), and is bounded: a record whose
framing is broken (bad magic, a length past the end of the file, chunks out of order, a lying ``.idx`` offset), that
is too large, or whose header declares more labels than it holds, is a counted Skip with its reason; a broken
``.idx``, list or record 0 is one line (UsageError). Records whose class cannot be read while planning are left out
and reported (``source.warnings``, the run's provenance and the card).
"""

from __future__ import annotations

import csv
import math
import os
import stat
import threading
from collections import Counter, defaultdict

import numpy as np
from datasets import Value

from facegen.api import (CHANNEL_ORDERS, Option, Skip, Source, SourceImage, UsageError, natural_key,
                         printable_name, sniff_image, warn)
from facegen.plugins.published_sets import declare, names_read_by
from facegen.plugins.recordio import (MAX_RECORD_BYTES, IdxError, RecordError, label_class, read_header, read_idx,
                                      read_record, unpack)

REC_NAMES = ("train.rec", "file.rec")  # insightface, DCFace
LIST_NAME = "list.txt"  # DCFace
MAX_LIST_BYTES = 1 << 30
WARNING_EXAMPLES = 3
FLOAT32_EXACT = 1 << 24  # float32 holds every integer up to 2^24: record 0's labels are exact below that


class RecSource(Source):
    name = "rec"
    description = "MXNet RecordIO (train.rec + train.idx: insightface, im2rec, DCFace), read in place without mxnet"
    card_description = (
        "Images read in place from an MXNet RecordIO file (`.rec` with its `.idx`), the format of insightface's "
        "training sets; each image's bytes are kept as stored, and identities are the records' class labels."
    )
    columns = {
        "json.record": "the image's record key in the source .rec file",
        "json.path": "the image's path in the source's list.txt (DCFace layout only)",
    }
    options = {
        "layout": Option("auto", "auto, face (record 0 and identity records), plain (every key is an image) or "
                         "list (DCFace: classes from list.txt)", choices=("auto", "face", "plain", "list")),
        "list": Option("", "the index<TAB>path list of the list layout (default: list.txt beside the .rec)",
                       path=True),
        "channels": Option("rgb", "channel order of the stored images: rgb, or bgr (bytes kept, marked in the json)",
                           choices=CHANNEL_ORDERS),
        "dataset": Option(None, "a published set this file holds (its licence, citation and counts go to the card): "
                          f"{', '.join(names_read_by('rec'))}", choices=names_read_by("rec")),
    }

    def __init__(self, path, **options):
        super().__init__(path, **options)
        declare(self, self.opts["dataset"])
        self.channels = self.opts["channels"]  # marked in each sample's json by the build, bytes kept
        self.rec_path, self.idx_path = self._find_files(self.path)
        self.rec_name = printable_name(os.path.basename(self.rec_path))
        idx_name = printable_name(os.path.basename(self.idx_path))
        try:
            keys, offsets = read_idx(self.idx_path)
        except IdxError as exc:
            raise UsageError(f"source 'rec': {idx_name}: {exc}") from None
        except OSError as exc:
            raise UsageError(f"source 'rec': cannot read {idx_name}: {exc.strerror or exc}") from None
        if not len(keys):
            raise UsageError(f"source 'rec': {idx_name} lists no record")
        self.file_size = os.path.getsize(self.rec_path)
        self._fd_value: int | None = None
        self._fd_pid = os.getpid()
        self._fd_lock = threading.Lock()
        self._index_keys, self._index_offsets = keys, offsets
        self.records_in_index = len(keys)
        self._sorted = np.argsort(keys, kind="stable")
        self._sorted_keys = keys[self._sorted]
        self.warnings: list[str] = []
        self.unplaced: Counter = Counter()  # reason -> records left out of the plan
        self._unplaced_examples: dict[str, list[str]] = defaultdict(list)
        self.property = self._read_property()

        self.layout = self._choose_layout()
        self._paths: dict[int, str] = {}  # list layout: key -> the list's path
        self._classes: dict[str, int | None] = {}  # identity -> the class every record must carry (None: unchecked)
        if self.layout == "list":
            grouped = self._plan_list()
        elif self.layout == "face":
            grouped = self._plan_face()
        else:
            grouped = self._plan_plain(keys)
        del keys, offsets
        self._ids = list(grouped)
        rows = [grouped[i] for i in self._ids]
        self._bounds = dict(zip(self._ids, _bounds([len(r) for r in rows])))
        self._keys = np.concatenate(rows).astype(np.int64) if rows else np.empty(0, np.int64)
        self._offsets = self._offset_of(self._keys)
        # what planning alone needed: each process keeps only the planned records' keys and offsets
        del self._index_keys, self._index_offsets, self._sorted, self._sorted_keys
        if self.layout == "list":
            self._row_paths = [self._paths[k] for k in self._keys.tolist()]
            self._paths = {}
        for reason, count in sorted(self.unplaced.items()):
            examples = ", ".join(self._unplaced_examples[reason])
            self.warnings.append(f"rec: {self.rec_name}: left out {count} record{'s' if count != 1 else ''} "
                                 f"({reason}), e.g. {examples}")
        if not self._ids:
            raise UsageError(f"source 'rec': no image record of {self.rec_name} could be placed in an identity "
                             f"({'; '.join(self.warnings) or 'the file lists none'})")
        if os.environ.get("RANK", "0") == "0":  # every process plans; one of them tells
            for line in self.warnings:
                warn(line)
        self._image_format: str | None = None
        self._close_fd()  # opened again by whichever process reads images (a forked child gets its own)

    # --- construction ---

    @staticmethod
    def _find_files(path: str) -> tuple[str, str]:
        if os.path.isdir(path):
            names = sorted(os.listdir(path))
            recs = [n for n in REC_NAMES if n in names] or [n for n in names if n.endswith(".rec")]
            if len(recs) != 1 and not any(n in names for n in REC_NAMES):
                found = ", ".join(recs[:5]) or "none"
                raise UsageError(f"source 'rec': expected train.rec, file.rec or a single .rec file in {path} "
                                 f"(found: {found}); pass the .rec file itself")
            rec = os.path.join(path, recs[0])
        elif path.endswith(".rec"):
            rec = path
        else:
            raise UsageError(f"source 'rec': {path} is neither a folder nor a .rec file")
        idx = rec[:-4] + ".idx"
        if not os.path.isfile(idx):
            raise UsageError(f"source 'rec': {printable_name(os.path.basename(rec))} has no "
                             f"{printable_name(os.path.basename(idx))} beside it (facegen reads records through the "
                             "index; mxnet's im2rec writes one)")
        return rec, idx

    def _read_property(self) -> str | None:
        """insightface's ``property`` file beside the .rec ("classes,height,width"), for the provenance."""
        path = os.path.join(os.path.dirname(self.rec_path), "property")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO named so would block the build forever
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                self.warnings.append(f"rec: {self.rec_name}: the 'property' beside it is not a regular file: ignored")
                return None
            text = os.read(fd, 256).decode("ascii", "replace").strip().splitlines()
        except OSError:
            return None
        finally:
            os.close(fd)
        return text[0].strip() if text else None

    def _fd(self) -> int:
        """This process's read handle on the .rec, opened on first use (and again in a forked child)."""
        with self._fd_lock:
            if self._fd_pid != os.getpid():
                self._fd_value, self._fd_pid = None, os.getpid()
            if self._fd_value is None:
                self._fd_value = os.open(self.rec_path, os.O_RDONLY)
            return self._fd_value

    def _close_fd(self) -> None:
        with self._fd_lock:
            if self._fd_value is not None and self._fd_pid == os.getpid():
                os.close(self._fd_value)
            self._fd_value = None

    def _offset_of(self, keys: np.ndarray) -> np.ndarray:
        """The .idx offset of each key, -1 where the .idx does not list it."""
        ordered = self._sorted_keys
        at = np.searchsorted(ordered, keys)
        found = at < len(ordered)
        found[found] = ordered[at[found]] == keys[found]
        offsets = np.full(len(keys), -1, np.int64)
        offsets[found] = self._index_offsets[self._sorted[at[found]]]
        return offsets

    def _offset(self, key: int) -> int:
        """The .idx offset of one key, -1 when the .idx does not list it."""
        at = int(np.searchsorted(self._sorted_keys, key))
        if at < len(self._sorted_keys) and int(self._sorted_keys[at]) == key:
            return int(self._index_offsets[self._sorted[at]])
        return -1

    def _leave_out(self, reason: str, key: int) -> None:
        self.unplaced[reason] += 1
        if len(self._unplaced_examples[reason]) < WARNING_EXAMPLES:
            self._unplaced_examples[reason].append(f"record {key}")

    def _header(self, key: int):
        """The IRHeader of record ``key`` (RecordError when it cannot be read)."""
        offset = self._offset(key)
        if offset < 0:
            raise RecordError("record missing from the index", f"key {key} is not in the .idx")
        return read_header(self._fd(), offset, self.file_size)

    def _choose_layout(self) -> str:
        layout = self.opts["layout"]
        list_path = self.opts["list"] or os.path.join(os.path.dirname(self.rec_path), LIST_NAME)
        if layout == "list" or (layout == "auto" and (self.opts["list"] or os.path.isfile(list_path))):
            if not os.path.isfile(list_path):
                raise UsageError(f"source 'rec': layout=list needs {printable_name(os.path.basename(list_path))} "
                                 "beside the .rec (or list=FILE)")
            self.list_path = list_path
            return "list"
        if layout != "auto":
            return layout
        if self._offset(0) < 0:
            return "plain"
        return "face" if _is_header_record(*self._record_zero()) else "plain"

    def _record_zero(self):
        """Record 0's header and the size of its image (insightface's header record has none)."""
        offset = self._offset(0)
        try:
            if offset < 0:
                raise RecordError("record missing from the index", "key 0 is not in the .idx")
            header, image = unpack(read_record(self._fd(), offset, self.file_size))
        except RecordError as exc:
            raise UsageError(f"source 'rec': {self.rec_name}: record 0 is unreadable ({exc}); pass layout=plain to "
                             "read every record as an image") from None
        return header, len(image)

    def _plan_list(self) -> dict[str, np.ndarray]:
        """DCFace: list.txt's ``index<TAB>path`` lines; the class is the path's folder."""
        import pandas as pd

        name = printable_name(os.path.basename(self.list_path))
        size = os.path.getsize(self.list_path)
        if size > MAX_LIST_BYTES:
            raise UsageError(f"source 'rec': {name} has {size} bytes, over the {MAX_LIST_BYTES} bytes limit")
        try:
            table = pd.read_csv(self.list_path, sep="\t", header=None, index_col=None, dtype={0: np.int64, 1: str},
                                quoting=csv.QUOTE_NONE, engine="c", keep_default_na=False, na_filter=False,
                                encoding="utf-8")
        except (ValueError, OverflowError, UnicodeDecodeError, pd.errors.ParserError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UsageError(f"source 'rec': {name} is not index<TAB>path lines ({first[:200]})") from None
        if table.shape[1] != 2:
            raise UsageError(f"source 'rec': {name} is not index<TAB>path lines ({table.shape[1]} fields on a line)")
        indices = table[0].to_numpy(np.int64)
        paths = table[1].tolist()
        if len(np.unique(indices)) != len(indices):
            raise UsageError(f"source 'rec': {name} lists an index more than once")
        listed = self._offset_of(indices) >= 0
        grouped: dict[str, list[int]] = defaultdict(list)
        for index, path, present in zip(indices.tolist(), paths, listed.tolist()):
            parts = path.replace("\\", "/").split("/")
            folder = parts[-2] if len(parts) >= 2 else ""
            if not present:
                self._leave_out(f"in {name} but not in the .idx", index)
            elif not folder:
                self._leave_out(f"a {name} path without a folder", index)
            else:
                grouped[folder].append(index)
                self._paths[index] = path
        not_listed = len(self._index_keys) - int(listed.sum())
        if not_listed:
            self.unplaced[f"in the .idx but not in {name}"] += not_listed
            missing = np.setdiff1d(self._index_keys, indices)[:WARNING_EXAMPLES]
            self._unplaced_examples[f"in the .idx but not in {name}"] = [f"record {k}" for k in missing.tolist()]
        for folder in grouped:
            self._classes[folder] = None
        return {folder: np.asarray(grouped[folder], np.int64) for folder in sorted(grouped, key=natural_key)}

    def _plan_face(self) -> dict[str, np.ndarray]:
        """insightface: record 0, the identity records, and the header of each run's first image."""
        header, image_bytes = self._record_zero()
        if not _is_header_record(header, image_bytes):
            raise UsageError(f"source 'rec': {self.rec_name}: record 0 is not a header record (flag > 0, labels "
                             f"[N+1, N+1+C], no image): found flag {header.flag}; use layout=plain")
        first_identity, end_identity = int(header.labels[0]), int(header.labels[1])
        if end_identity - 1 > len(self._index_keys):  # keys 1 .. N+C, each at most once in the .idx
            raise UsageError(f"source 'rec': {self.rec_name}: record 0 declares {first_identity - 1} images and "
                             f"{end_identity - first_identity} identity records, but the .idx lists only "
                             f"{len(self._index_keys)} records")
        if end_identity > FLOAT32_EXACT:
            return self._plan_face_by_image_labels(first_identity)
        fd, size = self._fd(), self.file_size
        identity_keys = np.arange(first_identity, end_identity, dtype=np.int64)
        ranges: list[tuple[int, int, int]] = []  # (start, end, identity record key)
        for key, offset in zip(identity_keys.tolist(), self._offset_of(identity_keys).tolist()):
            try:
                if offset < 0:
                    raise RecordError("record missing from the index", f"key {key} is not in the .idx")
                record = read_header(fd, offset, size)
            except RecordError as exc:
                self._leave_out(f"identity record unreadable: {exc.reason}", key)
                continue
            if record.flag < 2 or not all(math.isfinite(v) and v == int(v) for v in record.labels[:2]):
                self._leave_out("identity record without a [start, end) label", key)
                continue
            start, end = int(record.labels[0]), int(record.labels[1])
            if not 1 <= start < end <= first_identity:
                self._leave_out("identity record with a range outside the images", key)
                continue
            ranges.append((start, end, key))
        runs: list[tuple[int, int, int]] = []  # (class, start, end)
        covered = np.zeros(first_identity, bool)  # image keys 1..N covered by a run (index 0 unused)
        first_offsets = self._offset_of(np.array([r[0] for r in ranges], np.int64)).tolist()
        for (start, end, key), first_offset in zip(ranges, first_offsets):
            if covered[start:end].any():
                self._leave_out("identity record overlapping another", key)
                continue
            cls = self._run_class(start, end, first_offset)
            if cls is None:
                continue
            covered[start:end] = True
            runs.append((cls, start, end))
        grouped: dict[int, list[np.ndarray]] = defaultdict(list)
        for cls, start, end in runs:
            grouped[cls].append(np.arange(start, end, dtype=np.int64))
        orphans = np.flatnonzero(~covered[1:]) + 1
        orphans = orphans[self._offset_of(orphans) >= 0]  # image keys the .idx lists that no run covers
        if len(orphans):
            self.warnings.append(f"rec: {self.rec_name}: {len(orphans)} image record(s) are in no identity record's "
                                 f"range; placed by their own labels (e.g. record {int(orphans[0])})")
            for cls, keys in self._classes_of(orphans).items():
                grouped[cls].append(keys)
        identities = {}
        for cls in sorted(grouped):
            identities[str(cls)] = np.sort(np.concatenate(grouped[cls]))
            self._classes[str(cls)] = cls
        return identities

    def _plan_face_by_image_labels(self, first_identity: int) -> dict[str, np.ndarray]:
        """Record 0 past 2^24 (Glint360K's 17 M images): float32 rounds its labels and the identity records' ranges
        (to even, off by one or more), so each image record's own header gives its class instead; records without
        an image (the identity records, where the rounded boundary may fall) are not images."""
        spacing = max(1, int(np.spacing(np.float32(first_identity))))
        keys = self._sorted_keys[(self._sorted_keys >= 1) & (self._sorted_keys < first_identity + spacing)]
        self.warnings.append(f"rec: {self.rec_name}: record 0's labels are past 2^24, where float32 rounds them: "
                             f"each of the {len(keys)} image records' own label is read instead")
        identities = {}
        for cls, rows in sorted(self._classes_of(keys, images_only=True).items()):
            identities[str(cls)] = rows
            self._classes[str(cls)] = cls
        return identities

    def _run_class(self, start: int, end: int, first_offset: int) -> int | None:
        """The class of an identity record's run: the label of its first image whose header is readable."""
        for key in range(start, end):
            try:
                if key == start and first_offset >= 0:
                    cls = label_class(read_header(self._fd(), first_offset, self.file_size))
                else:
                    cls = label_class(self._header(key))
            except RecordError:
                continue
            if cls is not None:
                return cls
        self._leave_out("identity whose images have no readable label", start)
        return None

    def _plan_plain(self, keys: np.ndarray) -> dict[str, np.ndarray]:
        """Every record is an image: its header's label is its class."""
        identities = {}
        for cls, rows in sorted(self._classes_of(keys).items()):
            identities[str(cls)] = rows
            self._classes[str(cls)] = cls
        return identities

    def _classes_of(self, keys: np.ndarray, images_only: bool = False) -> dict[int, np.ndarray]:
        """Class -> keys (in the given order), from one header read per record; unreadable ones are left out, and
        with ``images_only`` records that hold no image (insightface's header records) are passed over."""
        fd, size = self._fd(), self.file_size
        classes = np.full(len(keys), -1, np.int64)
        for row, (key, offset) in enumerate(zip(keys.tolist(), self._offset_of(keys).tolist())):
            try:
                if offset < 0:
                    raise RecordError("record missing from the index", "")
                header = read_header(fd, offset, size)
            except RecordError as exc:
                self._leave_out(f"label unreadable: {exc.reason}", key)
                continue
            if images_only and header.image_size == 0:
                continue
            cls = label_class(header)
            if cls is None:
                self._leave_out("label is not a class number", key)
                continue
            classes[row] = cls
        placed = np.flatnonzero(classes >= 0)
        order = placed[np.argsort(classes[placed], kind="stable")]
        values, starts = np.unique(classes[order], return_index=True)
        return {int(c): keys[rows] for c, rows in zip(values.tolist(), np.split(order, starts[1:]))}

    # --- the Source API ---

    @property
    def image_format(self) -> str:
        """``jpg`` or ``png``: the encoding of the first readable image (insightface's files are JPEG)."""
        if self._image_format is None:
            self._image_format = "jpg"
            for row in range(min(len(self._keys), 16)):
                item = self._read(row, None)
                if isinstance(item, SourceImage):
                    self._image_format = item.ext
                    break
        return self._image_format

    def identities(self):
        return self._ids

    def image_refs(self, identity_id):
        start, stop = self._bounds[identity_id]
        return [f"{self.rec_name}:{key}" for key in self._keys[start:stop].tolist()]

    def load(self, identity_id):
        start, stop = self._bounds[identity_id]
        return self.load_images(identity_id, range(stop - start))

    def load_images(self, identity_id, indices):
        start, _ = self._bounds[identity_id]
        return [self._read(start + i, identity_id) for i in indices]

    def _read(self, row: int, identity_id: str | None) -> SourceImage | Skip:
        key, offset = int(self._keys[row]), int(self._offsets[row])
        ref = f"{self.rec_name}:{key}"
        if offset < 0:
            return Skip(ref, "record missing from the index", f"key {key} is not in the .idx")
        try:
            header, image = unpack(read_record(self._fd(), offset, self.file_size, MAX_RECORD_BYTES))
        except RecordError as exc:
            return Skip(ref, exc.reason, exc.detail)
        except OSError as exc:
            return Skip(ref, "unreadable file", str(exc.strerror or exc))
        expected = self._classes.get(identity_id) if identity_id is not None else None
        if expected is not None and label_class(header) != expected:
            return Skip(ref, "label disagrees with its identity",
                        f"record {key} is labelled {header.label:g}, its identity is class {expected}")
        if not image:
            return Skip(ref, "empty record", f"record {key} holds no image bytes")
        ext = sniff_image(image)
        if ext is None:
            return Skip(ref, "not an image", f"record {key}'s bytes are neither JPEG nor PNG")
        meta = {"record": key}
        if self.layout == "list":
            meta["path"] = self._row_paths[row]
        return SourceImage(ref=ref, data=bytes(image), ext=ext, meta=meta)

    def json_features(self):
        features = {"record": Value("int64")}
        if self.layout == "list":
            features["path"] = Value("string")
        return features

    def provenance(self):
        return {
            "file": self.rec_name,
            "layout": self.layout,
            "records_in_index": self.records_in_index,
            "identities": len(self._ids),
            "images": int(len(self._keys)),
            "property": self.property,
            "channels": self.opts["channels"],
            "left_out": dict(sorted(self.unplaced.items())),
            "warnings": list(self.warnings),
        }

    def close(self):
        self._close_fd()


def _is_header_record(header, image_bytes: int) -> bool:
    """insightface's record 0: flag > 0, labels [N+1, N+1+C] with 1 <= N+1 <= N+1+C, and no image."""
    if header.flag < 2 or image_bytes != 0:
        return False
    first, end = header.labels[0], header.labels[1]
    return all(math.isfinite(v) and v == int(v) for v in (first, end)) and 1 <= first <= end


def _bounds(counts: list[int]) -> list[tuple[int, int]]:
    ends = np.cumsum(counts).tolist()
    return [(end - count, end) for count, end in zip(counts, ends)]
