"""The units that flow through a run: source images in, faces out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SourceImage:
    """One image as a source stores it.

    ``data`` are the encoded bytes exactly as stored (so a passthrough can copy them), ``ext`` their encoding
    (``png``/``jpg``). ``meta`` becomes part of the sample's json (fields declared by the source's
    ``json_features``), ``extras`` become extra tar members (field name -> value, declared by ``extra_features``),
    ``hints`` are handed to transforms but never written (e.g. a DisCo embedding, SFHQ landmarks for alignment).
    """

    ref: str
    data: bytes
    ext: str
    meta: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    hints: dict[str, Any] = field(default_factory=dict)
    changes: list[str] = field(default_factory=list)  # what the source did to the stored file ("resized to 256 px")


@dataclass
class Skip:
    """A sample that was not written, and why (counted in the shard stats and the card)."""

    ref: str
    reason: str  # a short category, counted in the stats ("corrupt image", "no face detected")
    detail: str = ""  # the specific error, kept in the stats' failure list


@dataclass
class Identity:
    """One identity of the plan: its source id, its label (plan position) and its seed."""

    id: str
    cls: int
    seed: int
    images: list[SourceImage] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)


@dataclass
class Face:
    """One output sample of a transform.

    ``image`` is encoded bytes (with ``ext``), a PIL image, or an HxWx3 uint8 RGB array; the shard writer encodes
    it to the run's format only when needed. ``meta`` joins the sample json (transform parameters, quality figures),
    ``extras`` are extra tar members (field name -> value).
    """

    image: Any
    ext: str | None = None
    ref: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    changes: list[str] = field(default_factory=list)  # re-encodes already done to a source's image, for the card


@dataclass
class IdentityResult:
    """What a transform made of one identity, in the order the faces are to be written."""

    identity: Identity
    faces: list[Face] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)


def printable_name(name: str) -> str:
    """A file name as text that can be written anywhere: bytes that are not UTF-8 (which ``os.listdir`` returns
    as surrogate escapes, and which no UTF-8 json can hold) are shown as ``\\xNN``."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        pass
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name gave
        return name.encode("utf-8", "backslashreplace").decode("utf-8")
