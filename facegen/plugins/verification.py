"""Source `bin`: an insightface verification set (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``, …) as a dataset of
pairs.

The file is a pickle of ``(bins, issame_list)``: 2P encoded images, each pair's two in a row, and P booleans (see
:mod:`facegen.generators.safe_pickle`, which reads it without running anything it names: bytes, uint8 arrays and
bools only; Python 2 pickles with ``encoding="bytes"``; at most MAX_PAIRS_BYTES). Such a set is not labelled by
identity: each pair is an "identity" of the plan, ``pair-000123``, holding its two images, left then right, and each
sample's json says ``pair`` (its number), ``side`` (``left``/``right``) and ``issame`` (whether the two show the same
person). The images' bytes are kept as stored (``jpg``/``png`` by their first bytes); ``bins`` stored as
``cv2.imencode`` arrays give their bytes. A file that is not such a pickle is one line; an entry that is neither JPEG
nor PNG bytes is a counted Skip.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
from datasets import Value

from facegen.api import Skip, Source, SourceImage, UsageError, printable_name, sniff_image
from facegen.generators.safe_pickle import UnsafePickleError, load_verification_pairs

SIDES = ("left", "right")


class VerificationBinSource(Source):
    name = "bin"
    description = "insightface verification pairs (lfw.bin, cfp_fp.bin, agedb_30.bin): one 'identity' per pair"
    card_description = (
        "Verification pairs read from an insightface `.bin` file (a pickle of `(bins, issame_list)`). The rows are "
        "not grouped by person: each pair is listed as `pair-NNNNNN` with its two images (`side` left, right), and "
        "`issame` says whether the two images show the same person."
    )
    identity_noun = "pair"  # the card counts pairs, not people
    columns = {
        "json.pair": "the pair's number in the source .bin file",
        "json.side": "left (the pair's first image) or right (its second)",
        "json.issame": "whether the pair's two images show the same person",
    }

    def __init__(self, path, **options):
        super().__init__(path, **options)
        self.bin_name = printable_name(os.path.basename(self.path))
        if not os.path.isfile(self.path):
            raise UsageError(f"source 'bin': {self.path} is not a file")
        try:
            self._images, self._issame = load_verification_pairs(self.path)
        except (UnsafePickleError, pickle.UnpicklingError) as exc:
            raise UsageError(f"source 'bin': {self.bin_name} is not a verification pickle of (bins, issame_list): "
                             f"{str(exc).splitlines()[0][:300]}") from None
        except OSError as exc:
            raise UsageError(f"source 'bin': cannot read {self.bin_name}: {exc.strerror or exc}") from None
        if not self._issame:
            raise UsageError(f"source 'bin': {self.bin_name} holds no pair")
        width = max(6, len(str(len(self._issame) - 1)))
        self._ids = [f"pair-{p:0{width}d}" for p in range(len(self._issame))]
        self._pair = {identity: p for p, identity in enumerate(self._ids)}
        self._image_format: str | None = None

    @property
    def image_format(self) -> str:
        """``jpg`` or ``png``: the encoding of the first readable image (insightface's sets are JPEG)."""
        if self._image_format is None:
            self._image_format = next((ext for ext in map(sniff_image, map(_bytes, self._images[:16])) if ext),
                                      "jpg")
        return self._image_format

    def identities(self):
        return self._ids

    def image_refs(self, identity_id):
        p = self._pair[identity_id]
        return [f"{self.bin_name}:{2 * p}", f"{self.bin_name}:{2 * p + 1}"]

    def load(self, identity_id):
        return self.load_images(identity_id, (0, 1))

    def load_images(self, identity_id, indices):
        p = self._pair[identity_id]
        items: list[SourceImage | Skip] = []
        for side in indices:
            index = 2 * p + side
            ref = f"{self.bin_name}:{index}"
            data = _bytes(self._images[index])
            ext = sniff_image(data)
            if ext is None:
                items.append(Skip(ref, "not an image", f"bins[{index}] is neither JPEG nor PNG bytes"))
                continue
            items.append(SourceImage(ref=ref, data=data, ext=ext,
                                     meta={"pair": p, "side": SIDES[side], "issame": self._issame[p]}))
        return items

    def json_features(self):
        return {"pair": Value("int32"), "side": Value("string"), "issame": Value("bool")}

    def provenance(self):
        return {"file": self.bin_name, "pairs": len(self._issame), "same_pairs": sum(self._issame),
                "images_stored_as": "uint8 arrays" if any(isinstance(i, np.ndarray) for i in self._images)
                else "bytes"}


def _bytes(image: bytes | np.ndarray) -> bytes:
    return image if isinstance(image, bytes) else image.tobytes()
