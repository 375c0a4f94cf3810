"""The plugin contract, whole: what a source or transform subclasses, yields, raises and declares.

A third-party package imports only this module (and, for model code, ``facegen.generators``), subclasses
:class:`Source` or :class:`Transform` and registers the class under the entry-point group ``facegen.sources`` or
``facegen.transforms``. Nothing in facegen lists plugins by hand, and nothing after the run (cards, publish,
``--from-card``) asks for a plugin or option by name: it reads what the plugin declared here, as the build
recorded it in ``.facegen/run.json`` (:func:`declared_paths`):

- the records that flow: :class:`Identity` in, :class:`SourceImage`/:class:`Skip` from a source,
  :class:`IdentityResult` of :class:`Face`/:class:`Skip` from a transform; :class:`SampleError` for one unusable
  sample, :class:`UsageError` for the user's mistake (one line, exit 2);
- options (:class:`Option`), which of them set a Hub model's revision (``revision_of``, pinned by ``--from-card``
  to the card's commit), and which are local paths (``path=True``: the card shows a placeholder,
  ``--from-card`` never uses the card's value) or small rebuild inputs published under ``provenance/``
  (``provenance_file=NAME``: copied beside the card and handed back to the option by ``--from-card``);
- card metadata: licence (:class:`LicenseInfo`), citation, models (:class:`ModelInfo`), column descriptions
  (:meth:`Plugin.column_descriptions`), the transform's per-image quality fields (``Transform.quality_fields``);
- a source's published download (``Source.download_url`` and :class:`DownloadFile` entries);
- what a plugin tells the person running it: ``warn(line)`` (``facegen.messages``), never print or logging.

The records live in ``facegen.records``, the exceptions in ``facegen.errors``, the streamed file hash
(``sha256_file``, for a plugin that records a file it read) in ``facegen.fileio`` and the thread stage
(``run_ahead``, for a transform whose ``stream`` works ahead; ``stop_if_closed``, for long work on a stage's thread)
in ``facegen.streams`` (the run engine and the command
line use them too); they are re-exported here so that a plugin needs no other facegen module.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

from facegen.errors import SampleError, UsageError
from facegen.fileio import sha256_file
from facegen.layout import PROVENANCE_NAME, is_plugin_provenance, published_provenance
from facegen.messages import warn  # what a plugin tells the person running it: never print or logging
from facegen.records import Face, Identity, IdentityResult, SourceImage, Skip, printable_name
from facegen.streams import run_ahead, stop_if_closed

__all__ = [
    "CHANNEL_ORDERS", "DownloadFile", "ExpectedCounts", "Face", "Identity", "IdentityResult", "LicenseInfo",
    "ModelInfo", "Option", "Plugin",
    "SampleError", "Skip", "Source", "SourceImage", "Transform", "UsageError", "check_provenance_files",
    "declared_paths", "natural_key", "parse_options", "printable_name", "run_ahead", "sha256_file", "sniff_image",
    "stop_if_closed", "to_bool", "to_list", "warn",
]


def to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def to_list(value: Any) -> list[str]:
    """A comma-separated string (CLI) or a YAML list (recipe) -> list of strings."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def natural_key(name: str):
    """Sort key that puts 2 before 10 ("img2" < "img10"): the order sources list numbered folders and files in."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def sniff_image(data: bytes) -> str | None:
    """``jpg`` or ``png`` from an encoded image's first bytes, else None (a container that stores images without
    naming their format)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return None


