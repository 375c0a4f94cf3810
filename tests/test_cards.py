"""Dataset cards: YAML that `datasets` and `huggingface_hub` accept, statistics, preview, licence chain, re-render."""

import json
import os
import tarfile
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import yaml
from huggingface_hub import DatasetCard
from PIL import Image

from facegen.cards import licence_chain, write_card
from facegen.cards.preview import TILE
from conftest import cli
from facegen.errors import UsageError
from facegen.layout.records import LicenseRecord, ModelRecord, PluginRecord, RunRecord, load_run
from facegen.testing.folder import write_folder_source
from facegen.testing.output import MIT, RESEARCH_ONLY, write_output_folder

RECIPES = sorted((Path(__file__).parent.parent / "facegen" / "builders" / "engine" / "recipes").glob("*.yaml"))




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
    # a folder may hold photos of real people: nothing calls them synthetic unless the source says so
    assert {"faces", "face-recognition", "webdataset", "passthrough"} <= set(meta["tags"])
    assert "synthetic" not in meta["tags"] and "The images are synthetic" not in (built / "README.md").read_text()
    assert "they may show real people" in (built / "README.md").read_text()
    assert meta["size_categories"] == ["n<1K"]
    assert meta["configs"] == [{"config_name": "default",
                                "data_files": [{"split": "train", "path": "data/train/*.tar"}]}]
    # num_bytes: the samples' bytes, i.e. every tar member's payload
    payload = sum(m.size for tar in sorted((built / "data" / "train").glob("*.tar"))
                  for m in tarfile.open(tar) if m.isfile())
    assert meta["dataset_info"]["splits"] == [{"name": "train", "num_bytes": payload, "num_examples": 20}]
    assert meta["dataset_info"]["dataset_size"] == payload and "source_datasets" not in meta
    # taken from the shards' stats (written with each shard), not by re-reading the tars
    stats = [json.loads(p.read_text()) for p in sorted((built / ".facegen" / "shards").glob("[0-9]*.json"))]
    assert sum(st["sample_bytes"] for st in stats) == payload
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
    assert "--source-path '<folder source folder>'" in text and str(run["options"]["source_path"]) not in text
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
    """What the build recorded of each plugin's ``column_descriptions()`` (``columns`` in its run record)."""
    out = write_output_folder(tmp_path / "out", identities=2, card=False)
    run = json.loads((out / ".facegen" / "run.json").read_text())
    run["source"]["columns"] = {"json.image_index": "position of the image in its identity folder"}
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
         "source": "org/arc2face@" + "a" * 40, "loaded": {"hub": "org/arc2face", "commit": "c" * 40}},
        {"id": "org/sd15", "revision": "b" * 40, "role": "VAE", "license": "CreativeML OpenRAIL-M",
         "license_link": "", "citation": "", "note": "", "source": str(tmp_path / "models" / "sd15"),
         "loaded": {"folder": "sd15", "sha256": {"vae/diffusion_pytorch_model.safetensors": "d" * 64}}},
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
    # what was loaded: the Hub commit, or the local folder's name and each weight file's sha256 (never its path)
    assert "| `org/arc2face` | Hub `org/arc2face@" + "c" * 40 + "` | UNet |" in text
    assert "| `org/sd15` | local folder `sd15` (sha256 of its weights below) | VAE |" in text
    assert "| `sd15` | `vae/diffusion_pytorch_model.safetensors` | `" + "d" * 64 + "` |" in text
    assert "lfs.sha256" in text and str(tmp_path) not in text
    assert meta["facegen"]["models"][1]["loaded"]["sha256"] == models[1]["loaded"]["sha256"]
    assert "Test models" not in text  # no random-weights marker recorded
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
    """The parts of a run record the licence chain reads."""
    def licence(fields):
        return LicenseRecord(**fields) if fields else None

    return SimpleNamespace(source=PluginRecord("src", license=licence(source_license)),
                           transform=PluginRecord("t", license=licence(transform_license), models=list(models)))


