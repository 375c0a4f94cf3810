"""Render a build's dataset card: YAML (``huggingface_hub.DatasetCardData``) + text (Jinja2 templates).

The YAML declares ``configs`` (``data/train/*.tar``) and ``dataset_info`` (every column's feature and the split's
exact example count), so ``load_dataset(OUT)`` never infers a schema from the first shard and verifies the count.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import DatasetCardData

from facegen.card_yaml import front_matter
from facegen.cards.licenses import LicenceChain, licence_chain
from facegen.cards.loading import loading_context
from facegen.cards.preview import preview_grid
from facegen.cards.public import (
    OUT_PLACEHOLDER,
    PLUGIN_OPTIONS,
    known_paths,
    published_hashes,
    path_options,
    provenance_copies,
    public_command_args,
    public_options,
    scrub,
    source_placeholder,
)
from facegen.cards.quality import curation_context, quality_context
from facegen.cards.stats import Statistics, size_category, summarise
from facegen.errors import UsageError
from facegen.fileio import atomic_write
from facegen.layout import (
    CARD_FILES,
    CHECKSUMS_FILE,
    DATA_FILES,
    LICENSE,
    PREVIEW,
    README,
    OutputFolder,
)
from facegen.layout.records import (
    RunRecord,
    ShardChecksums,
    ShardStats,
    is_own_file,
    load_run,
    load_shard_stats,
    load_unit_stats,
    not_own_files,
    refuse_foreign_files,
    remove_own_file,
    write_own_files,
)
from facegen.messages import plural

TEMPLATES = Path(__file__).parent / "templates"
PLACEHOLDER_REPO = "ORG/NAME"
SHARD_CHECKSUMS_SHOWN = 200
# Tells a reader that facegen wrote this LICENSE (and re-renders it); facegen itself knows its files by their record.
LICENSE_MARKER = "This LICENSE file was written by facegen"


@dataclass
class CardFiles:
    """What a card render produces: README.md text, LICENSE text (None unless the licence is `other`), preview."""

    readme: str
    license: str | None
    preview: bytes | None
    card_data: DatasetCardData
    chain: LicenceChain
    statistics: Statistics
    run: RunRecord


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=False,  # Markdown, not HTML
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.Undefined,  # records of older builds may lack optional fields: render them empty
    )
    env.filters["cell"] = lambda v: str(v if v is not None else "").replace("|", "\\|").replace("\n", " ").strip()
    env.filters["plural"] = lambda word, n: plural(word, n)
    env.filters["num"] = lambda v: f"{v:,}" if isinstance(v, int) else f"{v:,.4g}" if isinstance(v, float) else v
    return env


def feature_type(feature: Any) -> str:
    """A short human-readable type of a `datasets` feature for the column table."""
    from datasets import Array2D, Array3D, ClassLabel, Image, List, Value

    if isinstance(feature, dict):
        return "struct"
    if isinstance(feature, Value):
        return "binary" if feature.dtype in ("binary", "large_binary") else feature.dtype
    if isinstance(feature, Image):
        return "image"
    if isinstance(feature, ClassLabel):
        return f"class label ({feature.num_classes})"
    if isinstance(feature, List):
        inner = feature_type(feature.feature)
        return f"list<{inner}>[{feature.length}]" if feature.length not in (None, -1) else f"list<{inner}>"
    if isinstance(feature, (Array2D, Array3D)) or hasattr(feature, "shape"):
        return f"{feature.dtype} array {tuple(feature.shape)}"
    return type(feature).__name__


def _columns(run: RunRecord, features) -> list[dict]:
    """Rows of the column table. Plugins describe their columns (``Plugin.column_descriptions()``, recorded as
    ``columns`` in their run record: ``{"json.part": "…", "landmarks.npy": "…"}``); other plugin columns get a
    generic line."""
    image_column = run.image_column
    noun = run.source.identity_noun or "identity"
    quality = set(run.quality_fields)
    source, transform = run.source, run.transform
    declared_by = f"declared by the {source.name} source or the {transform.name} transform"
    described = {}
    for record in (source, transform):
        described.update(record.columns)
    image_kind = {"png": "PNG", "jpg": "JPEG"}.get(image_column, image_column)
    known = {
        image_column: f"the face image ({image_kind})",
        "cls": f"integer {noun} label: the {noun}'s position in the build plan (0 … {_plural(noun)} − 1)",
        "json": "per-sample metadata (the fields below)",
        "json.identity": "the identity's id in the source dataset",
        "json.source": "the source plugin's name",
        "json.source_ref": "the source image (or seed) this sample was made from",
        "json.width": "width of the stored image in pixels (as decoded, before any EXIF orientation)",
        "json.height": "height of the stored image in pixels (as decoded, before any EXIF orientation)",
        "json.channels": "channel order of the stored pixels: rgb, or bgr (red and blue swapped, as the source "
                         "stores them)",
        "__key__": "sample key `{cls:06d}_{n:03d}` (identity label, image number)",
        "__url__": "the shard (tar file) the sample was read from",
    }

    def row(name, feature, quality_field=False):
        description = known.get(name) or described.get(name) or declared_by
        if quality_field:
            description += " (quality figure, summarised under Statistics)"
        return {"name": name, "type": feature_type(feature), "description": description}

    rows = []
    for name, feature in features.items():
        rows.append(row(name, feature))
        if name == "json" and isinstance(feature, dict):
            rows += [row(f"json.{field}", sub, field in quality) for field, sub in feature.items()]
    return rows


def _plural(noun: str) -> str:
    return "identities" if noun == "identity" else noun + "s"


def channels_text(run: RunRecord) -> str:
    """The card's statement of the stored images' channel order ("" when the source declared none)."""
    stored, declared = run.channels, run.source.channels
    if stored == "bgr":
        return ("BGR: red and blue are swapped, as the source stores them (`json.channels` is `bgr`); swap them back "
                "(`image[..., ::-1]`) before use, or rebuild with `--format png` to store RGB")
    if stored == "rgb" and declared == "bgr":
        return "RGB, converted from the source's BGR by `--format png` (lossless; counted under conversions)"
    return "RGB" if stored == "rgb" else ""


def expected_text(run: RunRecord) -> str:
    """What the dataset's publisher states it holds, as the card words it ("" when the source states nothing)."""
    expected = run.source.expected_counts
    if expected is None or (expected.identities is None and expected.images is None):
        return ""
    noun = run.source.identity_noun or "identity"
    parts = ([f"{expected.identities:,} {_plural(noun)}"] if expected.identities is not None else []) + (
        [f"{expected.images:,} images"] if expected.images is not None else [])
    return " and ".join(parts) + (f" ({expected.stated_by})" if expected.stated_by else "")


