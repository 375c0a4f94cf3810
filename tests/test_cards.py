"""Dataset cards: YAML that `datasets` and `huggingface_hub` accept, statistics, preview, licence chain, re-render."""

import json
from pathlib import Path

import datasets
import pytest
import yaml
from huggingface_hub import DatasetCard
from PIL import Image

from facegen.cards import licence_chain, write_card
from facegen.cards.preview import TILE
from conftest import cli
from facegen.errors import UsageError
from facegen.testing.folder import write_folder_source
from facegen.testing.output import MIT, RESEARCH_ONLY, write_output_folder

RECIPES = sorted((Path(__file__).parent.parent / "facegen" / "builders" / "recipes").glob("*.yaml"))




def front_matter(readme: Path) -> dict:
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


@pytest.fixture
def built(tmp_path):
    """A real `facegen build` (folder source, passthrough) with one corrupt image: 7 identities, 20 images."""
    src = write_folder_source(tmp_path / "src", identities=7, images_per_identity=3, corrupt=1)
    out = tmp_path / "out"
    assert cli("build", "--source", "folder", "--source-path", src, "--plugin", "passthrough", "--out", out,
               "--shard-samples", 7) == 0
    return out


def test_card_of_a_real_build_declares_what_load_dataset_returns(built):
    run = json.loads((built / ".facegen" / "run.json").read_text())
    meta = front_matter(built / "README.md")
    # the YAML round-trips through huggingface_hub's card parser
    card = DatasetCard.load(built / "README.md")
    assert card.data.pretty_name == meta["pretty_name"] == "folder faces (facegen)"
    assert meta["task_categories"] == ["image-classification", "image-feature-extraction"]
    assert {"synthetic", "faces", "face-recognition", "webdataset", "passthrough"} <= set(meta["tags"])
    assert meta["size_categories"] == ["n<1K"]
    assert meta["configs"] == [{"config_name": "default",
                                "data_files": [{"split": "train", "path": "data/train/*.tar"}]}]
    assert meta["dataset_info"]["splits"] == [{"name": "train", "num_bytes": 0, "num_examples": 20}]
    infos = datasets.info.DatasetInfosDict.from_dataset_card_data(card.data)
    assert infos["default"].features == datasets.Features.from_dict(run["features"])
    # the folder source declares no licence: `other`, named "undeclared", with a LICENSE saying so
    assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", "undeclared", "LICENSE")
    assert "NOT DECLARED" in (built / "LICENSE").read_text()

    # a private cache: datasets 5.2 keys the cache of a local folder with README configs on the folder's name and
    # the README only, so another test's folder also named "out" could otherwise be served from the cache
    ds = datasets.load_dataset(str(built), split="train", cache_dir=str(built.parent / "hf-cache"))
    assert ds.column_names == ["png", "cls", "json", "__key__", "__url__"] == list(run["features"])
    assert ds.num_rows == 20 and ds[0]["__url__"] == str(built / "data" / "train" / "train-000000.tar")

    text = (built / "README.md").read_text()
    assert "| images per identity (min / mean / max) | 2 / 2.86 / 3 |" in text
    assert "| corrupt image | 1 |" in text
    assert "| `json.image_index` | int32 |" in text
    assert "--source-path " + str(run["options"]["source_path"]) in text
    stats0 = json.loads((built / ".facegen" / "shards" / "000000.json").read_text())
    assert stats0["tar_xxh3_128"] in text  # a real build records each shard's checksum, and the card shows it
    # the preview: one column per identity (first 7), label row + up to 4 rows of tiles
    with Image.open(built / "preview.jpg") as preview:
        assert preview.format == "JPEG"
        assert preview.width == 7 * TILE + 8 * 4
        assert preview.height == 16 + 3 * TILE + 4 * 4


