"""The card's preview grid: a few identities (columns) with a few of their images (rows), from the first shards."""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, ImageDraw

from facegen.builders.engine.images import MAX_PIXELS
from facegen.layout import OutputFolder, shard_number, shard_path
from facegen.layout.records import SampleIndex
from facegen.published import MAX_MEMBER_BYTES
from facegen.tarfiles import TarDamaged, list_members, span_members

IDENTITIES = 8
IMAGES_PER_IDENTITY = 4
TILE = 128
GAP = 4


def _first_samples(tar_paths: list[Path], image_column: str, identities: int, per_identity: int):
    """{label: [image bytes…]} for the first ``identities`` labels found, in shard order; reads only what it needs."""
    suffix = "." + image_column
    found: dict[str, list[bytes]] = {}
    for path in tar_paths:
        # a damaged shard gives the tiles before the damage; `facegen publish` reports it as a problem
        members = list_members(path).members
        try:
            with open(path, "rb") as f:
                for member in members:
                    if not member.name.endswith(suffix):
                        continue
                    key = member.name[: -len(suffix)].rsplit("/", 1)[-1]
                    label = key.split("_", 1)[0]
                    if label not in found and len(found) >= identities:
                        return found
                    images = found.setdefault(label, [])
                    if len(images) < per_identity and member.size <= MAX_MEMBER_BYTES:
                        images.append(os.pread(f.fileno(), member.size, member.offset))
        except OSError:
            continue
    return found


def _indexed_samples(out: Path, image_column: str, identities: int, per_identity: int):
    """{label: [image bytes…]} for the lowest labels, from the shards' sample indexes: the shards are shuffled,
    so an identity's images lie in many shards; each is read with one pread. Empty when there is no index."""
    folder = OutputFolder(out)
    wanted: dict[int, list[tuple[str, int, int]]] = {}
    for path in sorted(folder.shard_index_dir.glob("[0-9]*.json")):
        index = SampleIndex.read(path)  # its types checked; None when unreadable
        number = shard_number(f"train-{path.stem}.tar")
        if index is None or number is None or index.tar != shard_path(number):
            continue  # an index names its own shard, nothing else
        for cls, offset, length in zip(index.cls, index.offsets, index.lengths):
            if cls < identities * 4:  # enough candidates without keeping every row of a large build
                wanted.setdefault(cls, []).append((index.tar, offset, length))
    found: dict[str, list[bytes]] = {}
    for cls in sorted(wanted)[:identities]:
        images = found.setdefault(f"{cls:06d}", [])
        for tar, offset, length in sorted(wanted[cls])[:per_identity]:
            try:  # the span's headers only, then its image members under the cap: an index may lie
                with open(out / tar, "rb") as f:
                    images += [os.pread(f.fileno(), m.size, m.offset) for m in span_members(f.fileno(), offset, length)
                               if m.name.endswith("." + image_column) and m.size <= MAX_MEMBER_BYTES]
            except (TarDamaged, OSError):
                continue  # a damaged shard gives no tile; `facegen publish` reports it
    return {label: images for label, images in found.items() if images}


def preview_grid(tar_paths: list[Path], image_column: str, identities: int = IDENTITIES,
                 per_identity: int = IMAGES_PER_IDENTITY, tile: int = TILE, out: Path | None = None) -> bytes | None:
    """A JPEG grid (one column per identity, its label on top), or None when the shards hold no image."""
    samples = _indexed_samples(out, image_column, identities, per_identity) if out is not None else {}
    if not samples:
        samples = _first_samples(tar_paths, image_column, identities, per_identity)
    if not samples:
        return None
    label_height = 16
    columns = len(samples)
    rows = max(len(v) for v in samples.values())
    width = columns * tile + (columns + 1) * GAP
    height = label_height + rows * tile + (rows + 1) * GAP
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for col, (label, images) in enumerate(samples.items()):
        x = GAP + col * (tile + GAP)
        draw.text((x + 2, 2), f"cls {int(label)}" if label.isdigit() else label, fill=(0, 0, 0))
        for row, data in enumerate(images):
            try:
                with Image.open(io.BytesIO(data)) as im:
                    if im.width * im.height > MAX_PIXELS:  # the build's own limit: never decoded
                        continue
                    thumb = im.convert("RGB")
                    thumb.thumbnail((tile, tile))
            except Exception:  # a damaged image leaves its tile blank; the card must still render
                continue
            y = label_height + GAP + row * (tile + GAP)
            grid.paste(thumb, (x + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2))
    buf = io.BytesIO()
    grid.save(buf, format="JPEG", quality=90)
    return buf.getvalue()
