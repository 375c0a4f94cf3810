"""Source `sfhq` on fixture downloads in the published (Kaggle) layout, and `facegen build --recipe sfhq` end to end."""

import io
import json
import pickle
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from conftest import build, facegen
from facegen.errors import UsageError
from facegen.generators.landmarks import ARCFACE_TEMPLATE_112
from facegen.plugins.sfhq import SFHQSource
from facegen.records import SourceImage, Skip
from facegen.testing.sfhq import sfhq_name, write_sfhq_source

SMALL_FEATURES = {"CLIP_ViTL_14@336": 768, "CLIP_ResNet50x64": 16}




def files_of(root: Path, name: str) -> dict[str, Path]:
    return {p.suffix: p for p in root.rglob(f"{name}.*") if "sample" not in p.parent.name}


@pytest.fixture
def two_parts(tmp_path):
    return write_sfhq_source(tmp_path / "sfhq", parts=(1, 2), images_per_part=4, size=192,
                             feature_dims=SMALL_FEATURES, feature_dtype="float16")


def test_identities_found_by_name_whatever_the_nesting(two_parts):
    source = SFHQSource(two_parts)
    # gaps in the numbers (0, 1, 3, 4), parts in order, the "tiny sample" copies ignored
    assert source.identities() == [sfhq_name(p, n) for p in (1, 2) for n in (0, 1, 3, 4)]
    assert source.provenance()["sample_folders_ignored"] == 2
    assert SFHQSource(two_parts, parts="2").identities() == [sfhq_name(2, n) for n in (0, 1, 3, 4)]
    # a part root given directly, and flat folders without the part level or the doubled names
    part2 = two_parts / "synthetic-faces-high-quality-sfhq-part-2"
    assert SFHQSource(part2).identities()[0] == "SFHQ_pt2_00000000"


def test_flat_layout_without_kaggle_nesting(tmp_path):
    root = write_sfhq_source(tmp_path / "flat", parts=(3,), images_per_part=3, size=128, kaggle_nesting=False,
                             part_folders=False, sample_folder=False, feature_dims=SMALL_FEATURES)
    assert (root / "images" / "SFHQ_pt3_00000000.jpg").exists()
    assert SFHQSource(root).identities() == ["SFHQ_pt3_00000000", "SFHQ_pt3_00000001", "SFHQ_pt3_00000003"]


def test_native_load_copies_every_file_exactly(two_parts):
    source = SFHQSource(two_parts)
    name = sfhq_name(2, 3)
    [image] = source.load(name)
    files = files_of(two_parts, name)
    assert isinstance(image, SourceImage) and image.ext == "jpg"
    assert image.data == files[".jpg"].read_bytes()
    assert image.meta == {"part": 2, "index": 3}
    assert image.ref == str(files[".jpg"].relative_to(two_parts))
    stored = np.load(files[".npz"])["landmarks"]
    assert image.extras["landmarks.npy"].dtype == np.float32
    np.testing.assert_allclose(image.extras["landmarks.npy"], stored, rtol=1e-6)
    assert image.extras["seg.png"] == files[".png"].read_bytes()
    with open(files[".pickle"], "rb") as f:
        features = pickle.load(f)  # our own fixture file
    assert set(source.extra_features()) == {"landmarks.npy", "seg.png", "clip_vitl_14_336.npy",
                                            "clip_resnet50x64.npy"}
    vector = image.extras["clip_vitl_14_336.npy"]
    assert vector.dtype == np.float32 and vector.shape == (768,)
    np.testing.assert_array_equal(vector, features["CLIP_ViTL_14@336"][0].astype(np.float32))
    assert image.hints["landmarks5"].shape == (5, 2)


def test_resize_scales_image_landmarks_and_segmentation(two_parts):
    native = SFHQSource(two_parts, extras="landmarks,segmentation").load(sfhq_name(1, 1))[0]
    small = SFHQSource(two_parts, extras="landmarks,segmentation", size="96").load(sfhq_name(1, 1))[0]
    with Image.open(io.BytesIO(small.data)) as im:
        assert im.format == "JPEG" and im.size == (96, 96)
    # pixel centres at integer coordinates: x' = (x + 0.5) * s - 0.5 with s = 96 / 192
    np.testing.assert_allclose(small.extras["landmarks.npy"], (native.extras["landmarks.npy"] + 0.5) * 0.5 - 0.5,
                               atol=1e-4)
    seg_native = np.asarray(Image.open(io.BytesIO(native.extras["seg.png"])))
    seg_small = Image.open(io.BytesIO(small.extras["seg.png"]))
    assert seg_small.mode == "L" and seg_small.size == (96, 96)
    # nearest neighbour: no label id is invented by interpolation
    assert set(np.unique(np.asarray(seg_small))) <= set(np.unique(seg_native))


