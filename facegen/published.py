"""A facegen dataset as published, read back: its shards, its samples regrouped by identity, its card.

Used by `facegen report`, `facegen curate` and the `facegen` source (any facegen dataset as the input of another
build), so it sits beside ``records``: builders and plugins may both import it.

API summary
-----------
- ``hub_dataset(path_or_repo) -> HubId | None``: None for a local folder, else the Hub dataset id it names
  (:mod:`facegen.hub_ids`); neither is "no such folder" in one line.
- ``resolve_dataset(path_or_repo) -> (Path, repo_id | None)``: a local folder, or a Hub dataset id (``org/name``,
  ``org/name@revision``, ``hf://datasets/org/name``) downloaded with ``huggingface_hub.snapshot_download``
  (``data/``, ``README.md``, ``_info.json``, ``LICENSE*`` only).
- ``PublishedDataset(path_or_repo)``: ``.samples`` (every sample, in identity (label) order, then key order),
  ``.identities`` (ids in label order), ``.by_identity`` (id -> samples), ``.read(sample, field) -> bytes``,
  ``.meta(sample) -> dict`` (its json), ``.image_column``, ``.features`` (the card's declared features),
  ``.card`` (YAML data as a dict, read by :mod:`facegen.card_yaml`), ``.card_text`` (its Markdown), ``.license_text``, ``.run`` (``.facegen/run.json`` when the folder has it),
  ``.skipped`` (members or shards that could not be read, with reasons), ``.fingerprint()``, ``.name``.

What is read, and how cheaply: a local build's per-shard sample index (``.facegen/shards/index/{j:06d}.json``:
keys, identities, labels, byte offsets and lengths) when it is present and describes this very shard: its name and
size, samples laid end to end from byte 0 up to the end-of-archive blocks, each no longer than
:data:`MAX_SAMPLE_BYTES`, each key ``{cls:06d}_{n}`` of its own label, and each span starting with a valid header of
a member of that key (one 512-byte ``pread`` per sample). Labels and identities must also pair one to one across the
dataset: a shard whose index pairs them otherwise is read from its headers instead (an index is only a cache of
what the tar says; a lying one never merges two identities). A sample's members are then found from its headers
alone (:func:`facegen.tarfiles.span_members`), whatever its span claims. Without a usable index (a Hub download, a
shard rewritten since), the tar headers (:mod:`facegen.tarfiles`: bounded; a damaged header ends the shard's
listing) and the small ``.json`` and ``.cls`` members; image bytes only on request, by offset, and never a member
over :data:`MAX_MEMBER_BYTES` (:class:`MemberTooLarge`). One identity's samples may be spread over many shards
(shards are shuffled across the whole dataset), so samples are regrouped by their label (``cls``) and ordered by key.
A member too large to be metadata, a label that is not an integer or a damaged shard is a counted skip, never an
exception.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from facegen.card_yaml import MAX_CARD_BYTES, front_matter, read_card_text
from facegen.errors import RemoteError, UsageError, server_failed
from facegen.hub_ids import HubId, dataset_id, parse
from facegen.layout import DATA_DIR, INFO, LICENSE, README, TRAIN_DIR, OutputFolder, shard_number
from facegen.layout.records import RunRecord, SampleIndex
from facegen.tarfiles import BLOCK, TarDamaged, header_at, list_members, span_members

HUB_PATTERNS = [f"{DATA_DIR}/**", README, INFO, f"{LICENSE}*"]
MAX_METADATA_BYTES = 1 << 20  # a json or cls member larger than this is not facegen's metadata
# a face image is 5 KB-1 MB (facegen's sources refuse files over 8-32 MB): a larger member is not read
MAX_MEMBER_BYTES = 16 << 20
MAX_SAMPLE_BYTES = 8 * MAX_MEMBER_BYTES  # an indexed span longer than this (image, cls, json, a few extras) is a lie
KEY = re.compile(r"(\d{6,})_\d{3,}")  # the shard writer's {cls:06d}_{n:03d}
COLUMNS_OF_EVERY_SAMPLE = ("cls", "json", "__key__", "__url__")
MAX_LABEL = 2**63 - 1  # labels are stored as int64 (`cls`, and a child build's `parent_cls`)


def hub_dataset(path_or_repo: str | os.PathLike) -> HubId | None:
    """None for a local folder, the Hub id of a dataset named by one (:mod:`facegen.hub_ids`' rule); anything else
    is a one-line UsageError ("no such folder")."""
    text = os.fspath(path_or_repo)
    if os.path.isdir(text):
        return None
    hub = dataset_id(text)
    if hub is not None:
        return hub
    if os.path.exists(text):
        raise UsageError(f"{text} is a file, not a facegen dataset folder")
    if parse(text) is not None:  # id-shaped, but its first part is a local folder: a mistyped path
        raise UsageError(f"{text}: no such folder (for the Hub dataset, write hf://datasets/{text})")
    raise UsageError(f"{text}: no such folder, and not a Hub dataset id (ORG/NAME or hf://datasets/ORG/NAME)")


def download_dataset(repo_id: str, revision: str | None = None) -> Path:
    """The files of a Hub dataset that a facegen dataset consists of, from the Hub cache or the Hub."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline, unknown repo, gated: the user must act; the Hub failing: a rerun may work
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        kind = RemoteError if server_failed(exc) else UsageError
        raise kind(f"{repo_id} is not a local folder, and the Hub dataset {repo_id} cannot be downloaded "
                   f"({type(exc).__name__}{': ' + first_line if first_line else ''})") from None


def resolve_dataset(path_or_repo: str | os.PathLike) -> tuple[Path, str | None]:
    """(local folder, Hub repo id or None) of a facegen dataset given as a folder or a Hub id."""
    hub = hub_dataset(path_or_repo)
    if hub is None:
        return Path(path_or_repo).resolve(), None
    return download_dataset(hub.repo_id, hub.revision), hub.repo_id


def shards_fingerprint(root: str | os.PathLike) -> str:
    """Changes when any shard is added, removed or rewritten (names, sizes, modification times)."""
    digest = hashlib.sha256()
    for path in OutputFolder(root).shard_tars():
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@dataclass
class Sample:
    """One sample of a published dataset: where its members are, and the fields every reader needs."""

    shard: int  # index into PublishedDataset.shards
    key: str
    cls: int
    identity: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # field -> (offset, size) in the tar
    # (offset of its first header, bytes of all its members) from the sample index; ``members`` is then filled
    # on first use (:meth:`PublishedDataset.members`)
    span: tuple[int, int] | None = None

    @property
    def position(self) -> int:
        """Where the sample starts in its shard (for reading a shard's samples in order)."""
        if self.span is not None:
            return self.span[0]
        return min((offset for offset, _ in self.members.values()), default=0)


class MemberTooLarge(OSError):
    """A member over :data:`MAX_MEMBER_BYTES`: never read (a counted skip for whoever asked for it)."""


def _identity(meta, cls: int) -> str:
    """A sample's identity as its json names it (``cls{N}`` when it names none)."""
    identity = meta.get("identity") if isinstance(meta, dict) else None
    return str(identity) if identity not in (None, "") else f"cls{cls}"


def _unpaired(found: list[tuple[int, str, Sample]]) -> list[Sample]:
    """The samples whose label has two identities, or whose identity has two labels (a facegen build pairs them one
    to one)."""
    identities, labels = defaultdict(set), defaultdict(set)
    for cls, _, sample in found:
        identities[cls].add(sample.identity)
        labels[sample.identity].add(cls)
    if all(len(i) == 1 for i in identities.values()) and all(len(c) == 1 for c in labels.values()):
        return []
    return [sample for cls, _, sample in found if len(identities[cls]) > 1 or len(labels[sample.identity]) > 1]


def _split_name(name: str) -> tuple[str, str]:
    """``dir/000001_002.png`` -> (``dir/000001_002``, ``png``): the key ends at the first dot of the basename."""
    folder, _, base = name.rpartition("/")
    stem, _, field_name = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), field_name


