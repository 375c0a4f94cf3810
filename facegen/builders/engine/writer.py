"""The tar writer: one tar per published shard or hidden unit of work (:class:`TarWriter`), written under a hidden
name, renamed when complete, then its sample index, then its stats last.

Published shards are ``data/train/train-{j:06d}.tar`` with ``.facegen/shards/{j:06d}.json`` (:class:`ShardStats`) and
``.facegen/shards/index/{j:06d}.json`` (:class:`SampleIndex`: where each sample lies); units of work of
identity-level transforms are ``.facegen/units/{i:06d}.tar`` with the same two records (:class:`UnitStats`) under
``.facegen/units/``. Every sample a tar skipped is listed in ``.facegen/skipped/{j:06d}.jsonl`` (shards) or
``.facegen/units/skipped/{i:06d}.jsonl`` (units), written before the stats. A tar is complete when its stats exist
and its size and XXH3-128 match them (:func:`check_complete`); a kill at any moment leaves at most a hidden
temporary file, which the next attempt at that tar removes.
"""

from __future__ import annotations

import io
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from facegen.builders.engine.images import IMAGE_FIELD_EXTENSIONS, ImageError, prepare_image
from facegen.builders.engine.skipped import write_skipped_list
from facegen.fileio import fsync_folder, temporary_name, xxh3_128_file
from facegen.layout import OutputFolder, Place
from facegen.layout.records import (
    QualityTotals,
    SampleIndex,
    ShardStats,
    TarStats,
    UnitStats,
    WrittenBy,
    dumps,
)
from facegen.records import Face, IdentityResult, Skip, printable_name
from facegen.tarfiles import payload_bytes

MAX_FAILURES_LISTED = 100
MAX_SIZES_LISTED = 64  # distinct image sizes counted per shard; more are counted as "other"

SHARD, UNIT = "shard", "unit"  # the two kinds of tar a build writes
STATS = {SHARD: ShardStats, UNIT: UnitStats}

ImageInfo = tuple[str, str, list[str]]  # a stored image's PIL mode, "WxH" and the changes made on its way in


def read_stats(place: Place, kind: str) -> TarStats | None:
    """A tar's stats, or None when they are missing or damaged (a damaged file means: redo that tar)."""
    return STATS[kind].read(place.stats)


def check_complete(place: Place, kind: str, checksum: bool = True) -> str | None:
    """None when the tar is complete; otherwise why not ("missing", or what failed the check).

    Complete = stats and index exist, and the tar's size (and, with ``checksum``, its XXH3-128) match the stats.
    """
    stats = read_stats(place, kind)
    if stats is None:
        return "missing" if not place.stats.exists() else "unreadable stats"
    try:
        size = place.tar.stat().st_size
    except OSError:
        return "tar missing"
    if size != stats.tar_bytes:
        return f"{size} bytes, its stats say {stats.tar_bytes}"
    if not place.index.exists():
        return "index missing"
    if checksum and xxh3_128_file(place.tar) != stats.tar_xxh3_128:
        return "checksum (XXH3-128) differs from its stats"
    if checksum and SampleIndex.read(place.index) is None:
        return "unreadable sample index"
    return None


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


@dataclass(frozen=True)
class SampleFormat:
    """How every sample of a build is stored: the same for all its tars."""

    image_format: str  # png or jpg: the image column
    source_name: str  # the `source` field of every sample's json
    quality_fields: tuple[str, ...] = ()  # the transform's quality figures, summed in the stats
    verify: str = "full"  # how images not checked on the loading threads are checked here
    lossy_allowed: bool = False  # --format jpg given: a PNG may become a JPEG
    # the channel order of the source's images, when it declared one: each sample's json says what is stored
    channels: str | None = None
    to_rgb: bool = False  # BGR source images converted to RGB (--format png asked for it), losslessly


