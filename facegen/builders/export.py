"""`facegen export`: a facegen dataset (a folder or a Hub id) in the formats face-recognition trainers read.

- ``--format rec``: insightface's RecordIO layout, as arcface_torch's ``MXFaceDataset`` reads it
  (``recognition/arcface_torch/dataset.py``: record 0's labels ``[N+1, N+1+C]``, then each of the image records
  ``1 .. N`` with its class): ``DIR/train.rec`` + ``train.idx`` + ``property`` ("C,H,W"). The images are the
  dataset's samples in label order, then key order; each image record holds the sample's image bytes and its
  class as a scalar label: the ``cls`` values with an image, numbered ``0 .. C-1`` in order (a ``cls`` with no
  image, from an empty identity or one whose images were all skipped, leaves no gap, so record 0, the identity
  records and ``property`` say the same C); records ``N+1 .. N+C`` are one identity record per class, labelled
  ``[start, end)``. ``property``'s H,W is the most common image size; other sizes are counted in one warning.
  A record whose payload holds the RecordIO magic word is cut into chunks (:mod:`facegen.plugins.recordio`, which
  writes what mxnet 1.9.1 writes).
- ``--format rec --shuffle``: the header-less flavour DALI's ``fn.readers.mxnet`` wants (arcface_torch's
  ``scripts/shuffle_rec.py``): the image records only, keys ``0 .. N-1`` in an order shuffled by ``--seed``, scalar
  labels, with ``train.idx``.
- ``--format imagefolder``: ``DIR/{identity}/{n}.{ext}`` for torchvision's ``ImageFolder`` (its class index is the
  sorted order of the folder names, not ``cls``); ``n`` is the sample's number within its identity (the key's
  ``_NNN``). An identity id that is not a plain file name (or starts with ``__``, which ``datasets`` skips)
  becomes ``cls-{cls:06d}``.

Image bytes are never re-encoded: a PNG dataset exports PNG bytes (``mx.image.imdecode`` and ``cv2.imdecode``,
which arcface_torch and insightface decode with, read PNG as well as JPEG; DALI's image decoder too). The source
dataset's card is written beside the export (README.md, and LICENSE copied): its licence, citation, gating and prose
unchanged, a note on top saying what this folder is and what reads it, and YAML ``configs``/``dataset_info`` that
describe this folder, not the shards: for image folders a ``configs`` entry naming ``*/*.{ext}`` with
``drop_labels: false`` (so ``load_dataset`` gets ``label`` from the folder names even for one identity, or one named
like a split), for RecordIO none (``datasets`` does not read it).

Resumable and atomic like a build: ``DIR/.facegen-export.json`` (:class:`ExportRecord`) names what is exported
and how far it got. A RecordIO export writes ``.train.rec.partial`` and ``.train.idx.partial``, and at each
checkpoint makes them durable and then records their sizes; a rerun cuts them back to the last checkpoint and
goes on, so that the result is byte-identical to an uninterrupted export, and the two files get their names only
once both are whole. An image-folder export writes each file under a hidden temporary name and renames it; a rerun
keeps the files already there with the right size. A sample that cannot be read is skipped and counted, and the
record is complete only at the very end. A folder holding anything else, or another export, is refused.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import facegen
from facegen.errors import UsageError
from facegen.fileio import atomic_write, fsync_folder, sync_all
from facegen.layout import IDX_FILE, LICENSE, PROPERTY_FILE, README, REC_FILE, ExportFolder
from facegen.layout.records import ExportPlan, ExportRecord, ExportSkip
from facegen.messages import warn
from facegen.plugins.recordio import encode_record, pack
from facegen.published import PublishedDataset, Sample

FORMATS = ("rec", "imagefolder")
CHECKPOINT_RECORDS = 2000  # samples between two checkpoints of a RecordIO export
CHECKPOINT_BYTES = 256 << 20  # or this many bytes of records, whichever comes first
FLOAT32_EXACT = 1 << 24  # record 0's labels are float32: exact up to here
SAFE_FOLDER = re.compile(r"[^/\\\x00-\x1f\x7f]{1,200}")
FACEGEN_KEY = re.compile(r"\d{6}_(\d{3,})")


@dataclass
class ExportSummary:
    """What an export holds and what this run did."""

    to: Path
    format: str
    shuffle: bool
    samples: int  # in the dataset
    written: int  # images in the export
    identities: int  # with an image in the export
    classes: int = 0  # labels 0 .. classes-1 (RecordIO: property's count)
    skipped: Counter = field(default_factory=Counter)
    already_complete: bool = False
    resumed_at: int = 0  # samples handled by an earlier, interrupted run
    seconds: float = 0.0

    def lines(self) -> list[str]:
        flavour = {("rec", False): "RecordIO, insightface's layout", ("rec", True): "RecordIO, shuffled, no header",
                   ("imagefolder", False): "image folders"}[(self.format, self.shuffle)]
        lines = [f"facegen export done: {self.to} ({flavour})",
                 f"  {self.written} images of {self.identities} identities"
                 + (f" (labels 0..{self.classes - 1}: {self.classes - self.identities} with no image)"
                    if self.classes > self.identities else "")
                 + f"; skipped {sum(self.skipped.values())}"
                 + (f" ({', '.join(f'{r}: {n}' for r, n in self.skipped.most_common())})" if self.skipped else "")]
        if self.already_complete:
            lines.append("  nothing to do: the export was already complete")
        elif self.resumed_at:
            lines.append(f"  resumed after {self.resumed_at} of {self.samples} samples exported by an earlier run")
        return lines


def export(dataset: str | os.PathLike, to: str | os.PathLike, fmt: str, shuffle: bool = False, seed: int = 0,
           progress: bool = True) -> ExportSummary:
    """Export the facegen dataset ``dataset`` (a folder or a Hub id) to ``to`` in ``fmt`` (see the module)."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if shuffle and fmt != "rec":
        raise UsageError("--shuffle writes the header-less RecordIO flavour: it goes with --format rec")
    started = time.perf_counter()
    data = PublishedDataset(dataset, progress=progress)
    folder = ExportFolder(Path(to).resolve())
    if folder.root == data.root or data.root in folder.root.parents:
        raise UsageError(f"--to {to} is inside the dataset's folder: choose a folder outside it")
    order = _order(data, shuffle, seed)
    plan = ExportPlan(dataset=data.name, fingerprint=data.fingerprint(), format=fmt, shuffle=shuffle, seed=seed,
                      samples=len(order))
    record = _start(folder, plan)
    _warn_channels(data)
    resumed_at = record.position if not record.complete else 0
    summary = ExportSummary(folder.root, fmt, shuffle, len(order), 0, 0, resumed_at=resumed_at)
    if record.complete:
        summary.already_complete = True
    elif fmt == "rec":
        record = RecExport(data, folder, order, record, progress).run()
    else:
        record = FolderExport(data, folder, order, record, progress).run()
    summary.written, summary.identities, summary.classes = record.written, record.identities, record.classes
    summary.skipped = Counter(s.reason for s in record.skipped)
    summary.seconds = time.perf_counter() - started
    return summary