class PublishedDataset:
    """A facegen dataset (local folder or Hub id), indexed by reading its shards' headers and metadata."""

    def __init__(self, path_or_repo: str | os.PathLike, progress: bool = False):
        self.given = os.fspath(path_or_repo)
        self.root, self.repo_id = resolve_dataset(path_or_repo)
        self.folder = OutputFolder(self.root)
        if not self.folder.train_dir.is_dir():
            raise UsageError(f"{self.given} is not a facegen dataset: it has no {TRAIN_DIR}/ folder of shards")
        self.shards = self.folder.shard_tars()
        if not self.shards:
            raise UsageError(f"{self.given} is not a facegen dataset: {TRAIN_DIR}/ holds no .tar shard")
        self.card_text = ""  # the card's Markdown after its YAML
        self.card = self._read_card()
        self.features = self._read_features()
        self.image_column = self._image_column()
        self.run = RunRecord.read(self.folder.run_json)
        license_path = self.folder.file(LICENSE)
        self.license_text = ""
        if license_path.is_file():
            with open(license_path, "rb") as f:  # a licence is text of a few KB: no more than a card is read
                self.license_text = f.read(MAX_CARD_BYTES).decode("utf-8", errors="replace")
        self.skipped: Counter = Counter()
        self.skipped_details: list[dict] = []
        self.samples: list[Sample] = []
        self.indexed_shards = 0  # shards read from their sample index instead of their headers
        self._scan(progress)
        self.by_identity: dict[str, list[Sample]] = defaultdict(list)
        for sample in self.samples:
            self.by_identity[sample.identity].append(sample)
        self.identities = list(self.by_identity)

    # ------------------------------------------------------------------ card and records

    @property
    def name(self) -> str:
        """How the dataset is named in what is published: its Hub id, else the folder's name (never a path)."""
        if self.repo_id:
            return self.repo_id
        remembered = self._read_json(self.folder.card_settings) or {}
        return remembered.get("repo_id") or self.root.name

    @property
    def ref_prefix(self) -> str:
        """The start of a ``source_ref`` pointing into this dataset."""
        return f"hf://datasets/{self.name}" if "/" in self.name else self.name

    @staticmethod
    def _read_json(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return None

    def _read_card(self) -> dict:
        """The card's YAML (:mod:`facegen.card_yaml`: bounded, no aliases, UTF-8), {} without a card; a card that
        cannot be read is one line naming it."""
        readme = self.folder.readme
        if not readme.is_file():
            return {}
        where = f"{self.given}'s README.md"
        card, self.card_text = front_matter(read_card_text(readme, where), where)
        return card

    def _read_features(self):
        """The card's declared features (``datasets.Features``), else the run's, else None."""
        from datasets import Features

        info = self.card.get("dataset_info")
        if isinstance(info, list):
            info = next((i for i in info if i.get("config_name", "default") == "default"), info[0] if info else None)
        if isinstance(info, dict) and info.get("features"):
            try:
                return Features._from_yaml_list(info["features"])
            except Exception:
                pass
        run = RunRecord.read(self.folder.run_json)
        return Features.from_dict(run.features) if run is not None else None

    def _image_column(self) -> str:
        if self.features is not None:
            from datasets import Image

            for name, feature in self.features.items():
                if isinstance(feature, Image):
                    return name
        return "png"

    def extra_columns(self) -> list[str]:
        """Columns besides the image, cls, json and the key/url: plugin extras (e.g. ``embedding.npy``)."""
        if self.features is None:
            return []
        return [n for n in self.features if n != self.image_column and n not in COLUMNS_OF_EVERY_SAMPLE]

    def fingerprint(self) -> str:
        return shards_fingerprint(self.root)

    # ------------------------------------------------------------------ shards

    def _skip(self, where: str, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        if len(self.skipped_details) < 100:
            self.skipped_details.append({"ref": where, "reason": reason, "detail": detail})

    def _scan(self, progress: bool) -> None:
        from tqdm.auto import tqdm

        found: list[tuple[int, str, Sample]] = []
        indexed: set[int] = set()
        for index, path in enumerate(tqdm(self.shards, unit="shard", desc="read shards", disable=not progress)):
            samples = self._indexed_shard(index, path)
            if samples is not None:
                indexed.add(index)
                found += samples
            else:
                found += self._scan_shard(index, path)
        # labels and identities paired otherwise than one to one: each indexed sample involved is checked against
        # its json, and a shard whose index lied is read from its headers instead
        doubtful = {sample.shard for sample in _unpaired(found)
                    if sample.shard in indexed and self._identity_in_json(sample) != sample.identity}
        if doubtful:
            found = [item for item in found if item[2].shard not in doubtful]
            for index in sorted(doubtful):
                found += self._scan_shard(index, self.shards[index])
            indexed -= doubtful
        self.indexed_shards = len(indexed)
        found.sort(key=lambda item: (item[0], item[1]))  # label order, then key (= image number) order
        self.samples = [sample for _, _, sample in found]

    def _indexed_shard(self, index: int, path: Path) -> list[tuple[int, str, Sample]] | None:
        """The shard's samples from its sample index, or None (then its headers are scanned) when there is no
        index, or it is malformed or does not describe this very file: its name and size, samples laid end to end
        from byte 0 (each at most MAX_SAMPLE_BYTES, its key of its own label, its span starting with a header of
        a member of that key) up to the end-of-archive blocks."""
        number = shard_number(path)
        if number is None:
            return None
        record = SampleIndex.read(self.folder.shard(number).index)  # its types checked
        if record is None or record.tar != path.relative_to(self.root).as_posix():
            return None
        out, end = [], 0
        try:
            with open(path, "rb") as f:
                fd = f.fileno()
                size = os.fstat(fd).st_size
                if record.tar_bytes != size:
                    return None
                for key, identity, cls, offset, length in zip(record.keys, record.identities, record.cls,
                                                              record.offsets, record.lengths):
                    label = KEY.fullmatch(key)
                    if (label is None or int(label.group(1)) != cls or not 0 <= cls <= MAX_LABEL or offset != end
                            or length % BLOCK or not 0 < length <= min(MAX_SAMPLE_BYTES, size - offset)):
                        return None
                    first = header_at(fd, offset, size)
                    if first is None or _split_name(first.name)[0] != key or first.offset + first.size > end + length:
                        return None
                    end += length
                    identity = str(identity) if identity not in (None, "") else f"cls{cls}"
                    out.append((cls, key, Sample(index, key, cls, identity, span=(offset, length))))
                # the end-of-archive blocks follow the last indexed sample: nothing was appended since
                if os.pread(fd, 2 * BLOCK, end) != bytes(2 * BLOCK):
                    return None
        except OSError:
            return None
        return out

    def _identity_in_json(self, sample: Sample) -> str | None:
        """The identity the sample's own json member names; None when it cannot be read."""
        try:
            members = self.members(sample)
            if "json" not in members or members["json"][1] > MAX_METADATA_BYTES:
                return None
            return _identity(json.loads(self.read(sample, "json")), sample.cls)
        except (OSError, ValueError, RecursionError):
            return None

    def members(self, sample: Sample) -> dict[str, tuple[int, int]]:
        """field -> (offset, size) in the shard; for an indexed sample, from the headers in its span (one pread of
        512 bytes per member, whatever the span's length)."""
        if sample.members or sample.span is None:
            return sample.members
        start, length = sample.span
        name = self.shards[sample.shard].name
        with open(self.shards[sample.shard], "rb") as f:
            try:
                entries = span_members(f.fileno(), start, length)
            except TarDamaged as exc:
                raise OSError(f"{name}: sample {sample.key} is damaged ({exc})") from None
        members = {}
        for member in entries:
            key, field_name = _split_name(member.name)
            if key != sample.key:
                raise OSError(f"{name}: the sample index puts member {member.name} in sample {sample.key}")
            if field_name:
                members[field_name] = (member.offset, member.size)
        sample.members = members
        return members

    def _scan_shard(self, index: int, path: Path) -> list[tuple[int, str, Sample]]:
        rel = path.relative_to(self.root).as_posix()
        groups: dict[str, dict[str, tuple[int, int]]] = {}
        metadata: dict[str, dict[str, bytes]] = defaultdict(dict)
        listing = list_members(path)
        members, error = listing.members, listing.error
        try:
            with open(path, "rb") as f:
                for name, offset, size in members:
                    key, field_name = _split_name(name)
                    if not field_name:
                        continue
                    groups.setdefault(key, {})[field_name] = (offset, size)
                    if field_name in ("json", "cls"):
                        if size > MAX_METADATA_BYTES:
                            metadata[key][field_name] = b""  # refused below, never read into memory
                            continue
                        f.seek(offset)
                        metadata[key][field_name] = f.read(size)
        except OSError as exc:
            error = exc
        if error is not None:
            self._skip(rel, "unreadable shard", f"{type(error).__name__}: {error}")
            # the samples before the damage are complete and kept; the one being read when it broke is not
            if members and groups.pop(_split_name(members[-1][0])[0], None) is not None:
                self._skip(f"{rel}#{_split_name(members[-1][0])[0]}", "truncated sample")
        out = []
        for key, members in groups.items():
            where = f"{rel}#{key}"
            if self.image_column not in members:
                self._skip(where, "sample without an image")
                continue
            try:
                cls = int(metadata[key].get("cls", b"").decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                self._skip(where, "bad label", "the .cls member is missing or not an integer")
                continue
            if not 0 <= cls <= MAX_LABEL:
                self._skip(where, "bad label", f"the label {cls} is not an int64 >= 0 (a column of int64 labels)")
                continue
            try:
                meta = json.loads(metadata[key].get("json") or b"{}")
            except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than Python's stack
                self._skip(where, "bad json", "nested too deeply" if isinstance(exc, RecursionError) else str(exc))
                continue
            out.append((cls, key, Sample(index, key, cls, _identity(meta, cls), members)))
        return out

    def read(self, sample: Sample, field_name: str, length: int | None = None) -> bytes:
        """One member's bytes, or its first ``length`` (opened per call, so threads may read concurrently)."""
        members = self.members(sample)
        if field_name not in members:
            raise OSError(f"sample {sample.key} has no {field_name!r} member")
        offset, size = members[field_name]
        if length is None and size > MAX_MEMBER_BYTES:  # a prefix (a header to check) is bounded by its length
            raise MemberTooLarge(f"{self.shards[sample.shard].name}: member {sample.key}.{field_name} is {size:,} "
                                 f"bytes, over the {MAX_MEMBER_BYTES:,} a facegen dataset's member may hold")
        size = size if length is None else min(size, length)
        with open(self.shards[sample.shard], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{self.shards[sample.shard].name} ends inside member {sample.key}.{field_name}")
        return data

    def image(self, sample: Sample) -> bytes:
        return self.read(sample, self.image_column)

    def meta(self, sample: Sample) -> dict:
        try:
            members = self.members(sample)
            if "json" not in members or members["json"][1] > MAX_METADATA_BYTES:
                return {}
            value = json.loads(self.read(sample, "json"))
        except (OSError, ValueError, RecursionError):
            return {}
        return value if isinstance(value, dict) else {}

    def shard_name(self, sample: Sample) -> str:
        return self.shards[sample.shard].relative_to(self.root).as_posix()

    def ref(self, sample: Sample) -> str:
        """Where a sample lies, for a ``source_ref``: ``<dataset>/data/train/train-000003.tar#000012_004``."""
        return f"{self.ref_prefix}/{self.shard_name(sample)}#{sample.key}"
