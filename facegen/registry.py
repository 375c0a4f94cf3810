"""Plugin discovery from the entry-point groups ``facegen.sources`` and ``facegen.transforms``.

Built-in plugins are registered in facegen's own pyproject exactly as a third-party package registers its own.
A plugin that fails to import is reported with its error and does not break the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from facegen.errors import UsageError

GROUPS = {"source": "facegen.sources", "transform": "facegen.transforms"}


@dataclass
class PluginEntry:
    name: str
    kind: str  # "source" | "transform"
    distribution: str
    entry_point: EntryPoint
    error: str | None = None
    _cls: type | None = None

    def load(self) -> type:
        if self._cls is None and self.error is None:
            try:
                self._cls = self.entry_point.load()
            except Exception as exc:  # any import failure of a third-party plugin must stay contained
                self.error = f"{type(exc).__name__}: {exc}"
        if self.error is not None:
            raise UsageError(f"{self.kind} plugin {self.name!r} ({self.distribution}) failed to load: {self.error}")
        return self._cls

    @property
    def description(self) -> str:
        try:
            return self.load().description
        except UsageError:
            return ""


def discover(kind: str) -> dict[str, PluginEntry]:
    """All plugins of one kind, by name. Nothing is imported until ``load``."""
    found: dict[str, PluginEntry] = {}
    for ep in entry_points(group=GROUPS[kind]):
        dist = ep.dist.name if ep.dist is not None else "?"
        if ep.name in found:
            # the same name from two distributions is ambiguous: keep the first, say so when it is used
            found[ep.name].error = found[ep.name].error or f"name also registered by {dist}"
            continue
        found[ep.name] = PluginEntry(ep.name, kind, dist, ep)
    return dict(sorted(found.items()))


def get(kind: str, name: str) -> type:
    """The plugin class ``name`` of ``kind``; an unknown name is a UsageError listing the available names."""
    plugins = discover(kind)
    if name not in plugins:
        available = ", ".join(plugins) or "none installed"
        raise UsageError(f"unknown {kind} plugin {name!r} (available: {available})")
    return plugins[name].load()


def get_source(name: str) -> type:
    return get("source", name)


def get_transform(name: str) -> type:
    return get("transform", name)
