"""Digi2Real fidelity knobs (issue 13 §4), each an option whose default follows the paper:

- the prototype from five images per subject (DigiFace source ``max_images=5``) or from all of them (``0``);
- identity selection: the paper's one-pass sorted list or ``--method greedy`` (keeps one of each near-duplicate);
- 112x112 crops embedded as they are, or detected and aligned again (``realign``) as Arc2Face's demo does.
"""

import io
import json
import os
import time
import tracemalloc

import cv2
import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from conftest import run_cli
from facegen.builders.quality.identities import (
    FaceEmbedder,
    nearest_neighbors,
    select_greedy,
    select_identities,
    select_least_similar,
)
from facegen.builders.plan import read_identities_file
from facegen.builders.quality.shift import estimate_shift, parse_source_spec
from facegen.generators import arc2face as a2f
from facegen.generators.alignment import FaceAligner, crop_for_recognition, realign_crop
from facegen.generators.embeddings import normalize
from facegen.plugins.arc2face import Arc2FaceTransform
from facegen.plugins.digiface import DigiFaceSource
from facegen.records import Identity, SourceImage
from facegen.testing.digiface import write_digiface_part
from facegen.testing.folder import encode

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_dir(tiny_arc2face):
    return tiny_arc2face


def make(tiny_dir, **opts):
    transform = Arc2FaceTransform(model_dir=str(tiny_dir), **{"steps": "2", "latents": "3",
                                                              "images_per_latent": "2", **opts})
    transform.setup("cpu")
    return transform


def rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ---------------------------------------------------------------------------------------------------------------
# 1. Prototype from five images (the paper's dataset generation) or from all (its method paragraph)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digiface_72(tmp_path_factory):
    """Two identities of a 72-image part, as DigiFace-1M's first 10,000 subjects have."""
    root = tmp_path_factory.mktemp("digiface72")
    write_digiface_part(root, ids=range(2), images_per_identity=72)
    return root


def source_identities(source):
    out = []
    for cls, identity_id in enumerate(source.identities()):
        images = [i for i in source.load(identity_id) if isinstance(i, SourceImage)]
        out.append(Identity(identity_id, cls, 1000 + cls, images=images))
    return out


def test_prototype_from_five_or_all_images(tiny_dir, digiface_72):
    transform = make(tiny_dir)
    calls = []
    embed = transform.embedder.embed
    transform.embedder.embed = lambda crops: calls.append(len(crops)) or embed(crops)
    plans = {}
    for max_images in (5, 0):
        batch = source_identities(DigiFaceSource(str(digiface_72), max_images=max_images))
        plans[max_images] = transform.plan_identities(batch)
        for identity, plan in zip(batch, plans[max_images]):
            assert len(identity.images) == (5 if max_images else 72)
            assert plan.source_refs == [image.ref for image in identity.images]
            # by hand: the normalised mean of the unit embeddings of exactly those crops, each as it is
            crops = np.stack([rgb(image.data) for image in identity.images])
            np.testing.assert_allclose(plan.prototype, a2f.prototype(embed(crops)), atol=1e-6)
            assert all(0 <= v.target < len(identity.images) for v in plan.variations)
    # every crop of a call is embedded in one batched recogniser call: 2 x 5, then 2 x 72
    assert calls == [10, 144]
    five, every = plans[5], plans[0]
    assert five[0].source_refs == [f"subjects_0-1_72_imgs.zip:0/{k}.png" for k in range(5)]
    for a, b in zip(five, every):
        assert a.identity.seed == b.identity.seed and len(a.variations) == len(b.variations) == 3
        assert float(a.prototype @ b.prototype) < 1 - 1e-4  # the knob moves the prototype
    transform.close()


# ---------------------------------------------------------------------------------------------------------------
# 2. Identity selection: one-pass (the paper's sorted list) or greedy
# ---------------------------------------------------------------------------------------------------------------


def brute_force_greedy(x, count):
    """The drop loop on the full matrix: drop the identity most similar to another remaining one (ties: the later)."""
    unit = normalize(x).astype(np.float64)
    sims = (unit @ unit.T).astype(np.float32)
    np.fill_diagonal(sims, -np.inf)
    alive = np.ones(len(x), bool)
    while alive.sum() > count:
        current = np.where(alive[None, :], sims, -np.inf).max(axis=1)
        current[~alive] = -np.inf
        alive[np.flatnonzero(current == current.max()).max()] = False
    return set(np.flatnonzero(alive).tolist())


