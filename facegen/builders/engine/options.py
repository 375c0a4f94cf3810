"""Build options: the CLI's ``k=v`` pairs and recipes (YAML files holding the same options; the CLI overrides)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from importlib import resources
from typing import Any

from facegen.api import to_bool
from facegen.card_yaml import load_yaml
from facegen.errors import UsageError


@dataclass
class BuildConfig:
    source: str | None = None
    source_path: str | None = None
    source_opts: dict[str, Any] = field(default_factory=dict)
    plugin: str | None = None
    plugin_opts: dict[str, Any] = field(default_factory=dict)
    out: str | None = None
    recipe: str | None = None
    limit_identities: int | None = None
    identities_file: str | None = None
    shard_size: int = 100  # identities per unit of work
    shard_samples: int | None = None  # target samples per published shard (None: DEFAULT_SHARD_SAMPLES)
    shards_multiple_of: int | None = None  # shard count rounded up to a multiple of this (None: the default layout)
    seed: int = 0
    format: str | None = None
    strict: bool = False
    verify: str = "full"  # full: every image decoded once before it is written; header: PIL's cheap check only
    overwrite: bool = False
    break_lock: bool = False
    offers_break_lock: bool = False  # the command has --break-lock (`facegen build`): a busy folder's line names it
    command: list[str] = field(default_factory=list)
    # called with the transform's ModelInfo list once its models are loaded, before anything is generated (a
    # rebuild from a card checks them against the card's: facegen.builders.hub.from_card.models_check)
    check_models: Callable[[list], None] | None = None


RECIPE_KEYS = {f.name for f in fields(BuildConfig)} - {"out", "recipe", "overwrite", "break_lock", "offers_break_lock",
                                                       "command", "check_models"}
RECIPE_TYPES = {"shard_size": int, "shard_samples": int, "shards_multiple_of": int, "seed": int,
                "limit_identities": int, "strict": to_bool, "source": str, "plugin": str, "source_path": str,
                "identities_file": str, "format": str, "verify": str}


def parse_pairs(pairs: tuple[str, ...] | list[str], flag: str) -> dict[str, str]:
    """``("a=1", "b=x")`` -> ``{"a": "1", "b": "x"}``; a pair without ``=`` is a UsageError."""
    values = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"{flag} expects key=value, got {pair!r}")
        values[name.strip()] = value
    return values


def recipe_names() -> list[str]:
    folder = resources.files("facegen.builders.engine") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_file: str) -> dict[str, Any]:
    """A recipe by built-in name (``digiface``) or by path to a YAML file."""
    if os.path.isfile(name_or_file):
        where = name_or_file
        try:
            with open(name_or_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise UsageError(f"cannot read recipe {name_or_file}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise UsageError(f"recipe {name_or_file} is not UTF-8 text (byte {exc.start}): save it as UTF-8") \
                from None
    else:
        candidate = resources.files("facegen.builders.engine") / "recipes" / f"{name_or_file}.yaml"
        if not candidate.is_file():
            raise UsageError(
                f"unknown recipe {name_or_file!r}: not a file, and not a built-in recipe "
                f"(built-in: {', '.join(recipe_names()) or 'none'})"
            )
        text = candidate.read_text(encoding="utf-8")
        where = f"built-in recipe {name_or_file}"
    data = load_yaml(text, where, "the recipe") or {}  # one line for bad YAML; aliases refused as in a card
    if not isinstance(data, dict):
        raise UsageError(f"{where} must be a YAML mapping of build options")
    if not all(isinstance(k, str) for k in data):
        raise UsageError(f"{where}: option names must be strings")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - RECIPE_KEYS)
    if unknown:
        raise UsageError(f"{where}: unknown option {unknown[0]!r} (options: {', '.join(sorted(RECIPE_KEYS))})")
    for key in ("source_opts", "plugin_opts"):
        if data.get(key) is None:
            data[key] = {}
        if not isinstance(data[key], dict):
            raise UsageError(f"{where}: {key} must be a mapping")
    for key, convert in RECIPE_TYPES.items():  # YAML may hold "2" or "no" where the CLI would give 2 or False
        if data.get(key) is not None:
            try:
                data[key] = convert(data[key])
            except (TypeError, ValueError):
                raise UsageError(f"{where}: bad value {data[key]!r} for {key}") from None
    return data


def merge_recipe(recipe: dict[str, Any], cli: dict[str, Any]) -> dict[str, Any]:
    """Recipe values, overridden by every CLI value that was given (option dicts are merged key by key)."""
    merged = dict(recipe)
    for key, value in cli.items():
        if key in ("source_opts", "plugin_opts"):
            merged[key] = {**recipe.get(key, {}), **value}
        elif value is not None:
            merged[key] = value
    return merged
