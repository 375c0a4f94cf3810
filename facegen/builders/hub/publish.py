"""`facegen publish`: check a finished build folder, then upload it to a Hub dataset repository.

Steps (each visible in :func:`publish`), all while holding the folder's lock (a build in progress there, or a
`facegen card` or `report`, stops the publish in one line, exit 2):

1. Only what facegen wrote (:func:`check_files`): every visible file outside ``.facegen/`` is a shard of the build
   or a file facegen recorded when it wrote it (``.facegen/own_files.json``: the card's files, ``_info.json``,
   ``provenance/*``, ``report/*.png``) and unchanged since; no symbolic or hard link. Anything else stops the
   publish in one line naming it, exit 2 (move the file out, or rerun the command that writes it).
2. Check the folder's content (:func:`check_folder`) and refuse with the list of problems, exit 1: the card's YAML
   parses and names a licence (with a LICENSE file when it is `other`), every shard is a complete tar whose size,
   checksum and sample count match its stats, the totals match the run, no uploaded text names a local path the
   build recorded, and ``load_dataset(OUT, streaming=True)`` yields exactly the declared columns and rows.
3. List what would be uploaded (:func:`files_to_upload`): README.md, LICENSE*, preview.jpg and data/**; never
   ``.facegen/`` or hidden/temporary files. ``--dry-run`` stops here and contacts nothing.
4. ``create_repo(repo_type="dataset", exist_ok=True)`` (and the branch when ``--revision`` names one), then
   ``upload_folder`` with those patterns. huggingface_hub 2.x's upload is resumable: rerunning the same command
   after an interruption skips the files already committed.

The token comes from ``--token``, ``HF_TOKEN`` or the saved ``hf auth login``; it is never printed, and any error
text that could contain it is masked.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from facegen.errors import CheckFailed, RemoteError, UsageError
from facegen.fileio import sha256_file
from facegen.hub_ids import check_repo_name
from facegen.builders.engine.lock import output_lock
from facegen.card_yaml import front_matter, read_card_text
from facegen.layout import (
    DATA_DIR,
    FACEGEN_DIR,
    INFO,
    LICENSE,
    PLOTS_DIR,
    PREVIEW,
    PROVENANCE_DIR,
    README,
    OutputFolder,
)
from facegen.layout.records import RunRecord, load_run, load_shard_stats, load_unit_stats, own_files
from facegen.messages import count, info
from facegen.tarfiles import list_members

# report/: the plots of `facegen report` (report.json itself stays in .facegen/)
ALLOW_PATTERNS = [README, f"{LICENSE}*", PREVIEW, INFO, f"{DATA_DIR}/**", f"{PROVENANCE_DIR}/**", f"{PLOTS_DIR}/**"]
# Hidden names anywhere (temporary shard files, editor droppings) and the build's own records stay local:
# `.*` matches a hidden name at the top level (fnmatch's `*` also crosses `/`), `**/.*` one in a folder.
IGNORE_PATTERNS = [f"{FACEGEN_DIR}/**", ".*", "**/.*", "**/__pycache__/**"]
# Uploaded last, in a second commit series: until they land, an interrupted upload never looks complete on the Hub.
LAST_FILES = [README, INFO]
# Remote files under these folders that the build no longer has are deleted in the same run (a rebuilt dataset
# must not load old and new samples together).
SYNCED_FOLDERS = [f"{DATA_DIR}/**", f"{PROVENANCE_DIR}/**"]
PROBLEMS_SHOWN = 30


@dataclass
class FileToUpload:
    path: str  # relative to the folder = path in the repo
    size: int


@dataclass
class PublishResult:
    repo_id: str
    revision: str
    files: list[FileToUpload] = field(default_factory=list)
    commit_url: str | None = None
    dry_run: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


# --------------------------------------------------------------------------------------------- local checks


class _HashingReader:
    """A read-only file wrapper that hashes every byte read (one pass gives both the members and the checksum)."""

    def __init__(self, f):
        self._f = f
        self.xxh3_128 = xxhash.xxh3_128()
        self.bytes_read = 0

    def read(self, size=-1):
        data = self._f.read(size)
        self.xxh3_128.update(data)
        self.bytes_read += len(data)
        return data

    def read_to(self, position: int) -> None:
        """Hash the bytes up to ``position`` without keeping them."""
        while self.bytes_read < position and self.read(min(1 << 20, position - self.bytes_read)):
            pass


DECODE_THREADS = min(8, os.cpu_count() or 4)  # PIL and zlib release the GIL while decoding
DECODES_IN_FLIGHT = 64  # images read ahead of their decode: bounded memory


def check_shard(path: Path, image_column: str, verify: str = "full") -> tuple[dict, str | None]:
    """List a tar's members (:mod:`facegen.tarfiles`), then read it once to its end, hashing it and decoding every
    image member when ``verify`` is full.

    Returns ({"images", "xxh3_128", "bytes"}, problem or None).
    """
    from concurrent.futures import ThreadPoolExecutor

    from facegen.builders.engine.images import IMAGE_FIELD_EXTENSIONS, ImageError, check_image

    listing = list_members(path)
    if listing.error is not None:
        return {}, f"not a complete tar ({type(listing.error).__name__}: {listing.error})"
    unexpected = listing.others + [m.name for m in listing.members
                                   if m.name.startswith("/") or ".." in m.name.split("/")]
    if unexpected:
        return {}, f"unexpected member {unexpected[0]!r}"
    columns = [m.name.rpartition("/")[2].partition(".")[2] for m in listing.members]
    images = columns.count(image_column)
    pending: list = []
    broken: list[str] = []

    def decoded(name: str, data: bytes) -> str | None:
        try:
            check_image(data, "full")
        except ImageError as exc:
            return f"{name} ({exc})"
        return None

    try:
        with open(path, "rb") as raw, ThreadPoolExecutor(DECODE_THREADS) as pool:
            reader = _HashingReader(raw)
            for member, column in zip(listing.members, columns):
                if verify == "full" and column.rsplit(".", 1)[-1] in IMAGE_FIELD_EXTENSIONS:
                    reader.read_to(member.offset)
                    pending.append(pool.submit(decoded, member.name, reader.read(member.size)))
                    if len(pending) >= DECODES_IN_FLIGHT:
                        broken += filter(None, (f.result() for f in pending))
                        pending = []
            broken += filter(None, (f.result() for f in pending))
            while reader.read(1 << 20):  # to the end (the end-of-archive padding): the checksum covers the file
                pass
    except OSError as exc:
        return {}, f"not a complete tar ({type(exc).__name__}: {exc})"
    if broken:
        return {}, (f"{count(len(broken), 'image')} {'does' if len(broken) == 1 else 'do'} not decode "
                    f"(`load_dataset` would fail on {'it' if len(broken) == 1 else 'them'}), first: {broken[0]}; "
                    "rebuild with the default --verify full, which skips them")
    return {"images": images, "xxh3_128": reader.xxh3_128.hexdigest(),
            "bytes": reader.bytes_read}, None


def _check_card(out: Path, run: RunRecord, problems: list[str]) -> None:
    from datasets import Features
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCardData

    readme = OutputFolder(out).readme
    if not readme.is_file():
        problems.append("README.md is missing (run `facegen card OUT` to write it)")
        return
    try:
        data, _ = front_matter(read_card_text(readme, README), README)
    except UsageError as exc:
        problems.append(str(exc))
        return
    licence = data.get("license")
    if not licence:
        problems.append("README.md: no `license` in the YAML")
    elif licence == "other":
        if not data.get("license_name"):
            problems.append("README.md: `license: other` needs a `license_name`")
        link = data.get("license_link")
        if not link:
            problems.append("README.md: `license: other` needs a `license_link` (the LICENSE file)")
        elif not re.match(r"^https?://", link):
            target = out / link
            if not target.is_file() or target.stat().st_size == 0:
                problems.append(f"README.md: `license_link: {link}` but that file is missing or empty")
    if not data.get("configs"):
        problems.append("README.md: no `configs` (data_files) in the YAML")
    try:
        infos = DatasetInfosDict.from_dataset_card_data(DatasetCardData(**data))
    except Exception as exc:  # datasets raises several types for a malformed dataset_info
        problems.append(f"README.md: `dataset_info` is not valid ({type(exc).__name__}: {exc})".splitlines()[0])
        return
    info = next(iter(infos.values()), None) if infos else None
    if info is None or info.features is None:
        problems.append("README.md: no `dataset_info.features` in the YAML")
        return
    if info.features != Features.from_dict(run.features):
        problems.append("README.md declares other columns than .facegen/run.json (run `facegen card OUT`)")
    if info.splits and "train" in info.splits:
        declared = info.splits["train"].num_examples
        if declared != run.totals.images:
            problems.append(f"README.md declares {declared} train examples but the run has "
                            f"{run.totals.images} (run `facegen card OUT`)")


def _check_shards(out: Path, run: RunRecord, problems: list[str], verify: str = "full",
                  counted: dict[str, int | None] | None = None) -> None:
    from facegen.cards.stats import summarise

    image_column = run.image_column
    shards = load_shard_stats(out)
    expected = run.plan.shards
    indices = [s.shard for s in shards]
    missing = sorted(set(range(expected)) - set(indices))
    if missing:
        problems.append(f"{len(missing)} of {count(expected, 'shard')} {'has' if len(missing) == 1 else 'have'} "
                        "no stats (not finished?): first is "
                        f"{missing[0]:06d}; rerun the build command to complete them")
    listed = set()
    totals = Counter()
    for stats in shards:
        rel = stats.tar
        listed.add(rel)
        totals["images"] += stats.images
        path = out / rel
        if not path.is_file():
            problems.append(f"{rel}: missing (its stats file exists)")
            continue
        found, problem = check_shard(path, image_column, verify)
        if problem:
            problems.append(f"{rel}: {problem}")
            if counted is not None:
                counted[rel] = None  # a shard of this build, reported: its count is unknown
            continue
        if found["bytes"] != stats.tar_bytes:
            problems.append(f"{rel}: {found['bytes']} bytes but its stats say {stats.tar_bytes}")
        if found["xxh3_128"] != stats.tar_xxh3_128:
            problems.append(f"{rel}: checksum (XXH3-128) differs from its stats (the file changed after the build)")
        if counted is not None:
            counted[rel] = found["images"]
        if found["images"] != stats.images:
            problems.append(f"{rel}: {count(found['images'], 'image')} but its stats say {stats.images}")
    # a shard holds samples of many identities: identities are counted across the shards (or the units of work)
    totals["identities"] = summarise(shards, load_unit_stats(out), run.plan.identities).identities
    for name in ("images", "identities"):
        if getattr(run.totals, name) != totals[name]:
            problems.append(f"run.json counts {getattr(run.totals, name)} {name} but the shard stats add up to "
                            f"{totals[name]}")
    if not (out / DATA_DIR).is_dir():
        problems.append("data/ is missing")


def _check_loads(out: Path, run: RunRecord, problems: list[str]) -> None:
    """``load_dataset(OUT, split="train", streaming=True)`` must yield the declared columns, every row once."""
    import datasets

    try:
        stream = datasets.load_dataset(str(out), split="train", streaming=True)
        declared = list(datasets.Features.from_dict(run.features))
        rows = 0
        # images are not decoded (the tar walk checked them); every json row is still cast to its features
        for example in stream.decode(False):
            if rows == 0 and list(example) != declared:
                problems.append(f"load_dataset yields columns {list(example)}, the card declares {declared}")
                return
            rows += 1
    except Exception as exc:  # datasets raises many types (DatasetGenerationError, ValueError, ArrowInvalid…)
        problems.append(f"load_dataset(OUT, streaming=True) fails: {type(exc).__name__}: {exc}".splitlines()[0])
        return
    if rows != run.totals.images:
        problems.append(f"load_dataset yields {rows} rows, the run counts {run.totals.images}")


def _check_licence(out: Path, problems: list[str]) -> None:
    """README.md's licence fields and LICENSE must be the ones the build's inputs imply (a hand-edited
    `license: mit` or a replaced LICENSE text is refused)."""
    from facegen.cards.card import expected_licence

    try:
        chain, licence_text = expected_licence(out)
        data, _ = front_matter(read_card_text(OutputFolder(out).readme, README), README)
    except UsageError:  # the card checks above already report an unreadable card or run
        return
    for key, want in (("license", chain.hub_id), ("license_name", chain.name), ("license_link", chain.link)):
        if data.get(key) != want:
            problems.append(f"README.md: `{key}: {data.get(key)}` but the build's inputs imply `{want}` "
                            "(run `facegen card OUT` to write the licence they imply)")
    licence_file = OutputFolder(out).file(LICENSE)
    if licence_text is not None and licence_file.is_file():
        if licence_file.read_text(encoding="utf-8", errors="replace") != licence_text:
            problems.append("LICENSE: its text is not the one the build's inputs imply (run `facegen card OUT`, "
                            "after moving your own text elsewhere)")


def _check_links(out: Path, problems: list[str]) -> None:
    """Every file the card links to (preview, LICENSE, provenance, report plots) exists."""
    readme = OutputFolder(out).readme
    if not readme.is_file():
        return
    try:
        text = read_card_text(readme, README)
    except UsageError:  # the card checks report it
        return
    for target in sorted(set(re.findall(r"\]\(([^)\s]+)\)", text))):
        if re.match(r"^(?:[a-z][a-z0-9+.-]*:|#)", target):  # a URL, mailto: or an anchor in the card
            continue
        path = target.split("#", 1)[0]
        if path and not (out / path).is_file():
            problems.append(f"README.md links to {path}, which is missing")


def _check_info(out: Path, counted: dict[str, int | None], problems: list[str]) -> None:
    """`_info.json` (timm's shard list), when present, names exactly the shards with their sample counts (those
    counted: a shard whose check failed was reported already)."""
    path = out / "_info.json"
    if not path.is_file():
        return
    try:
        split = json.loads(path.read_text(encoding="utf-8"))["splits"]["train"]
        listed = dict(zip(split["filenames"], split["shard_lengths"], strict=True))
        num_samples = split["num_samples"]
    except (ValueError, KeyError, TypeError) as exc:
        problems.append(f"_info.json: not timm's format ({type(exc).__name__}: {exc})".splitlines()[0])
        return
    for name in sorted(set(listed) - set(counted)):
        problems.append(f"_info.json lists {name}, which is not a shard of this build")
    for name in sorted(set(counted) - set(listed)):
        problems.append(f"_info.json does not list the shard {name}")
    for name in sorted(set(listed) & set(counted)):
        if counted[name] is not None and listed[name] != counted[name]:
            problems.append(f"_info.json gives {name} {count(listed[name], 'sample')}; it holds {counted[name]}")
    if None not in counted.values() and num_samples != sum(counted.values()):
        problems.append(f"_info.json: num_samples {num_samples}, the shards hold {sum(counted.values())}")


def _check_local_paths(out: Path, run: RunRecord, problems: list[str]) -> None:
    """No text file publish uploads names a local path the build recorded: absolute, or relative as given
    (:func:`facegen.cards.public.local_path_needles`), a safetensors file's metadata included."""
    from facegen.cards.public import local_path_needles

    needles = local_path_needles(run, out)
    pattern = re.compile("|".join(rf"(?<![\w.~/-]){re.escape(n)}(?![\w.-])" for n in sorted(needles, key=len,
                                                                                            reverse=True)))
    for f in files_to_upload(out):
        text = _text_of(out / f.path)
        found = pattern.search(text) if text is not None and needles else None
        if found:
            problems.append(f"{f.path} names {needles[found.group(0)]} ({found.group(0)}): nothing published may "
                            "name a local path (rerun `facegen card OUT`)")