# ------------------------------------------------------------------------------------------------ the reader


def _order(data: PublishedDataset, shuffle: bool, seed: int) -> list[Sample]:
    """The samples in the export's order: label, then key; ``shuffle``: one permutation seeded by ``seed``."""
    samples = list(data.samples)
    if shuffle:
        permutation = np.random.default_rng(seed).permutation(len(samples))
        samples = [samples[i] for i in permutation.tolist()]
    return samples


def _warn_channels(data: PublishedDataset) -> None:
    """A dataset stored BGR stays BGR (its bytes are copied): say so, since trainers decode to RGB."""
    stored = data.run.channels if data.run is not None else (data.meta(data.samples[0]).get("channels")
                                                              if data.samples else None)
    if stored == "bgr":
        warn(f"{data.name} stores its images with red and blue swapped (json channels: bgr); the export copies "
             "them as they are, so a trainer that decodes them as RGB gets them swapped (rebuild the dataset with "
             "--format png to store RGB first)")


# ------------------------------------------------------------------------------------------------ the state


def _start(folder: ExportFolder, plan: ExportPlan) -> ExportRecord:
    """The export's record: a new one for an empty (or new) folder, the earlier run's when it is the same export;
    anything else there is refused in one line."""
    if folder.root.exists() and not folder.root.is_dir():
        raise UsageError(f"--to {folder.root} is a file, not a folder")
    record = None
    if folder.record.exists():
        record = ExportRecord.read(folder.record)
        if record is None:
            raise UsageError(f"{folder.record} is damaged or was written by another version of facegen: delete "
                             f"{folder.root} (or choose another --to) to export again")
        if record.plan != plan:
            raise UsageError(f"{folder.root} holds an export of {record.plan.dataset} ({record.plan.format}"
                             f"{', shuffled' if record.plan.shuffle else ''}) that differs from this one: choose "
                             "another --to, or delete that folder first")
        return record
    if folder.root.is_dir() and any(True for _ in os.scandir(folder.root)):
        raise UsageError(f"--to {folder.root} is not empty and holds no facegen export: choose an empty or new "
                         "folder")
    try:
        folder.root.mkdir(parents=True, exist_ok=True)
        record = ExportRecord(facegen_version=facegen.__version__, plan=plan)
        record.write(folder.record)
    except OSError as exc:
        raise UsageError(f"cannot write to {folder.root}: {exc.strerror or exc}") from None
    return record


