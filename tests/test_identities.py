"""`facegen embed` (prototypes) and `facegen select-identities` (the most distinct identities)."""

import time
import tracemalloc

import numpy as np
import pytest

from facegen.builders.quality.identities import (
    FaceEmbedder,
    embed_source,
    load_prototypes,
    max_similarity,
    open_source,
    select_least_similar,
)
from facegen.builders.plan import read_identities_file
from conftest import run_cli
from facegen.errors import UsageError
from facegen.generators.alignment import ARCFACE_TEMPLATE
from facegen.generators.arcface import ArcFaceEmbedder
from facegen.generators.embeddings import normalize
from facegen.records import SourceImage
from facegen.testing.folder import draw_face, encode, write_folder_source


@pytest.fixture(scope="module")
def face_models(tiny_face_models):
    return tiny_face_models




def unit_rows(rng, n, d=512):
    return normalize(rng.standard_normal((n, d)))


# --- embed ---


def test_embed_command_writes_prototypes(tmp_path, face_models, capsys):
    source = write_folder_source(tmp_path / "src", identities=5, images_per_identity=3)
    out = tmp_path / "prototypes.npz"
    code, stdout, stderr = run_cli(["embed", "--source", "folder", "--source-path", source,
                                    "--model-dir", face_models, "--out", out], capsys)
    assert code == 0, stderr
    assert "5 prototypes from 15 images" in stdout
    with np.load(out, allow_pickle=False) as data:  # no pickled objects in the file
        assert data["ids"].dtype.kind == "U"
        ids, embeddings, counts = list(data["ids"]), data["embeddings"], data["num_images"]
    assert ids == ["0", "1", "2", "3", "4"] and embeddings.shape == (5, 512) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    assert counts.tolist() == [3] * 5
    # each prototype = normalised mean of the identity's unit embeddings, computed here by hand
    recogniser = ArcFaceEmbedder(face_models / "arc2face" / "arcface.onnx")
    for i in range(5):
        crops = np.stack([np.asarray(draw_face(i, k)) for k in range(3)])
        expected = normalize(normalize(recogniser.embed(crops)).mean(axis=0))
        np.testing.assert_allclose(embeddings[i], expected, atol=1e-5)
    assert load_prototypes(out)[0] == ids


def test_embed_skips_bad_images_and_counts_them(tmp_path, face_models, capsys):
    source = write_folder_source(tmp_path / "src", identities=3, images_per_identity=2, corrupt=1)
    empty = tmp_path / "src" / "9"
    empty.mkdir()
    (empty / "0.png").write_bytes(b"not a png")
    out = tmp_path / "p.npz"
    code, stdout, _ = run_cli(["embed", "--source", "folder", "--source-path", source, "--model-dir", face_models,
                               "--out", out], capsys)
    assert code == 0
    assert "3 prototypes from 5 images" in stdout
    assert "skipped 2 images (corrupt image: 2)" in stdout
    assert "1 identity without a usable image left out" in stdout
    ids, _ = load_prototypes(out)
    assert ids == ["0", "1", "2"]


def test_embed_batch_routes_hints_and_large_images(face_models):
    embedder = FaceEmbedder(str(face_models))
    given = np.arange(512, dtype=np.float32)
    aligned = encode(draw_face(1, 0))
    large = encode(draw_face(1, 0, size=448))
    flat = encode(draw_face(1, 0, size=300, noise=0).convert("L").point(lambda _: 128).convert("RGB"))
    images = [
        SourceImage("a", b"", "png", hints={"embedding": given}),  # DisCo: taken as it is, not decoded
        SourceImage("b", aligned, "png"),  # 112x112: embedded as it is
        SourceImage("c", large, "png", hints={"landmarks5": ARCFACE_TEMPLATE * 4}),  # warped, no detection
        SourceImage("d", large, "png"),  # detected (SCRFD path, stand-in detector) and aligned
        SourceImage("e", flat, "png"),  # nothing to detect
    ]
    unit, refs, skips = embedder.embed_images(images)
    assert refs == ["a", "b", "c", "d"]
    assert [(s.ref, s.reason) for s in skips] == [("e", "no face detected in source image")]
    np.testing.assert_allclose(unit[0], given / np.linalg.norm(given), rtol=1e-6)
    direct = embedder.recogniser.embed_unit(np.asarray(draw_face(1, 0))[None])[0]
    np.testing.assert_allclose(unit[1], direct, atol=1e-6)
    # the 4x picture warped back with the template landmarks is close to the 112 picture
    assert float(unit[2] @ unit[1]) > 0.95
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)