@dataclass
class Option:
    """One ``k=v`` option of a plugin: default, converter (from the CLI's string or a recipe's YAML value), help.

    ``path=True`` declares a local file or folder: the card shows ``<placeholder>`` (default: ``<the file's
    name>``) instead of the value, relative values too, and ``--from-card`` never uses the card's value: the
    rebuild is given the path again, or leaves the option out when ``optional_on_rebuild`` (the plugin then does the
    same without it, e.g. loads the same models from the Hub at the card's revisions).

    ``provenance_file=NAME`` declares a small input the rebuild needs (implies ``path``): the card publishes the
    file the build read as ``provenance/NAME`` (while its sha256 is still the one the build recorded), the card's
    options name that copy, and ``--from-card`` hands the published copy back to the option.

    ``revision_of=HUB_ID`` declares the option that sets the revision of the Hub model ``HUB_ID`` (as
    ``ModelInfo.loaded["hub"]`` records it): ``--from-card`` sets it to the commit the card's build loaded, so
    that the rebuild loads the same weights.
    """

    default: Any
    help: str
    type: Callable[[Any], Any] = str
    choices: Sequence[Any] | None = None
    path: bool = False
    placeholder: str = ""
    optional_on_rebuild: bool = False
    provenance_file: str = ""
    revision_of: str = ""

    def __post_init__(self):
        if self.provenance_file:
            if not PROVENANCE_NAME.fullmatch(self.provenance_file):
                raise ValueError(f"provenance_file {self.provenance_file!r} must be a plain file name "
                                 "(letters, digits, '_', '.', '-'; no folder)")
            if not is_plugin_provenance(published_provenance(self.provenance_file)):
                raise ValueError(f"provenance_file {self.provenance_file!r} is one of facegen's own provenance files")
            self.path = True


def parse_options(spec: dict[str, Option], given: dict[str, Any], owner: str) -> dict[str, Any]:
    """Validate ``given`` against ``spec``; unknown names and bad values are a UsageError (one line)."""
    unknown = sorted(set(given) - set(spec))
    if unknown:
        known = ", ".join(sorted(spec)) or "none"
        raise UsageError(f"{owner}: unknown option {unknown[0]!r} (options: {known})")
    values = {}
    for name, option in spec.items():
        if name not in given:
            values[name] = option.default
            continue
        raw = given[name]
        try:
            value = raw if raw is None else option.type(raw)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{owner}: bad value {raw!r} for option {name!r}: {exc}") from None
        unset = value is None and option.default is None  # a card's `null` for an option left out
        if option.choices is not None and value not in option.choices and not unset:
            choices = ", ".join(map(str, option.choices))
            raise UsageError(f"{owner}: option {name!r} must be one of {choices}, got {raw!r}")
        values[name] = value
    return values


@dataclass
class ModelInfo:
    """A model a transform uses, for provenance and the card's licence chain."""

    id: str  # Hub id or a name
    revision: str | None = None
    role: str = ""  # what it does here, e.g. "UNet", "face detector"
    license: str = ""  # licence name as the owner states it
    license_link: str = ""
    citation: str = ""  # BibTeX
    note: str = ""  # e.g. "non-commercial research only"
    source: str = ""  # where it was actually loaded from in this run (path or hub id@revision); run.json only
    commercial_use: bool | None = None  # None: the card classifies the licence name and note
    # what setup() read (facegen.generators.weights.describe_loaded): {"hub", "commit"} or {"folder", "sha256"},
    # plus "test_model" for facegen's random test weights; empty when nothing was loaded in this run
    loaded: dict = field(default_factory=dict)


@dataclass
class LicenseInfo:
    """A licence as the card needs it. ``id`` is a Hub licence id (``mit``, ``cc0-1.0``, ``other``…)."""

    id: str
    name: str = ""  # license_name when id is "other"
    link: str = ""
    text: str = ""  # text for the LICENSE file (summary plus link when the full text is not ours to copy)
    commercial_use: bool = False
    note: str = ""


class Plugin:
    """Common to sources and transforms: a name, a one-line description, options and card metadata."""

    name: str = ""
    description: str = ""  # one line, shown by `facegen plugins`
    card_description: str = ""  # a paragraph for the dataset card
    homepage: str = ""
    citation: str = ""  # BibTeX
    license: LicenseInfo | None = None
    options: dict[str, Option] = {}
    columns: dict[str, str] = {}  # descriptions of the columns this plugin adds, e.g. {"json.part": "…"}

    def __init__(self, **options: Any):
        self.opts = parse_options(self.options, options, f"{self.kind} {self.name!r}")

    kind = "plugin"

    def column_descriptions(self) -> dict[str, str]:
        """What each column this plugin adds means, for the card's column table (``json.FIELD`` for a json field,
        the member name for an extra). Default: the ``columns`` mapping; override when they depend on options."""
        return dict(self.columns)

    def provenance(self) -> dict[str, Any]:
        """Facts for the card's provenance section (versions, command files…): JSON-serialisable."""
        return {}

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class ExpectedCounts:
    """What the publisher of a dataset states the complete set holds, and where it says so: a build that reads
    the whole source and finds other counts is warned about (a partial download, another release)."""

    identities: int | None = None  # None: not stated
    images: int | None = None
    stated_by: str = ""  # e.g. "the Vec2Face model card (huggingface.co/BooBooWu/Vec2Face)"