def _option_args(flag: str, options: dict) -> list[str]:
    args = []
    for name, value in options.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        args += [flag, f"{name}={value}"]
    return args


def rebuild_command(run: RunRecord, out: str = OUT_PLACEHOLDER) -> str:
    """The `facegen build` command with every option spelled out (the recipe's values included), local paths
    replaced by placeholders (``<digiface source folder>``) or the published provenance files."""
    o = public_options(run)
    args = ["facegen", "build", "--source", o["source"]]
    if o["source_path"]:
        args += ["--source-path", o["source_path"]]
    args += _option_args("--source-opt", o["source_opts"])
    args += ["--plugin", o["plugin"]]
    args += _option_args("--plugin-opt", o["plugin_opts"])
    for key, flag in (("limit_identities", "--limit-identities"), ("identities_file", "--identities-file"),
                      ("shard_size", "--shard-size"), ("shard_samples", "--shard-samples"),
                      ("shards_multiple_of", "--shards-multiple-of"), ("seed", "--seed"), ("format", "--format"),
                      ("verify", "--verify")):
        if o[key] is not None:
            args += [flag, str(o[key])]
    if o["strict"]:
        args.append("--strict")
    args += ["--out", out]
    return shlex.join(args)


def from_card_command(run: RunRecord, repo_id: str) -> str:
    """The short rebuild: options, plan and model revisions are read from the card; the local paths it used (other
    than the published provenance files) are given again."""
    args = ["facegen", "build", "--from-card", repo_id]
    if run.options.source_path:
        args += ["--source-path", source_placeholder(run)]
    public = public_options(run)
    for (key, kind), flag in zip(PLUGIN_OPTIONS, ("--source-opt", "--plugin-opt")):
        for name, declared in path_options(run, kind).items():
            value = public[key].get(name)
            if value and not declared.provenance_file:
                args += [flag, f"{name}={value}"]
    args += ["--out", OUT_PLACEHOLDER]
    return shlex.join(args)


def public_command(run: RunRecord, out: Path) -> str:
    """The command as it was run, with its local paths replaced (relative ones too)."""
    return shlex.join(public_command_args(run, out))


