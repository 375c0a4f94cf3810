"""Images in a shard: each one checked once, copied when it is in the dataset's format, else converted and counted.

``--verify full`` (the default) decodes every image the way ``datasets`` will (``PIL.Image.open(...).load()``), so a
published image cannot fail to decode. A well-formed PNG takes a cheaper path that gives the same guarantee: every
chunk's CRC, then the whole IDAT stream inflated, its length checked against the image size and every row's filter
byte checked (stricter than PIL, which silently blackens the rows missing from a short but complete zlib stream);
anything unusual (interlaced, APNG, chunks after the pixel data, a bad CRC) falls back to the full decode, whose
verdict counts. ``--verify header`` only parses the header and checksums (PIL ``verify()``).

A transform that copies the source's bytes (passthrough) has them checked on the loading threads that read them
ahead of the writer (a per-image shard's samples via ``Source.load_images``, a unit's identities via ``Source.load``;
PIL and zlib release the GIL); a checked image travels as :class:`CheckedImage`, so that the shard writer does not
check it twice. The writer checks any other encoded bytes it is handed; the assembly of published shards from units
copies samples already checked.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from facegen.records import SourceImage, Skip

VERIFY_LEVELS = ("full", "header")
PIL_FORMATS = {"PNG": "png", "JPEG": "jpg", "MPO": "jpg"}  # MPO: a camera JPEG with extra frames; frame 0 is a JPEG
IMAGE_FIELD_EXTENSIONS = {"png": "png", "jpg": "jpg", "jpeg": "jpg"}
# A decode allocates width x height x channels: refuse before allocating (a 5792x5792 RGBA image is 134 MB)
MAX_PIXELS = 1 << 25
PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # IHDR colour type -> samples per pixel
EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
    """An image that cannot go into a shard: ``reason`` is the skip's category, the message its readable detail."""

    def __init__(self, detail: str, reason: str = "corrupt image"):
        super().__init__(detail)
        self.reason = reason


class CheckedImage(bytes):
    """Encoded image bytes that passed :func:`check_image`, with what the check found."""

    format: str  # png or jpg, from the bytes (not the file name)
    mode: str  # PIL mode, e.g. RGB, RGBA, L
    size: tuple[int, int]  # (width, height)
    level: str  # the check they passed: full or header


