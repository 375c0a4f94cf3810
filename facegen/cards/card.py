"""Render a build's dataset card: YAML (``huggingface_hub.DatasetCardData``) + text (Jinja2 templates).

The YAML declares ``configs`` (``data/train/*.tar``) and ``dataset_info`` (every column's feature and the split's
exact example count), so ``load_dataset(OUT)`` never infers a schema from the first shard and verifies the count.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import DatasetCard, DatasetCardData

from facegen.cards.licenses import LicenceChain, licence_chain
from facegen.cards.preview import preview_grid
from facegen.cards.quality import curation_context, quality_context
from facegen.cards.stats import Statistics, load_run, load_shard_stats, size_category, summarise

TEMPLATES = Path(__file__).parent / "templates"
DATA_FILES = "data/train/*.tar"
PLACEHOLDER_REPO = "ORG/NAME"
SHARD_CHECKSUMS_SHOWN = 200
# Marks a LICENSE file written by facegen, so that a re-render may replace or remove it (never a user's own file).
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
    run: dict


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


def _columns(run: dict, features) -> list[dict]:
    """Rows of the column table. Plugins may describe their columns with a ``columns`` mapping
    (``{"json.part": "…", "landmarks.npy": "…"}``) in their run record or their ``provenance()``; other plugin
    columns get a generic line."""
    image_column = run.get("image_column", "png")
    quality = set(run.get("quality_fields") or [])
    source = run.get("source") or {}
    transform = run.get("transform") or {}
    declared_by = f"declared by the {source.get('name', '?')} source or the {transform.get('name', '?')} transform"
    described = {}
    for record in (source, transform):  # a plugin may put them in its provenance() or its record
        described.update((record.get("provenance") or {}).get("columns") or {})
        described.update(record.get("columns") or {})
    image_kind = {"png": "PNG", "jpg": "JPEG"}.get(image_column, image_column)
    known = {
        image_column: f"the face image ({image_kind})",
        "cls": "integer identity label: the identity's position in the build plan (0 … identities − 1)",
        "json": "per-sample metadata (the fields below)",
        "json.identity": "the identity's id in the source dataset",
        "json.source": "the source plugin's name",
        "json.source_ref": "the source image (or seed) this sample was made from",
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


def _option_args(flag: str, options: dict) -> list[str]:
    args = []
    for name, value in (options or {}).items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        args += [flag, f"{name}={value}"]
    return args


def rebuild_command(run: dict, out: str = "OUT") -> str:
    """The `facegen build` command with every option spelled out (the recipe's values included)."""
    o = run.get("options", {})
    args = ["facegen", "build", "--source", o.get("source", "?")]
    if o.get("source_path"):
        args += ["--source-path", o["source_path"]]
    args += _option_args("--source-opt", o.get("source_opts"))
    args += ["--plugin", o.get("plugin", "?")]
    args += _option_args("--plugin-opt", o.get("plugin_opts"))
    for key, flag in (("limit_identities", "--limit-identities"), ("identities_file", "--identities-file"),
                      ("shard_size", "--shard-size"), ("seed", "--seed"), ("format", "--format")):
        if o.get(key) is not None:
            args += [flag, str(o[key])]
    if o.get("strict"):
        args.append("--strict")
    args += ["--out", out]
    return shlex.join(args)


def _citations(run: dict) -> list[dict]:
    """BibTeX entries of the source, the method (transform) and the models, each once."""
    entries, seen = [], set()

    def add(what: str, bibtex: str | None):
        text = (bibtex or "").strip()
        if text and text not in seen:
            seen.add(text)
            entries.append({"what": what, "bibtex": text})

    source = run.get("source") or {}
    transform = run.get("transform") or {}
    add(f"source dataset: {source.get('name', '?')}", source.get("citation"))
    add(f"method: {transform.get('name', '?')}", transform.get("citation"))
    for model in transform.get("models") or []:
        add(f"model: {model.get('id', '?')}", model.get("citation"))
    return entries


def _pretty_name(run: dict) -> str:
    source = (run.get("source") or {}).get("name") or run.get("options", {}).get("source", "?")
    plugin = (run.get("transform") or {}).get("name") or run.get("options", {}).get("plugin", "?")
    if plugin == "passthrough":
        return f"{source} faces (facegen)"
    return f"{source} faces through {plugin} (facegen)"


def card_data(run: dict, statistics: Statistics, chain: LicenceChain) -> DatasetCardData:
    """The card's YAML metadata."""
    from datasets import DatasetInfo, Features, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs

    source = (run.get("source") or {}).get("name") or run["options"]["source"]
    plugin = (run.get("transform") or {}).get("name") or run["options"]["plugin"]
    tags = ["synthetic", "faces", "face-recognition", "webdataset", plugin]
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
        source_datasets=[f"extended|{source}"],
    )
    # Declared features = the exact columns; the split's example count is checked by `load_dataset`.
    features = Features.from_dict(run["features"])
    splits = SplitDict()
    splits.add(SplitInfo(name="train", num_examples=statistics.images, num_bytes=0))
    info = DatasetInfo(features=features, splits=splits, download_size=statistics.tar_bytes or None)
    DatasetInfosDict({"default": info}).to_dataset_card_data(data)
    MetadataConfigs({"default": {"data_files": [{"split": "train", "path": DATA_FILES}]}}).to_dataset_card_data(data)
    return data