def _citations(run: RunRecord) -> list[dict]:
    """BibTeX entries of the source, the method (transform) and the models, each once."""
    entries, seen = [], set()

    def add(what: str, bibtex: str | None):
        text = (bibtex or "").strip()
        if text and text not in seen:
            seen.add(text)
            entries.append({"what": what, "bibtex": text})

    source, transform = run.source, run.transform
    add(f"source dataset: {source.name}", source.citation)
    add(f"method: {transform.name}", transform.citation)
    for model in transform.models:
        add(f"model: {scrub(model.id)}", model.citation)
    return entries


def _pretty_name(run: RunRecord) -> str:
    source, plugin = run.source.name, run.transform.name
    if run.transform.copies_source_images:  # the faces are the source's own images
        return f"{source} faces (facegen)"
    return f"{source} faces through {plugin} (facegen)"


def images_are_synthetic(run: RunRecord) -> bool:
    """Only when the transform generates the images or the source says its images are synthetic: a folder may
    hold photos of real people."""
    return bool(run.transform.synthetic or run.source.synthetic)


def gating_fields(chain: LicenceChain) -> dict:
    """`extra_gated_prompt`/`extra_gated_fields` (the Hub's access form) for data that is not free to use."""
    return {
        "extra_gated_prompt": (f"{chain.summary} Request access only if you accept every licence listed in the "
                               "card's Licence section (and in LICENSE)."),
        "extra_gated_fields": {
            "Name": "text",
            "Affiliation": "text",
            "Country": "country",
            "I will use this dataset for non-commercial research only": "checkbox",
            "I accept the licence of every input listed in the dataset card": "checkbox",
        },
    }


def needs_gating(chain: LicenceChain) -> bool:
    return not chain.commercial_use


def facegen_record(run: RunRecord, provenance: list[str]) -> dict:
    """The card's machine-readable `facegen:` YAML key: what `facegen build --from-card` needs to rebuild."""
    models = [{"id": scrub(m.id), "role": m.role, "revision": m.revision, "loaded": scrub(m.loaded)}
              for m in run.transform.models]
    return {
        "version": run.facegen_version,
        "options": {k: v for k, v in public_options(run).items() if v is not None},
        "plan": dataclasses.asdict(run.plan),
        "models": models,
        "provenance": provenance,
    }


def card_data(run: RunRecord, statistics: Statistics, chain: LicenceChain, *, num_bytes: int = 0,
              gated: bool = False, provenance: list[str] | None = None) -> DatasetCardData:
    """The card's YAML metadata."""
    from datasets import DatasetInfo, Features, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs

    source, plugin = run.source.name, run.transform.name
    tags = (["synthetic"] if images_are_synthetic(run) else []) + ["faces", "face-recognition", "webdataset", plugin]
    if source not in tags:
        tags.append(source)
    data = DatasetCardData(
        pretty_name=_pretty_name(run),
        license=chain.hub_id,
        license_name=chain.name,
        license_link=chain.link,
        task_categories=["image-classification", "image-feature-extraction"],
        tags=tags,
        size_categories=[size_category(statistics.images)],
    )
    if gated:
        for key, value in gating_fields(chain).items():
            setattr(data, key, value)
    # Declared features = the exact columns; the split's example count is checked by `load_dataset`.
    # num_bytes: the samples' bytes (tar payloads); datasets' own value would be the Arrow size, close to it.
    features = Features.from_dict(run.features)
    splits = SplitDict()
    splits.add(SplitInfo(name="train", num_examples=statistics.images, num_bytes=num_bytes))
    info = DatasetInfo(features=features, splits=splits, download_size=statistics.tar_bytes or None,
                       dataset_size=num_bytes or None)
    DatasetInfosDict({"default": info}).to_dataset_card_data(data)
    MetadataConfigs({"default": {"data_files": [{"split": "train", "path": DATA_FILES}]}}).to_dataset_card_data(data)
    data.facegen = facegen_record(run, provenance or [])
    return data


def card_settings(out: Path) -> dict:
    """What the last `facegen publish` / `facegen card` of this folder chose: {"repo_id", "gating"}."""
    path = OutputFolder(out).card_settings
    try:
        settings = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return settings if isinstance(settings, dict) else {}


def remembered_repo_id(out: Path) -> str | None:
    """The repo named by the last `facegen publish` / `facegen card --repo` of this folder."""
    return card_settings(out).get("repo_id")


