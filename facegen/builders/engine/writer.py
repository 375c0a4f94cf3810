"""The tar writer: one tar per published shard or hidden unit of work, written under a hidden name, renamed when
complete, then its sample index, then its stats last.

Published shards are ``data/train/train-{j:06d}.tar`` with ``.facegen/shards/{j:06d}.json`` (stats) and
``.facegen/shards/index/{j:06d}.json`` (where each sample lies); units of work of identity-level transforms are
``.facegen/units/{i:06d}.tar`` with the same two records under ``.facegen/units/``. Every sample a file skipped
is listed in ``.facegen/skipped/{j:06d}.jsonl`` (shards) or ``.facegen/units/skipped/{i:06d}.jsonl`` (units),
written before the stats. A file is complete when its
stats exist and its size and XXH3-128 match them; a kill at any moment leaves at most a hidden temporary file,
which the next attempt at that file removes.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from facegen.layout import OutputFolder, Place
from facegen.builders.engine.images import IMAGE_FIELD_EXTENSIONS, ImageError, prepare_image
from facegen.records import Face, IdentityResult, Skip, printable_name
from facegen.tarfiles import payload_bytes

MAX_FAILURES_LISTED = 100
MAX_SIZES_LISTED = 64  # distinct image sizes counted per shard; more are counted as "other"

ImageInfo = tuple[str, str, list[str]]  # a stored image's PIL mode, "WxH" and the changes made on its way in


INDEX_FORMAT = "facegen-sample-index-1"


def file_xxh3_128(path: Path, chunk: int = 8 << 20) -> str:
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_stats(path: Path) -> dict | None:
    """A stats file, or None when it is missing or damaged (a damaged one means: redo that file)."""
    try:
        stats = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return stats if isinstance(stats, dict) else None


def check_place(place: Place, verify: bool = True) -> str | None:
    """None when the tar is complete; otherwise why not ("missing", or what failed the check).

    Complete = stats and index exist, and the tar's size (and, with ``verify``, its XXH3-128) match the stats.
    """
    stats = read_stats(place.stats)
    if stats is None:
        return "missing" if not place.stats.exists() else "unreadable stats"
    try:
        size = place.tar.stat().st_size
    except OSError:
        return "tar missing"
    if size != stats.get("tar_bytes"):
        return f"{size} bytes, its stats say {stats.get('tar_bytes')}"
    if not place.index.exists():
        return "index missing"
    if verify and file_xxh3_128(place.tar) != stats.get("tar_xxh3_128"):
        return "checksum (XXH3-128) differs from its stats"
    return None


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes under a hidden temporary name, fsync, rename: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk leaves no half-written temporary behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def json_default(value: Any):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(value: Any) -> bytes:
    return json.dumps(value, default=json_default, ensure_ascii=False, separators=(",", ":")).encode()


def encode_extra(field: str, value: Any) -> bytes:
    """Encode one extra tar member by its field's last extension (what `datasets` will decode it by)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    last = field.rsplit(".", 1)[-1]
    if last == "npy":
        buf = io.BytesIO()
        np.save(buf, np.asarray(value), allow_pickle=False)
        return buf.getvalue()
    if last in IMAGE_FIELD_EXTENSIONS:
        return prepare_image(value, IMAGE_FIELD_EXTENSIONS[last]).data
    if last in ("json", "jsn"):
        return dumps(value)
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (int, np.integer)):
        return str(int(value)).encode()
    raise TypeError(f"cannot encode extra field {field!r} of type {type(value).__name__}")


