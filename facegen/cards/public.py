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
from facegen.fileio import atomic_write, sha256_file
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


def known_paths(run: RunRecord, out: Path | None = None) -> dict[str, str]:
    """The run's local paths and what the card writes instead."""
    options = run.options
    known = {}
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
    if out is not None:
        known[str(Path(out).resolve())] = OUT_PLACEHOLDER
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
    if options["recipe"] and _looks_local(str(options["recipe"])):
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
        return save(load(data), metadata=scrub(metadata))
    except Exception:  # not readable as safetensors: the build read it, so publish it as it is
        return data


def copy_provenance(out: Path, run: RunRecord) -> list[str]:
    """Copy the rebuild inputs under ``OUT/provenance/`` (only when the file is still the one the build used).
    Returns the provenance files present afterwards."""
    present = []
    for rel, local, sha in provenance_files(run):
        target = out / rel
        source = Path(os.path.expanduser(local))
        if source.is_file() and (sha is None or sha256_file(source) == sha):
            data = _publishable_copy(source)
            if not target.is_file() or target.read_bytes() != data:
                atomic_write(target, data)
        if target.is_file():
            present.append(rel)
    return present
