"""Transform `passthrough`: re-emits the source's images and extras.

The encoded bytes are copied without decoding the pixels, after PIL's cheap integrity check (`verify()` walks the
chunks and checksums, ~16 µs for a 20 KB PNG against ~190 µs for a full decode). The shard writer decodes only to
convert when the run's `--format` differs from the stored encoding.
"""

from __future__ import annotations

import io

from PIL import Image

from facegen.api import Transform
from facegen.records import Face, IdentityResult, Skip

PIL_FORMATS = {"PNG": "png", "JPEG": "jpg"}


def check_image(data: bytes) -> str:
    """The image's actual encoding (png/jpg); raises ValueError with the detail when it is corrupt."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.verify()
    except Exception as exc:  # PIL raises many types (SyntaxError, OSError, struct.error…) for broken files
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
    if fmt not in PIL_FORMATS:
        raise ValueError(f"unsupported image format {fmt}")
    return PIL_FORMATS[fmt]


class Passthrough(Transform):
    name = "passthrough"
    description = "Re-emit the source's images and extras unchanged (bytes copied after an integrity check)"
    card_description = "Images are the source's own files, copied byte for byte (re-encoded only to change format)."
    batch_size = 16
    per_image = True  # one image in, that image (or a skip) out

    def output_format(self, source):
        return source.image_format

    def json_features(self, source):
        return source.json_features()

    def extra_features(self, source):
        return source.extra_features()

    def __call__(self, batch):
        for identity in batch:
            result = IdentityResult(identity)  # the run loop counts identity.skipped itself
            for image in identity.images:
                try:
                    ext = check_image(image.data)
                except ValueError as exc:
                    result.skipped.append(Skip(image.ref, "corrupt image", str(exc)))
                    continue
                result.faces.append(Face(image=image.data, ext=ext, ref=image.ref, meta=image.meta,
                                         extras=image.extras))
            yield result