def test_embed_with_missing_models_is_one_line_exit_2(tmp_path, capsys):
    source = write_folder_source(tmp_path / "src", identities=1, images_per_identity=1)
    code, _, stderr = run_cli(["embed", "--source", "folder", "--source-path", source, "--model-dir", tmp_path,
                               "--out", tmp_path / "p.npz"], capsys)
    assert code == 2
    assert stderr.count("\n") == 1 and "arcface.onnx not found" in stderr and "Traceback" not in stderr
    code, _, stderr = run_cli(["embed", "--source", "nosuch", "--source-path", source, "--out", tmp_path / "p.npz"],
                              capsys)
    assert code == 2 and "unknown source plugin 'nosuch'" in stderr


def test_embed_source_limit(tmp_path, face_models):
    source = open_source("folder", str(write_folder_source(tmp_path / "src", identities=4, images_per_identity=1)))
    prototypes = embed_source(source, FaceEmbedder(str(face_models)), limit=2, progress=False)
    assert prototypes.ids == ["0", "1"]


# --- select-identities ---


def test_max_similarity_equals_brute_force_for_any_block():
    rng = np.random.default_rng(0)
    for n, blocks in ((120, (1, 7, 119)), (1500, (256, 1000, 1500, 4096))):
        x = unit_rows(rng, n, 64)
        full = x @ x.T
        np.fill_diagonal(full, -np.inf)
        expected = full.max(axis=1)
        for block in blocks:
            np.testing.assert_allclose(max_similarity(x, block=block), expected, atol=1e-6)


def test_selection_drops_planted_near_duplicates():
    rng = np.random.default_rng(1)
    n, pairs = 3000, 40
    x = unit_rows(rng, n)
    # plant near-duplicates: 40 identities get a twin (cosine ~0.98), placed at random rows
    originals = rng.choice(n, pairs, replace=False)
    twins = normalize(x[originals] + 0.1 * rng.standard_normal((pairs, 512)) / np.sqrt(512))
    all_vectors = np.concatenate([x, twins])
    ids = [f"id{i}" for i in range(n + pairs)]
    selection = select_least_similar(ids, all_vectors, count=n + pairs - 2 * pairs, block=512)
    dropped = set(ids) - set(selection.ids)
    planted = {f"id{i}" for i in originals} | {f"id{n + j}" for j in range(pairs)}
    assert dropped == planted
    assert np.all(np.diff(selection.scores) >= 0)  # most distinct first
    assert selection.threshold < 0.5


def test_select_identities_command(tmp_path, capsys):
    rng = np.random.default_rng(2)
    x = unit_rows(rng, 50)
    x[7] = x[3]  # an exact duplicate pair
    ids = np.array([f"subject_{i}" for i in range(50)])
    np.savez(tmp_path / "p.npz", ids=ids, embeddings=x.astype(np.float32))
    out = tmp_path / "ids.txt"
    code, stdout, stderr = run_cli(["select-identities", "--prototypes", tmp_path / "p.npz", "--count", 48,
                                    "--out", out], capsys)
    assert code == 0, stderr
    assert "kept 48 of 50 identities" in stdout
    kept = read_identities_file(str(out))  # the file feeds `facegen build --identities-file`
    assert len(kept) == 48 and "subject_3" not in kept and "subject_7" not in kept
    code, _, stderr = run_cli(["select-identities", "--prototypes", tmp_path / "p.npz", "--count", 51,
                               "--out", out], capsys)
    assert code == 2 and "more than the 50 identities" in stderr
    code, _, stderr = run_cli(["select-identities", "--prototypes", tmp_path / "nope.npz", "--count", 5,
                               "--out", out], capsys)
    assert code == 2 and "does not exist" in stderr


def test_prototypes_with_pickled_objects_are_refused(tmp_path):
    np.savez(tmp_path / "bad.npz", ids=np.array(["a", 1], dtype=object), embeddings=np.zeros((2, 4)))
    with pytest.raises(UsageError, match="not a prototypes file"):
        load_prototypes(tmp_path / "bad.npz")


def test_selection_is_blockwise_and_fast():
    """8000 identities: no N x N matrix (256 MB) is ever allocated, and it takes seconds, not minutes."""
    rng = np.random.default_rng(3)
    x = unit_rows(rng, 8000)
    tracemalloc.start()
    start = time.perf_counter()
    scores = max_similarity(x, block=1024)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 40 * 2**20, f"peak {peak / 2**20:.0f} MiB"  # a 1024 x 1024 tile is 4 MiB; N x N would be 244
    assert seconds < 20, f"{seconds:.1f} s"  # ~1 s on 2 cores; 110K identities take ~N^2 times longer
    assert scores.shape == (8000,) and np.all(scores < 0.35)