def readable(exc: BaseException) -> str:
    """An exception as one line without memory addresses (PIL names its BytesIO in some messages)."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a PNG or JPEG image (unrecognised bytes)"
    text = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(exc)).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _png_stream_ok(data: bytes, width: int, height: int) -> bool:
    """True when a non-interlaced PNG is well formed and its pixel stream complete; False means "decode it to know".

    Raises :class:`ImageError` for a well-formed file whose pixel stream is broken: not zlib, shorter than the
    image (PIL fails with "image file is truncated", or, when the stream is a complete zlib stream, silently fills
    the missing rows with black), or a row with an unknown filter type.
    """
    pos = 8
    idat: list[memoryview] = []
    header = None
    size = len(data)
    view = memoryview(data)  # chunks are looked at in place: a large file is never copied here
    while pos + 12 <= size:
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > size:
            return False
        body = view[pos + 8:end - 4]
        if zlib.crc32(body, zlib.crc32(kind)) != struct.unpack_from(">I", data, end - 4)[0]:
            return False
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        elif idat:
            return False  # a chunk after the pixel data: PIL reads it in load_end; let the decode judge it
        pos = end
    else:
        return False  # no IEND
    if header is None or len(header) != 13 or not idat:
        return False
    bit_depth, colour_type, _, _, interlace = struct.unpack_from(">BBBBB", header, 8)
    if interlace or colour_type not in PNG_CHANNELS:
        return False
    row = (width * PNG_CHANNELS[colour_type] * bit_depth + 7) // 8 + 1  # + the row's filter-type byte
    expected = row * height
    inflate = zlib.decompressobj()
    try:
        pixels = inflate.decompress(b"".join(idat), expected)  # at most the expected size: bounded memory
    except zlib.error as exc:
        raise ImageError(f"PNG pixel data is not a valid zlib stream ({exc})") from None
    if len(pixels) < expected:
        raise ImageError(f"image file is truncated: PNG pixel data ends after {len(pixels):,} of "
                         f"{expected:,} bytes")
    filters = np.frombuffer(pixels, dtype=np.uint8)[::row]
    if filters.max() > 4:
        raise ImageError(f"PNG row {int(np.argmax(filters > 4))} has unknown filter type {int(filters.max())}")
    return True


def check_image(data: bytes, level: str = "full") -> CheckedImage:
    """Check encoded image bytes at ``level``; raises :class:`ImageError` with the reason."""
    if isinstance(data, CheckedImage) and (data.level == "full" or level == "header"):
        return data
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = PIL_FORMATS.get(im.format)
            if fmt is None:
                raise ImageError(f"{im.format} (facegen stores PNG and JPEG)", "unsupported image format")
            width, height = im.size
            if width * height > MAX_PIXELS:
                raise ImageError(f"{width}x{height} pixels is more than the {MAX_PIXELS:,} allowed", "image too large")
            mode = im.mode
            if level == "header":
                im.verify()
            elif not (fmt == "png" and _png_stream_ok(data, width, height)):
                im.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own size limit, above ours
        raise ImageError(readable(exc), "image too large") from None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, struct.error, …) for broken files
        raise ImageError(readable(exc)) from None
    checked = CheckedImage(data)
    checked.format, checked.mode, checked.size, checked.level = fmt, mode, (width, height), level
    return checked


def check_source_images(items: list, level: str) -> list:
    """A source's load() result with every image (and image-typed extra given as bytes) checked.

    An image that fails becomes a :class:`Skip` with its reason, in its place.
    """
    checked: list[SourceImage | Skip] = []
    for item in items:
        if not isinstance(item, SourceImage):
            checked.append(item)
            continue
        try:
            item.data = check_image(item.data, level)
        except ImageError as exc:
            checked.append(Skip(item.ref, exc.reason, str(exc)))
            continue
        problem = None
        for name, value in item.extras.items():
            if isinstance(value, (bytes, bytearray)) and name.rsplit(".", 1)[-1] in IMAGE_FIELD_EXTENSIONS:
                try:
                    item.extras[name] = check_image(value if isinstance(value, bytes) else bytes(value), level)
                except ImageError as exc:
                    problem = Skip(item.ref, exc.reason, f"{name}: {exc}")
                    break
        checked.append(problem or item)
    return checked


@dataclass
class PreparedImage:
    """What goes into the shard for one image, and what happened to it on the way."""

    data: bytes
    mode: str
    size: tuple[int, int]
    changes: list[str] = field(default_factory=list)  # readable re-encode reasons, counted in the shard stats


BGR_TO_RGB = "channels bgr -> rgb (lossless)"


def _bgr_to_rgb(image: Image.Image, changes: list[str]) -> Image.Image:
    """The image with its first and third channels swapped (BGR stored as if RGB -> RGB); images without colour
    channels (greyscale) are left as they are, with nothing to swap."""
    if image.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
    if image.mode not in ("RGB", "RGBA", "RGBX"):
        return image
    bands = list(image.split())
    bands[0], bands[2] = bands[2], bands[0]
    changes.append(BGR_TO_RGB)
    return Image.merge(image.mode, bands)


def _encode(image: Image.Image, fmt: str, changes: list[str]) -> PreparedImage:
    buf = io.BytesIO()
    if fmt == "jpg":
        if image.mode not in ("RGB", "L"):
            changes.append(f"mode {image.mode} -> RGB (JPEG)")
            image = image.convert("RGB")
        image.save(buf, format="JPEG", quality=95)
    else:
        if image.mode not in PNG_MODES:  # CMYK, YCbCr, … (JPEG-only modes)
            changes.append(f"mode {image.mode} -> RGB (PNG)")
            image = image.convert("RGB")
        image.save(buf, format="PNG")
    return PreparedImage(buf.getvalue(), image.mode, image.size, changes)


def prepare_image(image: Any, fmt: str, level: str = "full", lossy_allowed: bool = False,
                  to_rgb: bool = False) -> PreparedImage:
    """The bytes to store for ``image`` in a ``fmt`` column.

    Encoded bytes are checked (unless already checked), then copied when they are in ``fmt``, else converted:
    JPEG to PNG losslessly, with the EXIF orientation applied first (as ``datasets`` shows it); PNG to JPEG only
    when ``lossy_allowed`` (the user asked with ``--format jpg``). ``to_rgb`` (a PNG column only): the bytes hold
    BGR pixels, which are swapped to RGB and stored as a PNG (lossless). Arrays and PIL images (made by a
    transform) are encoded once.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        checked = check_image(image if isinstance(image, bytes) else bytes(image), level)
        if checked.format == fmt and not to_rgb:
            return PreparedImage(checked, checked.mode, checked.size)
        if fmt == "jpg" and not lossy_allowed:
            raise ImageError("never made lossy silently: pass --format png to keep it lossless, or --format jpg to "
                             "convert it", "PNG image in a JPEG dataset")
        changes = [] if checked.format == fmt else [
            f"{checked.format} -> {fmt}" + (" (lossless)" if fmt == "png" else " (lossy, --format jpg)")]
        try:
            with Image.open(io.BytesIO(checked)) as im:
                im.load()
                if checked.format == "jpg" and im.getexif().get(EXIF_ORIENTATION, 1) != 1:
                    changes.append("EXIF orientation applied")
                    pixels = ImageOps.exif_transpose(im)
                else:
                    pixels = im.copy()
        except Exception as exc:
            raise ImageError(readable(exc)) from None
        if to_rgb:
            pixels = _bgr_to_rgb(pixels, changes)
        return _encode(pixels, fmt, changes)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"an image must be encoded bytes, a PIL image or an array, not {type(image).__name__}")
    return _encode(image, fmt, [])
