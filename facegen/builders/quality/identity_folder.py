"""A plain identity folder (one sub-folder of images per identity, as the `folder` source reads it) shaped like a
:class:`facegen.published.PublishedDataset` for the report: what ``facegen report --against FOLDER`` embeds when
FOLDER is not a facegen dataset (an evaluation set's identities, say, to find them in a training set).

Only what the report's embedding pass and analysis read is provided: ``samples`` (identity order, then image
order), ``identities``, ``by_identity``, ``image(sample)``, ``members(sample)`` and ``read(sample, column,
length)`` (the image's size and first bytes, checked before decoding), ``name``, ``root``, ``repo_id`` (None) and
``fingerprint()``. Images are read through the `folder` source on request; an unreadable one is an OSError, which
the report counts as a sample it could not embed.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from facegen import registry
from facegen.api import Skip
from facegen.errors import UsageError


@dataclass
class FolderSample:
    shard: int  # always 0: the report reads samples in (shard, position) order
    position: int
    key: str
    cls: int
    identity: str
    index: int  # the image's position among its identity's images


class IdentityFolder:
    """A folder of identity sub-folders of images (see the module docstring)."""

    repo_id = None
    skipped: dict = {}
    image_column = "image"

    def __init__(self, path: str | Path):
        self.root = Path(path).resolve()
        self.name = self.root.name  # never a path: the report names the folder by its name
        self.source = registry.get_source("folder")(str(self.root))
        self.identities = list(self.source.identities())
        if not self.identities:
            raise UsageError(f"{path} holds no identity sub-folder of images: not a facegen dataset, and not an "
                             "identity folder")
        self.samples: list[FolderSample] = []
        self.by_identity: dict[str, list[FolderSample]] = defaultdict(list)
        self._refs: list[str] = []
        for cls, identity in enumerate(self.identities):
            refs = self.source.image_refs(identity)
            for n, ref in enumerate(refs):
                sample = FolderSample(0, len(self.samples), f"{cls:06d}_{n:03d}", cls, identity, n)
                self.samples.append(sample)
                self.by_identity[identity].append(sample)
                self._refs.append(ref)

    def image(self, sample: FolderSample) -> bytes:
        (item,) = self.source.load_images(sample.identity, [sample.index])
        if isinstance(item, Skip):
            raise OSError(f"{item.ref}: {item.reason}")
        return item.data

    def members(self, sample: FolderSample) -> dict[str, tuple[int, int]]:
        """The sample's one member, its image file, as (offset, size)."""
        return {self.image_column: (0, (self.root / self._refs[sample.position]).stat().st_size)}

    def read(self, sample: FolderSample, field_name: str, length: int | None = None) -> bytes:
        """The image's bytes (the first ``length`` of them: its header, read from the file alone)."""
        if length is None:
            return self.image(sample)
        with open(self.root / self._refs[sample.position], "rb") as f:
            return f.read(length)

    def fingerprint(self) -> str:
        return hashlib.sha256("\n".join(self._refs).encode()).hexdigest()