def test_card_command_rerenders_without_rebuilding(built, capsys):
    readme = (built / "README.md").read_text()
    preview = (built / "preview.jpg").read_bytes()
    for name in ("README.md", "LICENSE", "preview.jpg"):
        (built / name).unlink()
    tars = {p: p.stat().st_mtime_ns for p in (built / "data" / "train").glob("*.tar")}
    assert cli("card", built) == 0
    assert (built / "README.md").read_text() == readme  # deterministic: same records, same card
    assert (built / "preview.jpg").read_bytes() == preview
    assert (built / "LICENSE").is_file()
    assert {p: p.stat().st_mtime_ns for p in tars} == tars  # no shard touched
    assert "wrote" in capsys.readouterr().out

    assert cli("card", built, "--repo", "someone/faces") == 0
    text = (built / "README.md").read_text()
    assert 'load_dataset("someone/faces", split="train")' in text and "ORG/NAME" not in text
    assert cli("card", built) == 0  # the repo id is remembered in .facegen
    assert 'load_dataset("someone/faces", split="train")' in (built / "README.md").read_text()


def test_card_of_an_unfinished_build_warns(built, capsys):
    stats1 = built / ".facegen" / "shards" / "000001.json"
    remaining = 20 - json.loads(stats1.read_text())["images"]
    stats1.unlink()
    assert cli("card", built) == 0
    assert "warning: only 2 of 3 shards are finished" in capsys.readouterr().err
    assert f"| images | {remaining} |" in (built / "README.md").read_text()


def test_plugins_can_describe_their_columns(tmp_path):
    out = write_output_folder(tmp_path / "out", identities=2, card=False)
    run = json.loads((out / ".facegen" / "run.json").read_text())
    run["source"]["provenance"] = {"columns": {"json.image_index": "position of the image in its identity folder"}}
    run["transform"]["columns"] = {"embedding.npy": "ArcFace embedding of the output image"}
    (out / ".facegen" / "run.json").write_text(json.dumps(run))
    write_card(out)
    text = (out / "README.md").read_text()
    assert "| `json.image_index` | int32 | position of the image in its identity folder |" in text
    assert "| `embedding.npy` | list<float32>[8] | ArcFace embedding of the output image |" in text
    assert ("| `json.cosine_to_prototype` | float32 | declared by the fixture source or the fixture-transform "
            "transform (quality figure, summarised under Statistics) |") in text


def test_card_command_on_a_folder_without_a_build_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli("card", tmp_path / "empty") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run.json" in err and "Traceback" not in err


def test_card_with_extras_quality_and_models(tmp_path):
    models = [
        {"id": "org/arc2face", "revision": "a" * 40, "role": "UNet", "license": "CC BY-NC 4.0",
         "license_link": "https://example.org/l", "citation": "@inproceedings{arc,\n  title={Arc}\n}", "note": "",
         "source": "org/arc2face@" + "a" * 40},
        {"id": "org/sd15", "revision": "b" * 40, "role": "VAE", "license": "CreativeML OpenRAIL-M",
         "license_link": "", "citation": "", "note": "", "source": ""},
    ]
    out = write_output_folder(tmp_path / "out", identities=5, images_per_identity=2, shard_size=2, models=models)
    meta = front_matter(out / "README.md")
    text = (out / "README.md").read_text()
    # NC model + OpenRAIL model + MIT source: no single Hub id covers both restrictions
    assert meta["license"] == "other" and meta["license_link"] == "LICENSE"
    licence_file = (out / "LICENSE").read_text()
    for name in ("fixture", "org/arc2face", "CC BY-NC 4.0", "org/sd15", "CreativeML OpenRAIL-M", "MIT"):
        assert name in licence_file
    assert "Non-commercial use only" in licence_file and "Non-commercial use only" in text
    assert "| `embedding.npy` | list<float32>[8] |" in text
    assert "`" + "a" * 40 + "`" in text  # model revision pinned in provenance
    assert "@inproceedings{arc," in text and "@misc{fixture2026," in text  # model + source citations
    assert "--plugin-opt steps=25 --plugin-opt guidance=3.0 --plugin-opt fp16=true" in text
    assert "--source-opt parts=a,b" in text and "--seed 7" in text
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert ds.column_names == ["png", "cls", "json", "embedding.npy", "__key__", "__url__"]
    assert ds.num_rows == 10 and len(ds[0]["embedding.npy"]) == 8
    assert ds.features["json"]["cosine_to_prototype"] == datasets.Value("float32")
    # quality figures: the card's mean/min/max are those of the samples' json values
    values = [float(j["cosine_to_prototype"]) for j in ds["json"]]
    row = (f"| `cosine_to_prototype` | {sum(values) / len(values):.4f} | {min(values):.4f} | {max(values):.4f} "
           f"| {len(values)} |")
    assert row in text


