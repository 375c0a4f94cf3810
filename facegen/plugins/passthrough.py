"""Transform `passthrough`: re-emits the source's images and extras.

The encoded bytes are copied. The run checks every image before it is written (decoded once under the default
``--verify full``, on the loading threads), and the shard writer converts an image only when its encoding differs
from the dataset's: losslessly to PNG, or to JPEG when ``--format jpg`` asks for it; each conversion is counted in
the card. Modes (RGBA, greyscale, …) and sizes are kept as they are.
"""

from __future__ import annotations

from facegen.api import Face, IdentityResult, Transform


class Passthrough(Transform):
    name = "passthrough"
    description = "Re-emit the source's images and extras unchanged (bytes copied after an integrity check)"
    card_description = ("Images are the source's own files, copied byte for byte (converted only where the "
                        "encoding differs from the dataset's; the statistics count every conversion).")
    batch_size = 16
    copies_source_images = True
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
                result.faces.append(Face(image=image.data, ext=image.ext, ref=image.ref, meta=image.meta,
                                         extras=image.extras, changes=image.changes))
            yield result