def test_align_puts_the_five_points_on_the_arcface_template(two_parts):
    source = SFHQSource(two_parts, align="true")
    [image] = source.load(sfhq_name(1, 3))
    with Image.open(io.BytesIO(image.data)) as im:
        assert im.size == (112, 112)
        pixels = np.asarray(im.convert("RGB"))
    np.testing.assert_allclose(image.hints["landmarks5"], ARCFACE_TEMPLATE_112, atol=1e-3)
    assert image.extras["landmarks.npy"].shape == (110, 2)
    seg = np.asarray(Image.open(io.BytesIO(image.extras["seg.png"])))
    assert seg.shape == (112, 112)
    # the drawn eyes (label 4 and 5 of the fixture's segmentation) sit on the template's eye points
    for label, point in ((4, ARCFACE_TEMPLATE_112[0]), (5, ARCFACE_TEMPLATE_112[1])):
        ys, xs = np.nonzero(seg == label)
        assert abs(xs.mean() - point[0]) < 1.5 and abs(ys.mean() - point[1]) < 1.5
    assert pixels.std() > 10  # a real image came out, not a black crop
    # align with a size: the template scaled
    [big] = SFHQSource(two_parts, align="true", size="224", extras="").load(sfhq_name(1, 3))
    np.testing.assert_allclose(big.hints["landmarks5"], ARCFACE_TEMPLATE_112 * 2, atol=1e-3)
    assert Image.open(io.BytesIO(big.data)).size == (224, 224)


def test_malicious_pickle_is_skipped_and_never_run(tmp_path):
    root = write_sfhq_source(tmp_path / "sfhq", images_per_part=4, size=128, malicious_pickles=1,
                             feature_dims=SMALL_FEATURES)
    evil = sfhq_name(1, 4)  # damage goes to the last images
    source = SFHQSource(root)
    [skip] = source.load(evil)
    assert isinstance(skip, Skip) and skip.reason == "unsafe pickle"
    assert "refused to unpickle global" in skip.detail and "system" in skip.detail
    assert not list(root.glob("PWNED*"))


def test_a_malicious_first_pickle_does_not_decide_the_columns(tmp_path):
    root = write_sfhq_source(tmp_path / "sfhq", images_per_part=3, size=128, feature_dims=SMALL_FEATURES)
    from facegen.testing.sfhq import malicious_pickle_bytes

    first = next(root.rglob(f"{sfhq_name(1, 0)}.pickle"))
    first.write_bytes(malicious_pickle_bytes(f"touch {root / 'PWNED'}"))
    source = SFHQSource(root)
    assert source.provenance()["feature_models_read_from"] == {"1": sfhq_name(1, 1)}
    assert set(source.extra_features()) >= {"clip_vitl_14_336.npy", "clip_resnet50x64.npy"}
    assert not (root / "PWNED").exists()


def test_missing_side_files_skip_only_when_needed(tmp_path):
    root = write_sfhq_source(tmp_path / "sfhq", images_per_part=5, size=128, missing_landmarks=1,
                             missing_segmentation=1, missing_features=1, feature_dims=SMALL_FEATURES)
    # victims: the last image lost its landmarks, the one before its segmentation, the one before its features
    no_landmarks, no_seg, no_features = sfhq_name(1, 6), sfhq_name(1, 4), sfhq_name(1, 3)
    source = SFHQSource(root)
    reasons = {i: source.load(i)[0] for i in (no_landmarks, no_seg, no_features)}
    assert reasons[no_landmarks].reason == "missing landmarks"
    assert reasons[no_seg].reason == "missing segmentation"
    assert reasons[no_features].reason == "missing features"
    # without extras the image alone is enough; alignment needs the landmarks
    assert isinstance(SFHQSource(root, extras="").load(no_landmarks)[0], SourceImage)
    assert SFHQSource(root, extras="", align="true").load(no_landmarks)[0].reason == "missing landmarks"
    assert source.provenance()["images_missing_side_file"] == {"landmarks": 1, "segmentation": 1, "features": 1}


def test_corrupt_image_is_skipped_when_it_must_be_decoded(tmp_path):
    root = write_sfhq_source(tmp_path / "sfhq", images_per_part=3, size=128, corrupt_images=1, feature_dims={})
    [skip] = SFHQSource(root, extras="", size="64").load(sfhq_name(1, 3))
    assert skip.reason == "corrupt image"


