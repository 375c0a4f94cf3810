"""Presets for the published synthetic sets (issue 20 §5) and the channel order of stored images (§6).

A preset is a recipe whose source is given ``dataset=NAME``: the source declares that set's licence, citation,
description and counts (facegen/plugins/published_sets.py), and the card states them without knowing any set by
name. Checked here on fixtures in each set's published layout: the card's licence (MIT with its WebFace4M note,
CC BY-NC-SA 4.0, or "not declared"), gating, citation, SynFace's mixup columns, the warning when a build's counts
differ from the publisher's, and that a BGR source is marked, kept, or converted losslessly only by --format png.
"""

import io
import json
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
from huggingface_hub import DatasetCard
from PIL import Image

from conftest import cli, facegen
from facegen.api import UsageError
from facegen.builders.engine.options import load_recipe, recipe_names
from facegen.plugins.published_sets import CC_BY_NC_SA, PUBLISHED_SETS
from facegen.testing.folder import draw_face, encode
from facegen.testing.vec2face import write_vec2face_lmdb

FIXTURES = Path(__file__).parent / "fixtures" / "recordio"


def members(out: Path) -> dict[str, bytes]:
    found = {}
    for tar in sorted((out / "data" / "train").glob("*.tar")):
        with tarfile.open(tar) as archive:
            found.update({m.name: archive.extractfile(m).read() for m in archive.getmembers()})
    return found


def test_every_preset_names_a_set_its_source_reads():
    presets = {name: load_recipe(name) for name in recipe_names() if load_recipe(name)["source_opts"].get("dataset")}
    assert sorted(p["source_opts"]["dataset"] for p in presets.values()) == sorted(PUBLISHED_SETS)
    for name, preset in presets.items():
        row = PUBLISHED_SETS[preset["source_opts"]["dataset"]]
        assert row.reader == preset["source"] and preset["plugin"] == "passthrough", name
        assert row.citation.startswith("@") and row.homepage.startswith("https://"), name
    licences = {key: row.license.name or "not declared" for key, row in PUBLISHED_SETS.items()}
    assert licences == {"dcface": "not declared", "hsface10k": "MIT", "hsface20k": "MIT", "synface": "not declared",
                        "sface": "CC BY-NC-SA 4.0", "idiff-face": "CC BY-NC-SA 4.0"}


