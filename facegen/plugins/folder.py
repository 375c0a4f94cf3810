"""Source `folder`: one sub-folder per identity with its images inside (the layout DigiFace extracts to)."""

from __future__ import annotations

import os
import re

from datasets import Value

from facegen.api import Source
from facegen.errors import UsageError
from facegen.records import SourceImage, Skip

IMAGE_EXTENSIONS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg"}


def natural_key(name: str):
    """Sort key that puts 2 before 10 ("img2" < "img10")."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


class FolderSource(Source):
    name = "folder"
    description = "One sub-folder per identity, images inside (identity id = folder name)"
    card_description = (
        "Images read from a local folder with one sub-folder per identity; the identity id is the folder name."
    )

    def __init__(self, path, **options):
        super().__init__(path, **options)
        if not os.path.isdir(self.path):
            raise UsageError(f"source 'folder': {self.path} is not a directory")
        with os.scandir(self.path) as entries:
            names = [e.name for e in entries if e.is_dir() and not e.name.startswith((".", "__"))]
        self._ids = sorted(names, key=natural_key)
        self._listing: dict[str, list[str]] = {}  # identity -> image file names (filled on first use)
        # the stored encoding, from the first identity's images: passthrough then copies bytes instead of converting
        self.image_format = "png"
        if self._ids:
            names = os.listdir(os.path.join(self.path, self._ids[0]))
            first = next((n for n in sorted(names, key=natural_key)
                          if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS), None)
            if first:
                self.image_format = IMAGE_EXTENSIONS[os.path.splitext(first)[1].lower()]

    def identities(self):
        return self._ids

    def _files(self, identity_id: str) -> list[str]:
        """The identity's image files in natural order, listed once per process."""
        files = self._listing.get(identity_id)
        if files is None:
            folder = os.path.join(self.path, identity_id)
            files = self._listing[identity_id] = sorted(
                (n for n in os.listdir(folder)
                 if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS),
                key=natural_key,
            )
        return files

    def image_refs(self, identity_id):
        return [f"{identity_id}/{name}" for name in self._files(identity_id)]

    def load(self, identity_id):
        return self.load_images(identity_id, range(len(self._files(identity_id))))

    def load_images(self, identity_id, indices):
        folder = os.path.join(self.path, identity_id)
        files = self._files(identity_id)
        items: list[SourceImage | Skip] = []
        for index in indices:
            file_name = files[index]
            ref = f"{identity_id}/{file_name}"
            try:
                with open(os.path.join(folder, file_name), "rb") as f:
                    data = f.read()
            except OSError as exc:
                items.append(Skip(ref, "unreadable file", str(exc.strerror or exc)))
                continue
            ext = IMAGE_EXTENSIONS[os.path.splitext(file_name)[1].lower()]
            items.append(SourceImage(ref=ref, data=data, ext=ext, meta={"image_index": index}))
        return items

    def json_features(self):
        return {"image_index": Value("int32")}