def _write_card(data: PublishedDataset, folder: ExportFolder, fmt: str, shuffle: bool) -> None:
    """The source dataset's card beside the export: its licence, citation, gating and prose as they are, a note on
    top saying what this folder holds and how to read it, and YAML whose ``configs``/``dataset_info`` describe this
    folder instead of the WebDataset shards (a copy of the source's would make ``load_dataset`` look for
    ``data/train/*.tar``); LICENSE* copied."""
    import yaml
    from huggingface_hub import DatasetCard, DatasetCardData

    readme = data.folder.readme
    text = readme.read_text(encoding="utf-8", errors="replace") if readme.is_file() else ""
    card = None
    if text.startswith("---"):
        try:
            card = DatasetCard(text)
        except (yaml.YAMLError, ValueError, TypeError):  # not YAML; not a mapping; fields of the wrong type
            warn(f"{data.name}'s README.md has YAML front matter that does not parse: the export's card keeps its "
                 "text only (the licence is in LICENSE)")
            match = re.match(r"(?s)---\n.*?\n---\n", text)
            text = text[match.end():] if match else ""
    meta = card.data.to_dict() if card is not None else {}
    body = card.text if card is not None else text
    for key in ("configs", "dataset_info"):
        meta.pop(key, None)
    if isinstance(meta.get("tags"), list):
        meta["tags"] = [tag for tag in meta["tags"] if tag != "webdataset"]
    if fmt == "imagefolder":
        meta["configs"] = [{"config_name": "default", "drop_labels": False,
                            "data_files": [{"split": "train", "path": f"*/*.{data.image_column}"}]}]
    yaml_text = DatasetCardData(**meta).to_yaml(original_order=list(meta))
    content = f"---\n{yaml_text}\n---\n\n{_card_note(data, fmt, shuffle)}{body.lstrip()}"
    DatasetCard(content)  # the front matter parses back: a card that does not round-trip is never written
    atomic_write(folder.file(README), content.encode("utf-8"))
    for path in sorted(data.root.glob(f"{LICENSE}*")):
        if path.is_file():
            atomic_write(folder.file(path.name), path.read_bytes())


def _card_note(data: PublishedDataset, fmt: str, shuffle: bool) -> str:
    """The note on top of the export's card: what this folder holds and what reads it."""
    made = f"> **This folder is an export of `{data.name}` made with `facegen export`:"
    if fmt == "imagefolder":
        what = (f"{made} image folders** (`{{identity}}/{{n}}.{data.image_column}`). `datasets` loads it "
                "(`load_dataset(\"imagefolder\", data_dir=...)`, or this folder or its Hub id: the `configs` above "
                "name the images), and so does torchvision's `ImageFolder`; both number the classes (`label`) in the "
                "sorted order of the folder names, not by the dataset's `cls`.")
    else:
        flavour = ("MXNet RecordIO, shuffled and without header records** (`train.rec`, `train.idx`, `property`), "
                   "for DALI's `fn.readers.mxnet`." if shuffle else
                   "MXNet RecordIO in insightface's layout** (`train.rec`, `train.idx`, `property`), for "
                   "arcface_torch's `MXFaceDataset` (and DALI's mxnet reader after arcface_torch's `shuffle_rec.py`).")
        what = (f"{made} {flavour} `datasets` does not read these files (load the WebDataset version for that). "
                "Each image's label is its `cls`, numbered 0..C-1 in `cls` order without gaps; `property` says C "
                "and the size most images have.")
    return (f"{what} The card below describes the dataset as published (WebDataset shards): the same images, "
            "licence and citation apply to this export. Image bytes are copied, never re-encoded.\n\n")


