"""The output folder: every path under OUT and every file name facegen writes there, in one place.

Nothing else in facegen joins ``.facegen`` or names these files; it asks an :class:`OutputFolder`::

    OUT/README.md, LICENSE, preview.jpg          the card's files (``cards``)
    OUT/_info.json                               shard names and lengths, timm's WebDataset format
    OUT/data/train/train-{j:06d}.tar             published shards
    OUT/provenance/                              rebuild inputs: identities.txt, shift.safetensors, checksums.json,
                                                 curation.json (published with the card)
    OUT/report/*.png                             quality plots (`facegen report`, published)
    OUT/.facegen/                                facegen's records, never uploaded:
        run.json        provenance of the build       config.json   the build's signature (resume or refuse)
        card.json       the card's settings (repo id, gating)
        card_files.json sha256 of each card file facegen wrote (so that it never replaces a user's file)
        lock, lock.break                              the build lock
        shards/{j:06d}.json, shards/index/{j:06d}.json, skipped/{j:06d}.jsonl       per published shard
        units/{i:06d}.tar, units/{i:06d}.json, units/index/, units/skipped/         identity-level units of work
        skipped.jsonl   every skipped sample           report.json, report_embeddings.npz   the quality report
        curation.json   a curated build's decisions    parent-report/   the report of a Hub dataset being curated

``FACEGEN_DIR`` and the names below are the only spellings of these files in the code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FACEGEN_DIR = ".facegen"

# OUT itself
README = "README.md"
LICENSE = "LICENSE"
PREVIEW = "preview.jpg"
INFO = "_info.json"
CARD_FILES = (README, LICENSE, PREVIEW)
OUTPUT_FILES = (*CARD_FILES, INFO)  # every name facegen writes in OUT itself

DATA_DIR = "data"
TRAIN_DIR = f"{DATA_DIR}/train"
DATA_FILES = f"{TRAIN_DIR}/*.tar"  # the card's `configs` pattern and every reader's glob
SHARD_NAME = re.compile(r"train-(\d{6})\.tar")
SHARD_FILE = re.compile(r"\.?train-\d{6}\.tar(\.tmp-\d+)?")  # a published shard or its hidden temporary

PROVENANCE_DIR = "provenance"
IDENTITIES_FILE = f"{PROVENANCE_DIR}/identities.txt"
SHIFT_FILE = f"{PROVENANCE_DIR}/shift.safetensors"
CHECKSUMS_FILE = f"{PROVENANCE_DIR}/checksums.json"
PUBLISHED_CURATION_FILE = f"{PROVENANCE_DIR}/curation.json"  # the curation file as published with the card

PLOTS_DIR = "report"
CONSISTENCY_PLOT = f"{PLOTS_DIR}/consistency.png"
SEPARABILITY_PLOT = f"{PLOTS_DIR}/separability.png"
WORST_IDENTITIES_PLOT = f"{PLOTS_DIR}/worst-identities.png"

# under .facegen/
RUN_JSON = "run.json"
CONFIG_JSON = "config.json"
CARD_SETTINGS = "card.json"
CARD_FILES_RECORD = "card_files.json"
LOCK_FILE = "lock"
LOCK_BREAK_FILE = "lock.break"
LOCK_FILES = (LOCK_FILE, LOCK_BREAK_FILE)  # kept by --overwrite: the running build holds them
SKIPPED_LIST = "skipped.jsonl"
REPORT_JSON = "report.json"
REPORT_EMBEDDINGS = "report_embeddings.npz"
CURATION_FILE = "curation.json"  # a curated build's decisions, as `facegen curate` wrote them
PARENT_REPORT_DIR = "parent-report"


@dataclass(frozen=True)
class Place:
    """Where one tar (a published shard or a unit of work) and its records live."""

    tar: Path
    stats: Path
    index: Path
    skipped: Path  # every skipped sample of this file, one JSON line each (absent when none was skipped)

    def temporary(self, pid: int | None = None) -> Path:
        """The hidden name the tar is written under until it is complete."""
        return self.tar.with_name(f".{self.tar.name}.tmp-{os.getpid() if pid is None else pid}")


@dataclass(frozen=True)
class OutputFolder:
    """The paths of one output folder (a build's ``--out``, or a report's ``--out DIR``)."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    # --- OUT itself

    def file(self, name: str) -> Path:
        """A file of OUT by its relative name (``README.md``, ``provenance/shift.safetensors``)."""
        return self.root / name

    @property
    def readme(self) -> Path:
        return self.root / README

    @property
    def info_json(self) -> Path:
        return self.root / INFO

    @property
    def data_dir(self) -> Path:
        return self.root / DATA_DIR

    @property
    def train_dir(self) -> Path:
        return self.root / TRAIN_DIR

    def shard_tar(self, index: int) -> Path:
        return self.root / shard_path(index)

    def shard_tars(self) -> list[Path]:
        """The published shards present, in name order."""
        return sorted(self.root.glob(DATA_FILES))

    @property
    def provenance_dir(self) -> Path:
        return self.root / PROVENANCE_DIR

    @property
    def plots_dir(self) -> Path:
        return self.root / PLOTS_DIR

    # --- .facegen/

    @property
    def records(self) -> Path:
        return self.root / FACEGEN_DIR

    @property
    def run_json(self) -> Path:
        return self.records / RUN_JSON

    @property
    def config_json(self) -> Path:
        return self.records / CONFIG_JSON

    @property
    def card_settings(self) -> Path:
        return self.records / CARD_SETTINGS

    @property
    def card_files_record(self) -> Path:
        return self.records / CARD_FILES_RECORD

    @property
    def lock(self) -> Path:
        return self.records / LOCK_FILE

    @property
    def lock_break(self) -> Path:
        return self.records / LOCK_BREAK_FILE

    @property
    def skipped_list(self) -> Path:
        return self.records / SKIPPED_LIST

    @property
    def report_json(self) -> Path:
        return self.records / REPORT_JSON

    @property
    def report_embeddings(self) -> Path:
        return self.records / REPORT_EMBEDDINGS

    @property
    def curation_file(self) -> Path:
        return self.records / CURATION_FILE

    @property
    def parent_report_dir(self) -> Path:
        return self.records / PARENT_REPORT_DIR

    @property
    def shard_stats_dir(self) -> Path:
        return self.records / "shards"

    @property
    def shard_index_dir(self) -> Path:
        return self.shard_stats_dir / "index"

    @property
    def shard_skipped_dir(self) -> Path:
        return self.records / "skipped"

    @property
    def units_dir(self) -> Path:
        return self.records / "units"

    def shard(self, index: int) -> Place:
        """Published shard ``index``: ``data/train/train-{j:06d}.tar`` and its records under ``.facegen/``."""
        name = f"{index:06d}"
        return Place(self.shard_tar(index), self.shard_stats_dir / f"{name}.json",
                     self.shard_index_dir / f"{name}.json", self.shard_skipped_dir / f"{name}.jsonl")

    def unit(self, index: int) -> Place:
        """Unit of work ``index`` of an identity-level transform, all under ``.facegen/units/``."""
        name, units = f"{index:06d}", self.units_dir
        return Place(units / f"{name}.tar", units / f"{name}.json", units / "index" / f"{name}.json",
                     units / "skipped" / f"{name}.jsonl")

    def shard_stats_files(self) -> list[Path]:
        return sorted(self.shard_stats_dir.glob("[0-9]*.json"))

    def unit_stats_files(self) -> list[Path]:
        return sorted(self.units_dir.glob("[0-9]*.json"))

    def temporaries_folders(self) -> tuple[Path, ...]:
        """Every folder where facegen writes hidden temporaries (``.NAME.tmp-PID``)."""
        records, units = self.records, self.units_dir
        return (self.train_dir, self.shard_stats_dir, self.shard_index_dir, self.shard_skipped_dir, units,
                units / "index", units / "skipped", records, self.provenance_dir, self.plots_dir, self.root)