def _run(source_license, models=(), transform_license=None):
    return {"source": {"name": "src", "license": source_license},
            "transform": {"name": "t", "license": transform_license, "models": list(models)}}


def _model(licence, note=""):
    return {"id": f"m-{licence}-{note}", "revision": "r", "license": licence, "note": note}


def test_licence_chain_most_restrictive_input_governs():
    # permissive everywhere, one licence: that Hub id, commercial use allowed, no LICENSE needed
    chain = licence_chain(_run(MIT, [_model("MIT")]))
    assert (chain.hub_id, chain.commercial_use, chain.name) == ("mit", True, None)
    # a non-commercial model makes the dataset non-commercial and its licence governs
    chain = licence_chain(_run(MIT, [_model("cc-by-nc-4.0"), _model("Apache 2.0")]))
    assert (chain.hub_id, chain.commercial_use) == ("cc-by-nc-4.0", False)
    # a note saying "non-commercial" counts even when the licence name says nothing
    chain = licence_chain(_run(MIT, [_model("InsightFace model licence", note="non-commercial research only")]))
    assert (chain.hub_id, chain.commercial_use, chain.name) == ("other", False, "insightface-model-licence")
    # a research-only source (custom licence) + an NC model: `other`, composite name, both governing
    chain = licence_chain(_run(RESEARCH_ONLY, [_model("cc-by-nc-4.0")]))
    assert chain.hub_id == "other" and chain.name == "facegen-src-t-terms" and not chain.commercial_use
    assert [i.name for i in chain.governing] == ["src", "m-cc-by-nc-4.0-"]
    # a licence nobody can classify is not a grant of commercial use
    chain = licence_chain(_run(MIT, [_model("Some Custom Licence")]))
    assert chain.commercial_use is False and chain.hub_id == "other"
    assert chain.inputs[1].commercial_text == "not stated (treated as no)"
    # OpenRAIL: commercial use allowed, restrictions carried into the terms
    chain = licence_chain(_run(MIT, [_model("creativeml-openrail-m")]))
    assert chain.commercial_use and chain.hub_id == "creativeml-openrail-m" and "use restrictions" in chain.summary
    # a source without any licence statement: unknown terms
    chain = licence_chain(_run(None))
    assert chain.hub_id == "other" and chain.name == "undeclared" and "not declared" in chain.summary
    assert "non-commercial" not in chain.summary
    # ... and what is known still binds: a non-commercial model makes it non-commercial at the very least
    chain = licence_chain(_run(None, [_model("cc-by-nc-4.0")]))
    assert "not declared" in chain.summary and "non-commercial use only (m-cc-by-nc-4.0- (cc-by-nc-4.0))" in chain.summary
    # a transform that declares its own licence is an input too
    chain = licence_chain(_run(MIT, transform_license={**MIT, "id": "cc-by-nc-sa-4.0", "name": "CC BY-NC-SA 4.0",
                                                       "commercial_use": False}))
    assert chain.hub_id == "cc-by-nc-sa-4.0" and [i.role for i in chain.inputs] == ["source dataset", "transform"]
    # a permissive id declared non-commercial (CC0 images made with NC weights) never becomes the card's licence
    chain = licence_chain(_run({**MIT, "id": "cc0-1.0", "name": "CC0 1.0", "commercial_use": False}))
    assert (chain.hub_id, chain.commercial_use) == ("other", False) and chain.link == "LICENSE"
    # share-alike / copyleft inputs allow commercial use but their terms travel with the data
    for name in ("cc-by-sa-4.0", "GPL-3.0", "c-uda"):
        chain = licence_chain(_run(MIT, [_model(name)]))
        assert chain.commercial_use and chain.governing and "share-alike/copyleft" in chain.summary, name