CHANNEL_ORDERS = ("rgb", "bgr")


@dataclass(frozen=True)
class DownloadFile:
    """One file of a source's published download: ``facegen download`` fetches ``Source.download_url + name`` and
    verifies it (size and sha256 where published, otherwise every zip member's CRC) before it gets its name."""

    name: str
    size: int | None = None
    sha256: str | None = None


class Source(Plugin):
    """A dataset layout: a cheap, stably ordered identity list and per-identity loading.

    Constructed in every process of a run with the same arguments; ``identities()`` must return the same list
    in each. ``load`` returns the identity's images in their natural order; an unreadable image becomes a
    :class:`Skip` (with its reason) instead of an exception.
    """

    kind = "source"
    image_format = "png"  # encoding of the images as stored
    synthetic: bool | None = None  # True: the images are generated (the card may call them synthetic); None: unknown
    needs_path = True  # False for sources that read no files (e.g. `seeds`): --source-path is then optional
    # what the card's licence table calls the data this source reads (default: the source's name)
    dataset_name = ""
    download_url = ""  # base URL of the published files (`facegen download`); a file's URL is this + its name
    download_files: Sequence[DownloadFile] = ()
    # what one identity of the plan is, for the card ("identity"; a verification set's rows are "pair"s)
    identity_noun = "identity"
    # channel order of the stored pixels when the source knows it (CHANNEL_ORDERS; None: not declared, the usual
    # RGB of PNG and JPEG files). "bgr" images are copied as they are and marked in each sample's json and the
    # card; only `--format png` converts them to RGB, losslessly. Transforms that decode the images refuse them.
    channels: str | None = None
    expected_counts: ExpectedCounts | None = None  # what the dataset's publisher states it holds

    def __init__(self, path: str | os.PathLike | None = None, **options: Any):
        super().__init__(**options)
        self.path = os.fspath(path) if path is not None else None
        if self.needs_path and (self.path is None or not os.path.exists(self.path)):
            raise UsageError(f"source {self.name!r}: path {self.path} does not exist")

    def identities(self) -> Sequence[str]:
        raise NotImplementedError

    def load(self, identity_id: str) -> list[SourceImage | Skip]:
        raise NotImplementedError

    def image_refs(self, identity_id: str) -> Sequence[str]:
        """One entry per item ``load`` returns (image or skip), in the same order, without reading the images.

        Per-image transforms (passthrough) plan the published shards from these counts and then read single
        images in a shuffled order. The default loads the identity (correct, but it reads everything once more):
        sources with an index or a file listing should override it, and ``load_images``.
        """
        return [item.ref for item in self.load(identity_id)]

    def load_images(self, identity_id: str, indices: Sequence[int]) -> list[SourceImage | Skip]:
        """The items at ``indices`` of ``load(identity_id)`` (positions in ``image_refs``), in that order."""
        items = self.load(identity_id)
        return [items[i] for i in indices]

    def json_features(self) -> dict[str, Any]:
        """``datasets`` features of the per-image ``meta`` fields this source adds to each sample's json."""
        return {}

    def extra_features(self) -> dict[str, Any]:
        """``datasets`` features of the extra tar members (field name -> feature) this source emits."""
        return {}


