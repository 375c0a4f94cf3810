"""Source `digiface`: DigiFace-1M (Microsoft, WACV 2023) read from its published zip parts in place.

The dataset is published as 8 zips whose root holds numeric identity folders (``17/0.png`` … ``17/71.png``).
This source reads, from one directory, any mix of

* the zip parts themselves (``subjects_0-1999_72_imgs.zip``…), read in place, never extracted;
* extracted identity folders (``DIR/17/3.png``);
* wrapper folders, as macOS' Archive Utility extracts them (``DIR/subjects_0-1999_72_imgs/17/3.png``),
  and zips holding such a wrapper folder.

Each zip's central directory is read once, at construction, into a compact numpy index (offset, sizes, CRC of
each member): loading an identity then costs one ``pread`` per image, with no rescan of the zip. The zip files are
opened lazily, once per process (every process of a run constructs its own source).

Members are never used as paths (nothing is extracted). Members with unsafe names (absolute, ``..``), folders with
non-numeric names and other unexpected entries are ignored and reported: one warning line per zip/folder and kind,
said at construction (``facegen.api.warn``), kept in ``source.warnings`` and in the run's provenance.
A member whose bytes fail their CRC becomes a ``Skip`` ("corrupt zip member"); a zip whose central directory
cannot be read (truncated download) is a ``UsageError`` naming the file.

Hostile zips cost bounded memory: symbolic-link entries and names that are not UTF-8 are unexpected entries (never
read); members whose bytes overlap another member's (a zip bomb) are skipped unread, and sizes are checked against
a per-member and a per-identity bound before anything is inflated.
"""

from __future__ import annotations

import os
import re
import struct
import threading
import zlib
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import Value

from facegen.api import (DownloadFile, LicenseInfo, Option, Skip, Source, SourceImage, UsageError, printable_name,
                         warn)

# The eight published parts: (file stem, first id, last id, images per identity).
PUBLISHED_PARTS = [
    ("subjects_0-1999_72_imgs", 0, 1999, 72),
    ("subjects_2000-3999_72_imgs", 2000, 3999, 72),
    ("subjects_4000-5999_72_imgs", 4000, 5999, 72),
    ("subjects_6000-7999_72_imgs", 6000, 7999, 72),
    ("subjects_8000-9999_72_imgs", 8000, 9999, 72),
    ("subjects_100000-133332_5_imgs", 100000, 133332, 5),
    ("subjects_133333-166665_5_imgs", 133333, 166665, 5),
    ("subjects_166666-199998_5_imgs", 166666, 199998, 5),
]
PART_NAMES = [p[0] for p in PUBLISHED_PARTS]
FIRST_ID_OF_5_IMAGE_SET = 100000  # ids 0-9999 have 72 images each, ids 100000-199998 have 5

# Sizes and sha256 of the 72-image parts, from the git-LFS pointers of the byte-identical HF mirror
# lhoestq/digiface1m_720k (Microsoft publishes no checksums); the 5-image parts are checked as zips instead.
DOWNLOAD_FILES = [
    DownloadFile("subjects_0-1999_72_imgs.zip", 2938553163,
                 "29c5347f2287637c646eee7a760cbc392763ecd804e7bb5a9ba6d557fa94f9b3"),
    DownloadFile("subjects_2000-3999_72_imgs.zip", 2936098225,
                 "0e0edb4f8ff7ddeced29aa3e1e734c62cc097b7a1f63eacbac09aa75f3fba989"),
    DownloadFile("subjects_4000-5999_72_imgs.zip", 2936895527,
                 "d5237cc674351b08f708b0393d7ddea6778c3200a17115eee5a2fbea41e498fa"),
    DownloadFile("subjects_6000-7999_72_imgs.zip", 2940940004,
                 "227ab9f733a7b2e4952b283774e83f461484c55d177a185e86d0b69e82d71964"),
    DownloadFile("subjects_8000-9999_72_imgs.zip", 2927632784,
                 "9510e30f07eb3ec523df95cf83fa5401a3a8fd0c9c0970fbb548d1d2718b9651"),
    DownloadFile("subjects_100000-133332_5_imgs.zip"),
    DownloadFile("subjects_133333-166665_5_imgs.zip"),
    DownloadFile("subjects_166666-199998_5_imgs.zip"),
]