def test_rerender_removes_our_license_when_no_longer_other(tmp_path):
    out = write_output_folder(tmp_path / "out", identities=2, source_license=RESEARCH_ONLY)
    assert (out / "LICENSE").is_file()
    run = json.loads((out / ".facegen" / "run.json").read_text())
    run["source"]["license"] = MIT
    (out / ".facegen" / "run.json").write_text(json.dumps(run))
    write_card(out)
    assert not (out / "LICENSE").exists() and front_matter(out / "README.md")["license"] == "mit"
    # a LICENSE the user wrote is never removed
    (out / "LICENSE").write_text("my own terms\n")
    write_card(out)
    assert (out / "LICENSE").read_text() == "my own terms\n"


def _recipe_run(recipe: Path, tmp_path: Path) -> dict:
    """A run record for a recipe from its plugins' own card metadata (what `facegen build` records)."""
    from facegen import registry

    values = yaml.safe_load(recipe.read_text())
    source_cls = registry.get_source(values["source"])
    transform_cls = registry.get_transform(values["plugin"])

    def record(cls):
        lic = cls.license
        return {"name": cls.name, "description": cls.description, "card_description": cls.card_description,
                "homepage": cls.homepage, "citation": cls.citation, "distribution": "facegen", "version": "0.1.0",
                "license": None if lic is None else dict(vars(lic)), "provenance": {}}

    transform = record(transform_cls)
    options = dict(values.get("plugin_opts") or {})
    if values["plugin"] == "e4e":  # the weights are the user's to give: a tiny checkpoint in the real format
        from facegen.testing.stylegan import write_checkpoints

        options["checkpoint"] = str(write_checkpoints(tmp_path / "ckpt")[0])
    try:
        instance = transform_cls(**options)
    except UsageError:  # the recipe names files made by earlier steps (e.g. a shift file): use the defaults
        instance = transform_cls()
    transform["models"] = [dict(vars(m)) for m in instance.models()]
    fmt = values.get("format", "png")
    features = datasets.Features({fmt: datasets.Image(), "cls": datasets.Value("int64"),
                                  "json": {"identity": datasets.Value("string")},
                                  "__key__": datasets.Value("string"), "__url__": datasets.Value("string")})
    return {"facegen_version": "0.1.0", "git_revision": None, "command": ["facegen", "build", "--recipe", recipe.stem],
            "created": "2026-01-01T00:00:00+00:00",
            "options": {"source": values["source"], "source_path": "/data", "source_opts": values.get("source_opts", {}),
                        "plugin": values["plugin"], "plugin_opts": values.get("plugin_opts", {}),
                        "recipe": recipe.stem, "shard_size": values.get("shard_size", 100),
                        "seed": values.get("seed", 0), "format": fmt, "strict": False},
            "plan": {"identities": 0, "shards": 0, "plan_sha256": "0" * 64},
            "source": record(source_cls), "transform": transform, "features": features.to_dict(),
            "image_column": fmt, "quality_fields": list(getattr(transform_cls, "quality_fields", ())),
            "totals": {"identities": 0, "images": 0, "skipped": {}, "shards": 0}}


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_card_renders_for_each_recipe(recipe, tmp_path):
    run = _recipe_run(recipe, tmp_path)
    (tmp_path / ".facegen").mkdir()
    (tmp_path / ".facegen" / "run.json").write_text(json.dumps(run))
    files = write_card(tmp_path)
    card = DatasetCard.load(tmp_path / "README.md")  # round-trips through huggingface_hub
    assert card.data.license == files.chain.hub_id
    text = card.text
    source = run["source"]
    # the source's own licence, description and citation reach the card
    assert source["license"] is not None, f"source {source['name']!r} declares no licence"
    assert source["license"]["name"] in text or source["license"]["id"] in text
    if source["citation"]:
        assert source["citation"].strip().splitlines()[0] in text
    if source["card_description"]:
        assert source["card_description"].split("\n")[0][:40] in text
    for model in run["transform"]["models"]:
        assert model["id"] in text
    if card.data.license == "other":
        assert card.data.license_name and (tmp_path / "LICENSE").read_text().strip()