TEXT_SUFFIXES = (".md", ".json", ".txt", ".jsonl", ".yaml", ".yml", ".csv", ".bib", "")


def _text_of(path: Path) -> str | None:
    """A file's text as a reader sees it (a safetensors file's header), or None for an image or a shard."""
    if path.suffix == ".safetensors":
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            return f.read(min(size, 100 << 20)).decode("utf-8", errors="replace")
    if path.suffix not in TEXT_SUFFIXES and path.name != LICENSE:
        return None
    return path.read_bytes().decode("utf-8", errors="replace")


def check_files(out_dir) -> None:
    """Publish uploads exactly what facegen wrote: every visible file in the folder outside ``.facegen/`` is a
    shard of the build (its content is checked against its stats by :func:`check_folder`) or a file facegen
    recorded when it wrote it (``.facegen/own_files.json``), unchanged since, with no other name (hard link) and
    not a symbolic link. Anything else stops the publish in one line naming it (UsageError, exit 2: the user must
    move the file out, or have facegen write it again); hidden names are never uploaded and are left alone."""
    out = Path(out_dir)
    shards = {s.tar for s in load_shard_stats(out)}
    record = own_files(out)
    problems: list[str] = []
    for folder, dirs, names in os.walk(out):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .facegen/ and hidden folders stay local
        for name in sorted([*dirs, *(n for n in names if not n.startswith("."))]):
            path = here / name
            rel = path.relative_to(out).as_posix()
            problem = _file_problem(path, rel, shards, record)
            if problem:
                problems.append(problem)
    if problems:
        more = f" (and {count(len(problems) - 1, 'other file')} like it)" if len(problems) > 1 else ""
        raise UsageError(f"refusing to publish {out_dir}: {problems[0]}{more}")