LICENSE_NAME = "microsoft-research-use-of-data-agreement"
LICENSE_LINK = "https://github.com/microsoft/DigiFace1M/blob/main/LICENSE"
LICENSE_TEXT = f"""\
DigiFace-1M
Copyright (c) Microsoft Corporation.

DigiFace-1M is made available by Microsoft under the Microsoft Research Use of Data Agreement
(R-UDA, v1.0). The full agreement is published with the dataset:

    {LICENSE_LINK}

Summary of its terms (this summary is not the agreement; the agreement's own text governs):

- Non-commercial research only: the data may be used for non-commercial research purposes, not in or for
  commercial products or services.
- Redistribution of the data, including modified or re-packaged copies such as this one, is allowed only
  under the same agreement: keep this notice and the link above, credit Microsoft and the DigiFace-1M paper,
  bind every recipient to the agreement, and charge no fee for the data.
- What you make with the data (for example models trained on it) is governed by the agreement's provisions
  on "Results"; read them before using such results outside non-commercial research.
- The data is provided as is, without warranty.

By using this dataset you agree to the Microsoft Research Use of Data Agreement.

Cite: Bae et al., "DigiFace-1M: 1 Million Digital Face Images for Face Recognition", WACV 2023.
"""

CITATION = """\
@inproceedings{bae2023digiface1m,
  title={DigiFace-1M: 1 Million Digital Face Images for Face Recognition},
  author={Bae, Gwangbin and de La Gorce, Martin and Baltru{\\v{s}}aitis, Tadas and Hewitt, Charlie and Chen, Dong and Valentin, Julien and Cipolla, Roberto and Shen, Jingjing},
  booktitle={2023 IEEE Winter Conference on Applications of Computer Vision (WACV)},
  year={2023},
  organization={IEEE}
}"""

DIGITS = re.compile(r"[0-9]+")  # ASCII digits only (str.isdigit also accepts "²")
# [wrapper/]ID/N.png with a wrapper that is not hidden, "..", a drive ("C:") or holding a backslash
CANONICAL_MEMBER = re.compile(r"([^/\\.:][^/\\:]*/)?([0-9]+)/([0-9]+)\.(?:png|PNG)")
LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, then file name and extra field lengths at bytes 26-29
LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"
END_RECORD = struct.Struct("<4s4H2LH")  # signature, disks, entry counts, directory size and offset, comment length
END_RECORD_SIGNATURE = b"PK\x05\x06"
ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
ZIP64_LOCATOR_SIZE = 20
ZIP64_END_RECORD = struct.Struct("<4sQ2H2L4Q")  # what a zip of > 65,535 members (every DigiFace part) carries
ZIP64_END_RECORD_SIGNATURE = b"PK\x06\x06"
DIRECTORY_ENTRY = struct.Struct("<4s6H3L5H2L")  # one central-directory header (46 bytes + name, extra, comment)
DIRECTORY_ENTRY_SIGNATURE = b"PK\x01\x02"
READ_SLACK = 512  # read the local header, its name/extra and the data in one pread when they fit
# Memory bounds. A DigiFace PNG is ~25 KB and an identity ~2 MB: a member over MAX_IMAGE_BYTES is not read, and an
# identity stops at MAX_IDENTITY_BYTES (sizes as declared, which inflating never exceeds). Identity-level transforms
# read ahead about 9 identities (~300 MB at most of a hostile part); per-image transforms about 8 chunks of 16 single
# images (~1 GB at most, if every one of them were a member of 8 MB).
MAX_IMAGE_BYTES = 8 << 20
MAX_IDENTITY_BYTES = 32 << 20
S_IFLNK = 0o120000  # a symbolic link's file type in a zip entry's Unix mode (the external attributes' high half)

# One row per image of a container, sorted by (identity, image index). ``overlap``: the member's bytes overlap
# another member's (a zip bomb made of overlapping entries): it is never inflated.
ROW = np.dtype([("image_index", "<i4"), ("offset", "<i8"), ("csize", "<i8"), ("size", "<i8"),
                ("method", "<u2"), ("flags", "<u2"), ("crc", "<u4"), ("overlap", "u1")])

SILENT = ("macOS metadata", "hidden file", "directory entry")  # ignored without a warning


def parse_parts(value: Any) -> tuple[str, ...]:
    """``all`` | ``72`` | ``5`` | part names (comma list or YAML list; with or without ``.zip``)."""
    raw = [str(x) for x in value] if isinstance(value, (list, tuple)) else str(value).split(",")
    names = [n.strip() for n in raw if n.strip()]
    names = [n[:-4] if n.lower().endswith(".zip") else n for n in names]
    if not names:
        raise ValueError("give all, 72, 5 or part names")
    if len(names) > 1 and any(n in ("all", "72", "5") for n in names):
        raise ValueError("all, 72 and 5 cannot be combined with other part names")
    return tuple(names)


def non_negative_int(value: Any) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be >= 0")
    return number


def published_part(identity_number: int) -> str | None:
    for name, first, last, _ in PUBLISHED_PARTS:
        if first <= identity_number <= last:
            return name
    return None