class UstarWriter:
    """A minimal, deterministic USTAR tar writer for regular files with short names.

    Why not webdataset.TarWriter: it builds every member header through ``tarfile.TarInfo`` (a copy and the pax
    logic, ~25 µs per member); a sample here has 3+ members and the passthrough target is 0.8x the rate of copying
    only the images with TarWriter. The headers are byte-identical to ``tarfile``'s USTAR headers (fixed mtime 0,
    mode 0444, owner facegen), read by ``tarfile``, ``webdataset`` and ``datasets`` alike.
    """

    RECORD = 10240  # tar files end padded to a multiple of the 20-block record, like tarfile's

    def __init__(self, fileobj):
        self.f = fileobj
        self.size = 0
        self.payload = 0  # the members' data bytes (no headers, no padding): the card's num_bytes
        # XXH3-128 of the bytes as written (~2 µs per sample); sha256 cost 15% of the passthrough rate
        self.digest = xxhash.xxh3_128()
        head = bytearray(512)
        head[100:108] = b"0000444\0"  # mode
        head[108:116] = b"0000000\0"  # uid
        head[116:124] = b"0000000\0"  # gid
        head[136:148] = b"00000000000\0"  # mtime 0: reproducible bytes
        head[148:156] = b"        "  # checksum field counts as spaces
        head[156:157] = b"0"  # regular file
        head[257:265] = b"ustar\x0000"
        head[265:272] = b"facegen"  # uname
        head[297:304] = b"facegen"  # gname
        self._template = bytes(head)
        self._template_sum = sum(head)

    def add_sample(self, key: str, fields: dict[str, bytes]) -> tuple[int, int]:
        """One sample's members, fields in sorted order (like webdataset's TarWriter), in a single write.

        Returns (offset, length) of the sample's members (headers included) in the tar."""
        chunks = []
        for field in sorted(fields):
            name, data = f"{key}.{field}".encode(), fields[field]
            if len(name) > 100:
                raise ValueError(f"tar member name longer than 100 bytes: {name.decode()}")
            size_field = b"%011o\0" % len(data)
            header = bytearray(self._template)
            header[0:len(name)] = name
            header[124:136] = size_field
            header[148:156] = b"%06o\0 " % (self._template_sum + sum(name) + sum(size_field))
            chunks += (header, data, b"\0" * (-len(data) % 512))
            self.payload += len(data)
        return self._append(b"".join(chunks))

    def add_raw(self, block: bytes) -> tuple[int, int]:
        """Members already laid out as tar blocks (a sample copied from another tar of this writer)."""
        self.payload += payload_bytes(block)
        return self._append(block)

    def _append(self, block: bytes) -> tuple[int, int]:
        offset = self.size
        self.f.write(block)
        self.digest.update(block)
        self.size += len(block)
        return offset, len(block)

    def close(self) -> None:
        end = 1024 + (-(self.size + 1024) % self.RECORD)
        self.f.write(b"\0" * end)
        self.digest.update(b"\0" * end)
        self.size += end