def _file_problem(path: Path, rel: str, shards: set[str], record) -> str | None:
    if path.is_symlink():
        return (f"{rel} is a symbolic link: publish uploads only the files facegen wrote (move it out of the "
                "folder)")
    if path.is_dir():
        return None
    stat = path.stat()
    if not path.is_file():
        return f"{rel} is not a regular file: move it out of the folder"
    if stat.st_nlink > 1:
        return (f"{rel} has {stat.st_nlink} names (a hard link): it could change through another name after the "
                "check; replace it with a copy of itself")
    if rel in shards:
        return None  # its size and XXH3-128 are checked against its stats
    if rel not in record.files:
        return f"{rel} was not written by facegen: publish uploads only what facegen wrote (move it out of the folder)"
    if sha256_file(path) != record.newest(rel):
        return f"{rel} changed since facegen wrote it: {rewrite_hint(rel)} (move your own text elsewhere first)"
    return None


def rewrite_hint(rel: str) -> str:
    """The command that writes facegen's file ``rel`` again."""
    if rel.startswith(f"{PLOTS_DIR}/"):
        return "rerun `facegen report OUT`"
    if rel == INFO:
        return "rerun the build command (it writes _info.json again)"
    return "rerun `facegen card OUT`"


def check_folder(out_dir, verify: str = "full") -> list[str]:
    """Every problem that should stop a publish, as one line each (empty list = ready to publish).

    ``verify="full"`` decodes every image (so that a build made before images were checked, or with
    ``--verify header``, is caught before upload); ``"header"`` only walks the tars.
    """
    out = Path(out_dir)
    if not out.is_dir():
        return [f"{out} is not a folder"]
    try:
        run = load_run(out)
    except UsageError as exc:
        return [str(exc)]
    problems: list[str] = []
    counted: dict[str, int | None] = {}
    _check_card(out, run, problems)
    if not problems:
        _check_licence(out, problems)
    _check_links(out, problems)
    _check_shards(out, run, problems, verify, counted)
    _check_info(out, counted, problems)
    _check_local_paths(out, run, problems)
    if not problems:  # loading is slow and pointless when the files are already known to be wrong
        _check_loads(out, run, problems)
    return problems


