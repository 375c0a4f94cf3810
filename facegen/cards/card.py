"""Render a build's dataset card: YAML (``huggingface_hub.DatasetCardData``) + text (Jinja2 templates).

The YAML declares ``configs`` (``data/train/*.tar``) and ``dataset_info`` (every column's feature and the split's
exact example count), so ``load_dataset(OUT)`` never infers a schema from the first shard and verifies the count.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import DatasetCard, DatasetCardData

from facegen.cards.licenses import LicenceChain, licence_chain
from facegen.cards.loading import loading_context
from facegen.cards.preview import preview_grid
from facegen.cards.public import (
    OUT_PLACEHOLDER,
    copy_provenance,
    known_paths,
    public_options,
    scrub,
    source_placeholder,
)
from facegen.cards.quality import curation_context, quality_context
from facegen.cards.stats import (
    Statistics,
    load_run,
    load_shard_stats,
    load_unit_stats,
    size_category,
    summarise,
)
from facegen.errors import UsageError

TEMPLATES = Path(__file__).parent / "templates"
DATA_FILES = "data/train/*.tar"
PLACEHOLDER_REPO = "ORG/NAME"
SHARD_CHECKSUMS_SHOWN = 200
CHECKSUMS_FILE = "provenance/checksums.json"
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
    env.filters["plural"] = lambda word, n: word if n == 1 else ("identities" if word == "identity" else word + "s")
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
        "json.width": "width of the stored image in pixels (as decoded, before any EXIF orientation)",
        "json.height": "height of the stored image in pixels (as decoded, before any EXIF orientation)",
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


def rebuild_command(run: dict, out: str = OUT_PLACEHOLDER) -> str:
    """The `facegen build` command with every option spelled out (the recipe's values included), local paths
    replaced by placeholders (``<digiface source folder>``) or the published provenance files."""
    o = public_options(run)
    args = ["facegen", "build", "--source", o.get("source", "?")]
    if o.get("source_path"):
        args += ["--source-path", o["source_path"]]
    args += _option_args("--source-opt", o.get("source_opts"))
    args += ["--plugin", o.get("plugin", "?")]
    args += _option_args("--plugin-opt", o.get("plugin_opts"))
    for key, flag in (("limit_identities", "--limit-identities"), ("identities_file", "--identities-file"),
                      ("shard_size", "--shard-size"), ("shard_samples", "--shard-samples"),
                      ("shards_multiple_of", "--shards-multiple-of"), ("seed", "--seed"), ("format", "--format"),
                      ("verify", "--verify")):
        if o.get(key) is not None:
            args += [flag, str(o[key])]
    if o.get("strict"):
        args.append("--strict")
    args += ["--out", out]
    return shlex.join(args)


def from_card_command(run: dict, repo_id: str) -> str:
    """The short rebuild: options, plan and model revisions are read from the card."""
    args = ["facegen", "build", "--from-card", repo_id]
    if (run.get("options") or {}).get("source_path"):
        args += ["--source-path", source_placeholder(run)]
    if ((run.get("options") or {}).get("plugin_opts") or {}).get("model_dir"):
        args += ["--plugin-opt", "model_dir=<model folder>"]
    args += ["--out", OUT_PLACEHOLDER]
    return shlex.join(args)


def public_command(run: dict, out: Path) -> str:
    """The command as it was run, with its local paths replaced."""
    return shlex.join(scrub(list(run.get("command") or []), known_paths(run, out)))


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
        add(f"model: {scrub(model.get('id') or '?')}", model.get("citation"))
    return entries


def _pretty_name(run: dict) -> str:
    source = (run.get("source") or {}).get("name") or run.get("options", {}).get("source", "?")
    plugin = (run.get("transform") or {}).get("name") or run.get("options", {}).get("plugin", "?")
    if plugin == "passthrough":
        return f"{source} faces (facegen)"
    return f"{source} faces through {plugin} (facegen)"


def images_are_synthetic(run: dict) -> bool:
    """Only when the transform generates the images or the source says its images are synthetic: a folder may
    hold photos of real people."""
    return bool((run.get("transform") or {}).get("synthetic") or (run.get("source") or {}).get("synthetic"))


def random_weight_models(run: dict) -> list[dict]:
    """The models whose folder carries facegen's random-weights marker (demo and test builds)."""
    return [m for m in (run.get("transform") or {}).get("models") or [] if (m.get("loaded") or {}).get("test_model")]


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


def sample_bytes(out: Path, shards: list[dict]) -> int:
    """The samples' bytes: every tar member's payload (no tar headers), read from the tar headers only."""
    import tarfile

    total = 0
    for stats in shards:
        if "sample_bytes" in stats:
            total += stats["sample_bytes"]
            continue
        path = out / stats.get("tar", "")
        if not path.is_file():
            continue
        try:
            with tarfile.open(path, "r:") as tar:  # random access: headers are read, data is skipped
                total += sum(m.size for m in tar if m.isfile())
        except (tarfile.TarError, OSError):
            continue
    return total


def facegen_record(run: dict, provenance: list[str]) -> dict:
    """The card's machine-readable `facegen:` YAML key: what `facegen build --from-card` needs to rebuild."""
    models = []
    for m in (run.get("transform") or {}).get("models") or []:
        models.append({"id": scrub(m.get("id")), "role": m.get("role"), "revision": m.get("revision"),
                       "loaded": scrub(m.get("loaded") or {})})
    return {
        "version": run.get("facegen_version"),
        "options": {k: v for k, v in public_options(run).items() if v is not None},
        "plan": run.get("plan") or {},
        "models": models,
        "provenance": provenance,
    }


def card_data(run: dict, statistics: Statistics, chain: LicenceChain, *, num_bytes: int = 0,
              gated: bool = False, provenance: list[str] | None = None) -> DatasetCardData:
    """The card's YAML metadata."""
    from datasets import DatasetInfo, Features, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs

    source = (run.get("source") or {}).get("name") or run["options"]["source"]
    plugin = (run.get("transform") or {}).get("name") or run["options"]["plugin"]
    tags = (["synthetic"] if images_are_synthetic(run) else []) + ["faces", "face-recognition", "webdataset", plugin]
    if source not in tags:
        tags.append(source)
    hub_dataset = (run.get("source") or {}).get("hub_dataset")
    data = DatasetCardData(
        pretty_name=_pretty_name(run),
        license=chain.hub_id,
        license_name=chain.name,
        license_link=chain.link,
        task_categories=["image-classification", "image-feature-extraction"],
        tags=tags,
        size_categories=[size_category(statistics.images)],
        # a Hub dataset id only: the source plugins name datasets that are not on the Hub
        source_datasets=[hub_dataset] if hub_dataset else None,
    )
    if gated:
        for key, value in gating_fields(chain).items():
            setattr(data, key, value)
    # Declared features = the exact columns; the split's example count is checked by `load_dataset`.
    # num_bytes: the samples' bytes (tar payloads); datasets' own value would be the Arrow size, close to it.
    features = Features.from_dict(run["features"])
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
    path = Path(out) / ".facegen" / "card.json"
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
    path = out / ".facegen" / "card.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = {**card_settings(out), **{k: v for k, v in settings.items() if v is not None}}
    path.write_text(json.dumps(merged) + "\n")


def remember_repo_id(out: Path, repo_id: str) -> None:
    remember_card_settings(out, repo_id=repo_id)


def _models_for_card(run: dict) -> list[dict]:
    """The models table: what was loaded (Hub id@commit, or a local folder's name and its files' sha256)."""
    rows = []
    for m in (run.get("transform") or {}).get("models") or []:
        loaded = scrub(m.get("loaded") or {})
        if loaded.get("hub"):
            where = f"Hub `{loaded['hub']}@{loaded.get('commit', '?')}`"
        elif loaded.get("folder"):
            where = f"local folder `{loaded['folder']}` (sha256 of its weights below)"
        else:
            where = "not loaded in this run (nothing recorded)"
        rows.append({"id": scrub(m.get("id") or "?"), "role": m.get("role") or "", "where": where,
                     "requested": m.get("revision"), "license": m.get("license") or "",
                     "sha256": loaded.get("sha256") or {}, "test_model": loaded.get("test_model"),
                     "folder": loaded.get("folder")})
    return rows


def _checksums(shards: list[dict]) -> dict:
    return {"algorithm": "xxh3_128", "files": {s["tar"]: s.get("tar_xxh3_128") for s in shards if s.get("tar")}}


def render_card(out_dir, repo_id: str | None = None, gating: bool | None = None) -> CardFiles:
    """Everything the card consists of, from ``OUT/.facegen`` alone; writes nothing.

    ``gating``: add the Hub's access-request fields for data that is not free to use (default: the choice
    remembered from the last publish/card, else on); False leaves them out (``--no-gating``).
    """
    from datasets import Features

    out = Path(out_dir)
    run = load_run(out)
    shards = load_shard_stats(out)
    statistics = summarise(shards, load_unit_stats(out), (run.get("plan") or {}).get("identities"))
    chain = licence_chain(run)
    if gating is None:
        gating = card_settings(out).get("gating", True)
    gated = bool(gating) and needs_gating(chain)
    provenance = sorted(rel for rel, _, _ in _provenance_inputs(run) if (out / rel).is_file())
    data = card_data(run, statistics, chain, num_bytes=sample_bytes(out, shards), gated=gated,
                     provenance=provenance + [CHECKSUMS_FILE])
    features = Features.from_dict(run["features"])
    repo = _repo_id(out, repo_id)
    tar_paths = [out / s["tar"] for s in shards if (out / s.get("tar", "")).is_file()]
    preview = preview_grid(tar_paths, run.get("image_column", "png"), out=out)
    num_shards = len(shards)
    known = known_paths(run, out)
    models = _models_for_card(run)
    context = {
        "card_data": data.to_yaml(),
        "pretty_name": data.pretty_name,
        "run": run,
        "options": public_options(run),
        "source": run.get("source") or {},
        "transform": run.get("transform") or {},
        "models": models,
        "random_weights": [m for m in models if m["test_model"]],
        "synthetic": images_are_synthetic(run),
        "gated": gated,
        "stats": statistics,
        "failures": scrub(statistics.failures, known),
        "totals": run.get("totals", {}),
        "chain": chain,
        "columns": _columns(run, features),
        "extras": [name for name in features if name not in
                   (run.get("image_column", "png"), "cls", "json", "__key__", "__url__")],
        "image_column": run.get("image_column", "png"),
        "repo_id": repo or PLACEHOLDER_REPO,
        "repo_known": repo is not None,
        "data_files": DATA_FILES,
        "layout_lengths": _lengths_text([s.get("images", 0) for s in shards]),
        "layout_mode": (run.get("layout") or {}).get("mode"),
        "loading": loading_context(run, [s.get("images", 0) for s in shards], statistics.image_sizes,
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
        "source_provenance_json": json.dumps(scrub((run.get("source") or {}).get("provenance") or {}, known),
                                             indent=2, sort_keys=True),
        "transform_provenance_json": json.dumps(scrub((run.get("transform") or {}).get("provenance") or {},
                                                      known), indent=2, sort_keys=True),
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


def _provenance_inputs(run: dict):
    from facegen.cards.public import provenance_files

    return provenance_files(run)


def _lengths_text(lengths: list[int]) -> str:
    """'1,000' or '999 to 1,000': how many samples the shards hold."""
    if not lengths:
        return "0"
    low, high = min(lengths), max(lengths)
    return f"{high:,}" if low == high else f"{low:,} to {high:,}"


def _write(path: Path, data: bytes) -> None:
    """Write next to the target under a hidden name, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
    except BaseException:  # a full disk leaves no half-written temporary behind
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


CARD_FILES = ("README.md", "LICENSE", "preview.jpg")
INFO_FILE = "_info.json"  # written by the build (timm's split info), recorded like the card's files
OUTPUT_FILES = (*CARD_FILES, INFO_FILE)  # every name facegen writes in OUT itself
CARD_FILES_RECORD = "card_files.json"  # under .facegen: the sha256 of each of those files facegen wrote


def _card_files_record(out: Path) -> dict | None:
    """name -> sha256 of the versions facegen wrote; None for a build made before the record existed."""
    try:
        record = json.loads((out / ".facegen" / CARD_FILES_RECORD).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def written_by_facegen(out, name: str) -> bool:
    """Whether ``OUT/name`` (a card file) is exactly what facegen wrote, so that facegen may replace or remove it."""
    out = Path(out)
    path = out / name
    if not path.is_file():
        return False
    data = path.read_bytes()
    if name == "LICENSE" and LICENSE_MARKER in data.decode("utf-8", errors="replace"):
        return True
    record = _card_files_record(out)
    if record is None:  # a build from before the record: its README.md, preview.jpg and _info.json were its own
        return name in ("README.md", "preview.jpg", INFO_FILE) and (out / ".facegen" / "run.json").is_file()
    return hashlib.sha256(data).hexdigest() in (record.get(name) or [])


def foreign_card_files(out, names=CARD_FILES) -> list[str]:
    """The card's file names (or ``names``) in OUT that hold files facegen did not write (the user's own, or edited
    since)."""
    out = Path(out)
    return [name for name in names if (out / name).exists() and not written_by_facegen(out, name)]


def write_recorded(out, name: str, data: bytes) -> None:
    """Write ``OUT/name`` (one of OUTPUT_FILES outside the card: ``_info.json``), recorded as facegen's; a file
    there that facegen did not write is refused in one line, never replaced."""
    out = Path(out)
    if foreign_card_files(out, (name,)):
        raise UsageError(f"{out / name} was not written by facegen (or changed since): move it out of the folder so "
                         "that the build can write it there")
    _record_card_files(out, {name: data})
    _write(out / name, data)


def _record_card_files(out: Path, files: dict[str, bytes]) -> None:
    """Record the new versions before writing them (the previous one stays listed: a crash between the two
    writes leaves either version recognised)."""
    record = _card_files_record(out) or {}
    for name, data in files.items():
        previous = [h for h in (record.get(name) or []) if isinstance(h, str)][-1:]
        record[name] = previous + [hashlib.sha256(data).hexdigest()]
    path = out / ".facegen" / CARD_FILES_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, json.dumps(record, indent=1, sort_keys=True).encode())


def write_card(out_dir, repo_id: str | None = None, gating: bool | None = None) -> CardFiles:
    """Write OUT/README.md, OUT/LICENSE (when the licence is `other`), OUT/preview.jpg and OUT/provenance/ (the
    small inputs needed to rebuild, and the shards' checksums) from OUT/.facegen.

    A file under one of the card's names that facegen did not write is never replaced or removed: the card is
    refused in one line naming it (UsageError), as is a folder facegen cannot write to.
    """
    out = Path(out_dir)
    run = load_run(out)
    try:  # first: the card lists the provenance files present
        copy_provenance(out, run)
        checksums = out / CHECKSUMS_FILE
        checksums.parent.mkdir(parents=True, exist_ok=True)
        _write(checksums, (json.dumps(_checksums(load_shard_stats(out)), indent=1, sort_keys=True) + "\n").encode())
    except OSError as exc:
        raise UsageError(f"cannot write the dataset card in {out}: {exc.strerror or exc}") from None
    files = render_card(out, repo_id, gating)
    foreign = [name for name in foreign_card_files(out) if name != "LICENSE" or files.license is not None]
    if foreign:
        raise UsageError(f"{', '.join(str(out / n) for n in foreign)} {'was' if len(foreign) == 1 else 'were'} not "
                         "written by facegen (or changed since): move "
                         f"{'it' if len(foreign) == 1 else 'them'} out of the folder so that the dataset card can "
                         "be written there")
    new = {"README.md": files.readme.encode("utf-8")}
    if files.license is not None:
        new["LICENSE"] = files.license.encode("utf-8")
    if files.preview is not None:
        new["preview.jpg"] = files.preview
    try:
        if repo_id or gating is not None:
            remember_card_settings(out, repo_id=repo_id, gating=gating)
        _record_card_files(out, new)
        for name, data in new.items():
            _write(out / name, data)
        for name in ("LICENSE", "preview.jpg"):  # ours from an earlier render that has none now
            if name not in new and written_by_facegen(out, name):
                (out / name).unlink()
    except OSError as exc:
        raise UsageError(f"cannot write the dataset card in {out}: {exc.strerror or exc}") from None
    return files