def _repo_id(out: Path, repo_id: str | None) -> str | None:
    """The Hub repo of this folder: given, or remembered."""
    return repo_id or remembered_repo_id(out)


def remember_card_settings(out: Path, **settings) -> None:
    merged = {**card_settings(out), **{k: v for k, v in settings.items() if v is not None}}
    atomic_write(OutputFolder(out).card_settings, (json.dumps(merged) + "\n").encode())


def _models_for_card(run: RunRecord) -> list[dict]:
    """The models table: what was loaded (Hub id@commit, or a local folder's name and its files' sha256)."""
    rows = []
    for m in run.transform.models:
        loaded = scrub(m.loaded)
        if loaded.get("hub"):
            where = f"Hub `{loaded['hub']}@{loaded.get('commit', '?')}`"
        elif loaded.get("folder"):
            where = f"local folder `{loaded['folder']}` (sha256 of its weights below)"
        else:
            where = "not loaded in this run (nothing recorded)"
        rows.append({"id": scrub(m.id), "role": m.role, "where": where,
                     "requested": m.revision, "license": m.license,
                     "sha256": loaded.get("sha256") or {}, "test_model": loaded.get("test_model"),
                     "folder": loaded.get("folder")})
    return rows


def _checksums(shards: list[ShardStats]) -> ShardChecksums:
    return ShardChecksums("xxh3_128", {s.tar: s.tar_xxh3_128 for s in shards})


def render_card(out_dir, repo_id: str | None = None, gating: bool | None = None) -> CardFiles:
    """Everything the card consists of, from ``OUT/.facegen`` alone; writes nothing.

    ``gating``: add the Hub's access-request fields for data that is not free to use (default: the choice
    remembered from the last publish/card, else on); False leaves them out (``--no-gating``).
    """
    from datasets import Features

    out = Path(out_dir)
    run = load_run(out)
    shards = load_shard_stats(out)
    statistics = summarise(shards, load_unit_stats(out), run.plan.identities)
    chain = licence_chain(run)
    if gating is None:
        gating = card_settings(out).get("gating", True)
    gated = bool(gating) and needs_gating(chain)
    provenance = sorted(rel for rel, _, _ in _provenance_inputs(run) if is_own_file(out, rel))
    data = card_data(run, statistics, chain, num_bytes=sum(s.sample_bytes for s in shards), gated=gated,
                     provenance=provenance + [CHECKSUMS_FILE])
    features = Features.from_dict(run.features)
    repo = _repo_id(out, repo_id)
    tar_paths = [out / s.tar for s in shards if (out / s.tar).is_file()]
    preview = preview_grid(tar_paths, run.image_column, out=out)
    num_shards = len(shards)
    known = known_paths(run, out)
    provenance_facts = {**known, **published_hashes(run, out)}  # a provenance file's hash: the published copy's
    models = _models_for_card(run)
    context = {
        "card_data": data.to_yaml(),
        "pretty_name": data.pretty_name,
        "run": run,
        "options": public_options(run),
        "source": run.source,
        "transform": run.transform,
        "models": models,
        "random_weights": [m for m in models if m["test_model"]],
        "synthetic": images_are_synthetic(run),
        "gated": gated,
        "stats": statistics,
        "noun": run.source.identity_noun or "identity",
        "channels": channels_text(run),
        "expected": expected_text(run),
        "failures": scrub(statistics.failures, known),
        "totals": run.totals,
        "chain": chain,
        "columns": _columns(run, features),
        "extras": [name for name in features if name not in (run.image_column, "cls", "json", "__key__", "__url__")],
        "image_column": run.image_column,
        "repo_id": repo or PLACEHOLDER_REPO,
        "repo_known": repo is not None,
        "data_files": DATA_FILES,
        "layout_lengths": _lengths_text([s.images for s in shards]),
        "layout_mode": run.layout.mode,
        "loading": loading_context(run, [s.images for s in shards], statistics.image_sizes,
                                   repo or PLACEHOLDER_REPO),  # training on several ranks: steps, splitting rules
        "shards": shards[:SHARD_CHECKSUMS_SHOWN],
        "shards_hidden": max(0, num_shards - SHARD_CHECKSUMS_SHOWN),
        "has_preview": preview is not None,
        "command": public_command(run, out),
        "rebuild_command": rebuild_command(run),
        "from_card_command": from_card_command(run, repo or PLACEHOLDER_REPO),
        "provenance_files": provenance,
        "checksums_file": CHECKSUMS_FILE,
        "options_json": json.dumps(public_options(run), indent=2, sort_keys=True),
        "source_provenance_json": json.dumps(scrub(run.source.provenance, provenance_facts), indent=2,
                                             sort_keys=True),
        "transform_provenance_json": json.dumps(scrub(run.transform.provenance, provenance_facts), indent=2,
                                                sort_keys=True),
        "citations": _citations(run),
        "license_marker": LICENSE_MARKER,
        "quality": quality_context(out),  # `facegen report`
        "curation": curation_context(run),  # `facegen curate`
    }
    env = _environment()
    readme = env.get_template("README.md.j2").render(**context)
    front_matter(readme, "the rendered card")  # as every reader parses it: a card that does not is never written
    license_text = env.get_template("LICENSE.j2").render(**context) if chain.hub_id == "other" else None
    return CardFiles(readme=readme, license=license_text, preview=preview, card_data=data, chain=chain,
                     statistics=statistics, run=run)