def classify_member(name: str) -> tuple[str, str, str, int]:
    """A zip member or relative file path -> (category, wrapper prefix, identity folder, image index).

    category is "" for an image of the layout ``[wrapper/]ID/N.png``; otherwise the reason it is ignored.
    """
    if not name.isascii() and printable_name(name) != name:  # no json can hold it as a ref
        return "name not UTF-8", "", "", -1
    match = CANONICAL_MEMBER.fullmatch(name)  # the fast path: 1.2 M members are classified at construction
    if match:
        wrapper, folder, stem = match.groups()
        if wrapper != "__MACOSX/":
            return "", wrapper or "", folder, int(stem)
    components = re.split(r"[/\\]", name)
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in components:
        return "unsafe path", "", "", -1
    if name.endswith("/"):
        return "directory entry", "", "", -1
    parts = name.split("/")
    if parts[0] == "__MACOSX":
        return "macOS metadata", "", "", -1
    if any(p.startswith(".") for p in parts):
        return "hidden file", "", "", -1
    if len(parts) == 2:
        wrapper, folder, file_name = "", parts[0], parts[1]
    elif len(parts) == 3 and parts[0]:
        wrapper, folder, file_name = parts[0] + "/", parts[1], parts[2]
    else:
        return "unexpected layout", "", "", -1
    if not DIGITS.fullmatch(folder):
        return "non-numeric folder name", "", "", -1
    stem, dot, ext = file_name.rpartition(".")
    if not dot or ext.lower() != "png":
        return "not a PNG file", "", "", -1
    if not DIGITS.fullmatch(stem):
        return "non-numeric image name", "", "", -1
    return "", wrapper, folder, int(stem)


class MemberError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class Container:
    """A zip part, a wrapper folder or the source directory itself, with the index of its images."""

    kind: str  # "zip" | "folder"
    path: str  # the zip file, or the folder that holds the identity folders
    label: str  # how refs name it: "subjects_0-1999_72_imgs.zip", "subjects_0-1999_72_imgs", "" (the root)
    rows: np.ndarray = field(default_factory=lambda: np.empty(0, ROW))
    prefix: str = ""  # the usual wrapper prefix inside a zip ("" or "subjects_…/")
    names: dict[int, str] = field(default_factory=dict)  # row -> member/file name, only where not canonical
    identities: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> rows [start, stop)
    ignored: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    overlapping: int = 0  # image members whose bytes overlap another member's (skipped when loaded)

    @property
    def stem(self) -> str:
        return self.label[:-4] if self.label.lower().endswith(".zip") else self.label

    def ignore(self, category: str, name: str) -> None:
        self.ignored[category] += 1
        if len(self.examples[category]) < 3:
            self.examples[category].append(printable_name(name))

    def member_name(self, identity_id: str, row: int, image_index: int) -> str:
        name = self.names.get(row)
        return name if name is not None else f"{self.prefix}{identity_id}/{image_index}.png"

    def ref(self, member: str) -> str:
        if self.kind == "zip":
            return f"{self.label}:{member}"
        return f"{self.label}/{member}" if self.label else member

    def finish(self, found: dict[str, list[tuple]]) -> None:
        """Turn the collected (image_index, offset, csize, size, method, flags, crc, overlap, name, wrapper) into
        rows."""
        prefixes = Counter()
        ordered = sorted(found, key=lambda i: (int(i), i))
        entries = []
        for identity_id in ordered:
            images = sorted(found[identity_id], key=lambda t: t[0])
            start = len(entries)
            seen = set()
            for image in images:
                if image[0] in seen:  # "3.png" and "03.png" in one folder
                    self.ignore("duplicate image number", image[8])
                    continue
                seen.add(image[0])
                entries.append((identity_id, image))
                prefixes[image[9]] += 1
            if len(entries) > start:
                self.identities[identity_id] = (start, len(entries))
        rows = np.array([e[1][:8] for e in entries], dtype=ROW) if entries else np.empty(0, ROW)
        self.rows = rows
        self.prefix = prefixes.most_common(1)[0][0] if prefixes else ""
        self.overlapping = int(rows["overlap"].sum())
        for row, (identity_id, image) in enumerate(entries):
            if image[8] != f"{self.prefix}{identity_id}/{image[0]}.png":
                self.names[row] = image[8]


