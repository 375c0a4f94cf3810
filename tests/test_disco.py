"""Source `disco` on fixture ensembles in the published layout, and `facegen build --recipe disco` end to end."""

import json
import subprocess
import sys

import datasets
import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import build, facegen
from facegen.errors import UsageError
from facegen.plugins.disco import DiscoSource, natural_key
from facegen.records import SourceImage, Skip
from facegen.testing.disco import IMAGES_DIR, disco_labels, write_disco_source




@pytest.fixture
def ensemble(tmp_path):
    return write_disco_source(tmp_path / "disco", identities=3, augmentations=12)


def test_labels_come_in_natural_order(ensemble):
    source = DiscoSource(ensemble)
    assert source.identities() == ["00000", "00001", "00002"]
    items = source.load("00001")
    assert [i.meta["label"] for i in items] == disco_labels(12)  # reference, augmentation_0 … augmentation_11
    assert items.index(next(i for i in items if i.meta["label"] == "augmentation_2")) < \
        items.index(next(i for i in items if i.meta["label"] == "augmentation_10"))
    with h5py.File(ensemble / "samples.h5") as f:  # what natural order fixes: h5py lists alphabetically
        assert list(f["00001"])[:4] == ["augmentation_0", "augmentation_1", "augmentation_10", "augmentation_11"]


def test_sample_values_meta_and_hints(ensemble):
    item = DiscoSource(ensemble).load("00002")[5]
    assert isinstance(item, SourceImage) and item.ref == "00002/augmentation_4" and item.ext == "png"
    assert item.data == (ensemble / IMAGES_DIR / "00002" / "augmentation_4.png").read_bytes()
    with h5py.File(ensemble / "samples.h5") as f:
        raw = f["00002/augmentation_4/embedding"][()]
        w = f["00002/augmentation_4/w_latent"][()]
    assert item.meta == {"label": "augmentation_4", "network_type": "stylegan2-256", "embedding_type": "iresnet50",
                         "embedding_norm": pytest.approx(float(np.linalg.norm(raw)), rel=1e-6)}
    assert item.meta["embedding_norm"] > 5  # raw, not normalised
    for value in (item.hints["embedding"], item.extras["embedding.npy"]):
        assert value.dtype == np.float32 and value.shape == (512,)
        np.testing.assert_array_equal(value, raw[0])
    np.testing.assert_array_equal(item.extras["w_latent.npy"], w[0])


def test_handle_is_opened_lazily_once_and_only_the_identity_is_read(ensemble, monkeypatch):
    source = DiscoSource(ensemble)
    assert source._h5 is None  # the constructor read the header and closed the file
    read = []
    original = h5py.Dataset.__getitem__

    def recording_getitem(self, key):
        read.append(self.name)
        return original(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", recording_getitem)
    source.load("00001")
    handle = source._h5
    assert handle is not None and handle.id.valid
    assert read and all(name.startswith("/00001/") for name in read)
    assert not any(name.endswith("z_latent") for name in read)  # only what is published
    source.load("00002")
    assert source._h5 is handle  # kept, not reopened
    source.close()
    assert not handle.id.valid


def test_a_forked_process_opens_its_own_handle(ensemble, monkeypatch):
    import os

    source = DiscoSource(ensemble)
    source.load("00000")
    parent_handle = source._h5
    real_pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: real_pid + 1)  # as seen from a child after fork
    items = source.load("00001")
    assert source._h5 is not parent_handle and len(items) == 13
    assert parent_handle.id.valid  # the parent's handle is not closed from the child
    parent_handle.close()


def test_importing_the_plugin_does_not_open_hdf5():
    code = "import sys, facegen.plugins.disco; print('h5py' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_reference_samples_follow_their_images(tmp_path):
    disco = write_disco_source(tmp_path / "disco", identities=2, augmentations=3, reference_images=False)
    auto = DiscoSource(disco)
    assert [i.meta["label"] for i in auto.load("00000")] == ["augmentation_0", "augmentation_1", "augmentation_2"]
    assert auto.provenance()["reference_samples"] == "excluded"
    included = DiscoSource(disco, reference="include").load("00000")
    assert isinstance(included[0], Skip) and included[0].reason == "missing image"
    # the reference images taken from the Langevin ensemble folder
    langevin = write_disco_source(tmp_path / "langevin", identities=2, augmentations=0)
    with_refs = DiscoSource(disco, reference_path=str(langevin)).load("00001")
    assert with_refs[0].meta["label"] == "reference"
    assert with_refs[0].data == (langevin / IMAGES_DIR / "00001" / "reference.png").read_bytes()
    assert [i.ref for i in DiscoSource(disco, reference="exclude").load("00000")][0] == "00000/augmentation_0"


