"""`facegen build --from-card PATH_OR_REPO`: rebuild a published facegen dataset from its own card, and say whether
the rebuild is the same.

What a card carries (see ``facegen.cards.card.facegen_record``): the build options with local paths replaced by
placeholders, the plan's sha256, the models as they were loaded (Hub commit, or a folder name and each weight file's
sha256), and the list of published ``provenance/`` files (the identity list, the files plugins declared such as the
shift Δ, the shards' checksums). A local build folder with ``.facegen/run.json`` is read from that record instead
(it holds the same, unscrubbed).

A card's value for an option the plugin declared a path (``facegen.api.Option(path=True)``) is never used: the
rebuild gets the published copy (``provenance_file``), the path given again on the command line, or leaves the
option out (``optional_on_rebuild``); the plugin is asked through the registry, never known here by name.

After the rebuild, :func:`compare` reports in one line what differs: the plan (the source's identities), a model, or
the shards' bytes (the source files, or a GPU's float16 arithmetic).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facegen import hub_ids, registry
from facegen.card_yaml import MAX_CARD_BYTES, front_matter, read_card_text
from facegen.errors import CheckFailed, RemoteError, UsageError, server_failed
from facegen.hub_ids import dataset_id
from facegen.layout import CHECKSUMS_FILE, IDENTITIES_FILE, README, OutputFolder, published_provenance
from facegen.layout.records import (
    CardBuild,
    RecordError,
    RunRecord,
    ShardChecksums,
    load_run,
    load_shard_stats,
)
from facegen.messages import count

REBUILT_OPTIONS = ("source", "source_path", "source_opts", "plugin", "plugin_opts", "limit_identities",
                   "identities_file", "shard_size", "shard_samples", "shards_multiple_of", "seed", "format", "strict",
                   "verify")


@dataclass
class CardRecord:
    """What a card (or a build's run.json) says about the build that made it."""

    where: str  # the card as the user named it
    options: dict[str, Any]
    plan: dict[str, Any] = field(default_factory=dict)
    models: list[dict] = field(default_factory=list)
    checksums: dict[str, str] = field(default_factory=dict)  # shard path -> XXH3-128
    files: dict[str, str] = field(default_factory=dict)  # provenance path -> local file
    local: bool = False  # a build's own run.json on this machine: its paths are this machine's, not placeholders


def _is_placeholder(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("<") and value.endswith(">")


def _card_build(text: str, where: str) -> CardBuild:
    """The card's ``facegen:`` record, checked by type and range (:class:`CardBuild`) before anything runs."""
    meta, _ = front_matter(text, where)
    if not isinstance(meta.get("facegen"), dict):
        raise UsageError(f"{where} is not the card of a facegen build (no `facegen:` options in its YAML)")
    try:
        return CardBuild.from_dict(meta["facegen"])
    except RecordError as exc:
        raise UsageError(f"{where}: the card's facegen record is not valid: {exc}") from None


def _record_of(card: CardBuild, where: str) -> CardRecord:
    options = {k: v for k, v in dataclasses.asdict(card.options).items() if v is not None}
    return CardRecord(where, options, dataclasses.asdict(card.plan) if card.plan else {},
                      [dataclasses.asdict(m) for m in card.models])


def _checksums_file(path: Path, where: str) -> dict[str, str]:
    """The shards' checksums published beside a card (checked: shard paths to XXH3-128), or one line."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CARD_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {where}: {exc.strerror or exc}") from None
    if len(data) > MAX_CARD_BYTES:
        raise UsageError(f"{where} is larger than {MAX_CARD_BYTES >> 20} MB: not a facegen checksums file")
    try:
        return dict(ShardChecksums.parse(data, where).files)
    except RecordError as exc:
        raise UsageError(f"{where} is not a facegen checksums file: {exc}") from None


def _beside(folder: Path, rel: str) -> Path | None:
    """A provenance file published beside a card, when it is a regular file inside the card's folder."""
    path = folder / rel
    if path.is_symlink() or not path.is_file():
        return None
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:  # a folder on the way is a link out of the dataset
        return None
    return path


def _from_folder(folder: Path, where: str) -> CardRecord:
    run_path = OutputFolder(folder).run_json
    if run_path.is_file():  # the build's own record on this machine: same facts, paths unscrubbed
        run = load_run(folder)
        record = CardRecord(where, dataclasses.asdict(run.options), dataclasses.asdict(run.plan),
                            [dataclasses.asdict(m) for m in run.transform.models], local=True)
        record.checksums = {s.tar: s.tar_xxh3_128 for s in load_shard_stats(folder)}
        for rel, local, _ in _provenance(run):
            copy = _beside(folder, rel)
            if not Path(os.path.expanduser(local)).is_file() and copy is not None:
                record.files[rel] = str(copy)  # the original moved away: the published copy
        if IDENTITIES_FILE in record.files:
            record.options["identities_file"] = record.files[IDENTITIES_FILE]
        return record
    readme = OutputFolder(folder).readme
    if not readme.is_file():
        raise UsageError(f"{where} holds neither .facegen/run.json nor README.md: not a facegen dataset")
    return _from_card_file(readme, where)


def _from_card_file(readme: Path, where: str) -> CardRecord:
    """The record in a card's YAML, with the provenance files it lists that lie beside it."""
    folder = readme.parent
    card = _card_build(read_card_text(readme, where), where)
    record = _record_of(card, where)
    for rel in card.provenance:
        copy = _beside(folder, rel)
        if copy is not None:
            record.files[rel] = str(copy)
    checksums = _beside(folder, CHECKSUMS_FILE)
    if checksums is not None:
        record.checksums = _checksums_file(checksums, f"{where}: {CHECKSUMS_FILE}")
    return record


def _provenance(run: RunRecord):
    from facegen.cards.public import provenance_files

    return provenance_files(run)


def _from_repo(repo_id: str, revision: str | None) -> CardRecord:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    def download(name: str) -> str:
        try:
            return hf_hub_download(repo_id, name, repo_type="dataset", revision=revision)
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            kind = RemoteError if server_failed(exc) else UsageError  # the Hub failing; else no network or no file
            raise kind(f"cannot read {name} of the dataset {repo_id} on the Hub: {first}") from None

    card = _card_build(read_card_text(download(README), repo_id), repo_id)
    record = _record_of(card, repo_id)
    for rel in card.provenance:  # names checked by CardBuild: facegen's provenance files, or provenance/NAME
        record.files[rel] = download(rel)
    if CHECKSUMS_FILE in record.files:
        record.checksums = _checksums_file(Path(record.files[CHECKSUMS_FILE]), f"{repo_id}: {CHECKSUMS_FILE}")
    return record


def read_card(spec: str, revision: str | None = None) -> CardRecord:
    """A card given as a build folder, a README.md file, or a Hub dataset repo id."""
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        return _from_folder(path, spec)
    if path.is_file():
        return _from_card_file(path, spec)
    hub = dataset_id(spec)
    if hub is not None:
        return _from_repo(hub.repo_id, hub.revision or revision)
    raise UsageError(f"--from-card {spec}: no such folder or file (a build folder, its README.md, or a Hub dataset "
                     "id ORG/NAME)")


def build_values(record: CardRecord, given: dict[str, Any]) -> dict[str, Any]:
    """The build options: the card's, overridden by what the command line gives (option dicts key by key).

    A card never chooses a local path or a file to read: a source folder is given again (only a Hub dataset id
    the card names is used as it is), the identity list is the copy published beside the card, a plugin's path
    option gets its published copy, is left out (``optional_on_rebuild``) or is given again. A model the card's
    build loaded from the Hub is pinned to that commit through the option its plugin declares for it
    (``facegen.api.Option(revision_of=…)``). The build's own run.json on this machine (``record.local``) keeps its
    paths."""
    values = {k: record.options.get(k) for k in REBUILT_OPTIONS}
    for key, value in given.items():
        if key in ("source_opts", "plugin_opts"):
            values[key] = {**(values.get(key) or {}), **(value or {})}
        elif value is not None:
            values[key] = value
    if not record.local:
        _card_paths(record, values, given)
    pins = {m["loaded"]["hub"]: m["loaded"]["commit"] for m in record.models
            if (m.get("loaded") or {}).get("hub") and (m.get("loaded") or {}).get("commit")}
    for key, kind, plugin, flag in (("source_opts", "source", "source", "--source-opt"),
                                    ("plugin_opts", "transform", "plugin", "--plugin-opt")):
        opts = dict(values.get(key) or {})
        given_names = set(given.get(key) or {})
        declared = _declared_options(kind, values.get(plugin))
        for name, option in declared.items():
            if option.revision_of in pins and name not in given_names:
                opts[name] = pins[option.revision_of]  # the commit the card's build loaded
        for name, value in list(opts.items()):
            option = declared.get(name)
            if name in given_names or value in (None, "") or (option is not None and not option.path):
                continue
            published = published_provenance(option.provenance_file) if option and option.provenance_file else None
            if published and published in record.files:
                opts[name] = record.files[published]  # the copy published with the card
            elif record.local:
                continue  # the build's own run.json on this machine: the path it used
            elif option is not None and option.optional_on_rebuild:
                opts.pop(name)  # the plugin does the same without it (e.g. the models from the Hub)
            elif option is not None or _is_placeholder(value):
                shown = f" ({value})" if _is_placeholder(value) else ""
                raise UsageError(f"the card's build used a local file for {name}{shown}: pass {flag} {name}=PATH")
        values[key] = opts
    return {k: v for k, v in values.items() if v is not None}


def _card_paths(record: CardRecord, values: dict[str, Any], given: dict[str, Any]) -> None:
    """--source-path and --identities-file of a rebuild from a card: given, or what the card publishes."""
    source_path = values.get("source_path")
    if given.get("source_path") is None and source_path is not None and hub_ids.parse(source_path) is None:
        shown = source_path if _is_placeholder(source_path) else "a local folder"
        raise UsageError(f"the card's build read {shown}: pass --source-path with your copy")
    if given.get("identities_file") is None and values.get("identities_file") is not None:
        if IDENTITIES_FILE not in record.files:
            raise UsageError(f"the card's build used an identity list that is not published with the card "
                             f"({IDENTITIES_FILE}): pass --identities-file")
        values["identities_file"] = record.files[IDENTITIES_FILE]


def _declared_options(kind: str, name: str | None) -> dict:
    """The options the card's ``kind`` plugin declares (which are local paths, which pin a model's revision)."""
    if not name:
        return {}
    return dict(registry.get(kind, name).options)


def _loaded_key(model: dict) -> tuple:
    from facegen.cards.public import scrub

    return scrub(model.get("id")), model.get("role")


def _model_difference(card: dict, rebuilt: dict) -> str | None:
    """How a model loaded now differs from the card's (None when it is the same)."""
    was, now = card.get("loaded") or {}, rebuilt.get("loaded") or {}
    if not was or not now:
        return None  # nothing recorded on one side: the shards' checksums still speak
    if was.get("hub") or now.get("hub"):
        if (was.get("hub"), was.get("commit")) != (now.get("hub"), now.get("commit")):
            before = f"{was['hub']}@{was.get('commit')}" if was.get("hub") else f"folder {was.get('folder')}"
            after = f"{now['hub']}@{now.get('commit')}" if now.get("hub") else f"folder {now.get('folder')}"
            return f"model {card.get('id')} was {before}, now {after}"
        return None
    for name in sorted(set(was.get("sha256") or {}) | set(now.get("sha256") or {})):
        a, b = (was.get("sha256") or {}).get(name), (now.get("sha256") or {}).get(name)
        if a != b:
            return (f"model {card.get('id')}: {name} has sha256 {str(b)[:12]}… here, {str(a)[:12]}… in the card")
    return None


def models_check(record: CardRecord) -> Callable[[list], None]:
    """What the build calls once the transform's models are loaded, before it generates anything
    (``BuildConfig.check_models``): a model loaded now that differs from the card's (another Hub commit, a local
    folder whose files have other sha256) stops the rebuild in one line."""

    def check(models: list) -> None:
        now = {_loaded_key({"id": m.id, "role": m.role}): {"loaded": m.loaded} for m in models}
        for model in record.models:
            difference = _model_difference(model, now.get(_loaded_key(model), {}))
            if difference:
                raise CheckFailed(f"rebuild of {record.where} stopped before generating anything: {difference}")

    return check


def compare(record: CardRecord, out: Path) -> tuple[bool, str]:
    """(same, one line): the rebuild in ``out`` against the card."""
    run = load_run(out)
    plan_was, plan_now = record.plan.get("plan_sha256"), run.plan.plan_sha256
    if plan_was and plan_was != plan_now:
        return False, (f"the source's identities differ: the plan has {count(run.plan.identities, 'identity')}, "
                       f"sha256 {str(plan_now)[:12]}…; the card's has {record.plan.get('identities')}, "
                       f"{plan_was[:12]}… (another source folder or source version?)")
    now_models = {_loaded_key(m): m for m in map(dataclasses.asdict, run.transform.models)}
    for model in record.models:
        difference = _model_difference(model, now_models.get(_loaded_key(model), {}))
        if difference:
            return False, difference
    shards = {s.tar: s.tar_xxh3_128 for s in load_shard_stats(out)}
    if not record.checksums:
        return True, f"rebuilt {count(len(shards), 'shard')}; the card lists no checksums to compare with"
    differ = sorted(p for p in set(shards) | set(record.checksums) if shards.get(p) != record.checksums.get(p))
    if differ:
        cause = ("the source files differ (the models and the plan are the same), or the build ran on a GPU in "
                 "float16, which matches only within numeric tolerance")
        return False, (f"{len(differ)} of {count(len(record.checksums), 'shard')} "
                       f"{'differs' if len(differ) == 1 else 'differ'} from the card ({differ[0]} first): {cause}")
    return True, (f"all {count(len(shards), 'shard')} {'is' if len(shards) == 1 else 'are'} byte-identical to the "
                  "card's")