class TarWriter:
    """Writes one tar of the build (a published shard or a unit of work, ``kind``): samples keyed
    ``{cls:06d}_{n:03d}`` under the tar's hidden name; :meth:`commit` renames it and writes its sample index, its
    skipped list and its stats, last.

    A unit's sample index also records each sample's image mode, size and conversions, so that the published shards
    assembled from it count them in their stats without decoding anything again. ``stats_fields`` are what the
    caller records in the stats besides the counts (why the file is redone, what it was planned from).
    """

    def __init__(self, folder: OutputFolder, kind: str, index: int, samples: SampleFormat,
                 rank: tuple[int, int] = (0, 1), redone_because: str | None = None, **stats_fields: Any):
        self.folder, self.kind, self.index = folder, kind, index
        self.place = folder.unit(index) if kind == UNIT else folder.shard(index)
        self.samples = samples
        self.rank = rank
        self.redone_because = redone_because  # said in the stats, so that the main process's summary counts it
        self.stats_fields = stats_fields
        final = self.place.tar
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            stale.unlink(missing_ok=True)  # left by a killed attempt at this file
        self._tmp = temporary_name(final)
        self._file = open(self._tmp, "wb", buffering=1 << 20)
        self._tar = UstarWriter(self._file)  # deterministic bytes: the same samples give the same tar anywhere
        self._started = time.perf_counter()
        self._started_at = time.time()
        self._finished_at = 0.0
        self._seconds = 0.0
        self.images = 0
        self._per_identity: dict[str, int] = {}
        self._skipped: Counter = Counter()
        self._failures: list[dict] = []  # every skip; the stats keep the first few, the skipped list all
        self._quality: dict[str, dict] = {}
        self._converted: Counter = Counter()  # re-encode reason -> images
        self._modes: Counter = Counter()  # PIL mode of the stored images
        self._sizes: Counter = Counter()  # "WxH" of the stored images
        # the sample index: where each sample lies in the tar (key, identity, label, offset, length)
        self._keys: list[str] = []
        self._identity_ids: list[str] = []
        self._labels: list[int] = []
        self._offsets: list[int] = []
        self._lengths: list[int] = []
        self._images_info: list[ImageInfo] = []  # units only: (mode, "WxH", changes) of each sample, for assembly

    @property
    def identities(self) -> int:
        return len(self._per_identity)

    @property
    def bytes_written(self) -> int:
        """The tar's size so far (what a full disk cut short, when it did)."""
        return self._tar.size

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
        self._per_identity[name] = self._per_identity.get(name, 0) + written
        result.skipped = skipped
        for skip in skipped:
            reason = printable_name(skip.reason)
            self._skipped[reason] += 1
            self._failures.append({"identity": printable_name(ident.id), "ref": printable_name(skip.ref),
                                   "reason": reason, "detail": printable_name(skip.detail)})

    def copy(self, key: str, identity_id: str, cls: int, block: bytes, info: ImageInfo | None = None) -> None:
        """A sample copied as it lies in another tar of this build (its members' headers and padding included);
        ``info``: its image's (mode, "WxH", changes) as recorded where it was written, counted in these stats."""
        self._add(key, identity_id, cls, self._tar.add_raw(block))
        if info is not None:
            self._count_image(info)
        self.images += 1
        name = printable_name(identity_id)
        self._per_identity[name] = self._per_identity.get(name, 0) + 1

    def _add(self, key: str, identity_id: str, cls: int, where: tuple[int, int]) -> None:
        self._keys.append(key)
        self._identity_ids.append(printable_name(identity_id))  # the index, too, must always encode
        self._labels.append(cls)
        self._offsets.append(where[0])
        self._lengths.append(where[1])

    def _sample(self, cls: int, n: int, identity_id: str, face: Face) -> tuple[str, dict, ImageInfo]:
        fmt, verify = self.samples.image_format, self.samples.verify
        image = prepare_image(face.image, fmt, verify, self.samples.lossy_allowed, self.samples.to_rgb)
        width, height = image.size  # of the stored pixels (before any EXIF orientation of a copied JPEG)
        meta = {"identity": identity_id, "source": self.samples.source_name, "source_ref": face.ref,
                "width": width, "height": height, **face.meta}
        if self.samples.channels is not None:
            meta["channels"] = "rgb" if self.samples.to_rgb else self.samples.channels
        sample = {fmt: image.data, "cls": str(cls).encode(), "json": dumps(meta)}
        changes = list(face.changes) + image.changes
        for field, value in face.extras.items():
            kind = IMAGE_FIELD_EXTENSIONS.get(field.rsplit(".", 1)[-1])
            if kind is None:
                sample[field] = encode_extra(field, value)
                continue
            extra = prepare_image(value, kind, verify)  # an extra image is never made lossy
            sample[field] = extra.data
            changes += [f"{field}: {change}" for change in extra.changes]
        return f"{cls:06d}_{n:03d}", sample, (image.mode, f"{width}x{height}", changes)

    def _count_image(self, info: ImageInfo) -> None:
        mode, size, changes = info
        self._converted.update(changes)
        self._modes[mode] += 1
        self._sizes[size if size in self._sizes or len(self._sizes) < MAX_SIZES_LISTED else "other"] += 1
        if self.kind == UNIT:
            self._images_info.append(info)

    def _count_quality(self, face: Face) -> None:
        for name in self.samples.quality_fields:  # counted once the sample is written
            value = face.meta.get(name)
            if isinstance(value, (int, float, np.number)) and np.isfinite(value):
                q = self._quality.setdefault(name, {"sum": 0.0, "count": 0, "min": float(value), "max": float(value)})
                q["sum"] += float(value)
                q["count"] += 1
                q["min"], q["max"] = min(q["min"], float(value)), max(q["max"], float(value))

    def finish(self) -> None:
        """All samples are written: end the tar. ``commit`` (fsync, rename, records) may then run in another
        thread."""
        self._tar.close()
        self._file.flush()
        self._finished_at = time.time()
        self._seconds = time.perf_counter() - self._started

    def commit(self) -> TarStats:
        """Give the finished tar its name, then write its sample index, its skipped list and its stats (last: their
        existence, and agreement with the tar, means complete)."""
        os.fsync(self._file.fileno())  # the bytes are on disk before the final name exists
        self._file.close()
        size = self._tar.size
        os.replace(self._tmp, self.place.tar)
        fsync_folder(self.place.tar.parent)
        tar = self.place.tar.relative_to(self.folder.root).as_posix()
        unit = self.kind == UNIT
        index = SampleIndex(
            tar=tar, tar_bytes=size, keys=self._keys, identities=self._identity_ids, cls=self._labels,
            offsets=self._offsets, lengths=self._lengths,
            # what the assembly counts in the published shards' stats, per sample
            image_modes=[mode for mode, _, _ in self._images_info] if unit else None,
            image_sizes=[size for _, size, _ in self._images_info] if unit else None,
            changes=[changes for _, _, changes in self._images_info] if unit else None)
        index.write(self.place.index)
        stats = STATS[self.kind](
            identities=self.identities,
            images=self.images,
            images_per_identity=self._per_identity,
            skipped=dict(sorted(self._skipped.items())),
            failures=self._failures[:MAX_FAILURES_LISTED],
            quality={name: QualityTotals(**q) for name, q in self._quality.items()},
            verify=self.samples.verify,
            converted=dict(sorted(self._converted.items())),
            image_modes=dict(sorted(self._modes.items())),
            image_sizes=dict(self._sizes.most_common()),
            seconds=round(self._seconds, 3),
            started_at=self._started_at,
            finished_at=self._finished_at,
            written_by=WrittenBy(process=self.rank[0], processes=self.rank[1], pid=os.getpid()),
            tar=tar,
            tar_bytes=size,
            tar_xxh3_128=self._tar.digest.hexdigest(),
            sample_bytes=self._tar.payload,  # the members' data bytes (the card's num_bytes, no tar re-read)
            redone_because=self.redone_because,
            **{self.kind: self.index},
            **self.stats_fields,
        )
        write_skipped_list(self.place.skipped, self.kind, self.index, self._failures)
        stats.write(self.place.stats)  # last: its existence (and agreement) means complete
        return stats

    def abort(self) -> None:
        """Discard the tar being written (a failure, Ctrl-C, a lost lock): nothing of it remains."""
        try:
            self._file.close()
        except OSError:  # the buffered rest cannot be flushed (a full disk): the file is discarded anyway
            pass
        finally:
            self._tmp.unlink(missing_ok=True)