def test_bad_samples_are_skipped_with_their_reason(tmp_path):
    root = write_disco_source(tmp_path / "disco", identities=2, augmentations=12, nan_embedding=1,
                              missing_embedding=1, missing_w_latent=1, sample_without_image=1,
                              image_without_sample=1)
    items = DiscoSource(root).load("00001")
    skips = {i.ref: i.reason for i in items if isinstance(i, Skip)}
    assert skips == {
        "00001/augmentation_11": "missing dataset",
        "00001/augmentation_10": "missing dataset",
        "00001/augmentation_9": "non-finite embedding",
        "00001/augmentation_8": "missing image",
        "00001/augmentation_12": "image without h5 sample",
    }
    assert sum(isinstance(i, SourceImage) for i in items) == 13 - 4
    assert all(isinstance(i, SourceImage) for i in DiscoSource(root).load("00000"))


def test_wrong_shape_and_missing_attribute_are_skipped(ensemble):
    with h5py.File(ensemble / "samples.h5", "a") as f:
        del f["00000/augmentation_3/w_latent"]
        f["00000/augmentation_3/w_latent"] = np.zeros((1, 256), np.float32)
        del f["00000/augmentation_5"].attrs["embedding_type"]
    items = {i.ref: i for i in DiscoSource(ensemble).load("00000")}
    assert items["00000/augmentation_3"].reason == "bad dataset" and "(1, 256)" in items["00000/augmentation_3"].detail
    assert items["00000/augmentation_5"].reason == "missing attribute"


@pytest.mark.parametrize("options, message", [
    ({"magic": "synthetics"}, "magic is 'synthetics', expected 'synthetics_collection' \\(a single-sample file"),
    ({"magic": "something_else"}, "not a synthetics sample collection"),
    ({"major": 3}, "format version 3.0; this plugin reads major version 2"),
])
def test_wrong_header_is_a_usage_error(tmp_path, options, message):
    root = write_disco_source(tmp_path / "disco", identities=1, augmentations=1, **options)
    with pytest.raises(UsageError, match=message):
        DiscoSource(root)


def test_unusable_folders_are_usage_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no samples.h5"):
        DiscoSource(tmp_path / "empty")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "samples.h5").write_bytes(b"not hdf5 at all")
    (tmp_path / "garbage" / IMAGES_DIR).mkdir()
    with pytest.raises(UsageError, match="cannot read .* as HDF5"):
        DiscoSource(tmp_path / "garbage")
    root = write_disco_source(tmp_path / "disco", identities=1, augmentations=1)
    (root / "images_arcface_112x112").rename(root / "images_other_256x256")
    (root / "images_raw").mkdir()
    with pytest.raises(UsageError, match="several image folders .* images=NAME"):
        DiscoSource(root)
    assert DiscoSource(root, images="images_other_256x256").load("00000")[0].meta["label"] == "reference"
    with pytest.raises(UsageError, match="option 'reference' must be one of"):
        DiscoSource(root, reference="maybe")


def test_provenance_has_command_yml_and_stats(tmp_path):
    root = write_disco_source(tmp_path / "disco", identities=2, augmentations=2, identity_dir_without_samples=1)
    record = DiscoSource(root).provenance()
    assert record["samples_h5"] == {"magic": "synthetics_collection", "major": 2, "minor": 0}
    commands = record["command_yml"]
    assert commands[0]["generate-database"]["git"] == {"branch": "main", "version": "f5efe3f"}
    # yaml.dump wrote a click tuple as !!python/tuple: read back as a plain list, no object built
    assert commands[1]["create-variations"]["latent_directions"] == ["pose", "illumination", "expression"]
    assert record["stats_h5"]["dist_avg"] == {"iterations": 5, "first": 1.0, "last": 0.5}
    assert record["image_folders_without_h5_identity"] == {"count": 1, "first": ["00002"]}
    json.dumps(record)