def read_central_directory(path: str) -> list[tuple] | None:
    """The members of a plain zip as (name, local header offset, compressed size, size, method, flags, CRC,
    external attributes).

    Several times faster than ``zipfile.ZipFile(path).infolist()`` on a 144,000-member DigiFace part (no ZipInfo
    objects), which matters because every process of a run indexes every part. Handles the zip64 end record (more
    than 65,535 members); returns None for anything else out of the ordinary (members past 4 GiB, several disks,
    inconsistent records): ``zipfile`` then reads it, or says what is wrong.
    """
    try:
        with open(path, "rb") as f:
            file_size = f.seek(0, os.SEEK_END)
            tail_size = min(file_size, END_RECORD.size + 0xFFFF)  # the end record, then a comment of <= 64 KiB
            f.seek(file_size - tail_size)
            tail = f.read(tail_size)
            at = tail.rfind(END_RECORD_SIGNATURE)
            if at < 0 or at + END_RECORD.size > len(tail):
                return None
            _, disk, directory_disk, entries_here, entries, directory_size, directory_offset, _ = \
                END_RECORD.unpack_from(tail, at)
            directory_end = file_size - tail_size + at  # where the central directory ends
            if tail[max(0, at - ZIP64_LOCATOR_SIZE):max(0, at - ZIP64_LOCATOR_SIZE + 4)] == ZIP64_LOCATOR_SIGNATURE:
                directory_end -= ZIP64_LOCATOR_SIZE + ZIP64_END_RECORD.size  # the zip64 record precedes the locator
                if directory_end < 0:
                    return None
                f.seek(directory_end)
                record = f.read(ZIP64_END_RECORD.size)
                if len(record) != ZIP64_END_RECORD.size:
                    return None
                (signature, _, _, _, disk, directory_disk, entries_here, entries, directory_size,
                 directory_offset) = ZIP64_END_RECORD.unpack_from(record)
                if signature != ZIP64_END_RECORD_SIGNATURE:
                    return None
            elif entries == 0xFFFF or 0xFFFFFFFF in (directory_size, directory_offset):
                return None
            if disk or directory_disk or entries_here != entries:
                return None
            prefix = directory_end - directory_size - directory_offset  # bytes before the zip (self-extractors)
            if prefix < 0:
                return None
            f.seek(directory_offset + prefix)
            directory = f.read(directory_size)
        if len(directory) != directory_size:
            return None
        members, position, unpack = [], 0, DIRECTORY_ENTRY.unpack_from
        for _ in range(entries):
            if position + DIRECTORY_ENTRY.size > directory_size:
                return None
            (signature, _, _, flags, method, _, _, crc, csize, size, name_length, extra_length, comment_length,
             _, _, external, offset) = unpack(directory, position)
            if signature != DIRECTORY_ENTRY_SIGNATURE or 0xFFFFFFFF in (csize, size, offset):
                return None
            start = position + DIRECTORY_ENTRY.size
            raw_name = directory[start:start + name_length]
            # a name flagged UTF-8 that is not: kept as surrogate escapes, then ignored as "name not UTF-8"
            name = raw_name.decode("utf-8", "surrogateescape") if flags & 0x800 else raw_name.decode("cp437")
            members.append((name.partition("\0")[0], offset + prefix, csize, size, method, flags, crc, external))
            position = start + name_length + extra_length + comment_length
        return members
    except (OSError, UnicodeDecodeError, struct.error):
        return None


def index_zip(path: str, label: str) -> Container:
    """Read a zip's central directory once and keep what reading a member later needs."""
    container = Container("zip", path, label)
    members = read_central_directory(path)
    if members is None:
        try:
            with zipfile.ZipFile(path) as archive:
                members = [(i.filename, i.header_offset, i.compress_size, i.file_size, i.compress_type,
                            i.flag_bits, i.CRC, i.external_attr) for i in archive.infolist()]
        except Exception as exc:  # BadZipFile, struct.error, OSError, ValueError…: a truncated or foreign file
            detail = str(exc) or type(exc).__name__
            raise UsageError(
                f"source 'digiface': {path} is not a readable zip ({detail}); it is probably truncated or "
                "corrupt: download it again (facegen download digiface)"
            ) from None
    overlaps = overlapping_members(members)
    found: dict[str, list[tuple]] = defaultdict(list)
    for (name, offset, csize, size, method, flags, crc, external), overlap in zip(members, overlaps.tolist()):
        category, wrapper, folder, image_index = classify_member(name)
        if not category and (external >> 16) & 0o170000 == S_IFLNK:  # its bytes are a link target, not a PNG
            category = "symbolic link"
        if category:
            container.ignore(category, name)
            continue
        found[folder].append((image_index, offset, csize, size, method, flags, crc, overlap, name, wrapper))
    container.finish(found)
    return container