def test_bad_landmark_file_is_skipped(tmp_path):
    root = write_sfhq_source(tmp_path / "sfhq", images_per_part=2, size=128, feature_dims=SMALL_FEATURES)
    path = next(root.rglob(f"{sfhq_name(1, 1)}.npz"))
    np.savez(path, landmarks=np.zeros((68, 2)))
    [skip] = SFHQSource(root).load(sfhq_name(1, 1))
    assert skip.reason == "bad landmarks" and "(68, 2)" in skip.detail


def test_pickle_without_a_declared_model_or_with_another_dimension_is_skipped(tmp_path):
    root = write_sfhq_source(tmp_path / "sfhq", images_per_part=3, size=64, feature_dims=SMALL_FEATURES)
    for number, features in ((1, {"CLIP_ViTL_14@336": np.ones((1, 768), np.float32)}),
                             (3, {"CLIP_ViTL_14@336": np.ones((1, 512), np.float32),
                                  "CLIP_ResNet50x64": np.ones((1, 16), np.float32)})):
        path = next(root.rglob(f"{sfhq_name(1, number)}.pickle"))
        path.write_bytes(pickle.dumps(features, protocol=4))
    source = SFHQSource(root)
    first, second = source.load(sfhq_name(1, 1))[0], source.load(sfhq_name(1, 3))[0]
    assert first.reason == "bad features" and "no 'CLIP_ResNet50x64'" in first.detail
    assert second.reason == "bad features" and "512 values, expected 768" in second.detail


def test_segmentation_stored_in_another_mode_comes_out_as_labels(tmp_path):
    root = write_sfhq_source(tmp_path / "sfhq", images_per_part=1, size=64, feature_dims=SMALL_FEATURES)
    path = next(root.rglob(f"{sfhq_name(1, 0)}.png"))
    labels = np.asarray(Image.open(path))
    Image.fromarray(labels).convert("RGB").save(path)
    [image] = SFHQSource(root).load(sfhq_name(1, 0))
    seg = Image.open(io.BytesIO(image.extras["seg.png"]))
    assert seg.mode == "L"
    np.testing.assert_array_equal(np.asarray(seg), labels)


@pytest.mark.parametrize("options, message", [
    ({"extras": "landmarks,depth"}, "unknown extra 'depth'"),
    ({"parts": "5"}, "parts must be numbers 1-4"),
    ({"parts": "x"}, "parts must be numbers 1-4"),
    ({"parts": "3"}, "part 3 not found"),
    ({"size": "huge"}, "bad value 'huge' for option 'size'"),
    ({"quality": "0"}, "quality must be between 1 and 100"),
])
def test_bad_options_are_one_line_usage_errors(two_parts, options, message):
    with pytest.raises(UsageError, match=message):
        SFHQSource(two_parts, **options)


def test_unusable_inputs_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        SFHQSource(tmp_path / "nowhere")
    (tmp_path / "empty" / "images").mkdir(parents=True)
    with pytest.raises(UsageError, match="no SFHQ images"):
        SFHQSource(tmp_path / "empty")
    only_images = write_sfhq_source(tmp_path / "img", images_per_part=2, size=64, feature_dims=SMALL_FEATURES)
    for folder in ("landmarks", "segmentations", "pretrained_features"):
        for path in only_images.rglob(f"{folder}/{folder}"):
            for f in path.iterdir():
                f.unlink()
    with pytest.raises(UsageError, match="no landmarks files .* drop landmarks from extras="):
        SFHQSource(only_images)
    with pytest.raises(UsageError, match="set align=false"):
        SFHQSource(only_images, extras="", align="true")
    assert len(SFHQSource(only_images, extras="").identities()) == 2


def test_unreadable_pickles_everywhere_is_a_usage_error(tmp_path):
    root = write_sfhq_source(tmp_path / "sfhq", images_per_part=2, size=64, malicious_pickles=2,
                             feature_dims=SMALL_FEATURES)
    with pytest.raises(UsageError, match="no readable features pickle .* refused to unpickle"):
        SFHQSource(root)
    assert len(SFHQSource(root, extras="landmarks,segmentation").identities()) == 2
    assert not list(root.glob("PWNED*"))