def shard_path(index: int) -> str:
    """Published shard ``index`` relative to OUT, as ``_info.json``, the stats and the Hub name it."""
    return f"{TRAIN_DIR}/train-{index:06d}.tar"


def shard_number(path: str | os.PathLike) -> int | None:
    """``train-000003.tar`` -> 3; None for any other name."""
    match = SHARD_NAME.fullmatch(os.path.basename(os.fspath(path)))
    return int(match.group(1)) if match else None


# ======================================================================================================================
# Records of the commands around a build: the quality report, the curation file, facegen's own card files
# (``report``, ``curate``, ``cards``). Read with validation: a damaged or foreign file is a RecordError (one line
# saying what is wrong), never a KeyError deep in a caller.
# ======================================================================================================================

REPORT_FORMAT = "facegen-report-1"
CARD_FILES_FORMAT = "facegen-card-files-1"
CURATION_SCHEMA = 1  # no field in the file: its published copy (provenance/curation.json) must not change


class RecordError(ValueError):
    """A record that is damaged or not facegen's (of another format or version)."""


def _check(value: Any, kind: Any, where: str) -> Any:
    """``value`` (parsed JSON) when it has type ``kind`` (a field annotation), else RecordError."""
    options = typing.get_args(kind) if typing.get_origin(kind) in (types.UnionType, typing.Union) else (kind,)
    if value is None and type(None) in options:
        return None
    kind = next(option for option in options if option is not type(None))
    if dataclasses.is_dataclass(kind):
        return _record(kind, value, where)
    base = typing.get_origin(kind) or kind
    if base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, base)
    if not ok:
        raise RecordError(f"{where} is {type(value).__name__}, not {getattr(base, '__name__', base)}")
    if base is list and typing.get_args(kind):
        return [_check(item, typing.get_args(kind)[0], f"{where}[{i}]") for i, item in enumerate(value)]
    return value