@pytest.mark.parametrize("n, dim, count, neighbors, block", [
    (300, 16, 100, 1, 97),  # one neighbour listed: lists run out and are recomputed all the time
    (500, 8, 50, 2, 64),
    (1000, 64, 200, 8, 256),
    (400, 32, 390, 32, 2048),
    (300, 16, 2, 1, 300),
])
def test_greedy_equals_the_brute_force_drop_loop(n, dim, count, neighbors, block):
    x = np.random.default_rng(n + count).standard_normal((n, dim)).astype(np.float32)
    selection = select_greedy([f"id{i}" for i in range(n)], x, count, block=block, neighbors=neighbors)
    assert {int(i[2:]) for i in selection.ids} == brute_force_greedy(x, count)
    assert len(selection.ids) == count and np.all(np.diff(selection.scores) >= 0)
    if neighbors <= 2:
        assert selection.refreshed > 0


def test_nearest_neighbors_equal_brute_force():
    rng = np.random.default_rng(0)
    for n, k, block in ((700, 5, 128), (700, 40, 64), (50, 49, 7), (1000, 3, 1000)):
        x = normalize(rng.standard_normal((n, 32)))
        values, indices = nearest_neighbors(x, k, block=block)
        full = x @ x.T
        np.fill_diagonal(full, -np.inf)
        expected = np.argsort(-full, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(indices, expected)
        np.testing.assert_allclose(values, np.take_along_axis(full, expected, 1), atol=1e-6)


def test_greedy_keeps_exactly_one_of_each_planted_near_duplicate():
    rng = np.random.default_rng(1)
    n, pairs = 3000, 40
    x = normalize(rng.standard_normal((n, 512)))
    originals = rng.choice(n, pairs + 1, replace=False)
    twins = normalize(x[originals[:pairs]] + 0.1 * rng.standard_normal((pairs, 512)) / np.sqrt(512))
    triple = normalize(x[originals[pairs]] + 0.1 * rng.standard_normal((2, 512)) / np.sqrt(512))  # a group of 3
    vectors = np.concatenate([x, twins, triple])
    ids = [f"id{i}" for i in range(len(vectors))]
    count = n  # room for every distinct identity: exactly the 40 twins and the 2 extra members must go
    greedy = select_identities(ids, vectors, count, method="greedy", block=512)
    dropped = set(ids) - set(greedy.ids)
    assert dropped == {f"id{n + j}" for j in range(pairs + 2)}  # the later member of each group goes
    assert greedy.method == "greedy" and greedy.threshold < 0.5
    # the paper's one-pass ranking drops the 42 highest-ranked instead: both members of the closest pairs, and
    # none of the others, whose near-duplicates stay in
    one_pass = select_identities(ids, vectors, count, method="one-pass", block=512)
    assert one_pass.ids == select_least_similar(ids, vectors, count, block=512).ids
    kept = set(one_pass.ids)
    members = [(f"id{a}", f"id{n + j}") for j, a in enumerate(originals[:pairs])]
    both_dropped = sum(a not in kept and b not in kept for a, b in members)
    both_kept = sum(a in kept and b in kept for a, b in members)
    assert both_dropped >= 15 and both_kept >= 15 and both_dropped + both_kept == pairs


def test_greedy_is_blockwise_and_fast():
    """8000 identities: no N x N matrix, seconds."""
    x = normalize(np.random.default_rng(3).standard_normal((8000, 512)))
    tracemalloc.start()
    start = time.perf_counter()
    selection = select_greedy([str(i) for i in range(8000)], x, 3000, block=1024)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(selection.ids) == 3000
    assert peak < 80 * 2**20, f"peak {peak / 2**20:.0f} MiB"  # N x N float32 would be 244 MiB
    assert seconds < 60, f"{seconds:.1f} s"  # ~3 s on 2 idle cores


def test_select_identities_command_methods(tmp_path, capsys):
    rng = np.random.default_rng(2)
    x = normalize(rng.standard_normal((50, 512)))
    x[7] = x[3]  # an exact duplicate pair
    ids = np.array([f"subject_{i}" for i in range(50)])
    np.savez(tmp_path / "p.npz", ids=ids, embeddings=x.astype(np.float32))
    args = ["select-identities", "--prototypes", tmp_path / "p.npz", "--count", 48]

    code, stdout, stderr = run_cli([*args, "--method", "greedy", "--out", tmp_path / "greedy.txt"], capsys)
    assert code == 0, stderr
    assert "kept 48 of 50 identities (greedy;" in stdout
    kept = read_identities_file(str(tmp_path / "greedy.txt"))
    assert len(kept) == 48 and "subject_3" in kept and "subject_7" not in kept  # one of the pair stays
    assert "greedy" in (tmp_path / "greedy.txt").read_text().splitlines()[1]

    # the default is the one-pass ranking, and its file is what it was before the option existed
    assert run_cli([*args, "--out", tmp_path / "default.txt"], capsys)[0] == 0
    assert run_cli([*args, "--method", "one-pass", "--out", tmp_path / "one-pass.txt"], capsys)[0] == 0
    default = (tmp_path / "default.txt").read_text()
    assert default == (tmp_path / "one-pass.txt").read_text()
    header = default.splitlines()[:3]
    assert header[1].startswith("# kept: highest cosine similarity to any other identity <= ")
    kept = read_identities_file(str(tmp_path / "default.txt"))
    assert "subject_3" not in kept and "subject_7" not in kept

    code, _, stderr = run_cli([*args, "--method", "best", "--out", tmp_path / "x.txt"], capsys)
    assert code == 2 and "best" in stderr


# ---------------------------------------------------------------------------------------------------------------
# 3. 112x112 crops embedded as they are (the paper) or detected and aligned again (Arc2Face's demo)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dlib_aligner():
    pytest.importorskip("dlib")
    import importlib.util

    if importlib.util.find_spec("face_recognition_models") is None:
        pytest.skip("face-recognition-models is not installed")
    return FaceAligner(detector="dlib")


@pytest.fixture(scope="module")
def tom_hanks():
    """insightface's example of an ArcFace-aligned 112x112 crop (a real face, shipped in its wheel)."""
    import insightface

    path = os.path.join(os.path.dirname(insightface.__file__), "data", "images", "Tom_Hanks_54745.png")
    return np.asarray(Image.open(path).convert("RGB"))


def misalign(crop, angle, shift):
    matrix = cv2.getRotationMatrix2D((56, 56), angle, 1.0)
    matrix[:, 2] += shift
    return cv2.warpAffine(crop, matrix, (112, 112))


MISALIGNMENTS = [(12, (6, -4)), (-10, (-5, 3)), (0, (8, 0))]


def landmarks_of(aligner, crop):
    return aligner.detect(np.pad(crop, ((56, 56), (56, 56), (0, 0))))[0].landmarks - 56


def test_realign_puts_misaligned_crops_back_on_the_template(dlib_aligner, tom_hanks):
    reference = realign_crop(tom_hanks, dlib_aligner)
    target = landmarks_of(dlib_aligner, reference)
    for angle, shift in MISALIGNMENTS:
        crooked = misalign(tom_hanks, angle, shift)
        assert np.abs(landmarks_of(dlib_aligner, crooked) - target).max() > 7  # the face moved by 7-14 px
        again = realign_crop(crooked, dlib_aligner)
        assert again.shape == (112, 112, 3)
        assert np.abs(landmarks_of(dlib_aligner, again) - target).max() <= 2.5  # back where it belongs


def test_crop_for_recognition_realigns_only_when_asked(dlib_aligner, tom_hanks):
    assert crop_for_recognition(tom_hanks) is tom_hanks  # default: as it is, not even copied
    assert crop_for_recognition(tom_hanks, aligner=dlib_aligner) is tom_hanks
    realigned = crop_for_recognition(tom_hanks, aligner=dlib_aligner, realign=True)
    np.testing.assert_array_equal(realigned, realign_crop(tom_hanks, dlib_aligner))
    with pytest.raises(ValueError, match="needs a face aligner"):
        crop_for_recognition(tom_hanks, realign=True)
    blank = np.full((112, 112, 3), 128, np.uint8)
    assert crop_for_recognition(blank, aligner=dlib_aligner, realign=True) is None


def identity_of_crops(crops, name="hanks"):
    images = [SourceImage(f"{name}/{k}.png", encode(Image.fromarray(c)), "png") for k, c in enumerate(crops)]
    return Identity(name, 0, 77, images=images)


def test_transform_realign_changes_the_prototype_and_nothing_else(tiny_dir, dlib_aligner, tom_hanks):
    crops = [tom_hanks] + [misalign(tom_hanks, a, s) for a, s in MISALIGNMENTS]
    identity = identity_of_crops(crops)
    as_is = make(tiny_dir, detector="dlib")
    again = make(tiny_dir, detector="dlib", realign="on")
    (plan_as_is,) = as_is.plan_identities([identity])
    (plan_again,) = again.plan_identities([identity])
    recogniser = as_is.embedder
    # default: every crop embedded exactly as it is
    np.testing.assert_allclose(plan_as_is.prototype, a2f.prototype(recogniser.embed(np.stack(crops))), atol=1e-6)
    # realign: each crop detected and warped first
    realigned = np.stack([realign_crop(c, dlib_aligner) for c in crops])
    np.testing.assert_allclose(plan_again.prototype, a2f.prototype(recogniser.embed(realigned)), atol=1e-6)
    assert float(plan_as_is.prototype @ plan_again.prototype) < 1 - 1e-4
    # nothing else moves: same sources, same SLERP targets and interpolation factors
    assert plan_again.source_refs == plan_as_is.source_refs and plan_again.skipped == plan_as_is.skipped == []
    assert [(v.target, v.t) for v in plan_again.variations] == [(v.target, v.t) for v in plan_as_is.variations]

    # a crop without a face: embedded as it is by default, a counted skip when re-aligned
    blank = identity_of_crops([np.full((112, 112, 3), 128, np.uint8)], name="blank")
    assert as_is.plan_identities([blank])[0].skipped == []
    assert [(s.ref, s.reason) for s in again.plan_identities([blank])[0].skipped] == [
        ("blank/0.png", "no face detected in source image"), ("blank", "no usable source image")]

    assert again.provenance()["recipe"]["realign"] is True and as_is.provenance()["recipe"]["realign"] is False
    assert "embedded as they are" in as_is.provenance()["prototype"]
    assert "aligned again" in again.provenance()["prototype"]
    as_is.close()
    again.close()


def test_embed_and_estimate_shift_realign(tmp_path, tiny_dir, capsys):
    """The SCRFD stand-in (tiny models) finds a face in any textured crop; realign changes the prototypes and the
    shift, and the default files are the ones made without the option."""
    part = tmp_path / "digiface"
    write_digiface_part(part, ids=range(4), images_per_identity=3)
    base = ["embed", "--source", "digiface", "--source-path", part, "--model-dir", tiny_dir]
    assert run_cli([*base, "--out", tmp_path / "as_is.npz"], capsys)[0] == 0
    code, stdout, stderr = run_cli([*base, "--realign", "--out", tmp_path / "again.npz"], capsys)
    assert code == 0, stderr
    assert "4 prototypes from 12 images" in stdout
    with np.load(tmp_path / "as_is.npz") as a, np.load(tmp_path / "again.npz") as b:
        assert list(a["ids"]) == list(b["ids"])
        assert np.all(np.sum(a["embeddings"] * b["embeddings"], axis=1) < 1 - 1e-4)
    embedder = FaceEmbedder(str(tiny_dir))
    assert embedder.realign is False and embedder._aligner is None  # 112x112 crops need no detector by default

    spec = parse_source_spec(f"digiface:{part}")
    plain = estimate_shift([spec], [spec], model_dir=str(tiny_dir), max_images=4, device="cpu", progress=False)
    assert "realign" not in plain.settings  # files made before the option existed read the same
    code, stdout, stderr = run_cli(["estimate-shift", "--real", f"digiface:{part}", "--synthetic", f"digiface:{part}",
                                    "--model-dir", tiny_dir, "--max-images", 4, "--device", "cpu", "--realign",
                                    "--out", tmp_path / "delta.safetensors"], capsys)
    assert code == 0, stderr
    with safe_open(str(tmp_path / "delta.safetensors"), "np") as f:
        assert f.metadata()["realign"] == "true"
        realigned_mean = f.get_tensor("mean_synthetic")
    assert not np.allclose(realigned_mean, plain.mean_synthetic)  # the embeddings behind the means changed


@pytest.mark.slow
def test_build_with_realign_states_it_in_the_card(tmp_path, tiny_dir):
    import datasets

    from facegen.builders.engine.options import BuildConfig
    from facegen.builders.engine.run import build

    part = tmp_path / "digiface"
    write_digiface_part(part, ids=range(2), images_per_identity=3)
    config = BuildConfig(source="digiface", source_path=str(part), plugin="arc2face", out=str(tmp_path / "out"),
                         plugin_opts={"model_dir": str(tiny_dir), "steps": "2", "latents": "1",
                                      "images_per_latent": "2", "realign": "on"})
    build(config)
    card = (tmp_path / "out" / "README.md").read_text()
    assert '"realign": true' in card and "detected and 5-point aligned again before embedding" in card
    run = json.loads((tmp_path / "out" / ".facegen" / "run.json").read_text())
    assert run["transform"]["options"]["realign"] is True
    ds = datasets.load_dataset(str(tmp_path / "out"), split="train")
    assert len(ds) == 4