def _model(licence, note=""):
    return ModelRecord(f"m-{licence}-{note}", revision="r", license=licence, note=note)


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
    assert chain.hub_id == "other" and chain.name == "src-t-terms" and not chain.commercial_use
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
    assert "not declared" in chain.summary and "non-commercial use only: m-cc-by-nc-4.0-: cc-by-nc-4.0." in chain.summary
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
    source = record(source_cls)
    dataset = (values.get("source_opts") or {}).get("dataset")
    if dataset:  # a preset: the source declares the published set's metadata as its own (dataset= option)
        from facegen.plugins.published_sets import PUBLISHED_SETS

        row = PUBLISHED_SETS[dataset]
        source.update(card_description=row.description, homepage=row.homepage, citation=row.citation,
                      license=dict(vars(row.license)), dataset_name=row.name)
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
    return {"schema": RunRecord.SCHEMA, "facegen_version": "0.1.0", "git_revision": None,
            "command": ["facegen", "build", "--recipe", recipe.stem], "created": "2026-01-01T00:00:00+00:00",
            "python": "3.11.0",
            "options": {"source": values["source"], "source_path": "/data", "source_opts": values.get("source_opts", {}),
                        "plugin": values["plugin"], "plugin_opts": values.get("plugin_opts", {}),
                        "recipe": recipe.stem, "limit_identities": None, "identities_file": None,
                        "identities_file_sha256": None, "shard_size": values.get("shard_size", 100),
                        "shard_samples": values.get("shard_samples", 10_000),
                        "shards_multiple_of": values.get("shards_multiple_of"), "seed": values.get("seed", 0),
                        "format": fmt, "strict": False, "verify": "full"},
            "plan": {"identities": 0, "shards": 0, "plan_sha256": "0" * 64},
            "layout": {"mode": "units", "units": 0, "identities_per_unit": values.get("shard_size", 100),
                       "planned_shard_lengths": [], "order": "", "units_xxh3_128": None,
                       "identities_without_images": []},
            "source": source, "transform": transform, "features": features.to_dict(),
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


def test_sample_bytes_of_written_and_assembled_shards():
    """A shard's `sample_bytes` (the card's num_bytes) is its members' payload, also when its samples are copied
    from units of work (identity-level transforms)."""
    import io

    from facegen.builders.engine.writer import UstarWriter

    unit, shard = io.BytesIO(), io.BytesIO()
    written, copied = UstarWriter(unit), UstarWriter(shard)
    samples = [{"png": b"x" * n, "cls": b"7", "json": b"{}" * (n // 3)} for n in (1, 511, 512, 513, 4000)]
    blocks = [written.add_sample(f"{i:06d}_000", sample) for i, sample in enumerate(samples)]
    written.close()
    for offset, length in reversed(blocks):  # the assembly copies whole samples, in another order
        copied.add_raw(unit.getvalue()[offset:offset + length])
    copied.close()
    for writer, data in ((written, unit), (copied, shard)):
        with tarfile.open(fileobj=io.BytesIO(data.getvalue())) as tar:
            assert writer.payload == sum(m.size for m in tar if m.isfile()) == sum(
                len(v) for sample in samples for v in sample.values())


def publishable_files(out: Path) -> list[Path]:
    from facegen.builders.hub.publish import files_to_upload

    return [out / f.path for f in files_to_upload(out)]


def test_nothing_publishable_names_a_local_path(tmp_path, monkeypatch):
    """A real build whose inputs all lie under the test's folder (and a fake home inside it): no publishable file
    (README.md, LICENSE, provenance/, preview) names that folder or the home folder."""
    home = tmp_path / "home" / "someone"
    monkeypatch.setenv("HOME", str(home))
    src = write_folder_source(home / "data" / "faces", identities=4, images_per_identity=2, size=48, corrupt=1)
    ids = home / "lists" / "ids.txt"
    ids.parent.mkdir(parents=True)
    ids.write_text("0\n1\n3\n")
    out = tmp_path / "out"
    assert cli("build", "--source", "folder", "--source-path", src, "--plugin", "passthrough", "--identities-file",
               ids, "--shard-size", 2, "--out", out) == 0
    run = json.loads((out / ".facegen" / "run.json").read_text())
    assert run["options"]["source_path"] == str(src)  # the private record keeps the real paths
    files = publishable_files(out)
    assert {p.relative_to(out).as_posix() for p in files} >= {"README.md", "LICENSE", "preview.jpg",
                                                              "provenance/identities.txt"}
    for path in files:
        data = path.read_bytes()
        for private in (str(tmp_path), str(home), "/home/", os.path.expanduser("~")):
            assert private.encode() not in data, (path.name, private)
    text = (out / "README.md").read_text()
    assert "--source-path '<folder source folder>'" in text and "--identities-file provenance/identities.txt" in text


def test_model_paths_in_records_are_scrubbed(tmp_path):
    """Older records (or third-party plugins) may name models by local path: the card shows file names only."""
    models = [{"id": str(tmp_path / "ckpt" / "e4e_ffhq_encode.pt"), "revision": None, "role": "encoder",
               "license": "MIT", "source": str(tmp_path / "ckpt" / "e4e_ffhq_encode.pt"),
               "loaded": {"folder": "ckpt", "sha256": {"e4e_ffhq_encode.pt": "e" * 64}}}]
    out = write_output_folder(tmp_path / "out", identities=2, models=models, card=False)
    run = json.loads((out / ".facegen" / "run.json").read_text())
    run["transform"]["provenance"] = {"e4e_source": str(tmp_path / "ckpt" / "e4e_ffhq_encode.pt"),
                                      "warnings": [f"cannot read {tmp_path}/src/x.png"]}
    (out / ".facegen" / "run.json").write_text(json.dumps(run))
    write_card(out)
    for path in publishable_files(out):
        assert str(tmp_path).encode() not in path.read_bytes(), path.name
    text = (out / "README.md").read_text()
    assert "`<e4e_ffhq_encode.pt>`" in text and "cannot read <x.png>" in text


def test_yaml_is_hub_grade_and_the_summary_reads_plainly(tmp_path, capsys):
    models = [{"id": "org/gen", "revision": "a" * 40, "role": "generator",
               "license": "research-only (model terms of A (weights) / B)", "note": "non-commercial",
               "loaded": {"hub": "org/gen", "commit": "a" * 40}}]
    out = write_output_folder(tmp_path / "out", identities=1, images_per_identity=3, shard_size=1,
                              source_license=RESEARCH_ONLY, models=models)
    meta = front_matter(out / "README.md")
    text = (out / "README.md").read_text()
    # a short license_name id; no invalid source_datasets; gating fields for non-commercial data
    assert meta["license"] == "other" and meta["license_name"] == "fixture-fixture-transform-terms"
    assert "source_datasets" not in meta
    assert meta["extra_gated_fields"] == {
        "Name": "text", "Affiliation": "text", "Country": "country",
        "I will use this dataset for non-commercial research only": "checkbox",
        "I accept the licence of every input listed in the dataset card": "checkbox"}
    assert meta["extra_gated_prompt"].startswith("Non-commercial use only.")
    assert "Access is gated" in text
    # the summary names each licence without its parenthetical remarks: no nested brackets
    summary = licence_chain(load_run(out)).summary
    assert "fixture: Research Use of Data Agreement v1.0; org/gen: research-only." in summary
    assert "((" not in summary and "))" not in summary
    # plurals
    assert "1 identity, 3 face images in 1 WebDataset shard, built" in text
    assert "| plan | 1 identity in 1 shard," in text
    # --no-gating leaves the fields out, and is remembered by the next render
    assert cli("card", out, "--no-gating") == 0
    assert "extra_gated_fields" not in front_matter(out / "README.md")
    write_card(out)
    assert "extra_gated_fields" not in front_matter(out / "README.md")
    assert cli("card", out, "--gating") == 0 and "extra_gated_fields" in front_matter(out / "README.md")
    # data free to use is never gated
    free = write_output_folder(tmp_path / "free", identities=1)
    assert "extra_gated_fields" not in front_matter(free / "README.md")


def test_random_weight_models_are_announced_at_the_top(tmp_path):
    from facegen.generators.weights import describe_loaded, write_test_model_marker

    folder = tmp_path / "tiny" / "unet"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    write_test_model_marker(tmp_path / "tiny", "tiny UNet")
    loaded = describe_loaded(folder)
    assert set(loaded) == {"folder", "sha256", "test_model"} and "random-weight" in loaded["test_model"]
    import hashlib

    assert loaded["sha256"] == {"model.safetensors": hashlib.sha256(b"weights").hexdigest()}
    models = [{"id": "org/unet", "revision": None, "role": "UNet", "license": "MIT", "loaded": loaded}]
    out = write_output_folder(tmp_path / "out", identities=2, models=models)
    text = (out / "README.md").read_text()
    body = text.split("---\n", 2)[2]
    assert body.lstrip().startswith("# fixture faces through fixture-transform (facegen)\n\n> **Test models: "
                                    "these images are noise.**")
    assert "| `org/unet` | local folder `unet` (sha256 of its weights below) — **random test weights** |" in text
    # a Hub snapshot path is recorded as repo@commit
    snapshot = tmp_path / "hub" / "models--org--unet" / "snapshots" / ("f" * 40) / "unet"
    snapshot.mkdir(parents=True)
    assert describe_loaded(snapshot) == {"hub": "org/unet", "commit": "f" * 40}


def test_card_of_a_single_shard_says_what_it_serves(tmp_path):
    from conftest import cli
    from facegen.testing.folder import write_folder_source

    src = write_folder_source(tmp_path / "src", identities=3, images_per_identity=2)
    out = tmp_path / "one"
    assert cli("build", "--source", "folder", "--source-path", src, "--plugin", "passthrough", "--out", out) == 0
    card = (out / "README.md").read_text()
    assert "This build is a single shard of 6 samples: it serves one rank with one `DataLoader` worker" in card
    assert "rebuild with `--shards-multiple-of` ranks × workers" in card
    assert "1 shards" not in card and "ranks, max_workers, batch_size = 1, 4, 256" in card