def _image_size(data: bytes) -> str:
    """"HxW" from an encoded image's header (nothing is decoded), "" when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception:  # an undecodable image was skipped by the build: it is exported as it is
        return ""
    return f"{height},{width}"


# ------------------------------------------------------------------------------------------------ the writers


class RecExport:
    """Writes ``train.rec`` + ``train.idx`` (+ ``property``) through their partial names, with checkpoints."""

    def __init__(self, data: PublishedDataset, folder: ExportFolder, order: list[Sample], record: ExportRecord,
                 progress: bool):
        self.data, self.folder, self.order, self.record, self.progress = data, folder, order, record, progress
        self.shuffle = record.plan.shuffle
        self.rec_path, self.idx_path = folder.partial(REC_FILE), folder.partial(IDX_FILE)

    def run(self) -> ExportRecord:
        record = self.record
        if not record.records_done:
            record = self._write_records(record)
        self._finish(record)
        return self.record

    def _open(self, record: ExportRecord):
        """The partial files, cut back to the last checkpoint (nothing after it was recorded as written)."""
        fresh = record.position == 0
        for path, size in ((self.rec_path, record.rec_bytes), (self.idx_path, record.idx_bytes)):
            if fresh:
                path.unlink(missing_ok=True)
            elif not path.is_file() or path.stat().st_size < size:
                raise UsageError(f"{path} is missing or shorter than the export's record says: delete "
                                 f"{self.folder.root} to export again")
        rec, idx = open(self.rec_path, "r+b" if not fresh else "wb"), open(self.idx_path, "r+b" if not fresh else "wb")
        rec.truncate(record.rec_bytes)
        idx.truncate(record.idx_bytes)
        rec.seek(record.rec_bytes)
        idx.seek(record.idx_bytes)
        return rec, idx

    def _checkpoint(self, rec, idx, **changes) -> ExportRecord:
        for f in (rec, idx):
            f.flush()
            os.fsync(f.fileno())
        self.record = dataclasses.replace(self.record, rec_bytes=rec.tell(), idx_bytes=idx.tell(), **changes)
        self.record.write(self.folder.record)
        return self.record

    def _write_records(self, record: ExportRecord) -> ExportRecord:
        from tqdm.auto import tqdm

        rec, idx = self._open(record)
        position, written = record.position, record.written
        skipped, sizes = list(record.skipped), Counter(record.sizes)
        label_of = self._labels(position, skipped)
        first_key = 0 if self.shuffle else 1
        if not self.shuffle and position == 0:  # record 0 first; its labels are written last, in place
            self._write(rec, idx, 0, pack([0.0, 0.0], b""))
        since, since_bytes = 0, 0
        bar = tqdm(total=len(self.order), initial=position, unit="img", desc=f"export rec -> {self.folder.root.name}",
                   disable=not self.progress, dynamic_ncols=True)
        with bar:
            for position in range(position, len(self.order)):
                sample = self.order[position]
                try:
                    image = self.data.image(sample)
                except OSError as exc:
                    skipped.append(ExportSkip(position, sample.key, f"unreadable sample ({exc})"[:300]))
                    continue
                finally:
                    bar.update(1)
                key = first_key + written
                since_bytes += self._write(rec, idx, key, pack(float(label_of(sample.cls)), image, id=key))
                sizes[_image_size(image)] += 1
                written += 1
                since += 1
                if since >= CHECKPOINT_RECORDS or since_bytes >= CHECKPOINT_BYTES:
                    self._checkpoint(rec, idx, position=position + 1, written=written, skipped=skipped,
                                     sizes=dict(sizes))
                    since, since_bytes = 0, 0
            position = len(self.order)
        if written == 0:
            rec.close()
            idx.close()
            raise UsageError(f"no sample of {self.data.name} could be read: nothing exported "
                             f"({Counter(s.reason for s in skipped).most_common(1)[0][0] if skipped else 'empty'})")
        gone = {s.position for s in skipped}
        if self.shuffle:
            identities = len({s.cls for i, s in enumerate(self.order) if i not in gone})
            classes = len({s.cls for s in self.order})
        else:
            identities = classes = self._identity_records(rec, idx, gone, written)
        record = self._checkpoint(rec, idx, position=position, written=written, skipped=skipped, sizes=dict(sizes),
                                  records_done=True, identities=identities, classes=classes)
        rec.close()
        idx.close()
        return record

    def _labels(self, position: int, skipped: list[ExportSkip]):
        """``cls`` -> the label written: the classes numbered 0..C-1 in ``cls`` order, so that a ``cls`` with no
        image (an empty identity, or one whose images were all skipped) leaves no gap, and record 0, the C identity
        records and ``property`` agree on C. In label order that is the count of classes written so far (recounted
        from the record on a resume); shuffled, the rank among the dataset's classes (no identity records there)."""
        if self.shuffle:
            ranks = {cls: i for i, cls in enumerate(sorted({s.cls for s in self.order}))}
            return ranks.__getitem__
        gone = {s.position for s in skipped}
        earlier = [s.cls for i, s in enumerate(self.order[:position]) if i not in gone]
        state = {"classes": len(set(earlier)), "last": earlier[-1] if earlier else None}

        def label_of(cls: int) -> int:
            if cls != state["last"]:
                state["classes"] += 1
                state["last"] = cls
            return state["classes"] - 1

        return label_of

    def _write(self, rec, idx, key: int, payload: bytes) -> int:
        data = encode_record(payload)
        idx.write(f"{key}\t{rec.tell()}\n".encode("ascii"))
        rec.write(data)
        return len(data)

    def _identity_records(self, rec, idx, gone: set[int], written: int) -> int:
        """One record per class after the images, labelled [start, end) over image keys; then record 0's labels
        [N+1, N+1+C], written over its placeholder at the start of the file (the same 40 bytes)."""
        runs: list[list[int]] = []  # [cls, start, end)
        key = 1
        for position, sample in enumerate(self.order):
            if position in gone:
                continue
            if runs and runs[-1][0] == sample.cls:
                runs[-1][2] = key + 1
            else:
                runs.append([sample.cls, key, key + 1])
            key += 1
        first_identity = written + 1
        if first_identity + len(runs) > FLOAT32_EXACT:
            raise UsageError(f"{written} images and {len(runs)} identities: record 0's float32 labels cannot hold "
                             f"{first_identity + len(runs)} exactly; export with --shuffle (no header records)")
        for i, (_, start, end) in enumerate(runs):
            self._write(rec, idx, first_identity + i, pack([float(start), float(end)], b"", id=first_identity + i))
        end = rec.tell()
        rec.seek(0)
        header = encode_record(pack([float(first_identity), float(first_identity + len(runs))], b""))
        rec.write(header)
        rec.seek(end)
        return len(runs)

    def _finish(self, record: ExportRecord) -> None:
        """Both files whole: give them their names (the .idx first), then property, the card and the record."""
        for partial, name, size in ((self.idx_path, IDX_FILE, record.idx_bytes),
                                    (self.rec_path, REC_FILE, record.rec_bytes)):
            final = self.folder.file(name)
            if partial.is_file():
                if partial.stat().st_size != size:
                    raise UsageError(f"{partial} is not the size its record says: delete {self.folder.root} to "
                                     "export again")
                os.replace(partial, final)
            elif not final.is_file() or final.stat().st_size != size:
                raise UsageError(f"{final} is missing or not the size its record says: delete {self.folder.root} to "
                                 "export again")
        fsync_folder(self.folder.root)
        sizes = Counter({size: n for size, n in record.sizes.items() if size})
        size = min(sizes, key=lambda s: (-sizes[s], s), default="112,112")  # the most common; of a tie, the smallest
        atomic_write(self.folder.file(PROPERTY_FILE), f"{record.classes},{size}\n".encode("ascii"))
        others = record.written - sizes[size]
        if others:
            height, width = size.split(",")
            warn(f"{others} of {record.written} exported images are not {height}x{width}, the size written in "
                 "property (the most common one); arcface_torch expects every image 112x112")
        _write_card(self.data, self.folder, "rec", self.shuffle)
        self.record = dataclasses.replace(record, complete=True)
        self.record.write(self.folder.record)


