"""What of a build's records may be published: no local path leaves the machine, and the inputs needed to rebuild
(the identity list, and the files plugins declare, such as arc2face's shift Δ) travel as files under
``provenance/``.

``.facegen/run.json`` keeps absolute paths (it is never uploaded). Everything the card, LICENSE or ``_info.json``
shows goes through :func:`scrub` or :func:`public_options`: a local path becomes a placeholder such as
``<digiface source folder>`` or the name of a published provenance file. Which plugin options are paths is what the
plugins declared (``facegen.api.Option(path=…, provenance_file=…)``), as run.json records it: no option is known
here by its name.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

from facegen import hub_ids
from facegen.fileio import sha256_file, sorted_safetensors
from facegen.layout import IDENTITIES_FILE
from facegen.layout.records import PathOptionRecord, RunRecord

OUT_PLACEHOLDER = "NEW"
# run.json's option mappings, with the plugin record that declares their options
PLUGIN_OPTIONS = (("source_opts", "source"), ("plugin_opts", "transform"))
# an absolute POSIX path or a home-relative one, not part of a URL (`https://x/y`) or of a relative path (`a/b`)
ABSOLUTE_PATH = re.compile(r"(?<![\w/.~-])(?:~|/(?!/))[^\s\"'`()\[\]<>,;|]*")


def is_hub_dataset(path: str | None) -> bool:
    """A ``--source-path`` that named a Hub dataset (the `facegen` source: ``ORG/NAME``, ``hf://datasets/…``):
    public, and what a rebuild needs. run.json keeps a local path absolute, a Hub id as it was given."""
    return hub_ids.parse(path) is not None


def source_placeholder(run: RunRecord) -> str:
    """What the card writes for ``--source-path``: a Hub dataset id as it is, a local folder as a placeholder."""
    path = run.options.source_path
    if is_hub_dataset(path):
        return path
    return f"<{run.source.name} source folder>"


def _placeholder(path: str) -> str:
    name = os.path.basename(os.path.normpath(os.path.expanduser(path)))
    return f"<{name}>" if name and name not in (".", "/") else "<local path>"


def _looks_local(value: str) -> bool:
    if not value or "://" in value:
        return False
    expanded = os.path.expanduser(value)
    return os.path.isabs(expanded) or value.startswith(("./", "../")) or os.path.exists(expanded)


def scrub(value: Any, known: dict[str, str] | None = None) -> Any:
    """``value`` (str, list, dict) with every local path replaced: ``known`` paths by their placeholder, other
    absolute or home-relative paths by ``<their file name>``; the home folder never survives."""
    if isinstance(value, dict):
        return {k: scrub(v, known) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v, known) for v in value]
    if not isinstance(value, str):
        return value
    text = value
    for path, placeholder in sorted((known or {}).items(), key=lambda kv: -len(kv[0])):
        if path:
            text = text.replace(path, placeholder)
    text = ABSOLUTE_PATH.sub(lambda m: _placeholder(m.group(0)) if len(m.group(0)) > 1 else m.group(0), text)
    home = os.path.expanduser("~")
    if home not in ("/", "~") and home in text:
        text = text.replace(home, "~")
    return text


def path_options(run: RunRecord, kind: str) -> dict[str, PathOptionRecord]:
    """The options the ``kind`` plugin ("source" or "transform") declared as paths, as run.json records them
    (``facegen.api.declared_paths``)."""
    return (run.source if kind == "source" else run.transform).path_options


def _declared_files(run: RunRecord):
    """(option mapping, option, its value, declaration) of each path option given a value in this build (a
    declared provenance file is always ``provenance/NAME``: :class:`PathOptionRecord` checks it)."""
    for key, kind in PLUGIN_OPTIONS:
        values = run.options.source_opts if key == "source_opts" else run.options.plugin_opts
        for name, declared in path_options(run, kind).items():
            value = values.get(name)
            if isinstance(value, str) and value:
                yield key, name, value, declared


def local_values(run: RunRecord, out: Path | None = None) -> dict[str, str]:
    """Every value the build was given that names a local path, as run.json records it (relative ones as given) ->
    what the card writes instead: facegen's own ``--source-path``, ``--out``, ``--identities-file`` and a recipe
    file, and the plugins' declared path options (``facegen.api.Option(path=True)``); ``out``: the folder now."""
    o = run.options
    values = {}
    if o.source_path and not is_hub_dataset(o.source_path):
        values[o.source_path] = source_placeholder(run)
    if o.identities_file:
        values[o.identities_file] = IDENTITIES_FILE
    if o.recipe and is_recipe_file(o.recipe):
        values[o.recipe] = _placeholder(o.recipe)
    for key, kind in PLUGIN_OPTIONS:
        given = o.source_opts if key == "source_opts" else o.plugin_opts
        for name, declared in path_options(run, kind).items():
            value = given.get(name)
            if isinstance(value, str) and value:
                values[value] = declared_value(value, declared)
    for folder in (o.out, str(Path(out).resolve()) if out is not None else None):
        if folder:
            values[folder] = OUT_PLACEHOLDER
    return values


def is_recipe_file(recipe: str) -> bool:
    """A recorded ``--recipe`` that named a file (recorded absolute), not a built-in recipe's name."""
    return os.path.isabs(os.path.expanduser(recipe)) or "/" in recipe or recipe.endswith((".yaml", ".yml"))


def _names_path(token: str, value: str) -> bool:
    """Whether a command-line ``token`` names the recorded path ``value``: the same text or path, or, for a relative
    token and an absolute value (run.json keeps --source-path and --out absolute), the value's last components."""
    if token == value:
        return True
    mine, theirs = os.path.normpath(os.path.expanduser(token)), os.path.normpath(os.path.expanduser(value))
    if mine == theirs:
        return True
    if os.path.isabs(mine) or not os.path.isabs(theirs):
        return False
    tail = "/".join(part for part in mine.split("/") if part not in ("", ".", ".."))
    return bool(tail) and theirs.endswith("/" + tail)


def _path_values(command: list[str], pair_keys: set[str]) -> list[tuple[int, str]]:
    """(index, text before the value) of each argument of ``command`` that holds a path, as the facegen command's
    own click parameters declare it: the value of a ``click.Path`` option or argument, a recipe file given to
    ``--recipe``, and ``K=V`` whose ``K`` a plugin declared a path (``--plugin-opt model_dir=…``). `--recipe
    digiface` or `--seed 0` never names a folder, whatever the folders are called. A command this facegen does not
    have (an older run.json): every argument."""
    import click

    from facegen.cli import main

    command_def = main.commands.get(command[1]) if len(command) > 1 else None
    if command_def is None:
        return [(i, "") for i in range(2, len(command))]
    options = {name: p for p in command_def.params if isinstance(p, click.Option) for name in p.opts}
    arguments = iter(p for p in command_def.params if isinstance(p, click.Argument))
    found = []

    def value_at(i: int, prefix: str, param: click.Parameter | None) -> None:
        value = command[i][len(prefix):]
        key, eq, _ = value.partition("=")
        if param is not None and isinstance(param.type, click.Path):
            found.append((i, prefix))
        elif param is not None and param.name == "recipe" and is_recipe_file(value):
            found.append((i, prefix))
        elif eq and key in pair_keys:
            found.append((i, prefix + key + "="))

    i = 2
    while i < len(command):
        token = command[i]
        name, eq, _ = token.partition("=")
        option = options.get(name) if token.startswith("-") else None
        if option is not None and not option.is_flag and not option.count:
            if eq:
                value_at(i, name + "=", option)
            elif i + 1 < len(command):
                i += 1
                value_at(i, "", option)
        elif not token.startswith("-"):
            value_at(i, "", next(arguments, None))
        i += 1
    return found


def public_command_args(run: RunRecord, out: Path | None = None) -> list[str]:
    """The command as it was run (``run.command``), each argument that holds a path (:func:`_path_values`) and names
    a recorded local path (relative ones too) replaced by what the card writes instead, and any other absolute path
    by a placeholder (:func:`scrub`)."""
    values = local_values(run, out)
    pair_keys = set(path_options(run, "source")) | set(path_options(run, "transform"))
    args = list(run.command)
    for i, prefix in _path_values(args, pair_keys):
        text = args[i][len(prefix):]
        placeholder = next((shown for value, shown in values.items() if _names_path(text, value)), None)
        if placeholder is not None:
            args[i] = prefix + placeholder
    return scrub(args, known_paths(run, out))


def local_path_needles(run: RunRecord, out: Path) -> dict[str, str]:
    """What publish searches every text file it uploads for (text -> what it is): the absolute form of every local
    path the build recorded, the folder itself, the home folder, and each recorded value as given when it holds a
    folder separator (a single name, such as `data`, is ordinary text and the card's placeholders show it)."""
    needles = {}
    for value, placeholder in local_values(run, out).items():
        full = os.path.abspath(os.path.expanduser(value))
        if os.path.isabs(os.path.expanduser(value)):
            needles[full] = f"the local path shown as {placeholder}"
        elif "/" in os.path.normpath(value) and not os.path.normpath(value).startswith(".."):
            needles[os.path.normpath(value)] = f"the local path shown as {placeholder}"
    home = os.path.expanduser("~")
    if home not in ("/", "~"):
        needles[home] = "the home folder"
    return needles


def known_paths(run: RunRecord, out: Path | None = None) -> dict[str, str]:
    """The run's local paths (absolute, and a few as given) and what the card writes instead."""
    options = run.options
    known = {value: placeholder for value, placeholder in local_values(run, out).items()
             if os.path.isabs(os.path.expanduser(value))}
    if options.source_path and not is_hub_dataset(options.source_path):
        known[os.path.abspath(os.path.expanduser(options.source_path))] = source_placeholder(run)
        known[options.source_path] = source_placeholder(run)
    if options.identities_file:
        known[options.identities_file] = IDENTITIES_FILE
        known[os.path.abspath(options.identities_file)] = IDENTITIES_FILE
    for _, _, value, declared in _declared_files(run):
        if declared.provenance_file:
            known[value] = declared.provenance_file
            known[os.path.abspath(os.path.expanduser(value))] = declared.provenance_file
    return known


def declared_value(value: str, declared: PathOptionRecord) -> str:
    """What the card shows for a path option's value: its published provenance file, or its placeholder."""
    if declared.provenance_file:
        return declared.provenance_file
    return f"<{declared.placeholder}>" if declared.placeholder else _placeholder(value)


def public_options(run: RunRecord) -> dict:
    """The build options as the card may publish them: same keys, local paths replaced by placeholders."""
    options = dataclasses.asdict(run.options)
    if options["source_path"]:
        options["source_path"] = source_placeholder(run)
    if options["identities_file"]:
        options["identities_file"] = IDENTITIES_FILE
    del options["out"]  # the card's commands name it NEW
    if options["recipe"] and is_recipe_file(str(options["recipe"])):
        options["recipe"] = _placeholder(str(options["recipe"]))
    for key, _ in PLUGIN_OPTIONS:
        options[key] = {name: _placeholder(value) if isinstance(value, str) and _looks_local(value) else value
                        for name, value in options[key].items()}
    public = scrub(options, known_paths(run))
    for key, name, value, declared in _declared_files(run):  # after scrub, which must not rewrite them again
        public[key][name] = declared_value(value, declared)
    return public


def provenance_files(run: RunRecord) -> list[tuple[str, str, str | None]]:
    """(path in the dataset, local source path, expected sha256) of each small input needed to rebuild: the
    identity list, and the files the plugins declared (``Option(provenance_file=…)``) that this build read."""
    options = run.options
    files = []
    if options.identities_file:
        files.append((IDENTITIES_FILE, options.identities_file, options.identities_file_sha256))
    for _, _, value, declared in _declared_files(run):
        if declared.provenance_file:
            files.append((declared.provenance_file, value, declared.sha256))
    return files


def _publishable_copy(path: Path) -> bytes:
    """The file's bytes; a safetensors file's metadata (which may name local paths) is scrubbed, its tensors kept."""
    data = path.read_bytes()
    if path.suffix != ".safetensors":
        return data
    from safetensors.numpy import load, save

    try:
        import json
        import struct

        header_len = struct.unpack("<Q", data[:8])[0]
        metadata = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
        return sorted_safetensors(save(load(data), metadata=scrub(metadata)))
    except Exception:  # not readable as safetensors: the build read it, so publish it as it is
        return data


def published_hashes(run: RunRecord, out: Path) -> dict[str, str]:
    """The sha256 of each file the build read that is published under ``provenance/`` -> the sha256 of that
    published copy, where they differ (a safetensors file's metadata is scrubbed): what a plugin recorded of its
    input, the card shows of the file a reader can check."""
    hashes = {}
    for rel, _, sha in provenance_files(run):
        copy = out / rel
        if sha and copy.is_file():
            published = sha256_file(copy)
            if published != sha:
                hashes[sha] = published
    return hashes


def provenance_copies(out: Path, run: RunRecord) -> dict[str, bytes]:
    """The rebuild inputs to publish under ``OUT/provenance/``, by their path there: each file the build read that
    is still the one it used (same sha256), as published (:func:`_publishable_copy`). An input moved away since
    keeps the copy already published."""
    copies = {}
    for rel, local, sha in provenance_files(run):
        source = Path(os.path.expanduser(local))
        if source.is_file() and (sha is None or sha256_file(source) == sha):
            copies[rel] = _publishable_copy(source)
    return copies