def overlapping_members(members: list[tuple]) -> np.ndarray:
    """Which members' bytes overlap another member's, as a bool array.

    In a published zip every member's local header and data lie apart. A zip bomb of overlapping entries (Fifield
    2019) points many central-directory entries into one small stream that inflates hugely; each such member is
    refused unread. A member spans at least [offset, offset + 30 + compressed size): the local header's name and
    extra field only make it longer, so this never flags a sound zip.
    """
    if not members:
        return np.zeros(0, bool)
    starts = np.fromiter((m[1] for m in members), np.int64, len(members))
    ends = starts + LOCAL_HEADER.size + np.fromiter((m[2] for m in members), np.int64, len(members))
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    reach = np.maximum.accumulate(ends)  # the furthest end among this member and those starting before it
    sorted_overlap = np.zeros(len(members), bool)
    sorted_overlap[1:] = starts[1:] < reach[:-1]  # starts inside an earlier member
    sorted_overlap[:-1] |= ends[:-1] > starts[1:]  # the next member starts inside this one
    overlap = np.empty(len(members), bool)
    overlap[order] = sorted_overlap
    return overlap


def index_folder(path: str, label: str, numeric_only: bool = False) -> Container:
    """List numeric identity folders and their ``N.png`` files (one scandir per identity, at construction).

    ``numeric_only``: other folders are someone else's business (the source directory's wrapper folders).
    """
    container = Container("folder", path, label)
    found: dict[str, list[tuple]] = defaultdict(list)
    with os.scandir(path) as entries:
        folders = [e for e in entries if e.is_dir()]
    for folder in folders:
        category, _, _, _ = classify_member(folder.name + "/0.png")
        if category and numeric_only:
            continue
        if category:
            container.ignore(category, f"{folder.name}/")
            continue
        with os.scandir(folder.path) as files:
            names = [f.name for f in files]
        for file_name in names:
            category, _, _, image_index = classify_member(f"{folder.name}/{file_name}")
            if category:
                container.ignore(category, f"{folder.name}/{file_name}")
                continue
            found[folder.name].append((image_index, 0, 0, 0, 0, 0, 0, 0, f"{folder.name}/{file_name}", ""))
    container.finish(found)
    return container


def read_zip_member(fd: int, row: tuple, budget: int = MAX_IDENTITY_BYTES) -> bytes:
    """One member's bytes: local header, raw data, inflate, length and CRC check (``MemberError`` when bad).

    ``row`` is an index row as a tuple (``ROW``'s fields); ``budget`` the bytes its identity may still take.
    ``pread`` needs no seek, hence no lock: the loader threads of a run share the handle.
    """
    _, offset, csize, size, method, flags, crc, overlap = row
    if overlap:
        raise MemberError("overlapping zip member", "its bytes overlap another member's (a zip bomb): not read")
    if flags & 0x1:
        raise MemberError("unsupported zip member", "encrypted member")
    if method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise MemberError("unsupported zip member", f"compression method {method}")
    if size > MAX_IMAGE_BYTES or csize > MAX_IMAGE_BYTES:
        raise MemberError("unsupported zip member", f"{max(size, csize)} bytes, over the {MAX_IMAGE_BYTES} limit")
    _check_budget(size, budget)  # the declared size, which inflating below never exceeds
    buf = os.pread(fd, LOCAL_HEADER.size + READ_SLACK + csize, offset)
    if len(buf) < LOCAL_HEADER.size:
        raise MemberError("corrupt zip member", "local header past the end of the file")
    signature, name_len, extra_len = LOCAL_HEADER.unpack_from(buf)
    if signature != LOCAL_HEADER_SIGNATURE:
        raise MemberError("corrupt zip member", "bad local header signature")
    start = LOCAL_HEADER.size + name_len + extra_len
    raw = buf[start:start + csize]
    if len(raw) < csize and start + csize > len(buf) and len(buf) == LOCAL_HEADER.size + READ_SLACK + csize:
        raw = os.pread(fd, csize, offset + start)  # the local extra field was longer than READ_SLACK
    if len(raw) != csize:
        raise MemberError("corrupt zip member", f"data truncated ({len(raw)} of {csize} bytes)")
    if method == zipfile.ZIP_DEFLATED:
        inflater = zlib.decompressobj(-15)
        try:
            data = inflater.decompress(raw, size + 1)  # never more than the central directory promises (+1 to tell)
        except zlib.error as exc:
            raise MemberError("corrupt zip member", f"inflate failed: {exc}") from None
    else:
        data = raw
    if len(data) != size:
        raise MemberError("corrupt zip member", f"size {len(data)} != {size} in the central directory")
    if zlib.crc32(data) != crc:
        raise MemberError("corrupt zip member", f"CRC mismatch (stored {crc:08x}, computed {zlib.crc32(data):08x})")
    return data


def _check_budget(size: int, budget: int) -> None:
    if size > budget:
        raise MemberError("identity over the size limit", f"its images add up to more than {MAX_IDENTITY_BYTES} "
                                                          "bytes (a DigiFace identity holds about 2 MB)")