class Transform(Plugin):
    """Turns batches of identities into faces.

    ``setup(device)`` loads the models once per process; ``__call__`` takes up to ``batch_size`` identities and
    yields one :class:`IdentityResult` per identity, in input order. All randomness comes from ``identity.seed``.
    The run hands all of a process's batches to one :meth:`stream`, whose default calls ``__call__`` on each in
    turn; a transform that can work on the next batch while it finishes one (arc2face) overrides ``stream``.
    """

    kind = "transform"
    batch_size = 1  # identities per call
    # json fields of each face that are quality figures (e.g. a cosine to the prototype): the card summarises them
    # (mean, min, max) under Statistics
    quality_fields: Sequence[str] = ()
    synthetic = False  # True: the transform generates the output images (they are synthetic whatever the source)
    # True when the source's encoded bytes are written as they are (passthrough): the run then checks every source
    # image on its loading threads, beside the writer. Other transforms' images are checked when written.
    copies_source_images = False
    # True: each output face is made from one input image alone, at most one face per image, in the images'
    # order. The run then hands the transform identities holding one image each, in the published (shuffled)
    # order, and writes the published shards directly. False: whole identities, in units of --shard-size
    # identities, assembled into the published shards afterwards.
    per_image = False

    def models(self) -> list[ModelInfo]:
        return []

    def output_format(self, source: Source) -> str:
        """The image encoding used when ``--format`` is not given."""
        return "png"

    def json_features(self, source: Source) -> dict[str, Any]:
        """Features of the ``meta`` fields this transform adds to each sample's json."""
        return {}

    def extra_features(self, source: Source) -> dict[str, Any]:
        """Features of the extra tar members this transform's faces carry."""
        return {}

    def setup(self, device: Any) -> None:
        pass

    def __call__(self, batch: list[Identity]) -> Iterable[IdentityResult]:
        raise NotImplementedError

    def stream(self, batches: Iterable[list[Identity]]) -> Iterator[IdentityResult]:
        """One :class:`IdentityResult` per identity of ``batches``, in input order, each yielded as soon as it is
        complete.

        The run reads the batches ahead on one thread, iterates this on another and writes the results on a
        third, through bounded queues: while a result is checked, encoded and written, the stream goes on. An
        override may take batch n+1 (plan it, start generating it) before batch n's results are finished (e.g.
        post-processed on worker threads), as long as each result is what ``__call__`` on its batch gives: the
        batches are those the run would pass to ``__call__`` (cut per unit of work, so that the output does not
        depend on the number of processes), and a result must not depend on which batches share the stream.
        Threads it starts (``run_ahead`` is one such stage) must stop when the iterator is closed: a failure
        downstream or Ctrl-C closes it.
        """
        for batch in batches:
            yield from self(batch)


def declared_paths(plugin: Plugin) -> dict[str, dict[str, Any]]:
    """What the build records (in run.json) of ``plugin``'s path options, for the card, publish and ``--from-card``:
    ``{option: {"placeholder": text or "" (the value's file name), "optional_on_rebuild": bool,
    "provenance_file": "provenance/NAME" or None, "sha256": that file's sha256 in this build, or None}}``."""
    declared = {}
    for name, option in plugin.options.items():
        if not option.path:
            continue
        value = plugin.opts.get(name)
        published = published_provenance(option.provenance_file) if option.provenance_file else None
        local = os.path.expanduser(value) if published and isinstance(value, str) and value else None
        declared[name] = {
            "placeholder": option.placeholder,
            "optional_on_rebuild": option.optional_on_rebuild,
            "provenance_file": published,
            "sha256": sha256_file(local) if local and os.path.isfile(local) else None,
        }
    return declared


def check_provenance_files(*plugins: Plugin) -> None:
    """Refuse (one line) a build whose plugins declare the same provenance file: both would publish it."""
    owners: dict[str, str] = {}
    for plugin in plugins:
        for option in plugin.options.values():
            if option.provenance_file in owners:
                raise UsageError(f"{owners[option.provenance_file]} and {plugin.kind} {plugin.name!r} both publish "
                                 f"{published_provenance(option.provenance_file)}; they cannot be used together")
            if option.provenance_file:
                owners[option.provenance_file] = f"{plugin.kind} {plugin.name!r}"
