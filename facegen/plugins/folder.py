"""Source `folder`: one sub-folder per identity with its images inside (the layout DigiFace extracts to).

``--source-opt dataset=NAME`` names a published set in this layout (SynFace, SFace, IDiff-Face: see
:mod:`facegen.plugins.published_sets`): the source then declares that set's licence, citation, description and
counts for the card, and a set whose file names carry labels (SynFace's identity mixup) has them parsed into json
columns; a file whose name does not follow the set's pattern is a counted skip.
"""

from __future__ import annotations

import functools
import os
from collections import Counter

from datasets import Value

from facegen.api import Option, Skip, Source, SourceImage, UsageError, natural_key, printable_name, warn
from facegen.plugins.published_sets import declare, names_read_by

IMAGE_EXTENSIONS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg"}


class FolderSource(Source):
    name = "folder"
    description = "One sub-folder per identity, images inside (identity id = folder name)"
    card_description = (
        "Images read from a local folder with one sub-folder per identity; the identity id is the folder name."
    )
    options = {
        "dataset": Option(None, "a published set this folder holds (its licence, citation and counts go to the "
                          f"card): {', '.join(names_read_by('folder'))}", choices=names_read_by("folder")),
    }

    def __init__(self, path, **options):
        super().__init__(path, **options)
        published = declare(self, self.opts["dataset"])
        self._name_fields = published.name_fields if published is not None else None
        if not os.path.isdir(self.path):
            raise UsageError(f"source 'folder': {self.path} is not a directory")
        with os.scandir(self.path) as entries:
            names = [e.name for e in entries if e.is_dir() and not e.name.startswith((".", "__"))]
        self._ids = sorted(names, key=natural_key)
        self._listing: dict[str, list[str]] = {}  # identity -> image file names (filled on first use)
        self._image_format: str | None = None

    @property
    def image_format(self) -> str:
        """The dataset's encoding: PNG when any image file is PNG (lossless), JPEG only when every one is JPEG.

        Decided from the file names of every identity folder (stopping at the first PNG), never from one file:
        one JPEG among PNGs must not turn the PNGs into JPEGs. Images of the other encoding are converted
        losslessly (or, for a PNG named .jpg in a JPEG dataset, skipped with the reason), and counted in the card.
        """
        if self._image_format is None:
            found: set[str] = set()
            for identity_id in self._ids:
                if printable_name(identity_id) != identity_id:
                    continue  # never read: its images are skipped (name not UTF-8)
                try:
                    files = self._files(identity_id)  # the listing the run uses anyway (cached)
                except OSError:
                    continue  # an unreadable folder: its images are skipped with the reason when loaded
                found.update(IMAGE_EXTENSIONS[os.path.splitext(name)[1].lower()] for name in files)
                if "png" in found:
                    break
            self._image_format = "jpg" if "jpg" in found and "png" not in found else "png"
        return self._image_format

    def identities(self):
        """The identity folders that hold an image (an empty folder would be a label without samples)."""
        return [i for i in self._folder_names if i not in self._scan["without_images"]]

    @functools.cached_property
    def _scan(self) -> dict:
        """One listing of every identity folder (cached for ``_files``): which folders hold no image, and what
        the source does not read, counted by kind and said in one warning line (hidden files only counted)."""
        ignored: Counter[str] = Counter()
        without_images = []
        with os.scandir(self.path) as entries:
            for entry in entries:
                if not entry.is_dir() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                    ignored["images at the top level"] += 1
        for identity_id, folder_name in self._folder_names.items():
            if identity_id != folder_name:
                continue  # never read: a counted skip
            try:
                with os.scandir(os.path.join(self.path, folder_name)) as entries:
                    images = []
                    for entry in entries:
                        if entry.name.startswith("."):
                            ignored["hidden files"] += 1
                        elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                            images.append(entry.name)  # by its name, as before: one that cannot be read is a skip
                        elif entry.is_dir():
                            ignored["nested folders"] += 1
                        else:
                            ignored["non-image files"] += 1
            except OSError:
                continue  # an unreadable folder: its images are skipped with the reason when loaded
            self._listing[identity_id] = sorted(images, key=natural_key)
            if not images:
                without_images.append(identity_id)
        shown = {kind: n for kind, n in sorted(ignored.items()) if kind != "hidden files"}
        if (shown or without_images) and os.environ.get("RANK", "0") == "0":
            parts = [f"{n} {kind}" for kind, n in shown.items()]
            if without_images:
                parts.insert(0, f"{len(without_images)} identity folder(s) without an image, left out "
                                f"(e.g. {', '.join(without_images[:3])})")
            warn(f"folder: not read: {'; '.join(parts)} (only PATH/<identity>/<image>.png|jpg|jpeg is read; "
                 "nested folders are not)")
        return {"without_images": set(without_images), "ignored": dict(sorted(ignored.items()))}

    def provenance(self):
        scan = self._scan
        facts = {}
        if scan["without_images"]:
            facts["identity_folders_without_images"] = len(scan["without_images"])
        if scan["ignored"]:
            facts["ignored_entries"] = scan["ignored"]
        return facts

    @functools.cached_property
    def _folder_names(self) -> dict[str, str]:
        """Identity id -> folder name. A name that is not UTF-8 (no json can hold it) is listed under a printable
        id (``person_\\xff``) so that it becomes a counted skip, with a warning now."""
        names = {printable_name(n): n for n in self._ids}
        if len(names) != len(self._ids):  # "a\xff" written out literally beside a non-UTF-8 a\xff
            raise UsageError(f"source 'folder': identity folder names in {self.path} collide once their non-UTF-8 "
                             "bytes are written as \\xNN; rename them")
        bad = [i for i, n in names.items() if i != n]
        if bad and os.environ.get("RANK", "0") == "0":
            warn(f"folder: {len(bad)} identity folder name(s) are not UTF-8; their images are skipped "
                 f"(e.g. {', '.join(bad[:3])})")
        return names

    def _files(self, identity_id: str) -> list[str]:
        """The identity's image files in natural order, listed once per process."""
        files = self._listing.get(identity_id)
        if files is None:
            self._scan  # lists every readable folder once
            files = self._listing.get(identity_id)
        if files is None:  # unreadable when scanned: list it now, to skip its images with the reason
            folder = os.path.join(self.path, identity_id)
            files = self._listing[identity_id] = sorted(
                (n for n in os.listdir(folder)
                 if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS),
                key=natural_key,
            )
        return files

    def image_refs(self, identity_id):
        if self._name_not_utf8(identity_id):
            return [f"{identity_id}/"]
        return [printable_name(f"{identity_id}/{name}") for name in self._files(identity_id)]

    def load(self, identity_id):
        return self.load_images(identity_id, range(len(self.image_refs(identity_id))))

    def _name_not_utf8(self, identity_id: str) -> bool:
        return self._folder_names.get(identity_id, identity_id) != identity_id

    def load_images(self, identity_id, indices):
        if self._name_not_utf8(identity_id):  # one item: the folder is never listed
            return [Skip(f"{identity_id}/", "name not UTF-8", "identity folder name is not UTF-8") for _ in indices]
        folder = os.path.join(self.path, identity_id)
        files = self._files(identity_id)
        items: list[SourceImage | Skip] = []
        for index in indices:
            file_name = files[index]
            ref = f"{identity_id}/{file_name}"
            if printable_name(file_name) != file_name:
                warn(f"folder: skipped {printable_name(ref)}: the file name is not UTF-8")
                items.append(Skip(printable_name(ref), "name not UTF-8", "file name is not UTF-8"))
                continue
            meta = {"image_index": index}
            if self._name_fields is not None:
                fields = self._name_fields.parse(file_name)
                if fields is None:
                    items.append(Skip(ref, "file name not in the set's pattern",
                                      f"{self.dataset_name} names its images {self._name_fields.pattern}"))
                    continue
                meta.update(fields)
            try:
                with open(os.path.join(folder, file_name), "rb") as f:
                    data = f.read()
            except OSError as exc:
                items.append(Skip(ref, "unreadable file", str(exc.strerror or exc)))
                continue
            ext = IMAGE_EXTENSIONS[os.path.splitext(file_name)[1].lower()]
            items.append(SourceImage(ref=ref, data=data, ext=ext, meta=meta))
        return items

    def json_features(self):
        features = {"image_index": Value("int32")}
        for field in self._name_fields.fields if self._name_fields is not None else ():
            features[field.name] = Value(field.type)
        return features

    def column_descriptions(self):
        return {f"json.{field.name}": field.description
                for field in (self._name_fields.fields if self._name_fields is not None else ())}