class ShardWriter:
    """Writes one tar: samples keyed ``{cls:06d}_{n:03d}``, then the tar rename, then its index, then its stats.

    ``unit=True`` writes a hidden unit of work (``.facegen/units/``) instead of published shard ``index``; its
    sample index then also records each sample's image mode, size and conversions, so that the published shards
    assembled from it count them in their stats without decoding anything again.
    """

    def __init__(self, out: Path, index: int, fmt: str, source_name: str, quality_fields=(), rank=(0, 1),
                 unit: bool = False, verify: str = "full", lossy_allowed: bool = False):
        self.out, self.index, self.fmt, self.source_name = out, index, fmt, source_name
        self.verify = verify  # how images not checked on the loading threads are checked here
        self.lossy_allowed = lossy_allowed  # --format jpg given: a PNG may become a JPEG
        self.rank = rank
        self.quality_fields = tuple(quality_fields)
        folder = OutputFolder(out)
        self.place = folder.unit(index) if unit else folder.shard(index)
        self.final = self.place.tar
        self.final.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.final.parent.glob(f".{self.final.name}.tmp-*"):
            stale.unlink(missing_ok=True)  # left by a killed attempt at this file
        self.tmp = self.final.with_name(f".{self.final.name}.tmp-{os.getpid()}")
        self._file = open(self.tmp, "wb", buffering=1 << 20)
        self._tar = UstarWriter(self._file)  # deterministic bytes: the same samples give the same tar anywhere
        self.started = time.perf_counter()
        self.started_at = time.time()
        self.images = 0
        self.per_identity: dict[str, int] = {}
        self.skipped: Counter = Counter()
        self.failures: list[dict] = []
        self.all_failures: list[dict] = []  # the full list, written beside the stats (which keep the first few)
        self.quality: dict[str, dict] = {}
        self.converted: Counter = Counter()  # re-encode reason -> images
        self.modes: Counter = Counter()  # PIL mode of the stored images
        self.sizes: Counter = Counter()  # "WxH" of the stored images
        self.extra_stats: dict[str, Any] = {}  # what the caller adds to the stats (e.g. the units a shard came from)
        # the sample index: where each sample lies in the tar (key, identity, label, offset, length)
        self.keys: list[str] = []
        self.identity_ids: list[str] = []
        self.labels: list[int] = []
        self.offsets: list[int] = []
        self.lengths: list[int] = []
        self.unit = unit
        self.images_info: list[ImageInfo] = []  # units only: (mode, "WxH", changes) of each sample, for assembly

    @property
    def identities(self) -> int:
        return len(self.per_identity)

    def write(self, result: IdentityResult, first: int = 0) -> None:
        """An identity's faces, numbered ``first``, ``first + 1`` … in their keys (dense: a face that cannot be
        encoded takes no number)."""
        ident = result.identity
        written = 0
        skipped = list(result.skipped)
        for face in result.faces:
            try:
                key, sample, info = self._sample(ident.cls, first + written, ident.id, face)
            except ImageError as exc:  # an image that does not decode, or may not be converted
                skipped.append(Skip(face.ref, exc.reason, str(exc)))
                continue
            except (OSError, ValueError, TypeError, SyntaxError) as exc:  # an image PIL cannot encode, a bad extra
                skipped.append(Skip(face.ref, "unencodable sample", f"{type(exc).__name__}: {exc}"))
                continue
            self._add(key, ident.id, ident.cls, self._tar.add_sample(key, sample))
            self._count_image(info)  # counted once the sample is written
            self._count_quality(face)
            written += 1
        self.images += written
        # names that are not UTF-8 (surrogate escapes from a file listing) are written as \xNN: the stats file
        # must always encode, or the shard would be renamed without its stats
        name = printable_name(ident.id)
        self.per_identity[name] = self.per_identity.get(name, 0) + written
        result.skipped = skipped
        for skip in skipped:
            reason = printable_name(skip.reason)
            self.skipped[reason] += 1
            failure = {"identity": printable_name(ident.id), "ref": printable_name(skip.ref), "reason": reason,
                       "detail": printable_name(skip.detail)}
            self.all_failures.append(failure)
            if len(self.failures) < MAX_FAILURES_LISTED:
                self.failures.append(failure)

    def copy(self, key: str, identity_id: str, cls: int, block: bytes, info: ImageInfo | None = None) -> None:
        """A sample copied as it lies in another tar of this build (its members' headers and padding included);
        ``info``: its image's (mode, "WxH", changes) as recorded where it was written, counted in these stats."""
        self._add(key, identity_id, cls, self._tar.add_raw(block))
        if info is not None:
            self._count_image(info)
        self.images += 1
        name = printable_name(identity_id)
        self.per_identity[name] = self.per_identity.get(name, 0) + 1

    def _add(self, key: str, identity_id: str, cls: int, where: tuple[int, int]) -> None:
        self.keys.append(key)
        self.identity_ids.append(printable_name(identity_id))  # the index, too, must always encode
        self.labels.append(cls)
        self.offsets.append(where[0])
        self.lengths.append(where[1])

    def _sample(self, cls: int, n: int, identity_id: str, face: Face) -> tuple[str, dict, ImageInfo]:
        image = prepare_image(face.image, self.fmt, self.verify, self.lossy_allowed)
        width, height = image.size  # of the stored pixels (before any EXIF orientation of a copied JPEG)
        meta = {"identity": identity_id, "source": self.source_name, "source_ref": face.ref,
                "width": width, "height": height, **face.meta}
        sample = {self.fmt: image.data, "cls": str(cls).encode(), "json": dumps(meta)}
        changes = list(face.changes) + image.changes
        for field, value in face.extras.items():
            kind = IMAGE_FIELD_EXTENSIONS.get(field.rsplit(".", 1)[-1])
            if kind is None:
                sample[field] = encode_extra(field, value)
                continue
            extra = prepare_image(value, kind, self.verify)  # an extra image is never made lossy
            sample[field] = extra.data
            changes += [f"{field}: {change}" for change in extra.changes]
        return f"{cls:06d}_{n:03d}", sample, (image.mode, f"{width}x{height}", changes)

    def _count_image(self, info: ImageInfo) -> None:
        mode, size, changes = info
        self.converted.update(changes)
        self.modes[mode] += 1
        self.sizes[size if size in self.sizes or len(self.sizes) < MAX_SIZES_LISTED else "other"] += 1
        if self.unit:
            self.images_info.append(info)

    def _count_quality(self, face: Face) -> None:
        for name in self.quality_fields:  # counted once the sample is written
            value = face.meta.get(name)
            if isinstance(value, (int, float, np.number)) and np.isfinite(value):
                q = self.quality.setdefault(name, {"sum": 0.0, "count": 0, "min": float(value), "max": float(value)})
                q["sum"] += float(value)
                q["count"] += 1
                q["min"], q["max"] = min(q["min"], float(value)), max(q["max"], float(value))

    def finish(self) -> None:
        """All samples are written: end the tar. ``commit`` (fsync, rename, stats) may then run in another thread."""
        self._tar.close()
        self._file.flush()
        self.finished_at = time.time()
        self.seconds = time.perf_counter() - self.started

    def commit(self) -> dict:
        os.fsync(self._file.fileno())  # the bytes are on disk before the final name exists
        self._file.close()
        size = self._tar.size
        os.replace(self.tmp, self.final)
        tar = self.final.relative_to(self.out).as_posix()
        index = {"format": INDEX_FORMAT, "tar": tar, "tar_bytes": size, "keys": self.keys,
                 "identities": self.identity_ids, "cls": self.labels, "offsets": self.offsets,
                 "lengths": self.lengths}
        if self.unit:  # what the assembly counts in the published shards' stats, per sample
            index["image_modes"] = [mode for mode, _, _ in self.images_info]
            index["image_sizes"] = [size for _, size, _ in self.images_info]
            index["changes"] = [changes for _, _, changes in self.images_info]
        write_atomic(self.place.index, dumps(index))
        stats = {
            "shard": self.index,
            "identities": self.identities,
            "images": self.images,
            "images_per_identity": self.per_identity,
            "skipped": dict(sorted(self.skipped.items())),
            "failures": self.failures,
            "quality": self.quality,
            "verify": self.verify,
            "converted": dict(sorted(self.converted.items())),
            "image_modes": dict(sorted(self.modes.items())),
            "image_sizes": dict(self.sizes.most_common()),
            "seconds": round(self.seconds, 3),
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "written_by": {"process": self.rank[0], "processes": self.rank[1], "pid": os.getpid()},
            "tar": tar,
            "tar_bytes": size,
            "tar_xxh3_128": self._tar.digest.hexdigest(),
            "sample_bytes": self._tar.payload,  # the members' data bytes (the card's num_bytes, no tar re-read)
            **self.extra_stats,
        }
        from facegen.builders.engine.skipped import write_skipped_list

        write_skipped_list(self.place.skipped, "unit" if self.unit else "shard", self.index, self.all_failures)
        write_atomic(self.place.stats, dumps(stats))  # last: its existence (and agreement) means complete
        return stats

    def abort(self) -> None:
        try:
            self._file.close()
        except OSError:  # the buffered rest cannot be flushed (a full disk): the file is discarded anyway
            pass
        finally:
            self.tmp.unlink(missing_ok=True)