LICENCE_ROWS = {  # preset -> (card metadata, its licence summary, its row in the Licence table)
    "dcface": ("license_name: undeclared", "The licence of DCFace is not declared",
               "| source dataset | `DCFace` | [not declared](https://github.com/mk-minchul/dcface) |"),
    "hsface10k": ("license_name: mit", "HSFace10K: MIT.",
                  "| source dataset | `HSFace10K` | [MIT](https://github.com/HaiyuWu/Vec2Face/blob/main/LICENSE) |"),
    "hsface20k": ("license_name: mit", "HSFace20K: MIT.",
                  "| source dataset | `HSFace20K` | [MIT](https://github.com/HaiyuWu/Vec2Face/blob/main/LICENSE) |"),
    "synface": ("license_name: undeclared", "The licence of SynFace is not declared",
                "| source dataset | `SynFace` | [not declared](https://github.com/haibo-qiu/SynFace) |"),
    "sface": ("license: cc-by-nc-sa-4.0", "SFace: CC BY-NC-SA 4.0.",
              f"| source dataset | `SFace` | [CC BY-NC-SA 4.0]({CC_BY_NC_SA}) |"),
    "idiff-face": ("license: cc-by-nc-sa-4.0", "IDiff-Face: CC BY-NC-SA 4.0.",
                   f"| source dataset | `IDiff-Face` | [CC BY-NC-SA 4.0]({CC_BY_NC_SA}) |"),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """One tiny input per published layout: an image folder with SynFace's file names, an LMDB, a DCFace rec."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "folder" / "00001").mkdir(parents=True)
    for n in range(2):
        (root / "folder" / "00001" / f"00{n + 1}_00001x0.700_(00042)x0.300.jpg").write_bytes(
            encode(draw_face(0, n, size=16), "jpg"))
    lmdb = write_vec2face_lmdb(root / "set.lmdb", identities=1, images_per_identity=2)
    return {"folder": root / "folder", "lmdb": lmdb, "rec": FIXTURES / "dcface"}


@pytest.mark.parametrize("preset", sorted(LICENCE_ROWS))
def test_each_preset_s_card_names_its_licence_and_is_gated(preset, inputs, tmp_path):
    out = tmp_path / "out"
    facegen("build", "--recipe", preset, "--source-path", inputs[PUBLISHED_SETS[preset].reader], "--out", out,
            check=True)
    card = (out / "README.md").read_text()
    metadata, summary, row = LICENCE_ROWS[preset]
    assert f"\n{metadata}\n" in card.split("\n---\n")[0] and "extra_gated_fields" in card
    licence_line = next(line for line in card.splitlines() if line.startswith("**Licence: "))
    assert summary in licence_line and "Access is gated" in licence_line
    assert row in card


def test_a_set_is_read_only_by_its_own_source(tmp_path):
    from facegen.plugins.folder import FolderSource

    (tmp_path / "a").mkdir()
    with pytest.raises(UsageError, match="must be one of synface, sface, idiff-face"):
        FolderSource(tmp_path, dataset="hsface10k")
    source = FolderSource(tmp_path, dataset="idiff-face")
    assert (source.dataset_name, source.license.id, source.synthetic) == ("IDiff-Face", "cc-by-nc-sa-4.0", True)
    assert (source.expected_counts.identities, source.expected_counts.images) == (10_000, 500_000)
    assert FolderSource(tmp_path).license is None  # a plain folder declares nothing


def test_hsface10k_preset_republishes_a_gated_mit_dataset_and_warns_about_counts(tmp_path, capsys):
    lmdb = write_vec2face_lmdb(tmp_path / "hsface10k.lmdb", identities=3, images_per_identity=2)
    out = tmp_path / "out"
    assert cli("build", "--recipe", "hsface10k", "--source-path", lmdb, "--out", out) == 0
    err = capsys.readouterr().err
    assert ("HSFace10K: the source holds 3 identities and 6 images, but its publisher states 10,000 identities and "
            "500,000 images") in err
    card = DatasetCard.load(out / "README.md")
    assert (card.data.license, card.data.license_name) == ("other", "mit") and card.data.extra_gated_fields
    text = card.text
    assert "HSFace10K (Wu et al., Vec2Face, ICLR 2025)" in text and "@misc{wu2024vec2face" in text
    assert "trained on WebFace4M" in text and "| channel order of the stored pixels | RGB |" in text
    assert "states that it holds 10,000 identities and 500,000 images" in text
    assert "MIT" in (out / "LICENSE").read_text()
    ds = datasets.load_dataset(str(out), split="train")
    assert ds.num_rows == 6 and {r["json"]["channels"] for r in ds} == {"rgb"}


def test_synface_preset_keeps_the_mixup_labels_of_each_file_name(tmp_path, capsys):
    src = tmp_path / "synface"
    names = {"00001": ["001_00001x0.700_(00042)x0.300.jpg", "002_00001x1.000_(00007)x0.000.jpg"],
             "00002": ["001_00002x0.550_(00001)x0.450.jpg", "not_a_synface_name.jpg"]}
    for i, (folder, files) in enumerate(names.items()):
        (src / folder).mkdir(parents=True)
        for n, name in enumerate(files):
            (src / folder / name).write_bytes(encode(draw_face(i, n, size=32), "jpg"))
    out = tmp_path / "out"
    assert cli("build", "--recipe", "synface", "--source-path", src, "--out", out) == 0
    ds = datasets.load_dataset(str(out), split="train")
    rows = sorted((r["json"]["mixup_identity"], r["json"]["mixup_image"], round(r["json"]["mixup_weight"], 3),
                   r["json"]["mixup_other_identity"], round(r["json"]["mixup_other_weight"], 3)) for r in ds)
    assert rows == [(1, 1, 0.7, 42, 0.3), (1, 2, 1.0, 7, 0.0), (2, 1, 0.55, 1, 0.45)]
    card = DatasetCard.load(out / "README.md")
    assert (card.data.license, card.data.license_name) == ("other", "undeclared") and card.data.extra_gated_prompt
    assert "The licence of SynFace is not declared" in card.text
    assert "| file name not in the set's pattern | 1 |" in card.text  # counted, never silently dropped
    assert "`json.mixup_other_weight` | float32 | the weight of the identity mixed in" in card.text
    assert "SynFace: the source holds 2 identities, but its publisher states 10,000 identities" in \
        capsys.readouterr().err


def test_dcface_preset_reads_the_rec_and_list_as_published(tmp_path):
    out = tmp_path / "out"
    assert cli("build", "--recipe", "dcface", "--source-path", FIXTURES / "dcface", "--out", out) == 0
    text = (out / "README.md").read_text()
    assert "DCFace (Kim et al., CVPR 2023)" in text and "@inproceedings{kim2023dcface" in text
    assert "license_name: undeclared" in text and "extra_gated_fields" in text


def test_bgr_images_are_marked_and_kept_and_only_format_png_converts_them(tmp_path):
    kept, converted = tmp_path / "kept", tmp_path / "png"
    common = ["--source", "rec", "--source-path", FIXTURES / "face", "--source-opt", "channels=bgr",
              "--plugin", "passthrough"]
    assert cli("build", *common, "--out", kept) == 0
    assert cli("build", *common, "--format", "png", "--out", converted) == 0
    as_stored, as_png = members(kept), members(converted)
    source = {json.loads(as_stored[n])["record"]: as_stored[n[:-4] + "jpg"] for n in as_stored if n.endswith("json")}
    assert {json.loads(as_stored[n])["channels"] for n in as_stored if n.endswith(".json")} == {"bgr"}
    for name in (n for n in as_png if n.endswith(".json")):
        meta = json.loads(as_png[name])
        assert meta["channels"] == "rgb"
        with Image.open(io.BytesIO(source[meta["record"]])) as jpeg, \
                Image.open(io.BytesIO(as_png[name[:-4] + "png"])) as png:
            assert np.array_equal(np.asarray(png), np.asarray(jpeg.convert("RGB"))[..., ::-1])  # swapped, lossless
    kept_card, png_card = (kept / "README.md").read_text(), (converted / "README.md").read_text()
    assert "**Channel order: BGR.**" in kept_card and "| images re-encoded or converted | 0 |" in kept_card
    assert "RGB, converted from the source's BGR by `--format png`" in png_card
    assert "| channels bgr -> rgb (lossless) | 7 |" in png_card and "**Channel order: BGR.**" not in png_card


def test_bgr_source_through_a_decoding_transform_is_refused():
    from facegen.builders.engine.options import BuildConfig
    from facegen.builders.engine.run import _channels
    from facegen.plugins.e4e import E4ETransform
    from facegen.plugins.rec import RecSource

    bgr = RecSource(FIXTURES / "face", channels="bgr")
    with pytest.raises(UsageError, match="holds BGR images and transform 'e4e' decodes them"):
        _channels(bgr, E4ETransform.__new__(E4ETransform), BuildConfig(format="png"))


def test_verification_pairs_card_counts_pairs(tmp_path):
    from facegen.testing.verification import write_verification_bin

    out = tmp_path / "out"
    assert cli("build", "--source", "bin", "--source-path", write_verification_bin(tmp_path / "lfw.bin", pairs=3),
               "--plugin", "passthrough", "--out", out) == 0
    text = (out / "README.md").read_text()
    assert "3 pairs, 6 face images" in text and "| pairs | 3 |" in text and "| shard | pairs | images |" in text
    assert "integer pair label: the pair's position in the build plan" in text
