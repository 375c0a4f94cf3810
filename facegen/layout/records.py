"""The typed records a build keeps under ``OUT/.facegen/``: what each file holds, its schema version, and the one
way to write and read it.

    run.json                      :class:`RunRecord`     provenance of the finished build (the card reads it)
    config.json                   :class:`BuildSignature` what makes two builds the same build (resume or refuse)
    shards/{j:06d}.json           :class:`ShardStats`    a published shard: its tar, checksum, counts, skips
    units/{i:06d}.json            :class:`UnitStats`     the same for a unit of work (identity-level transforms)
    shards/index/, units/index/   :class:`SampleIndex`   where each sample lies in its tar
    report.json                   :class:`QualityReport` what `facegen report` measured
    report_embeddings.npz, pieces :class:`EmbeddingsRecord` what an embeddings file holds besides its arrays
    curation.json                 :class:`Curation`      what `facegen curate` removed (no schema field: see there)
    own_files.json                :class:`OwnFiles`      every file facegen wrote outside .facegen/ and the shards

and, in an export's folder (``facegen export … --to DIR``), ``DIR/.facegen-export.json`` (:class:`ExportRecord`).

Every record is a frozen dataclass written as JSON with its ``schema`` (``facegen-run-1``) first. Reading checks the
schema, that every required field is there with its type, and that nothing else is: a damaged, foreign or
other-version record is never half-read (``read`` gives None, :func:`load_run` and the stats loaders one clear
line), so no caller needs ``.get`` chains. A field with a default is one a record may really lack (``None``: not
applicable, e.g. the units of a per-image build).
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
from typing import Any, ClassVar, TypeVar, Union

import numpy as np

from facegen.errors import UsageError
from facegen.fileio import atomic_write, sha256_file
from facegen.layout import OWN_PROVENANCE_FILES, OutputFolder, is_plugin_provenance, shard_number, shard_path

R = TypeVar("R", bound="Record")


class RecordError(ValueError):
    """A record that does not match its schema (damaged, written by something else, or by another version)."""


def json_default(value: Any):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON (numpy scalars and arrays as plain numbers and lists)."""
    return json.dumps(value, default=json_default, ensure_ascii=False, separators=(",", ":")).encode()