class DigiFaceSource(Source):
    name = "digiface"
    synthetic = True  # the card may call the images synthetic
    description = "DigiFace-1M (Microsoft): the published zip parts read in place, or extracted folders"
    card_description = (
        "DigiFace-1M (Bae et al., WACV 2023) is a synthetic face-recognition dataset by Microsoft: 1,219,995 "
        "images of 109,999 identities rendered with a procedural 3D face model (varied face shape, texture, hair, "
        "accessories, expression, pose, lighting and camera). 10,000 identities (ids 0-9999) have 72 images each "
        "(4 accessory sets x 18 renders); 99,999 identities (ids 100000-199998) have 5 images each (one accessory "
        "set). Images are 112x112 colour PNG crops, aligned with ground-truth facial landmarks. The identity id "
        "is the global DigiFace subject number."
    )
    homepage = "https://github.com/microsoft/DigiFace1M"
    citation = CITATION
    license = LicenseInfo(
        id="other",
        name=LICENSE_NAME,
        link=LICENSE_LINK,
        text=LICENSE_TEXT,
        commercial_use=False,
        note="Microsoft Research Use of Data Agreement (R-UDA v1.0): non-commercial research only; "
             "redistribution only under the same agreement.",
    )
    image_format = "png"
    columns = {  # the json fields this source adds, for the card's column table
        "json.part": "the published DigiFace-1M part holding the identity, e.g. subjects_0-1999_72_imgs",
        "json.image_index": "the image's number within its identity in DigiFace-1M (N of N.png)",
    }
    options = {
        "parts": Option(("all",), "which parts: all, 72 (ids 0-9999, 72 images each), 5 (ids 100000-199998, "
                        "5 images each), or part names, e.g. subjects_0-1999_72_imgs,subjects_2000-3999_72_imgs",
                        type=parse_parts),
        "min_images": Option(1, "drop identities with fewer images than this", type=non_negative_int),
        "max_images": Option(0, "keep at most this many images per identity, in natural order (0: all)",
                             type=non_negative_int),
    }
    # what `facegen download digiface` fetches (see facegen.builders.hub.download)
    download_url = "https://facesyntheticspubwedata.z6.web.core.windows.net/wacv-2023/"
    download_files = DOWNLOAD_FILES

    def __init__(self, path, **options):
        super().__init__(path, **options)
        self.containers = self._find_containers(self.path)
        self._where: dict[str, tuple[int, int, int]] = {}  # identity id -> (container, start row, stop row)
        duplicates: dict[tuple[int, int], list[str]] = defaultdict(list)
        for c_index, container in enumerate(self.containers):
            for identity_id, (start, stop) in container.identities.items():
                if identity_id in self._where:  # zips come first: an extracted copy may be incomplete
                    duplicates[(c_index, self._where[identity_id][0])].append(identity_id)
                    continue
                self._where[identity_id] = (c_index, start, stop)
        self.warnings = self._collect_warnings(duplicates)
        self._ids = self._select(sorted(self._where, key=lambda i: (int(i), i)))
        if os.environ.get("RANK", "0") == "0":  # every process builds the index; one of them tells
            for line in self.warnings:
                warn(line)
        self._fds: dict[int, int] = {}
        self._fd_pid = os.getpid()
        self._fd_lock = threading.Lock()
        self._folder_budgets: dict[str, list[int] | None] = {}  # identity -> _budgets (folders only)

    # --- construction: find the parts, index them once ---

    def _find_containers(self, path: str) -> list[Container]:
        if os.path.isfile(path):
            if not path.lower().endswith(".zip"):
                raise UsageError(f"source 'digiface': {path} is neither a directory nor a .zip part")
            return [index_zip(path, printable_name(os.path.basename(path)))]
        zips, wrappers, root_has_identities = [], [], False
        root_ignored: list[str] = []
        with os.scandir(path) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.name.startswith(".") or entry.name == "__MACOSX":
                    continue
                # labels name a zip or folder in refs: printable even when the name is not UTF-8
                if entry.is_file() and entry.name.lower().endswith(".zip"):
                    if not self._part_not_wanted(entry.name[:-4]):
                        zips.append(index_zip(entry.path, printable_name(entry.name)))
                elif entry.is_dir() and DIGITS.fullmatch(entry.name):
                    root_has_identities = True
                elif entry.is_dir():
                    wrapper = index_folder(entry.path, printable_name(entry.name))
                    if wrapper.identities:
                        wrappers.append(wrapper)
                    else:
                        root_ignored.append(printable_name(entry.name))
        root = index_folder(path, "", numeric_only=True) if root_has_identities else Container("folder", path, "")
        for name in root_ignored:
            root.ignore("folder without identity folders", name + "/")
        containers = zips + wrappers + ([root] if root.identities or root.ignored else [])
        if not any(c.identities for c in containers):
            raise UsageError(
                f"source 'digiface': no DigiFace images in {path} (expected the subjects_*.zip parts, numeric "
                "identity folders holding 0.png, 1.png…, or folders holding those)"
            )
        return containers

    def _part_not_wanted(self, stem: str) -> bool:
        """A zip named as a published part that the ``parts`` option leaves out is not even indexed."""
        for name, first, _, _ in PUBLISHED_PARTS:
            if stem == name:
                wanted = self.opts["parts"]
                if wanted == ("72",):
                    return first >= FIRST_ID_OF_5_IMAGE_SET
                if wanted == ("5",):
                    return first < FIRST_ID_OF_5_IMAGE_SET
                return wanted != ("all",) and name not in wanted
        return False

    def _collect_warnings(self, duplicates: dict[tuple[int, int], list[str]]) -> list[str]:
        lines = []
        for container in self.containers:
            where = container.label or self.path
            for category, count in sorted(container.ignored.items()):
                if category in SILENT:
                    continue
                examples = ", ".join(repr(e) for e in container.examples[category])
                lines.append(f"digiface: {where}: ignored {count} entr{'y' if count == 1 else 'ies'} "
                             f"({category}), e.g. {examples}")
            if container.overlapping:
                lines.append(f"digiface: {where}: {container.overlapping} member(s) share their bytes with other "
                             "members (a zip bomb of overlapping entries?); they are skipped, never inflated")
        for (loser, winner), ids in sorted(duplicates.items()):
            lines.append(f"digiface: {len(ids)} identit{'y' if len(ids) == 1 else 'ies'} of "
                         f"{self.containers[loser].label or self.path} also in "
                         f"{self.containers[winner].label or self.path}; using the latter (e.g. {', '.join(ids[:3])})")
        return lines

    def part_of(self, identity_id: str) -> str:
        """The published part holding this identity, else the name of the zip/folder it was found in."""
        c_index = self._where[identity_id][0]
        return published_part(int(identity_id)) or self.containers[c_index].stem or os.path.basename(self.path)

    def _select(self, ids: list[str]) -> list[str]:
        wanted = self.opts["parts"]
        if wanted == ("72",):
            ids = [i for i in ids if int(i) < FIRST_ID_OF_5_IMAGE_SET]
        elif wanted == ("5",):
            ids = [i for i in ids if int(i) >= FIRST_ID_OF_5_IMAGE_SET]
        elif wanted != ("all",):
            present: dict[str, set[str]] = defaultdict(set)  # name -> ids, by published part and by file name
            for identity_id in ids:
                present[self.part_of(identity_id)].add(identity_id)
                stem = self.containers[self._where[identity_id][0]].stem
                if stem:
                    present[stem].add(identity_id)
            missing = [n for n in wanted if n not in present]
            if missing:
                known = [n for n in missing if n not in PART_NAMES]
                hint = (f"published parts: {', '.join(PART_NAMES)}" if known
                        else f"found here: {', '.join(sorted(present)) or 'none'}")
                raise UsageError(f"source 'digiface': part {missing[0]!r} is not in {self.path} ({hint})")
            keep = set().union(*(present[n] for n in wanted))
            ids = [i for i in ids if i in keep]
        minimum = self.opts["min_images"]
        if minimum > 1:
            ids = [i for i in ids if self._where[i][2] - self._where[i][1] >= minimum]
        if not ids:
            raise UsageError(f"source 'digiface': no identity of {self.path} is left with parts="
                             f"{','.join(wanted)} and min_images={minimum}")
        return ids

    # --- the Source API ---

    def identities(self):
        return self._ids

    def _fd(self, c_index: int) -> int:
        """This process's read handle on a zip, opened on first use (and again in a forked child)."""
        with self._fd_lock:
            if self._fd_pid != os.getpid():  # inherited through fork: the parent's handles are not ours
                self._fds, self._fd_pid = {}, os.getpid()
            fd = self._fds.get(c_index)
            if fd is None:
                fd = self._fds[c_index] = os.open(self.containers[c_index].path, os.O_RDONLY)
            return fd

    def _rows(self, identity_id: str) -> tuple[int, int, int]:
        """(container, first row, stop row) of the identity's images, after ``max_images``."""
        c_index, start, stop = self._where[identity_id]
        if self.opts["max_images"]:
            stop = min(stop, start + self.opts["max_images"])
        return c_index, start, stop

    def image_refs(self, identity_id):
        c_index, start, stop = self._rows(identity_id)
        container = self.containers[c_index]
        return [container.ref(container.member_name(identity_id, row, int(container.rows[row]["image_index"])))
                for row in range(start, stop)]

    def load(self, identity_id):
        _, start, stop = self._rows(identity_id)
        return self.load_images(identity_id, range(stop - start))

    def load_images(self, identity_id, indices):
        """The items at ``indices`` of the identity's images. The per-identity byte bound is positional: the image
        at position p is refused when the images before it that would be read, plus itself, exceed
        MAX_IDENTITY_BYTES, so a single image read on its own (per-image transforms) is kept or refused exactly as
        ``load`` keeps or refuses it, and no call holds more than MAX_IDENTITY_BYTES."""
        c_index, start, _ = self._rows(identity_id)
        container = self.containers[c_index]
        part = self.part_of(identity_id)
        fd = self._fd(c_index) if container.kind == "zip" else -1
        budgets = self._budgets(identity_id)  # None: the whole identity fits
        items: list[SourceImage | Skip] = []
        for position in indices:
            row = start + position
            record = container.rows[row].tolist()
            budget = MAX_IDENTITY_BYTES if budgets is None else budgets[position]
            member = container.member_name(identity_id, row, record[0])
            ref = container.ref(member)
            try:
                if fd >= 0:
                    data = read_zip_member(fd, record, budget)
                else:
                    with open(os.path.join(container.path, member), "rb") as f:
                        size = os.fstat(f.fileno()).st_size
                        if size > MAX_IMAGE_BYTES:
                            raise MemberError("unsupported file", f"over the {MAX_IMAGE_BYTES} bytes limit")
                        _check_budget(size, budget)
                        data = f.read(min(MAX_IMAGE_BYTES, budget) + 1)
                        if len(data) > min(MAX_IMAGE_BYTES, budget):  # it grew since fstat
                            raise MemberError("unsupported file", "the file grew while it was read")
            except MemberError as exc:
                items.append(Skip(ref, exc.reason, exc.detail))
                continue
            except OSError as exc:
                items.append(Skip(ref, "unreadable file", str(exc.strerror or exc)))
                continue
            items.append(SourceImage(ref=ref, data=data, ext="png", meta={"part": part, "image_index": record[0]}))
        return items

    def _budgets(self, identity_id: str) -> list[int] | None:
        """The bytes the identity may still hold before each of its positions (the declared sizes of the earlier
        images that pass the per-member checks and fit), or None when all of them fit (the usual case).

        Zips: from the central directory, no I/O. Folders: one ``stat`` per image, once per identity (cached:
        per-image transforms ask for every image of an identity separately)."""
        c_index, start, stop = self._rows(identity_id)
        container = self.containers[c_index]
        if (stop - start) * MAX_IMAGE_BYTES <= MAX_IDENTITY_BYTES:
            return None  # cannot exceed it, whatever the sizes
        if container.kind == "zip":
            rows = container.rows[start:stop]
            sizes = rows["size"].astype(np.int64)
            eligible = ((rows["overlap"] == 0) & ((rows["flags"] & 0x1) == 0)
                        & np.isin(rows["method"], (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED))
                        & (rows["size"] <= MAX_IMAGE_BYTES) & (rows["csize"] <= MAX_IMAGE_BYTES))
        else:
            cached = self._folder_budgets.get(identity_id, False)
            if cached is not False:
                return cached
            sizes = np.zeros(stop - start, np.int64)
            for position in range(stop - start):
                record = container.rows[start + position].tolist()
                try:
                    sizes[position] = os.stat(os.path.join(container.path, container.member_name(
                        identity_id, start + position, record[0]))).st_size
                except OSError:
                    sizes[position] = MAX_IMAGE_BYTES + 1  # never read: it takes nothing
            eligible = sizes <= MAX_IMAGE_BYTES
        budgets = None
        if int(sizes[eligible].sum()) > MAX_IDENTITY_BYTES:
            budgets, remaining = [], MAX_IDENTITY_BYTES
            for size, ok in zip(sizes.tolist(), eligible.tolist()):
                budgets.append(remaining)
                if ok and size <= remaining:
                    remaining -= size
        if container.kind != "zip":
            self._folder_budgets[identity_id] = budgets
        return budgets

    def json_features(self):
        return {"part": Value("string"), "image_index": Value("int32")}

    def provenance(self):
        ignored = Counter()
        for container in self.containers:
            ignored.update(container.ignored)
        return {
            "inputs": [{"kind": c.kind, "name": c.label or ".", "identities": len(c.identities),
                        "images": int(len(c.rows))} for c in self.containers],
            "ignored_entries": dict(sorted(ignored.items())),
            "warnings": list(self.warnings),
        }

    def close(self):
        with self._fd_lock:
            if self._fd_pid == os.getpid():
                for fd in self._fds.values():
                    os.close(fd)
            self._fds = {}