# --------------------------------------------------------------------------------------------- upload


def files_to_upload(out_dir, allow_patterns: list[str] | None = None) -> list[FileToUpload]:
    """Exactly the files `upload_folder` will send with facegen's patterns (same matcher as huggingface_hub), in
    upload order: the card and `_info.json` last."""
    from huggingface_hub.utils import filter_repo_objects

    out = Path(out_dir)
    rel_paths = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    chosen = filter_repo_objects(rel_paths, allow_patterns=allow_patterns or ALLOW_PATTERNS,
                                 ignore_patterns=IGNORE_PATTERNS)
    chosen = sorted(chosen, key=lambda p: (p in LAST_FILES, p))
    return [FileToUpload(path=p, size=(out / p).stat().st_size) for p in chosen]


def resolve_token(token: str | None) -> tuple[str | None, str]:
    """(token, where it came from): --token, then HF_TOKEN, then the saved login."""
    from huggingface_hub import get_token

    if token:
        return token, "--token"
    found = get_token()
    if not found:
        return None, "none"
    if found in (os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")):
        return found, "HF_TOKEN"
    return found, "saved login"


def mask(text: str, token: str | None) -> str:
    """Remove the token (and anything shaped like an HF token) from text meant for a terminal or a log."""
    if token:
        text = text.replace(token, "hf_***")
    return re.sub(r"\bhf_[A-Za-z0-9]{8,}\b", "hf_***", text)


def _first_patterns() -> list[str]:
    return [p for p in ALLOW_PATTERNS if p not in LAST_FILES]


def hf_upload_commands(repo_id: str, out_dir, private: bool = False, revision: str | None = None) -> list[str]:
    """The same upload with the `hf` CLI (huggingface_hub >= 1.0), in facegen's order: everything but the card,
    deleting remote shards the build no longer has, then the card and `_info.json`. `hf upload` keeps every
    repeated `--include`/`--exclude`/`--delete` flag."""
    commands = []
    for includes, deletes in ((_first_patterns(), SYNCED_FOLDERS), (LAST_FILES, [])):
        args = ["hf", "upload", repo_id, str(out_dir), ".", "--repo-type", "dataset"]
        if private:
            args.append("--private")
        if revision:
            args += ["--revision", revision]
        for flag, patterns in (("--include", includes), ("--exclude", IGNORE_PATTERNS), ("--delete", deletes)):
            for pattern in patterns:
                args += [flag, pattern]
        commands.append(shlex.join(args))
    return commands


def legacy_upload_commands(repo_id: str, out_dir, private: bool = False, revision: str | None = None) -> list[str]:
    """The same with huggingface_hub 0.x's `huggingface-cli upload` (argparse, `nargs="*"`): a repeated flag
    replaces the earlier one there, so each flag is given once with all its patterns, after the positionals."""
    commands = []
    for includes, deletes in ((_first_patterns(), SYNCED_FOLDERS), (LAST_FILES, [])):
        args = ["huggingface-cli", "upload", repo_id, str(out_dir), ".", "--repo-type", "dataset"]
        if private:
            args.append("--private")
        if revision:
            args += ["--revision", revision]
        for flag, patterns in (("--include", includes), ("--exclude", IGNORE_PATTERNS), ("--delete", deletes)):
            if patterns:
                args += [flag, *patterns]
        commands.append(shlex.join(args))
    return commands


def hf_upload_command(repo_id: str, out_dir, private: bool = False, revision: str | None = None) -> str:
    """Both `hf upload` commands joined with `&&` (the order matters: the card goes last)."""
    return " && ".join(hf_upload_commands(repo_id, out_dir, private, revision))


def publish(out_dir, repo_id: str, *, private: bool = False, revision: str | None = None, dry_run: bool = False,
            token: str | None = None, endpoint: str | None = None, gating: bool = True, verify: str = "full"
            ) -> PublishResult:
    """Check ``out_dir`` and upload it to the dataset repo ``repo_id`` (see the module docstring).

    ``gating``: for data that is not free to use (non-commercial, research-only, undeclared), the card carries the
    Hub's access form and the repo's gate is switched on (``gated="auto"``); False (``--no-gating``) leaves both out.
    The folder's lock is held throughout: a build in progress there stops the publish in one line.
    """

    out = Path(out_dir).expanduser().resolve()
    check_repo_name(repo_id)
    if not out.is_dir():
        raise UsageError(f"{out_dir}: no such folder")
    with output_lock(out, command_breaks_locks=False):  # not while a build (or a card, a report) writes there
        return _publish(out, out_dir, repo_id, private=private, revision=revision, dry_run=dry_run, token=token,
                        endpoint=endpoint, gating=gating, verify=verify)


def _publish(out: Path, out_dir, repo_id: str, *, private: bool, revision: str | None, dry_run: bool,
             token: str | None, endpoint: str | None, gating: bool, verify: str) -> PublishResult:
    from huggingface_hub import HfApi, constants

    from facegen.cards.card import PLACEHOLDER_REPO, card_settings, write_card

    branch = revision or constants.DEFAULT_REVISION

    # 1. local checks: only what facegen wrote (one line, exit 2), then the folder's content (every problem, exit 1)
    check_files(out)
    info(f"checking {out} …" + (" (every image decoded)" if verify == "full" else " (images not decoded)"))
    problems = check_folder(out, verify)
    if problems:
        shown = problems[:PROBLEMS_SHOWN]
        more = f"\n  … and {len(problems) - PROBLEMS_SHOWN} more" if len(problems) > PROBLEMS_SHOWN else ""
        raise CheckFailed(f"refusing to publish {out_dir}: {count(len(problems), 'problem')}:\n  - "
                          + "\n  - ".join(shown) + more)

    token_value, token_source = resolve_token(token)
    if token_value is None and not dry_run:
        raise UsageError("no Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login`")

    # 2. the card names this repo and carries (or not) the access form (re-rendered from the same records; never
    #    on a dry run)
    readme = OutputFolder(out).readme
    settings = card_settings(out)
    named = PLACEHOLDER_REPO not in readme.read_text(encoding="utf-8") and settings.get("repo_id") == repo_id
    if not dry_run and (not named or settings.get("gating", True) != gating):
        write_card(out, repo_id=repo_id, gating=gating)
        info(f"README.md: loading examples name {repo_id}" + ("" if gating else "; no access form (--no-gating)"))
    from facegen.cards.card import expected_licence, needs_gating

    # what the card carries after this publish (a dry run leaves it as it is, so ask the inputs)
    gated = gating and needs_gating(expected_licence(out)[0])

    # 3. what goes where
    upload = files_to_upload(out)
    result = PublishResult(repo_id=repo_id, revision=branch, files=upload, dry_run=dry_run)
    hub = (endpoint or constants.ENDPOINT).rstrip("/")
    visibility = "private" if private else "public, unless the repo exists or its owner defaults to private"
    info(f"target: {hub}/datasets/{repo_id} (branch {branch}, {visibility}"
         + (", gated: users accept the terms first)" if gated else ")"))
    info(f"token: {token_source}")
    info(f"{count(len(upload), 'file')}, {result.total_bytes:,} bytes (README.md and _info.json last):")
    for f in upload:
        info(f"  {f.path}  ({f.size:,} bytes)")
    if dry_run:
        if gated:  # before any upload, or the research-only files are public until the gate goes on
            info("first create the repo and turn its gate on: python -c 'from huggingface_hub import HfApi; "
                 f"api = HfApi(); api.create_repo(\"{repo_id}\", repo_type=\"dataset\", exist_ok=True"
                 f"{', private=True' if private else ''}); "
                 f"api.update_repo_settings(\"{repo_id}\", gated=\"auto\", repo_type=\"dataset\")'")
        info("same upload with the hf CLI (huggingface_hub >= 1.0)" + (", after that" if gated else "") + ": "
             + hf_upload_command(repo_id, out_dir, private, revision))
        info("with huggingface_hub 0.x: " + " && ".join(legacy_upload_commands(repo_id, out_dir, private, revision)))
        info("dry run: nothing was uploaded")
        return result

    # 4. repository (and branch) and its gate, then the resumable uploads: data first, the card last
    api = HfApi(endpoint=endpoint, token=token_value)
    try:
        api.create_repo(repo_id, repo_type="dataset", exist_ok=True, private=private or None)
        if gated:  # before any data lands, so that nothing is downloadable without accepting the terms
            api.update_repo_settings(repo_id, gated="auto", repo_type="dataset")
        if branch != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=branch, repo_type="dataset", exist_ok=True)
        commit = None
        for step, (allow, deletes) in enumerate(((_first_patterns(), SYNCED_FOLDERS), (LAST_FILES, [])), 1):
            files = len(files_to_upload(out, allow))
            if not files and not deletes:
                continue
            # huggingface_hub >= 1.20 with hf_xet: a streamed pipeline of several commits, resumed by a rerun
            commit = api.upload_folder(
                repo_id=repo_id, repo_type="dataset", folder_path=str(out), revision=branch,
                allow_patterns=allow, ignore_patterns=list(IGNORE_PATTERNS), delete_patterns=deletes or None,
                commit_message=(f"facegen: dataset files ({files})" if step == 1 else "facegen: dataset card"),
            ) or commit
    except Exception as exc:  # HfHubHTTPError, network errors…: one masked line, and how to resume
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RemoteError(mask(f"upload to {repo_id} failed: {type(exc).__name__}: {message}; rerun the same "
                               "command to resume (files already committed are skipped)", token_value)) from None
    result.commit_url = getattr(commit, "commit_url", None)
    info(f"published: {hub}/datasets/{repo_id}" + (f" (commit {result.commit_url})" if result.commit_url else ""))
    return result