def json_safe(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples as lists, numpy numbers as numbers)."""
    return json.loads(dumps(value)) if value is not None else None


# --- reading a JSON value as a declared type ---

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _typed(tp: Any, value: Any, where: str) -> Any:
    """``value`` (parsed JSON) checked against the type ``tp``; nested dataclasses are built."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _typed(option, value, where)
            except RecordError as exc:
                errors.append(str(exc))
        raise RecordError(errors[0] if len(errors) == 1 else f"{where}: unexpected {type(value).__name__}")
    if dataclasses.is_dataclass(tp):
        return _fields(tp, value, where)
    if origin is list or tp is list:
        if not isinstance(value, list):
            raise RecordError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp) or (Any,)
        if item in _SCALAR:  # a sample index holds columns of 10,000s: checked without a call per value
            return _scalars(item, value, where)
        return value if item is Any else [_typed(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecordError(f"{where}: expected an object, got {type(value).__name__}")
        _, item = typing.get_args(tp) or (str, Any)
        if item in _SCALAR:
            _scalars(item, list(value.values()), where)
            return value
        return value if item is Any else {k: _typed(item, v, f"{where}.{k}") for k, v in value.items()}
    if tp in _SCALAR:
        if _SCALAR[tp](value):
            return value
    elif isinstance(value, tp):
        return value
    raise RecordError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {type(value).__name__}")


_SCALAR = {  # JSON scalars by declared type (a bool is not a number here; an int is a float)
    str: lambda v: type(v) is str,
    int: lambda v: type(v) is int,
    float: lambda v: type(v) in (int, float),
    bool: lambda v: type(v) is bool,
}
_SCALAR_TYPES = {str: (str,), int: (int,), float: (int, float), bool: (bool,)}


def _scalars(tp: type, values: list, where: str) -> list:
    types = _SCALAR_TYPES[tp]
    if not all(type(v) in types for v in values):
        i, bad = next((i, v) for i, v in enumerate(values) if type(v) not in types)
        raise RecordError(f"{where}[{i}]: expected {tp.__name__}, got {type(bad).__name__}")
    return values


def _fields(cls: type, data: Any, where: str):
    if not isinstance(data, dict):
        raise RecordError(f"{where}: expected an object, got {type(data).__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise RecordError(f"{where}: unknown field {unknown[0]!r}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            values[f.name] = _typed(hints[f.name], data[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecordError(f"{where}: {f.name} is missing")
    return cls(**values)


@dataclass(frozen=True)
class Record:
    """A file under ``.facegen/`` with a schema: ``to_dict``/``from_dict``, ``write``/``read``."""

    SCHEMA: ClassVar[str]  # name and version, e.g. "facegen-run-1"; a change of meaning bumps the number
    MAX_BYTES: ClassVar[int | None] = None  # a larger file is not this record: refused unread

    def to_dict(self) -> dict[str, Any]:
        return {"schema": self.SCHEMA, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls: type[R], data: Any, where: str | None = None) -> R:
        where = where or cls.__name__
        if not isinstance(data, dict):
            raise RecordError(f"{where}: expected an object, got {type(data).__name__}")
        if data.get("schema") != cls.SCHEMA:
            raise RecordError(f"{where}: schema {data.get('schema')!r}, expected {cls.SCHEMA!r} (written by another "
                              "version of facegen, or not by facegen)")
        return _fields(cls, {k: v for k, v in data.items() if k != "schema"}, where)

    def to_json(self) -> bytes:
        return dumps(self.to_dict())

    def write(self, path: Path) -> None:
        atomic_write(path, self.to_json())

    @classmethod
    def parse(cls: type[R], path: Path) -> R:
        """The record in ``path``; OSError when it cannot be read, RecordError when it is not this record."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if cls.MAX_BYTES is not None and size > cls.MAX_BYTES:
                raise RecordError(f"{path} holds {size:,} bytes, more than a {cls.__name__} ever does "
                                  f"({cls.MAX_BYTES:,})")
            raw = f.read()
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise RecordError(f"{path} is not valid JSON ({exc})") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def read(cls: type[R], path: Path) -> R | None:
        """The record in ``path``, or None when it is missing, damaged or not this record."""
        try:
            return cls.parse(path)
        except (OSError, RecordError):
            return None


# --- run.json ---


@dataclass(frozen=True)
class LicenseRecord:
    """A plugin's licence (``facegen.api.LicenseInfo``)."""

    id: str
    name: str = ""
    link: str = ""
    text: str = ""
    commercial_use: bool | None = None
    note: str = ""


@dataclass(frozen=True)
class ModelRecord:
    """A model a transform used (``facegen.api.ModelInfo``), with what this run loaded."""

    id: str
    revision: str | None = None
    role: str = ""
    license: str = ""
    license_link: str = ""
    citation: str = ""
    note: str = ""
    source: str = ""
    commercial_use: bool | None = None
    loaded: dict[str, Any] = field(default_factory=dict)  # {"hub", "commit"} or {"folder", "sha256"}; {}: none


@dataclass(frozen=True)
class PathOptionRecord:
    """A plugin option declared as a local path (``facegen.api.Option(path=True)``; ``facegen.api.declared_paths``):
    the card shows a placeholder or the published provenance file instead of its value, publish allows that file,
    ``--from-card`` asks for the path again or hands the published file back."""

    placeholder: str = ""  # "": the value's file name
    optional_on_rebuild: bool = False
    provenance_file: str | None = None  # provenance/NAME: the published copy of the file the build read
    sha256: str | None = None  # of the file this build read (the card copies it only while it still matches)

    def __post_init__(self):
        # where the card writes the copy: read from run.json, so checked rather than trusted
        if self.provenance_file is not None and not is_plugin_provenance(self.provenance_file):
            raise RecordError(f"provenance file {self.provenance_file!r} is not provenance/NAME of a plugin")


@dataclass(frozen=True)
class ExpectedCountsRecord:
    """What a dataset's publisher states it holds (``facegen.api.ExpectedCounts``)."""

    identities: int | None = None
    images: int | None = None
    stated_by: str = ""


@dataclass(frozen=True)
class PluginRecord:
    """A source or transform as the build used it: its card text, licence, options and provenance."""

    name: str
    description: str = ""
    card_description: str = ""
    homepage: str = ""
    citation: str = ""
    distribution: str = "?"
    version: str | None = None
    license: LicenseRecord | None = None
    options: dict[str, Any] = field(default_factory=dict)
    columns: dict[str, str] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)  # the plugin's own facts (its provenance())
    synthetic: bool | None = None  # the card calls images synthetic only when stated
    path_options: dict[str, PathOptionRecord] = field(default_factory=dict)  # what cards, publish, --from-card hide
    dataset_name: str | None = None  # sources only: what the licence table calls the data the source reads
    identity_noun: str | None = None  # sources only: what one identity of the plan is ("identity", "pair")
    channels: str | None = None  # sources only: the channel order the source declared for its images (rgb, bgr)
    expected_counts: ExpectedCountsRecord | None = None  # sources only: what the dataset's publisher states
    models: list[ModelRecord] = field(default_factory=list)  # transforms only
    copies_source_images: bool | None = None  # transforms only: the faces are the source's own images


@dataclass(frozen=True)
class RunOptions:
    """The build's options as given (recipe values included); paths as on this machine."""

    source: str
    source_path: str | None
    source_opts: dict[str, Any]
    plugin: str
    plugin_opts: dict[str, Any]
    recipe: str | None
    limit_identities: int | None
    identities_file: str | None
    identities_file_sha256: str | None
    shard_size: int  # identities per unit of work (the --shard-size flag)
    shard_samples: int
    shards_multiple_of: int | None  # None: the default layout (builders/plan.py)
    seed: int
    format: str
    strict: bool
    verify: str
    out: str | None = None  # absolute (a build of an earlier version did not record it)


@dataclass(frozen=True)
class PlanRecord:
    identities: int
    shards: int
    plan_sha256: str


@dataclass(frozen=True)
class LayoutRecord:
    mode: str  # "per-image" (the shards are the units of work) or "units"
    units: int | None  # units of work (None: per-image)
    identities_per_unit: int | None
    planned_shard_lengths: list[int]
    order: str
    units_xxh3_128: str | None  # the units the shards were assembled from (None: per-image)
    identities_without_images: list[str]  # the first 100


@dataclass(frozen=True)
class Totals:
    identities: int
    images: int
    skipped: dict[str, int]
    shards: int


@dataclass(frozen=True)
class RunRecord(Record):
    """``.facegen/run.json``: everything the card, publish and ``--from-card`` know about a finished build."""

    SCHEMA: ClassVar[str] = "facegen-run-1"

    facegen_version: str
    git_revision: str | None
    command: list[str]
    created: str  # UTC, ISO 8601
    python: str
    options: RunOptions
    plan: PlanRecord
    layout: LayoutRecord
    source: PluginRecord
    transform: PluginRecord
    features: dict[str, Any]  # datasets.Features.to_dict() of every column
    image_column: str
    quality_fields: list[str]
    totals: Totals
    channels: str | None = None  # channel order of the published images, when the source declared one

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1).encode()


def load_run(out: str | Path) -> RunRecord:
    """A finished build's run.json; a missing or damaged one is one line (UsageError)."""
    path = OutputFolder(out).run_json
    if not path.is_file():
        raise UsageError(f"{out} has no .facegen/run.json: not a finished facegen build (run `facegen build` first)")
    try:
        return RunRecord.parse(path)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except RecordError as exc:
        raise UsageError(f"{exc}; rerun the build to rewrite it") from None


# --- config.json ---


@dataclass(frozen=True)
class BuildSignature(Record):
    """``.facegen/config.json``: what a rerun must match to resume this build (else it is refused)."""

    SCHEMA: ClassVar[str] = "facegen-build-1"

    source: str
    source_path: str | None
    source_opts: dict[str, Any]
    plugin: str
    plugin_opts: dict[str, Any]
    plan_sha256: str
    identities: int
    shard_size: int
    shard_samples: int
    shards_multiple_of: int | None  # None: the default layout (builders/plan.py)
    seed: int
    format: str
    verify: str

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True).encode()

    def differences(self, other: BuildSignature) -> list[str]:
        mine, theirs = self.to_dict(), other.to_dict()
        return sorted(k for k in mine if mine[k] != theirs[k])


# --- shard and unit stats ---


@dataclass(frozen=True)
class WrittenBy:
    process: int
    processes: int
    pid: int


@dataclass(frozen=True)
class QualityTotals:
    """A quality figure over a file's samples (its mean is sum / count)."""

    sum: float
    count: int
    min: float
    max: float


@dataclass(frozen=True)
class TarStats:
    """What a tar of the build holds, written last: it exists and agrees with the tar = the tar is complete."""

    identities: int
    images: int
    images_per_identity: dict[str, int]
    skipped: dict[str, int]  # reason -> samples
    failures: list[dict[str, str]]  # the first few skips: identity, ref, reason, detail (all in the skipped list)
    quality: dict[str, QualityTotals]
    verify: str  # the image check the samples passed: full or header
    converted: dict[str, int]  # re-encode reason -> images
    image_modes: dict[str, int]
    image_sizes: dict[str, int]  # "WxH" -> images (the most frequent ones, then "other")
    seconds: float
    started_at: float  # time.time() when the file was started: tells this run's files from earlier ones
    finished_at: float
    written_by: WrittenBy
    tar: str  # relative to OUT
    tar_bytes: int
    tar_xxh3_128: str
    sample_bytes: int  # the members' data bytes, no tar headers (the card's num_bytes)
    redone_because: str | None  # the check an earlier version of this file failed


@dataclass(frozen=True)
class ShardStats(TarStats, Record):
    """``.facegen/shards/{j:06d}.json``: a published shard."""

    SCHEMA: ClassVar[str] = "facegen-shard-stats-1"

    shard: int = 0
    listing_xxh3_128: str | None = None  # per-image: the source listing the shard was planned from
    assembled_from_units: int | None = None  # identity-level: the units its samples were copied from
    units_xxh3_128: str | None = None


@dataclass(frozen=True)
class UnitStats(TarStats, Record):
    """``.facegen/units/{i:06d}.json``: a unit of work of an identity-level transform."""

    SCHEMA: ClassVar[str] = "facegen-unit-stats-1"

    unit: int = 0


def _load_all(paths: list[Path], kind: type[R]) -> list[R]:
    records = []
    for path in paths:
        try:
            records.append(kind.parse(path))
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
        except RecordError as exc:
            raise UsageError(f"{exc}; delete it and rerun the build") from None
    return records


def load_shard_stats(out: str | Path) -> list[ShardStats]:
    """Every published shard's stats, in shard order; a damaged one is one line (UsageError)."""
    return sorted(_load_all(OutputFolder(out).shard_stats_files(), ShardStats), key=lambda s: s.shard)


def load_unit_stats(out: str | Path) -> list[UnitStats]:
    """Every unit of work's stats (none for per-image transforms), in unit order."""
    return sorted(_load_all(OutputFolder(out).unit_stats_files(), UnitStats), key=lambda s: s.unit)


# --- the sample index ---


@dataclass(frozen=True)
class SampleIndex(Record):
    """``.facegen/{shards,units}/index/{n:06d}.json``: where each sample of a tar lies, in tar order, so that the
    assembly and readers of the dataset seek to a sample without reading the tar's headers."""

    SCHEMA: ClassVar[str] = "facegen-sample-index-2"
    MAX_BYTES: ClassVar[int] = 64 << 20  # ~60 bytes a sample: a tar of 10,000 samples has an index of ~1 MB

    tar: str  # relative to OUT
    tar_bytes: int
    keys: list[str]
    identities: list[str]
    cls: list[int]
    offsets: list[int]  # of the sample's first header
    lengths: list[int]  # of its members, headers and padding included
    # units only: each sample's image mode, "WxH" and changes, counted again in the stats of the shards made from it
    image_modes: list[str] | None = None
    image_sizes: list[str] | None = None
    changes: list[list[str]] | None = None

    def __post_init__(self):
        columns = [self.identities, self.cls, self.offsets, self.lengths]
        columns += [c for c in (self.image_modes, self.image_sizes, self.changes) if c is not None]
        if any(len(c) != len(self.keys) for c in columns):
            raise RecordError(f"sample index of {self.tar}: its columns differ in length")

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class RankBeat(Record):
    """``.facegen/ranks/{r:06d}.json``: process ``rank`` of a distributed build is alive (``beat`` counts up while it
    runs), finished its part (``done``) or failed (``failed``, with ``error``). ``run`` is the lock holder's token of
    the run it belongs to: a file left by an earlier run says nothing about this one."""

    SCHEMA: ClassVar[str] = "facegen-rank-beat-1"
    MAX_BYTES: ClassVar[int] = 64 * 1024

    run: str
    rank: int
    world: int
    host: str
    pid: int
    beat: int
    state: str  # running, done, failed
    error: str = ""


# --- the records of the commands around a build: report.json, the curation file, own_files.json ---


@dataclass(frozen=True)
class ReportSettings:
    recognizer: str
    model: str
    dedup: float
    min_similarity: float
    defaults: dict  # the recogniser's default thresholds


@dataclass(frozen=True)
class QualityReport(Record):
    """``.facegen/report.json`` (or ``DIR/report.json``), written by `facegen report`. Figures are cosine
    similarities of the recogniser's unit embeddings; ``summary`` holds {mean, median, min, p05, p95, max, count}
    per figure, ``identities`` one row per identity (identity, cls, images, embedded, consistency_mean/min,
    separability, nearest), ``outliers`` {identity, key, source_ref, cosine}, ``near_duplicate_identities``
    [a, b, cosine]."""

    SCHEMA: ClassVar[str] = "facegen-report-1"

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

    def to_json(self) -> bytes:  # read by people too
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class EmbeddingsRecord(Record):
    """What an embeddings file holds besides its numeric arrays, stored in it as the member ``record`` (this JSON as
    a uint8 array: the file stays a plain npz, read without pickle): the report's ``report_embeddings.npz``
    (``batch`` -1) and each piece of an embedding pass (``.NAME.pieces/{b:06d}.npz``, see
    :mod:`facegen.builders.quality.pieces`). ``signature`` is what must match for the file to be reused (the
    recogniser, the dataset's shards or the source, and for a piece the batch size); ``keys`` names the rows (the
    report's samples, `facegen embed`'s identities); ``columns`` holds the per-row values that are not numbers,
    one list per name with one value per key (the report: reasons, modes, sizes; embed: skips)."""

    SCHEMA: ClassVar[str] = "facegen-embeddings-1"

    signature: dict
    batch: int
    keys: list[str]
    columns: dict[str, list]


@dataclass(frozen=True)
class Curation:
    """A curated build's decisions (``.facegen/curation.json``, written by `facegen curate`; published as
    ``provenance/curation.json``). Only the removals are required, one of the two lists at least (a hand-written
    file may hold just those, and other fields, which are ignored): ``removed_identities`` rows are {identity,
    reason, detail}, ``removed_samples`` rows {identity, key, source_ref, reason, cosine}; ``identity`` and ``key``
    are required in them.

    Not a :class:`Record`: the file has no ``schema`` field, since its published copy must not change; it is read
    with the same typed checks."""

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
        """The file's JSON object, in field order, leaving out what is not known (None)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False).encode("utf-8")

    def decisions(self) -> dict:
        """What a build depends on (not when the report was made)."""
        return {k: v for k, v in self.to_dict().items() if k != "report_created"}

    @classmethod
    def from_dict(cls, data: Any, where: str = "curation file") -> Curation:
        if isinstance(data, dict):
            if not {"removed_identities", "removed_samples"} & set(data):  # `removed: [...]` would remove nothing
                raise RecordError(f"{where} holds neither removed_identities nor removed_samples")
            known = {f.name for f in dataclasses.fields(cls)}
            data = {k: v for k, v in data.items() if k in known}
        return _fields(cls, data, where)

    @classmethod
    def read(cls, path: Path) -> Curation:
        """The curation file at ``path``; OSError or RecordError (one line) when it cannot be read."""
        try:
            data = json.loads(Path(path).read_bytes())
        except ValueError as exc:
            raise RecordError(f"{path} is not valid JSON ({exc})") from None
        return cls.from_dict(data, str(path))


# --- what a card publishes of its build: its `facegen:` YAML key and provenance/checksums.json ---
# A card is input, never trusted: `--from-card` reads these with the same typed checks as every record, plus ranges,
# before anything runs (a seed of 1.5 or `.nan`, `strict: maybe`, `models: abc` or `provenance: [1]` is one line).

HEX = re.compile(r"[0-9a-f]+")
OPTION_SCALARS = (str, int, float, bool, type(None))


def _hex(value: str | None, digits: int, where: str) -> None:
    if value is not None and (len(value) != digits or not HEX.fullmatch(value)):
        raise RecordError(f"{where}: expected {digits} hexadecimal digits, got {value[:80]!r}")


def _option_values(options: dict[str, Any], where: str) -> None:
    """A plugin's options as a card gives them: plain values (text, numbers, booleans, lists of them)."""
    for name, value in options.items():
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(item, OPTION_SCALARS) for item in items):
            raise RecordError(f"{where}.{name}: expected a plain value (text, number, true/false or a list of "
                              f"them), got {type(value).__name__}")


@dataclass(frozen=True)
class CardOptions:
    """The build options a card publishes (``facegen.options``; local paths already placeholders). Only the plugins
    are required: a value not given is the command line's default."""

    source: str
    plugin: str
    source_path: str | None = None
    source_opts: dict[str, Any] = field(default_factory=dict)
    plugin_opts: dict[str, Any] = field(default_factory=dict)
    recipe: str | None = None
    limit_identities: int | None = None
    identities_file: str | None = None
    identities_file_sha256: str | None = None
    shard_size: int | None = None
    shard_samples: int | None = None
    shards_multiple_of: int | None = None
    seed: int | None = None
    format: str | None = None
    strict: bool | None = None
    verify: str | None = None

    def __post_init__(self):
        for name in ("limit_identities", "shard_size", "shard_samples", "shards_multiple_of"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RecordError(f"options.{name}: must be at least 1, got {value}")
        for name, allowed in (("format", ("png", "jpg")), ("verify", ("full", "header"))):
            if getattr(self, name) not in (None, *allowed):
                raise RecordError(f"options.{name}: must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not self.source or not self.plugin:
            raise RecordError("options: source and plugin must name plugins")
        _hex(self.identities_file_sha256, 64, "options.identities_file_sha256")
        _option_values(self.source_opts, "options.source_opts")
        _option_values(self.plugin_opts, "options.plugin_opts")


@dataclass(frozen=True)
class CardModel:
    """A model of the card's build: ``loaded`` is {"hub", "commit"} or {"folder", "sha256": {file: hex}} (and
    "test_model"), or {} when nothing was recorded; every value but the hashes is text."""

    id: str
    role: str = ""
    revision: str | None = None
    loaded: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        where = f"models[{self.id!r}].loaded"
        for name, value in self.loaded.items():  # a plugin may record more facts: text, like these
            if name != "sha256" and not isinstance(value, str):
                raise RecordError(f"{where}.{name}: expected text, got {type(value).__name__}")
        hashes = self.loaded.get("sha256", {})
        if not isinstance(hashes, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in
                                                   hashes.items()):
            raise RecordError(f"{where}.sha256: expected a mapping of file names to sha256")
        for name, digest in hashes.items():
            _hex(digest, 64, f"{where}.sha256.{name}")


@dataclass(frozen=True)
class CardBuild:
    """A card's ``facegen:`` YAML key (``facegen.cards.card.facegen_record``): what ``--from-card`` rebuilds from.
    ``provenance`` names files published beside the card: facegen's own provenance files or a plugin's
    ``provenance/NAME``, never a path outside the dataset."""

    options: CardOptions
    version: str = ""
    plan: PlanRecord | None = None
    models: list[CardModel] = field(default_factory=list)
    provenance: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.plan is not None:
            _hex(self.plan.plan_sha256, 64, "plan.plan_sha256")
            if self.plan.identities < 0 or self.plan.shards < 0:
                raise RecordError("plan: counts must not be negative")
        for rel in self.provenance:
            if rel not in OWN_PROVENANCE_FILES and not is_plugin_provenance(rel):
                raise RecordError(f"provenance: {rel[:200]!r} is not a provenance file of a facegen dataset "
                                  "(provenance/NAME)")

    @classmethod
    def from_dict(cls, data: Any, where: str = "facegen") -> CardBuild:
        return _fields(cls, data, where)


@dataclass(frozen=True)
class ShardChecksums:
    """``provenance/checksums.json``: each published shard's XXH3-128, by its path in the dataset."""

    algorithm: str
    files: dict[str, str]

    def __post_init__(self):
        if self.algorithm != "xxh3_128":
            raise RecordError(f"algorithm: expected xxh3_128, got {self.algorithm!r}")
        for rel, digest in self.files.items():
            if shard_number(rel) is None or rel != shard_path(shard_number(rel)):
                raise RecordError(f"files: {rel[:200]!r} is not a shard of a facegen dataset")
            _hex(digest, 32, f"files.{rel}")

    def to_json(self) -> bytes:
        return (json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes, where: str) -> ShardChecksums:
        try:
            value = json.loads(data)
        except ValueError as exc:
            raise RecordError(f"{where} is not valid JSON ({exc})") from None
        return _fields(cls, value, where)


@dataclass(frozen=True)
class OwnFiles(Record):
    """``.facegen/own_files.json``: every file facegen wrote in its folder outside ``.facegen/`` and the shards (the
    card's README.md, LICENSE and preview.jpg, ``_info.json``, ``provenance/*``, ``report/*.png``; in a report's own
    ``--out DIR`` also ``report.json`` and ``report_embeddings.npz``), as the sha256 of its last versions, newest
    last. The shards are recorded by their stats (size and XXH3-128) instead.

    facegen replaces or removes a file only while it is one of these versions (never a user's file, nor one edited
    since), and publish uploads a file only while it is the newest version. The new version is recorded before the
    file is written, and the previous one stays listed, so a crash between the two leaves either recognised."""

    SCHEMA: ClassVar[str] = "facegen-own-files-1"
    MAX_BYTES: ClassVar[int] = 16 << 20  # ~100 bytes a version: far more than the files facegen writes

    files: dict[str, list[str]] = field(default_factory=dict)  # path relative to the folder -> sha256, newest last

    def wrote(self, name: str, sha256: str) -> bool:
        """``sha256`` is a version facegen wrote of ``name``."""
        return sha256 in self.files.get(name, [])

    def newest(self, name: str) -> str | None:
        versions = self.files.get(name)
        return versions[-1] if versions else None

    def adding(self, name: str, sha256: str) -> OwnFiles:
        """This record with a new version of ``name`` (the previous one kept)."""
        if self.newest(name) == sha256:
            return self
        return OwnFiles({**self.files, name: self.files.get(name, [])[-1:] + [sha256]})

    def without(self, name: str) -> OwnFiles:
        return OwnFiles({k: v for k, v in self.files.items() if k != name})

    @classmethod
    def read(cls, path: Path) -> OwnFiles:
        """The record at ``path``; an empty one (nothing is facegen's) when there is none, it is damaged, or it was
        written by another version."""
        return super().read(path) or cls()


def own_files(root: str | os.PathLike) -> OwnFiles:
    """The record of what facegen wrote in the folder ``root``."""
    return OwnFiles.read(OutputFolder(root).own_files_record)


def is_own_file(root: str | os.PathLike, name: str) -> bool:
    """``root/name`` is a regular file holding a version facegen wrote (so facegen may replace or remove it)."""
    path = Path(root) / name
    if path.is_symlink() or not path.is_file():
        return False
    return own_files(root).wrote(name, sha256_file(path))


def not_own_files(root: str | os.PathLike, names) -> list[str]:
    """Those of ``names`` that exist in ``root`` but are not facegen's (the user's own, or changed since)."""
    return [name for name in names if os.path.lexists(Path(root) / name) and not is_own_file(root, name)]


def refuse_foreign_files(root: str | os.PathLike, names, what: str) -> None:
    """One line (UsageError) naming the files among ``names`` in ``root`` that facegen did not write."""
    root = Path(root)
    foreign = not_own_files(root, names)
    if foreign:
        shown = ", ".join(str(root / name) for name in foreign[:3]) + (" …" if len(foreign) > 3 else "")
        raise UsageError(f"{shown} {'was' if len(foreign) == 1 else 'were'} not written by facegen (or changed "
                         f"since): move {'it' if len(foreign) == 1 else 'them'} out of the folder so that {what} can "
                         "be written there")


def write_own_files(root: str | os.PathLike, files: dict[str, bytes], what: str = "facegen's files") -> None:
    """Write each ``root/name`` (atomically), recorded as facegen's first; a file under one of those names that
    facegen did not write (or that changed since) is refused in one line naming it, and nothing is written."""
    root = Path(root)
    refuse_foreign_files(root, files, what)
    record = own_files(root)
    hashes = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    changed = {name: sha for name, sha in hashes.items()
               if record.newest(name) != sha or not (root / name).is_file()}  # as written: left as it is
    record_files(root, changed)
    for name in changed:
        atomic_write(root / name, files[name])


def record_files(root: str | os.PathLike, hashes: dict[str, str]) -> None:
    """Record new versions (name -> sha256) of facegen's files in ``root``."""
    if not hashes:
        return
    path = OutputFolder(root).own_files_record
    record = OwnFiles.read(path)
    for name, sha256 in hashes.items():
        record = record.adding(name, sha256)
    record.write(path)


def remove_own_file(root: str | os.PathLike, name: str) -> bool:
    """Remove ``root/name`` if it is facegen's (then forget it); a user's file there is kept. True when removed."""
    if not is_own_file(root, name):
        return False
    (Path(root) / name).unlink()
    path = OutputFolder(root).own_files_record
    OwnFiles.read(path).without(name).write(path)
    return True


@dataclass(frozen=True)
class ExportPlan:
    """What makes two exports the same export (a rerun resumes it; anything else is refused)."""

    dataset: str  # the dataset's public name (its Hub id, or its folder's name)
    fingerprint: str  # of its shards (facegen.published.shards_fingerprint)
    format: str  # rec or imagefolder
    shuffle: bool
    seed: int
    samples: int


@dataclass(frozen=True)
class ExportSkip:
    """A sample of the dataset that could not be read, and so is not in the export."""

    position: int  # in the export's sample order
    key: str
    reason: str


@dataclass(frozen=True)
class ExportRecord(Record):
    """``DIR/.facegen-export.json``: an export's plan and how far it got, written first (DIR is then known as an
    export), at each checkpoint and last. A RecordIO export resumes from ``position``: its partial ``.rec`` and
    ``.idx`` are cut back to ``rec_bytes`` and ``idx_bytes``, which held the records of the samples before it;
    ``records_done`` means the partial files are whole and only their renaming and the small files remain."""

    SCHEMA: ClassVar[str] = "facegen-export-1"

    facegen_version: str
    plan: ExportPlan
    position: int = 0  # samples of the order handled (written or skipped)
    written: int = 0  # images written
    skipped: list[ExportSkip] = field(default_factory=list)
    rec_bytes: int = 0
    idx_bytes: int = 0
    records_done: bool = False
    complete: bool = False
    identities: int = 0  # identities (classes) with at least one image written, once complete
    classes: int = 0  # labels 0 .. classes-1 written (property's count), once complete
    sizes: dict[str, int] = field(default_factory=dict)  # "H,W" (from each image's header) -> images written