@pytest.mark.slow
def test_build_sfhq_recipe_end_to_end_with_typed_columns(tmp_path):
    root = write_sfhq_source(tmp_path / "sfhq", parts=(1, 4), images_per_part=4, size=160, missing_landmarks=1,
                             malicious_pickles=1, feature_dims=SMALL_FEATURES)
    out = tmp_path / "out"
    build("--recipe", "sfhq", "--source-path", root, "--out", out, "--shard-samples", 3)

    ds = datasets.load_dataset(str(out), split="train").sort("__key__")  # published shuffled; keys in plan order
    assert ds.num_rows == 8 - 4  # each part lost one sample to a missing .npz, one to a malicious pickle
    assert ds.column_names == ["jpg", "cls", "json", "landmarks.npy", "seg.png", "clip_resnet50x64.npy",
                               "clip_vitl_14_336.npy", "__key__", "__url__"]
    assert ds.features["landmarks.npy"] == datasets.Array2D((110, 2), "float32")
    assert ds.features["clip_vitl_14_336.npy"] == datasets.List(datasets.Value("float32"), length=768)
    row = ds[0]
    assert row["json"] == {"identity": "SFHQ_pt1_00000000", "source": "sfhq", "part": 1, "index": 0,
                           "width": 160, "height": 160,
                           "source_ref": "synthetic-faces-high-quality-sfhq-part-1/images/images/"
                                         "SFHQ_pt1_00000000.jpg"}
    landmarks = np.asarray(row["landmarks.npy"], dtype=np.float32)
    assert landmarks.shape == (110, 2)
    stored = np.load(next(root.rglob("SFHQ_pt1_00000000.npz")))["landmarks"]
    np.testing.assert_allclose(landmarks, stored, rtol=1e-6)
    assert isinstance(row["seg.png"], Image.Image) and row["seg.png"].mode == "L"
    assert isinstance(row["jpg"], Image.Image) and row["jpg"].size == (160, 160)
    assert len(row["clip_vitl_14_336.npy"]) == 768 and isinstance(row["clip_vitl_14_336.npy"][0], float)
    assert len(row["clip_resnet50x64.npy"]) == 16
    # one identity per image: labels 0..N-1 in plan order, part 1 before part 4
    assert [r["identity"] for r in ds["json"]] == ["SFHQ_pt1_00000000", "SFHQ_pt1_00000001",
                                                   "SFHQ_pt4_00000000", "SFHQ_pt4_00000001"]
    assert ds["cls"] == [0, 1, 4, 5]

    stats = [json.loads(p.read_text()) for p in sorted((out / ".facegen" / "shards").glob("*.json"))]
    skipped = {}
    for s in stats:
        for reason, n in s["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert skipped == {"missing landmarks": 2, "unsafe pickle": 2}
    run = json.loads((out / ".facegen" / "run.json").read_text())
    assert run["source"]["provenance"]["feature_columns"]["CLIP_ViTL_14@336"] == {
        "column": "clip_vitl_14_336.npy", "dimension": 768}
    card = (out / "README.md").read_text()
    # CC0 as found, but declared non-commercial (StyleGAN2/FFHQ provenance): the YAML must not claim CC0
    assert "license: other" in card and "license: cc0-1.0" not in card and "david_beniaguev_2022_SFHQ" in card
    assert "CC0" in (out / "LICENSE").read_text()
    assert not list(root.glob("PWNED*"))
    # the stored JPEG bytes went into the shard untouched
    with tarfile.open(out / "data" / "train" / "train-000000.tar") as tar:
        member = tar.extractfile("000000_000.jpg").read()
    assert member == next(root.rglob("images/images/SFHQ_pt1_00000000.jpg")).read_bytes()


@pytest.mark.slow
def test_build_aligned_sfhq_without_extras(tmp_path):
    root = write_sfhq_source(tmp_path / "sfhq", images_per_part=3, size=256, feature_dims=SMALL_FEATURES)
    out = tmp_path / "out"
    build("--recipe", "sfhq", "--source-path", root, "--out", out, "--source-opt", "align=true",
          "--source-opt", "extras=landmarks")
    ds = datasets.load_dataset(str(out), split="train")
    assert ds.column_names == ["jpg", "cls", "json", "landmarks.npy", "__key__", "__url__"]
    assert all(im.size == (112, 112) for im in ds["jpg"])
    for row in ds:
        landmarks = np.asarray(row["landmarks.npy"])
        eyes = np.stack([landmarks[36:42].mean(axis=0), landmarks[42:48].mean(axis=0)])
        np.testing.assert_allclose(eyes, ARCFACE_TEMPLATE_112[:2], atol=1e-3)


def test_cli_reports_unusable_input_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = facegen("build", "--recipe", "sfhq", "--source-path", tmp_path / "empty", "--out", tmp_path / "o")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no SFHQ images" in proc.stderr
    assert "Traceback" not in proc.stderr