def _record(cls: type, data: Any, where: str):
    """A dataclass ``cls`` from parsed JSON: every field present (or defaulted) and of its declared type."""
    if not isinstance(data, dict):
        raise RecordError(f"{where} is {type(data).__name__}, not a JSON object")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            values[f.name] = _check(data[f.name], hints[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecordError(f"{where} has no {f.name!r}")
    return cls(**values)


def _json_without_none(record) -> dict:
    """The record as JSON data, in field order, leaving out optional fields that are None."""
    return {k: v for k, v in dataclasses.asdict(record).items() if v is not None}


def _read_json_file(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_bytes())
    except ValueError as exc:
        raise RecordError(f"{path} is not JSON ({exc})") from None


@dataclass
class ReportSettings:
    recognizer: str
    model: str
    dedup: float
    min_similarity: float
    defaults: dict  # the recogniser's default thresholds


@dataclass
class QualityReport:
    """``.facegen/report.json`` (or ``DIR/report.json``), written by `facegen report`. Figures are cosine
    similarities of the recogniser's unit embeddings; ``summary`` holds {mean, median, min, p05, p95, max, count}
    per figure, ``identities`` one row per identity (identity, cls, images, embedded, consistency_mean/min,
    separability, nearest), ``outliers`` {identity, key, source_ref, cosine}, ``near_duplicate_identities``
    [a, b, cosine]."""

    facegen_version: str
    created: str  # ISO 8601, UTC
    settings: ReportSettings
    fingerprint: str  # of the shards the report describes (facegen.published.shards_fingerprint)
    embedding: dict  # {reused, seconds, samples_per_second}
    dataset: dict  # {name, identities, samples, embedded, shards, unreadable}
    summary: dict
    image_modes: dict
    image_sizes: dict
    skipped: dict  # reason -> samples not embedded
    skipped_samples: list  # the first LISTED of them: {identity, key, reason}
    near_duplicate_identities: list
    outliers: list
    identities: list
    plots: list[str]  # relative to the report's folder: report/*.png
    seconds: float
    dataset_name: str | None = None  # a report written outside the dataset names it
    against: dict | None = None  # --against: {dataset, identities, threshold, matches}

    def to_json(self) -> bytes:
        return json.dumps({"format": REPORT_FORMAT, **_json_without_none(self)}, indent=1,
                          ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_dict(cls, data: Any, where: str = "report.json") -> QualityReport:
        if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
            raise RecordError(f"{where} is not a facegen report ({REPORT_FORMAT})")
        return _record(cls, data, where)

    @classmethod
    def read(cls, path: Path) -> QualityReport | None:
        """The report at ``path``; None when there is none, or it is damaged or of another version."""
        try:
            return cls.from_dict(_read_json_file(path), str(path))
        except (OSError, RecordError):
            return None


@dataclass
class Curation:
    """A curated build's decisions (``.facegen/curation.json``, written by `facegen curate`; published as
    ``provenance/curation.json``). Only the removals are required (a hand-written file may hold just those):
    ``removed_identities`` rows are {identity, reason, detail}, ``removed_samples`` rows {identity, key,
    source_ref, reason, cosine}; ``identity`` and ``key`` are required in them. Schema: :data:`CURATION_SCHEMA`."""

    parent: str | None = None  # the parent dataset's name
    parent_fingerprint: str | None = None  # its shards when the decisions were made
    parent_identities: int | None = None
    parent_samples: int | None = None
    recognizer: str | None = None
    dedup: float | None = None
    min_similarity: float | None = None
    min_images: int | None = None
    report_created: str | None = None
    counts: dict | None = None  # {near_duplicate, too_few_images, outlier, identities_kept}
    removed_identities: list[dict] = field(default_factory=list)
    removed_samples: list[dict] = field(default_factory=list)

    def __post_init__(self):
        for name, required in (("removed_identities", "identity"), ("removed_samples", "key")):
            for i, row in enumerate(getattr(self, name)):
                if not isinstance(row.get(required), str):
                    raise RecordError(f"{name}[{i}] has no {required!r} string")

    def to_dict(self) -> dict:
        return _json_without_none(self)

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False).encode("utf-8")

    def decisions(self) -> dict:
        """What a build depends on (not when the report was made)."""
        return {k: v for k, v in self.to_dict().items() if k != "report_created"}

    @classmethod
    def from_dict(cls, data: Any, where: str = "curation file") -> Curation:
        return _record(cls, data, where)

    @classmethod
    def read(cls, path: Path) -> Curation:
        """The curation file at ``path``; OSError or RecordError (one line) when it cannot be read."""
        return cls.from_dict(_read_json_file(path), str(path))


@dataclass
class CardFilesRecord:
    """``.facegen/card_files.json``: the sha256 of every version facegen wrote of its own files in OUT (README.md,
    LICENSE, preview.jpg, _info.json). facegen replaces or removes such a file only while it is one of these."""

    files: dict[str, list[str]] = field(default_factory=dict)  # name -> sha256 of the last versions, newest last

    def wrote(self, name: str, data: bytes) -> bool:
        return hashlib.sha256(data).hexdigest() in self.files.get(name, [])

    def add(self, name: str, data: bytes) -> None:
        """Record a new version; the previous one stays listed (a crash between recording and writing leaves
        either version recognised)."""
        self.files[name] = self.files.get(name, [])[-1:] + [hashlib.sha256(data).hexdigest()]

    def to_json(self) -> bytes:
        return json.dumps({"format": CARD_FILES_FORMAT, "files": self.files}, indent=1, sort_keys=True).encode()

    @classmethod
    def read(cls, path: Path) -> CardFilesRecord:
        """The record at ``path``; an empty one (nothing is facegen's) when there is none or it is damaged."""
        try:
            data = _read_json_file(path)
        except (OSError, RecordError):
            return cls()
        if not isinstance(data, dict) or data.get("format") != CARD_FILES_FORMAT:
            return cls()
        files = data.get("files")
        if not isinstance(files, dict):
            return cls()
        return cls({name: [h for h in hashes if isinstance(h, str)] for name, hashes in files.items()
                    if isinstance(name, str) and isinstance(hashes, list)})
