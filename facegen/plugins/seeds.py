"""Source `seeds`: identities that are only seeds, for transforms that generate faces from scratch (e4e truncation).

Identity ``i`` (``i`` = 0 … count-1, id ``"i"``) carries no image: its per-identity seed (derived by the run from the
run seed and the id) is all a generating transform needs. No files are read, so ``--source-path`` is not needed.
"""

from __future__ import annotations

from facegen.api import LicenseInfo, Option, Source, UsageError


class SeedsSource(Source):
    name = "seeds"
    synthetic = True  # the card may call the images synthetic
    description = "N identities that are just seeds, for generating transforms (e.g. e4e mode=truncation)"
    card_description = (
        "Identities are seeds, not images: identity `i` is the number `i`, and everything generated for it comes "
        "from a seed derived from the run seed and that number, so the dataset is reproducible from the command."
    )
    homepage = ""
    citation = ""
    # The seeds are plain integers, no third-party data: they add no terms of their own. The dataset's licence is
    # that of the transform and its models (for e4e: NVIDIA's StyleGAN2 weights, non-commercial), which the card
    # lists next to this one.
    license = LicenseInfo(
        id="cc0-1.0", name="CC0 1.0 (the seeds are plain integers, no third-party data)",
        link="https://creativecommons.org/publicdomain/zero/1.0/",
        text="The seeds source contributes no data: identities are the integers start … start+count-1.",
        commercial_use=True,
        note="adds no terms; the transform's models govern the generated images",
    )
    options = {
        "count": Option(1000, "number of identities (seeds 0 … count-1)", type=int),
        "start": Option(0, "first identity number (to extend a dataset without repeating identities)", type=int),
    }

    needs_path = False  # no files are read; a given --source-path is ignored

    def __init__(self, path=None, **options):
        super().__init__(path, **options)
        if self.opts["count"] < 1:
            raise UsageError(f"source 'seeds': count must be at least 1, got {self.opts['count']}")
        if self.opts["start"] < 0:
            raise UsageError(f"source 'seeds': start must be >= 0, got {self.opts['start']}")

    def identities(self):
        start = self.opts["start"]
        return [str(i) for i in range(start, start + self.opts["count"])]

    def load(self, identity_id):
        return []  # nothing to read: the transform generates from identity.seed
