"""DigiFace-1M layout fixtures: parts as published zips or as extracted folders, with the usual accidents.

The published layout: ``subjects_0-1999_72_imgs.zip`` whose root holds numeric identity folders ``0/0.png`` …
``0/71.png`` (112x112 PNG). Variants written here: a wrapper folder (``subjects_0-1999_72_imgs/0/0.png``, what
macOS' Archive Utility makes), ``__MACOSX/`` AppleDouble entries and dot files, directory entries, and
corruptions: a truncated PNG, a member whose stored bytes no longer match their CRC, members with absolute or
``..`` names, non-numeric folders, and a truncated zip (:func:`truncate_file`).

Faces are drawn by :func:`facegen.testing.folder.draw_face` (about 20-25 KB per 112x112 PNG, like DigiFace).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

from facegen.testing.folder import draw_face, encode


def part_name(first: int, last: int, images_per_identity: int) -> str:
    """The published file stem, e.g. ``subjects_0-1999_72_imgs``."""
    return f"subjects_{first}-{last}_{images_per_identity}_imgs"


def face_png(identity: int, image: int, size: int = 112, noise: float = 7.0) -> bytes:
    return encode(draw_face(identity, image, size=size, noise=noise), "png")


def _zip_info(name: str, compress_type: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(2022, 10, 1, 0, 0, 0))  # fixed: the fixture bytes are reproducible
    info.compress_type = compress_type
    info.external_attr = (0o40755 << 16) | 0x10 if name.endswith("/") else 0o644 << 16
    return info


def write_digiface_part(
    directory: str | os.PathLike,
    ids: Iterable[int] = range(4),
    images_per_identity: int = 4,
    name: str | None = None,
    form: str = "zip",
    wrapper: bool = False,
    macosx: bool = False,
    dot_files: bool = False,
    directory_entries: bool = True,
    compression: int = zipfile.ZIP_DEFLATED,
    corrupt_png: int = 0,
    bad_crc: int = 0,
    unsafe_members: bool = False,
    non_numeric_folder: bool = False,
    size: int = 112,
    noise: float = 7.0,
    images: dict[tuple[int, int], bytes] | None = None,
) -> Path:
    """Write one part in ``directory`` and return its path.

    ``form="zip"`` writes ``{name}.zip``; ``form="folder"`` writes the identity folders into ``directory`` itself
    (an extracted part), or into ``directory/{name}/`` with ``wrapper=True``. ``name`` defaults to the published
    stem for the id range. Corruptions, applied to the first identities in order:

    * ``corrupt_png=n``: the last image of the first n identities is a truncated PNG (a valid zip member);
    * ``bad_crc=n`` (zip only): image 0 of the first n identities is stored uncompressed and one byte of its data
      is flipped afterwards, so its CRC no longer matches;
    * ``unsafe_members`` (zip only): adds ``../escape/0.png``, ``/{id}/99.png`` and ``{wrapper}/../up.png``;
    * ``non_numeric_folder``: adds a folder ``notes/`` holding ``0.png``.

    ``images`` may hold pre-encoded PNGs by (identity, image) (benchmarks reuse them).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ids = list(ids)
    if name is None:
        name = part_name(ids[0], ids[-1], images_per_identity) if ids else "subjects_empty"
    prefix = f"{name}/" if wrapper else ""

    def png(identity: int, image: int) -> bytes:
        data = images.get((identity, image)) if images else None
        return data if data is not None else face_png(identity, image, size, noise)

    # (member name, bytes) in the order a zip tool writes them; None bytes = a directory entry
    members: list[tuple[str, bytes | None]] = []
    if wrapper and directory_entries:
        members.append((prefix, None))
    for position, identity in enumerate(ids):
        if directory_entries:
            members.append((f"{prefix}{identity}/", None))
        for image in range(images_per_identity):
            data = png(identity, image)
            if position < corrupt_png and image == images_per_identity - 1:
                data = data[: len(data) // 2]
            members.append((f"{prefix}{identity}/{image}.png", data))
        if dot_files:
            members.append((f"{prefix}{identity}/.DS_Store", b"\0\0\0\1Bud1" + b"\0" * 54))
    if non_numeric_folder:
        members.append((f"{prefix}notes/0.png", png(0, 0)))
    if macosx:
        for identity in ids[:2]:
            members.append((f"__MACOSX/{prefix}{identity}/._0.png", b"\0\5\26\7\0\2\0\0Mac OS X        "))
    if dot_files:
        members.append((f"{prefix}.DS_Store", b"\0\0\0\1Bud1" + b"\0" * 54))

    if form == "folder":
        if bad_crc or unsafe_members:
            raise ValueError("bad_crc and unsafe_members exist only in zips")
        for member, data in members:
            target = directory / member
            if data is None:
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        return directory / name if wrapper else directory
    if form != "zip":
        raise ValueError(f"form must be zip or folder, got {form!r}")

    if unsafe_members:
        members.append(("../escape/0.png", png(0, 0)))
        members.append((f"/{ids[0]}/99.png", png(0, 0)))
        members.append((f"{prefix}../up.png", png(0, 0)))
    crc_victims = {f"{prefix}{identity}/0.png" for identity in ids[:bad_crc]}
    path = directory / f"{name}.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in members:
            if data is None:
                archive.writestr(_zip_info(member, zipfile.ZIP_STORED), b"")
            else:
                stored = zipfile.ZIP_STORED if member in crc_victims else compression
                archive.writestr(_zip_info(member, stored), data)
    if crc_victims:
        with zipfile.ZipFile(path) as archive:
            victims = [archive.getinfo(m) for m in sorted(crc_victims)]
        with open(path, "r+b") as f:
            for info in victims:
                f.seek(info.header_offset + 26)
                name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
                middle = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
                f.seek(middle)
                byte = f.read(1)
                f.seek(middle)
                f.write(bytes([byte[0] ^ 0xFF]))
    return path


def truncate_file(path: str | os.PathLike, fraction: float = 0.6) -> Path:
    """Cut a file to ``fraction`` of its bytes, like an interrupted download (a zip loses its central directory)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(int(size * fraction))
    return path