def test_command_yml_with_an_object_tag_builds_no_object(tmp_path):
    root = write_disco_source(tmp_path / "disco", identities=1, augmentations=1, command=False)
    marker = tmp_path / "PWNED"
    (root / "command.yml").write_text(
        f"- evil: !!python/object/apply:os.system ['touch {marker}']\n- path: !!python/object/apply:pathlib.Path "
        "['/data/x']\n")
    record = DiscoSource(root).provenance()
    assert record["command_yml"] == [{"evil": ["touch " + str(marker)]}, {"path": ["/data/x"]}]
    assert not marker.exists()


def test_command_yml_alias_bomb_is_an_error_in_the_record_not_gigabytes(tmp_path):
    root = write_disco_source(tmp_path / "disco", identities=1, augmentations=1, command=False)
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]  # 10**10 values
    (root / "command.yml").write_text("\n".join(lines) + "\n")
    record = DiscoSource(root).provenance()
    assert "command_yml" not in record and "expands to more than 100,000 values" in record["command_yml_error"]
    json.dumps(record)
    # a file that merely shares a value (yaml.dump writes an anchor for an object used twice) is read as before
    (root / "command.yml").write_text("- a: &d [pose, light]\n- b: *d\n")
    assert DiscoSource(root).provenance()["command_yml"] == [{"a": ["pose", "light"]}, {"b": ["pose", "light"]}]


def test_natural_key():
    assert sorted(["augmentation_10", "reference", "augmentation_2", "augmentation_1"], key=natural_key) == [
        "augmentation_1", "augmentation_2", "augmentation_10", "reference"]


@pytest.mark.slow
def test_build_disco_recipe_end_to_end(tmp_path):
    root = write_disco_source(tmp_path / "disco", identities=3, augmentations=11, reference_images=False,
                              nan_embedding=1, missing_embedding=1, sample_without_image=1, image_without_sample=1)
    out = tmp_path / "out"
    build("--recipe", "disco", "--source-path", root, "--out", out, "--shard-samples", 10)

    ds = datasets.load_dataset(str(out), split="train").sort("__key__")  # published shuffled; keys in plan order
    assert ds.column_names == ["png", "cls", "json", "embedding.npy", "w_latent.npy", "__key__", "__url__"]
    assert ds.features["embedding.npy"] == datasets.List(datasets.Value("float32"), length=512)
    assert ds.num_rows == 3 * 11 - 3
    labels = [r["label"] for r in ds["json"] if r["identity"] == "00000"]
    assert labels == [f"augmentation_{a}" for a in range(11)]  # natural order, no reference (no images)
    assert ds["cls"][:11] == [0] * 11
    row = ds[3]
    assert row["json"]["identity"] == "00000" and row["json"]["label"] == "augmentation_3"
    assert set(row["json"]) == {"identity", "source", "source_ref", "width", "height", "label", "network_type",
                                "embedding_type", "embedding_norm"}
    embedding = np.asarray(row["embedding.npy"], dtype=np.float32)
    with h5py.File(root / "samples.h5") as f:
        np.testing.assert_array_equal(embedding, f["00000/augmentation_3/embedding"][0])
        w_latent = f["00000/augmentation_3/w_latent"][0]
    np.testing.assert_array_equal(np.asarray(row["w_latent.npy"], np.float32), w_latent)
    assert len(row["embedding.npy"]) == 512 and abs(np.linalg.norm(embedding) - 1) > 1  # unnormalised
    assert isinstance(row["png"], Image.Image) and row["png"].size == (112, 112)

    skipped = {}
    for path in sorted((out / ".facegen" / "shards").glob("*.json")):
        for reason, n in json.loads(path.read_text())["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert skipped == {"non-finite embedding": 1, "missing dataset": 1, "missing image": 1,
                       "image without h5 sample": 1}
    run = json.loads((out / ".facegen" / "run.json").read_text())
    assert run["source"]["provenance"]["command_yml"][1]["create-variations"]["num_augmentations"] == 11
    assert run["source"]["license"]["id"] == "other"
    card = (out / "README.md").read_text()
    assert "license: other" in card and "geissbuhler2024synthetic" in card and "NOT L2-normalised" in card
    assert "LicenseRef-IdiapNCResearchAndEducationalOnly" in (out / "LICENSE").read_text()


def test_cli_wrong_magic_exits_2_in_one_line(tmp_path):
    root = write_disco_source(tmp_path / "disco", identities=1, augmentations=1, magic="synthetics")
    proc = facegen("build", "--recipe", "disco", "--source-path", root, "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "magic is 'synthetics'" in proc.stderr