class FolderExport:
    """Writes ``DIR/{identity}/{n}.{ext}``, each file atomically; a rerun keeps the files already there."""

    def __init__(self, data: PublishedDataset, folder: ExportFolder, order: list[Sample], record: ExportRecord,
                 progress: bool):
        self.data, self.folder, self.order, self.record, self.progress = data, folder, order, record, progress
        self.ext = data.image_column

    def run(self) -> ExportRecord:
        from tqdm.auto import tqdm

        names, files = self._folder_names(), self._file_names()
        skipped: list[ExportSkip] = []
        written, cleaned = 0, set()
        for position, sample in enumerate(tqdm(self.order, unit="img", disable=not self.progress,
                                               desc=f"export images -> {self.folder.root.name}", dynamic_ncols=True)):
            target = self.folder.identity_folder(names[sample.identity]) / f"{files[id(sample)]}.{self.ext}"
            if target.parent not in cleaned:  # a killed run's hidden temporaries
                for stale in target.parent.glob(".*.tmp-*") if target.parent.is_dir() else ():
                    stale.unlink(missing_ok=True)
                cleaned.add(target.parent)
            try:
                size = self.data.members(sample)[self.data.image_column][1]
                if not (target.is_file() and target.stat().st_size == size):
                    atomic_write(target, self.data.image(sample), durable=False)
            except (OSError, KeyError) as exc:
                skipped.append(ExportSkip(position, sample.key, f"unreadable sample ({exc})"[:300]))
                continue
            written += 1
        if written == 0:
            raise UsageError(f"no sample of {self.data.name} could be read: nothing exported")
        sync_all()  # every image durable before the record says complete
        _write_card(self.data, self.folder, "imagefolder", False)
        gone = {s.position for s in skipped}
        identities = len({sample.identity for i, sample in enumerate(self.order) if i not in gone})
        self.record = dataclasses.replace(self.record, position=len(self.order), written=written, skipped=skipped,
                                          complete=True, identities=identities, classes=identities)
        self.record.write(self.folder.record)
        return self.record

    def _folder_names(self) -> dict[str, str]:
        """Identity -> its folder's name: the identity id when it is a plain, visible file name (unique once case is
        ignored, for file systems that ignore it; not starting with ``__``, which ``datasets`` skips like a hidden
        folder), else ``cls-{cls:06d}`` (``-2``, ``-3``... appended while another identity has that name)."""
        names, taken = {}, set()
        for identity, samples in self.data.by_identity.items():
            name = identity
            if (not SAFE_FOLDER.fullmatch(name) or name.startswith((".", "__")) or name.strip() != name
                    or name.lower() in taken or name in self.folder.own_names()):
                name = base = f"cls-{samples[0].cls:06d}"
                suffix = 1
                while name.lower() in taken:  # an identity literally named so took it first
                    suffix += 1
                    name = f"{base}-{suffix}"
            names[identity] = name
            taken.add(name.lower())
        return names

    def _file_names(self) -> dict[int, str]:
        """id(sample) -> its file's name without extension: the ``NNN`` of a facegen key ``{cls:06d}_{NNN}``, else
        (or when two samples of an identity would share it) the sample's position in its identity."""
        names = {}
        for samples in self.data.by_identity.values():
            used: set[str] = set()
            for i, sample in enumerate(samples):
                match = FACEGEN_KEY.fullmatch(sample.key)
                name = match.group(1) if match and match.group(1) not in used else f"{i:03d}"
                while name in used:
                    name = f"{name}-{i}"
                used.add(name)
                names[id(sample)] = name
        return names