def expected_licence(out_dir) -> tuple[LicenceChain, str | None]:
    """The licence the build's inputs imply and the LICENSE text the card writes for it (None unless `other`),
    without rendering the rest of the card."""
    run = load_run(Path(out_dir))
    chain = licence_chain(run)
    if chain.hub_id != "other":
        return chain, None
    text = _environment().get_template("LICENSE.j2").render(
        pretty_name=_pretty_name(run), run=run, chain=chain, license_marker=LICENSE_MARKER)
    return chain, text


def _provenance_inputs(run: RunRecord):
    from facegen.cards.public import provenance_files

    return provenance_files(run)


def _lengths_text(lengths: list[int]) -> str:
    """'1,000' or '999 to 1,000': how many samples the shards hold."""
    if not lengths:
        return "0"
    low, high = min(lengths), max(lengths)
    return f"{high:,}" if low == high else f"{low:,} to {high:,}"


def written_by_facegen(out, name: str) -> bool:
    """Whether ``OUT/name`` is exactly what facegen wrote (its record of its own files), so that facegen may replace
    or remove it."""
    return is_own_file(out, name)


def foreign_card_files(out, names=CARD_FILES) -> list[str]:
    """The card's file names (or ``names``) in OUT that hold files facegen did not write (the user's own, or edited
    since)."""
    return not_own_files(out, names)


def write_recorded(out, name: str, data: bytes) -> None:
    """Write ``OUT/name`` (``_info.json``: written by the build, outside the card), recorded as facegen's; a file
    there that facegen did not write is refused in one line, never replaced."""
    write_own_files(Path(out), {name: data}, what="the build's " + name)


def write_card(out_dir, repo_id: str | None = None, gating: bool | None = None) -> CardFiles:
    """Write OUT/README.md, OUT/LICENSE (when the licence is `other`), OUT/preview.jpg and OUT/provenance/ (the
    small inputs needed to rebuild, and the shards' checksums) from OUT/.facegen, each recorded as facegen's.

    A file under one of those names that facegen did not write (or that changed since) is never replaced or
    removed: the card is refused in one line naming it (UsageError) before anything is written, as is a folder
    facegen cannot write to.
    """
    out = Path(out_dir)
    run = load_run(out)
    inputs = provenance_copies(out, run)
    inputs[CHECKSUMS_FILE] = _checksums(load_shard_stats(out)).to_json()
    licence = LICENSE if expected_licence(out)[0].hub_id == "other" else None
    refuse_foreign_files(out, [*inputs, README, PREVIEW, *([licence] if licence else [])], "the dataset card")
    try:
        write_own_files(out, inputs, "the dataset card")  # first: the card lists the provenance files present
        files = render_card(out, repo_id, gating)
        new = {README: files.readme.encode("utf-8")}
        if files.license is not None:
            new[LICENSE] = files.license.encode("utf-8")
        if files.preview is not None:
            new[PREVIEW] = files.preview
        if repo_id or gating is not None:
            remember_card_settings(out, repo_id=repo_id, gating=gating)
        write_own_files(out, new, "the dataset card")
        for name in (LICENSE, PREVIEW):  # ours from an earlier render that has none now
            if name not in new:
                remove_own_file(out, name)
    except OSError as exc:
        raise UsageError(f"cannot write the dataset card in {out}: {exc.strerror or exc}") from None
    return files
