"""A dataset card's YAML, read one way by everything that reads a card: ``--from-card``, the `facegen` source's
parent card (``facegen.published``), publish's checks, the card's own round trip, and recipes.

A card is input, never trusted: it may come from the Hub, from a stranger's folder, or be edited by hand. So:

- :func:`read_card_text`: at most :data:`MAX_CARD_BYTES` are read, and the text must be UTF-8 (one line, never a
  traceback, for anything else);
- :func:`load_yaml`: PyYAML's safe loader (plain data only: no Python objects), refusing every alias (``*name``)
  before anything is built. facegen writes no anchor or alias, and an alias is how a "billion laughs" card of a few kilobytes
  expands into gigabytes (measured: 2.9 GB from ``--from-card``); the YAML text itself is limited to
  :data:`MAX_YAML_BYTES`, and a nesting too deep for the parser is one line too;
- :func:`front_matter`: the YAML block as the Hub finds it (``huggingface_hub.repocard.REGEX_YAML_BLOCK``), parsed
  by :func:`load_yaml`, which must be a mapping; returns it with the Markdown text after it.

Every failure is a :class:`facegen.errors.UsageError` naming ``where`` (the card as the user named it).
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from facegen.errors import UsageError

MAX_CARD_BYTES = 16 << 20  # facegen's largest cards (200 shard rows, a curation list) are well under 1 MB
MAX_YAML_BYTES = 1 << 20  # the front matter of a facegen card is a few KB


# libyaml when PyYAML was built with it (10x faster on a large card); both are safe loaders: plain data only
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        return exc.problem + (f" (line {mark.line + 1})" if mark is not None else "")
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def load_yaml(text: str, where: str, what: str = "the YAML") -> Any:
    """``text`` parsed as plain YAML data, refusing aliases (see the module docstring): the events are read first,
    and an alias stops the read before anything is built from it."""
    if len(text.encode("utf-8", errors="replace")) > MAX_YAML_BYTES:
        raise UsageError(f"{where}: {what} is larger than {MAX_YAML_BYTES >> 20} MB: more than facegen "
                         "reads")
    try:
        for event in yaml.parse(text, Loader=_SAFE_LOADER):
            if isinstance(event, yaml.AliasEvent):
                raise UsageError(f"{where}: {what} holds an alias (*{event.anchor}, line "
                                 f"{event.start_mark.line + 1}); facegen reads none (they can expand a few lines "
                                 "into gigabytes)")
        return yaml.load(text, Loader=_SAFE_LOADER)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        raise UsageError(f"{where}: {what} does not parse ({_problem(exc)})") from None
    except RecursionError:
        raise UsageError(f"{where}: {what} is nested too deeply to read") from None


def read_card_text(path: str | os.PathLike, where: str | None = None) -> str:
    """A card file's text: at most :data:`MAX_CARD_BYTES`, UTF-8."""
    where = where or os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CARD_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {where}: {exc.strerror or exc}") from None
    if len(data) > MAX_CARD_BYTES:
        raise UsageError(f"{where} is larger than {MAX_CARD_BYTES >> 20} MB: not a dataset card facegen reads")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{where} is not UTF-8 text (byte {exc.start}): not a dataset card facegen reads") from None


def front_matter(text: str, where: str) -> tuple[dict, str]:
    """(the card's YAML metadata, the Markdown after it); a card without a YAML block has ``{}``."""
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    match = REGEX_YAML_BLOCK.search(text)
    if match is None:
        return {}, text
    data = load_yaml(match.group(2), where, "the YAML front matter")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"{where}: its YAML front matter is a {type(data).__name__}, not a mapping")
    return data, text[match.end():]