def remembered_repo_id(out: Path) -> str | None:
    """The repo named by the last `facegen publish` / `facegen card --repo` of this folder."""
    path = Path(out) / ".facegen" / "card.json"
    try:
        return json.loads(path.read_text()).get("repo_id")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def _repo_id(out: Path, repo_id: str | None) -> str | None:
    """The Hub repo of this folder: given, or remembered."""
    return repo_id or remembered_repo_id(out)


def remember_repo_id(out: Path, repo_id: str) -> None:
    path = out / ".facegen" / "card.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"repo_id": repo_id}) + "\n")


def render_card(out_dir, repo_id: str | None = None) -> CardFiles:
    """Everything the card consists of, from ``OUT/.facegen`` alone; writes nothing."""
    from datasets import Features

    out = Path(out_dir)
    run = load_run(out)
    shards = load_shard_stats(out)
    statistics = summarise(shards)
    chain = licence_chain(run)
    data = card_data(run, statistics, chain)
    features = Features.from_dict(run["features"])
    repo = _repo_id(out, repo_id)
    tar_paths = [out / s["tar"] for s in shards if (out / s.get("tar", "")).is_file()]
    preview = preview_grid(tar_paths, run.get("image_column", "png"))
    num_shards = len(shards)
    context = {
        "card_data": data.to_yaml(),
        "pretty_name": data.pretty_name,
        "run": run,
        "options": run.get("options", {}),
        "source": run.get("source") or {},
        "transform": run.get("transform") or {},
        "models": (run.get("transform") or {}).get("models") or [],
        "stats": statistics,
        "totals": run.get("totals", {}),
        "chain": chain,
        "columns": _columns(run, features),
        "extras": [name for name in features if name not in
                   (run.get("image_column", "png"), "cls", "json", "__key__", "__url__")],
        "image_column": run.get("image_column", "png"),
        "repo_id": repo or PLACEHOLDER_REPO,
        "repo_known": repo is not None,
        "data_files": DATA_FILES,
        "last_shard": f"{max(num_shards - 1, 0):06d}",
        "shards": shards[:SHARD_CHECKSUMS_SHOWN],
        "shards_hidden": max(0, num_shards - SHARD_CHECKSUMS_SHOWN),
        "has_preview": preview is not None,
        "command": shlex.join(run.get("command") or []),
        "rebuild_command": rebuild_command(run),
        "options_json": json.dumps(run.get("options", {}), indent=2, sort_keys=True),
        "source_provenance_json": json.dumps((run.get("source") or {}).get("provenance") or {}, indent=2,
                                             sort_keys=True),
        "transform_provenance_json": json.dumps((run.get("transform") or {}).get("provenance") or {}, indent=2,
                                                sort_keys=True),
        "citations": _citations(run),
        "license_marker": LICENSE_MARKER,
        "quality": quality_context(out),  # `facegen report`
        "curation": curation_context(run),  # `facegen curate`
    }
    env = _environment()
    readme = env.get_template("README.md.j2").render(**context)
    DatasetCard(readme)  # parses the YAML front matter: a card that does not round-trip is never written
    license_text = env.get_template("LICENSE.j2").render(**context) if chain.hub_id == "other" else None
    return CardFiles(readme=readme, license=license_text, preview=preview, card_data=data, chain=chain,
                     statistics=statistics, run=run)


def _write(path: Path, data: bytes) -> None:
    """Write next to the target under a hidden name, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_card(out_dir, repo_id: str | None = None) -> CardFiles:
    """Write OUT/README.md, OUT/LICENSE (when the licence is `other`) and OUT/preview.jpg from OUT/.facegen."""
    out = Path(out_dir)
    files = render_card(out, repo_id)
    if repo_id:
        remember_repo_id(out, repo_id)
    _write(out / "README.md", files.readme.encode("utf-8"))
    license_path = out / "LICENSE"
    if files.license is not None:
        if license_path.is_file() and LICENSE_MARKER not in license_path.read_text(encoding="utf-8", errors="replace"):
            raise FileExistsError(f"{license_path} was not written by facegen; move it away so the card can write "
                                  "the dataset's licence there")
        _write(license_path, files.license.encode("utf-8"))
    elif license_path.is_file() and LICENSE_MARKER in license_path.read_text(encoding="utf-8", errors="replace"):
        license_path.unlink()  # our own LICENSE from an earlier render whose licence was `other`
    preview_path = out / "preview.jpg"
    if files.preview is not None:
        _write(preview_path, files.preview)
    elif preview_path.is_file():
        preview_path.unlink()
    return files
