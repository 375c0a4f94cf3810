"""The output folder: every path under OUT and every file name facegen writes there, in one place.

Nothing else in facegen joins ``.facegen`` or names these files; it asks an :class:`OutputFolder`::

    OUT/README.md, LICENSE, preview.jpg          the card's files (``cards``)
    OUT/_info.json                               shard names and lengths, timm's WebDataset format
    OUT/data/train/train-{j:06d}.tar             published shards
    OUT/provenance/                              rebuild inputs: identities.txt, checksums.json and the files plugins
                                                 declare (shift.safetensors, curation.json), published with the card
    OUT/report/*.png                             quality plots (`facegen report`, published)
    OUT/.facegen/                                facegen's records, never uploaded:
        run.json        provenance of the build       config.json   the build's signature (resume or refuse)
        card.json       the card's settings (repo id, gating)
        own_files.json  sha256 of every file facegen wrote outside .facegen/ and the shards (so that it never
                        replaces a user's file, and publish uploads only what facegen wrote)
        lock, lock.break                              the build lock
        ranks/{r:06d}.json  each process's heartbeat in a distributed build
        shards/{j:06d}.json, shards/index/{j:06d}.json, skipped/{j:06d}.jsonl       per published shard
        units/{i:06d}.tar, units/{i:06d}.json, units/index/, units/skipped/         identity-level units of work
        skipped.jsonl   every skipped sample           report.json, report_embeddings.npz   the quality report
        .report_embeddings.npz.pieces/{b:06d}.npz      the report's embedding pass in pieces, one per batch, while
                                                       it runs (removed once report_embeddings.npz is written)
        curation.json   a curated build's decisions    parent-report/   the report of a Hub dataset being curated

A file made by an embedding pass in pieces (the report's embeddings, `facegen embed`'s ``prototypes.npz``) has its
pieces in the hidden folder beside it, :func:`pieces_folder` (``.NAME.pieces/``), file :func:`piece_path`.

An export's folder (`facegen export OUT --to DIR`) is laid out by :class:`ExportFolder`: ``DIR/train.rec``,
``train.idx``, ``property`` (``--format rec``) or ``DIR/{identity}/{n}.{ext}`` (``--format imagefolder``), the source
dataset's README.md and LICENSE, and the export's own record and partial files as hidden *files* in DIR itself
(never a folder: torchvision's ``ImageFolder`` takes every sub-folder, hidden ones included, for a class).

``FACEGEN_DIR`` and the names below are the only spellings of these files in the code. What the records hold
(run.json, config.json, the shard and unit stats, the sample index, report.json, the curation file, own_files.json)
is typed in :mod:`facegen.layout.records`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

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
CHECKSUMS_FILE = f"{PROVENANCE_DIR}/checksums.json"
OWN_PROVENANCE_FILES = (IDENTITIES_FILE, CHECKSUMS_FILE)  # facegen's own; plugins declare theirs (api.Option)


PROVENANCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a plugin's provenance file: a plain, visible name


def published_provenance(name: str) -> str:
    """Where a plugin's declared provenance file (``Option(provenance_file=NAME)``) is published: ``provenance/NAME``."""
    return f"{PROVENANCE_DIR}/{name}"


def is_plugin_provenance(rel: str) -> bool:
    """``rel`` is a path a plugin's provenance file may have (``provenance/NAME``, not one of facegen's own)."""
    folder, _, name = rel.partition("/")
    return folder == PROVENANCE_DIR and bool(PROVENANCE_NAME.fullmatch(name)) and rel not in OWN_PROVENANCE_FILES


PLOTS_DIR = "report"
CONSISTENCY_PLOT = f"{PLOTS_DIR}/consistency.png"
SEPARABILITY_PLOT = f"{PLOTS_DIR}/separability.png"
WORST_IDENTITIES_PLOT = f"{PLOTS_DIR}/worst-identities.png"

# under .facegen/
RUN_JSON = "run.json"
CONFIG_JSON = "config.json"
CARD_SETTINGS = "card.json"
OWN_FILES_RECORD = "own_files.json"
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
    def own_files_record(self) -> Path:
        return self.records / OWN_FILES_RECORD

    @property
    def lock(self) -> Path:
        return self.records / LOCK_FILE

    @property
    def lock_break(self) -> Path:
        return self.records / LOCK_BREAK_FILE

    @property
    def ranks_dir(self) -> Path:
        return self.records / "ranks"

    def rank_beat(self, rank: int) -> Path:
        """Process ``rank``'s heartbeat in a distributed build."""
        return self.ranks_dir / f"{rank:06d}.json"

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


def pieces_folder(result: str | os.PathLike) -> Path:
    """Where the pieces of an embedding pass that makes the file ``result`` are kept until it is written: the hidden
    folder ``.NAME.pieces/`` beside it (inside ``.facegen/`` for a dataset's own report)."""
    result = Path(result)
    return result.with_name(f".{result.name}.pieces")


def piece_path(folder: str | os.PathLike, batch: int) -> Path:
    """The piece of batch ``batch`` in a :func:`pieces_folder`."""
    return Path(folder) / f"{batch:06d}.npz"


# an export's folder (`facegen export`)
REC_FILE = "train.rec"
IDX_FILE = "train.idx"
PROPERTY_FILE = "property"  # insightface's "classes,height,width"
EXPORT_RECORD = ".facegen-export.json"


@dataclass(frozen=True)
class ExportFolder:
    """The paths of one export's folder (``facegen export … --to DIR``)."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    @property
    def record(self) -> Path:
        """The export's record (:class:`facegen.layout.records.ExportRecord`): what is exported, how far it got."""
        return self.root / EXPORT_RECORD

    def file(self, name: str) -> Path:
        """A final file of the export: ``train.rec``, ``train.idx``, ``property``, ``README.md``, ``LICENSE``."""
        return self.root / name

    def partial(self, name: str) -> Path:
        """Where ``train.rec``/``train.idx`` are written until they are complete: ``.train.rec.partial``."""
        return self.root / f".{name}.partial"

    def own_names(self) -> tuple[str, ...]:
        """The names of DIR's entries that an export itself writes besides the images' folders."""
        return (EXPORT_RECORD, REC_FILE, IDX_FILE, PROPERTY_FILE, README, LICENSE,
                f".{REC_FILE}.partial", f".{IDX_FILE}.partial")

    def identity_folder(self, name: str) -> Path:
        """An identity's folder of an image-folder export (``name`` is already a safe single path part)."""
        return self.root / name


def shard_path(index: int) -> str:
    """Published shard ``index`` relative to OUT, as ``_info.json``, the stats and the Hub name it."""
    return f"{TRAIN_DIR}/train-{index:06d}.tar"


def shard_number(path: str | os.PathLike) -> int | None:
    """``train-000003.tar`` -> 3; None for any other name."""
    match = SHARD_NAME.fullmatch(os.path.basename(os.fspath(path)))
    return int(match.group(1)) if match else None
