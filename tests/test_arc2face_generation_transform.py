"""The `arc2face` transform on tiny random-weight models: per-identity recipe, batching equivalence, dropped
faces, order, overlap of post-processing with generation, and `facegen build` end to end."""

import io
import json
import threading
import time

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import facegen
from facegen.errors import UsageError
from facegen.generators import arc2face as a2f
from facegen.plugins.arc2face import Arc2FaceTransform
from facegen.plugins.folder import FolderSource
from facegen.records import Identity, SourceImage
from facegen.streams import run_ahead, stop_if_closed
from facegen.testing.folder import write_folder_source

FAST = {"steps": "3", "latents": "2", "images_per_latent": "2"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_dir(tiny_arc2face):
    return tiny_arc2face


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return FolderSource(write_folder_source(tmp_path_factory.mktemp("src"), identities=4, images_per_identity=3))


def identities(source, seeds=(101, 102, 103, 104)):
    out = []
    for cls, (identity_id, seed) in enumerate(zip(source.identities(), seeds)):
        items = source.load(identity_id)
        out.append(Identity(identity_id, cls, seed, images=[i for i in items if isinstance(i, SourceImage)]))
    return out


def make(tiny_dir, **opts):
    transform = Arc2FaceTransform(model_dir=str(tiny_dir), **{**FAST, **opts})
    transform.setup("cpu")
    return transform


def pixels(face):
    return np.asarray(Image.open(io.BytesIO(face.image)).convert("RGB")).astype(int)


def run_all(transform, batch, call_size):
    results = []
    for start in range(0, len(batch), call_size):
        results.extend(transform(batch[start:start + call_size]))
    return results


def test_outputs_follow_the_recipe_and_do_not_depend_on_batching(tiny_dir, source):
    batch = identities(source)
    together = make(tiny_dir, batch_size="4", images_per_batch="3")
    assert together.batch_size == 4
    results = list(together(batch))
    assert [r.identity.id for r in results] == [i.id for i in batch]  # input order
    for identity, result in zip(batch, results):
        assert result.skipped == []
        assert [(f.meta["latent_index"], f.meta["image_index"]) for f in result.faces] == [
            (0, 0), (0, 1), (1, 0), (1, 1)]
        for face in result.faces:
            assert face.ext == "png" and pixels(face).shape == (112, 112, 3)
            j, k = face.meta["latent_index"], face.meta["image_index"]
            assert face.meta["seed"] == a2f.image_seed(identity.seed, j, k)
            assert 0 <= face.meta["t"] <= 1 and -1 <= face.meta["cosine_to_prototype"] <= 1
            assert face.ref in {image.ref for image in identity.images}  # the source the latent moves toward
        # both images of a latent share t; the two latents do not
        ts = [f.meta["t"] for f in result.faces]
        assert ts[0] == ts[1] and ts[2] == ts[3] and ts[0] != ts[2]

    # one identity per call, one image per micro-batch: same faces
    alone = run_all(make(tiny_dir, batch_size="1", images_per_batch="1"), batch, 1)
    for a, b in zip(results, alone):
        exact = ("latent_index", "t", "image_index", "seed")
        assert [[f.meta[k] for k in exact] for f in a.faces] == [[f.meta[k] for k in exact] for f in b.faces]
        for fa, fb in zip(a.faces, b.faces):
            # batched convolutions may round differently: at most one grey level, a tiny change of cosine
            assert np.abs(pixels(fa) - pixels(fb)).max() <= 1
            assert fa.meta["cosine_to_prototype"] == pytest.approx(fb.meta["cosine_to_prototype"], abs=1e-2)
    # the identity seed drives everything: other seeds, other t and images
    reseeded = list(together(identities(source, seeds=(201, 202, 203, 204))))
    assert [f.meta["t"] for f in reseeded[0].faces] != [f.meta["t"] for f in results[0].faces]
    together.close()


def test_prototype_comes_from_the_recogniser_or_from_source_embeddings(tiny_dir, source):
    transform = make(tiny_dir)
    batch = identities(source)[:2]
    plans = transform.plan_identities(batch)
    crops = np.stack([np.asarray(Image.open(io.BytesIO(i.data)).convert("RGB")) for i in batch[0].images])
    expected = a2f.prototype(transform.embedder.embed(crops))
    np.testing.assert_allclose(plans[0].prototype, expected, atol=1e-6)

    # a source handing over embeddings (DisCo) is used as is, without decoding the images
    raw = np.random.default_rng(0).normal(size=(3, 512)).astype(np.float32)  # not unit length
    images = [SourceImage(ref=f"x/{n}", data=b"not an image", ext="png", hints={"embedding": raw[n]})
              for n in range(3)]
    plan = transform.plan_identities([Identity("x", 0, 5, images=images)])[0]
    np.testing.assert_allclose(plan.prototype, a2f.prototype(raw), atol=1e-6)
    assert plan.skipped == [] and len(plan.variations) == 2
    transform.close()
    # source_embeddings=off recomputes them, and so has to decode the (here broken) images
    recompute = make(tiny_dir, source_embeddings="off")
    plan = recompute.plan_identities([Identity("x", 0, 5, images=images)])[0]
    assert [s.reason for s in plan.skipped] == ["corrupt image"] * 3 + ["no usable source image"]
    recompute.close()


def test_embed_and_the_transform_share_one_rule_to_the_last_bit(tiny_dir, source):
    """`facegen embed` (and so select-identities) computes the transform's own prototypes, bit for bit, skipping
    what the transform skips; a zero embedding handed over is a counted skip in both."""
    from facegen.builders.quality.identities import FaceEmbedder, embed_source

    batch = identities(source)
    broken = SourceImage(ref="x/0.png", data=b"\x89PNG broken", ext="png")
    zero = SourceImage(ref="x/1.png", data=b"", ext="png", hints={"embedding": np.zeros(512, np.float32)})
    batch[1] = Identity(batch[1].id, 1, batch[1].seed, images=[*batch[1].images, broken, zero])
    transform = make(tiny_dir)
    plans = transform.plan_identities(batch)
    transform.close()

    class Batch:  # the same images as a source hands them to `facegen embed`
        def identities(self):
            return [identity.id for identity in batch]

        def load(self, identity_id):
            return next(identity.images for identity in batch if identity.id == identity_id)

    prototypes = embed_source(Batch(), FaceEmbedder(str(tiny_dir)), progress=False)
    assert prototypes.ids == [identity.id for identity in batch]
    for plan, embedded in zip(plans, prototypes.embeddings):
        assert plan.prototype.tobytes() == embedded.tobytes()
    assert [(s.ref, s.reason) for s in plans[1].skipped] == [(s.ref, s.reason) for s in prototypes.skipped] == [
        ("x/0.png", "corrupt image"), ("x/1.png", "zero embedding")]


def test_identity_without_usable_images_is_skipped_in_place(tiny_dir, source):
    transform = make(tiny_dir)
    batch = identities(source)[:3]
    broken = [SourceImage(ref="1/0.png", data=b"\x89PNG broken", ext="png")]
    batch[1] = Identity(batch[1].id, 1, batch[1].seed, images=broken)
    results = list(transform(batch))
    assert [r.identity.id for r in results] == [i.id for i in batch]
    assert len(results[0].faces) == 4 and len(results[2].faces) == 4
    assert results[1].faces == []
    assert [s.reason for s in results[1].skipped] == ["corrupt image", "no usable source image"]
    transform.close()


def test_images_without_a_face_are_dropped_with_a_reason(tiny_dir, source):
    # dlib's real HOG detector finds no face in the noise the random-weight UNet draws
    transform = make(tiny_dir, detector="dlib")
    results = list(transform(identities(source)[:1]))
    assert results[0].faces == []
    assert [s.reason for s in results[0].skipped] == ["no face detected"] * 4
    assert results[0].skipped[0].ref == f"{source.identities()[0]}/latent0_image0"
    transform.close()


def test_align_off_keeps_the_generated_image(tiny_dir, source):
    transform = make(tiny_dir, align="off")
    assert transform.aligner is None
    face = next(iter(transform(identities(source)[:1]))).faces[0]
    assert pixels(face).shape == (128, 128, 3)  # tiny UNet sample size 16 x VAE factor 8
    assert "cosine_to_prototype" not in face.meta  # not measured without alignment: absent, never null
    assert "cosine_to_prototype" not in transform.json_features(source) and transform.quality_fields == ()
    transform.close()


def test_shift_file_changes_the_conditioning(tiny_dir, source, tmp_path):
    delta = torch.randn(77, 512, generator=torch.Generator().manual_seed(0))
    save_file({"delta": delta}, str(tmp_path / "delta.safetensors"))
    batch = identities(source)[:1]
    plain = make(tiny_dir)
    shifted = make(tiny_dir, shift=str(tmp_path / "delta.safetensors"), shift_scale="2")
    torch.testing.assert_close(shifted.delta, delta)
    seen = {}
    for name, transform in (("plain", plain), ("shifted", shifted)):  # the conditioning the sampler receives
        generate = transform.generator.generate

        def recording(cond, seeds, _generate=generate, _name=name):
            seen.setdefault(_name, []).append(cond.detach().clone())
            return _generate(cond, seeds)

        transform.generator.generate = recording
    a, b = list(plain(batch))[0].faces, list(shifted(batch))[0].faces
    torch.testing.assert_close(torch.cat(seen["shifted"]), torch.cat(seen["plain"]) + 2 * delta, atol=1e-5, rtol=0)
    assert [f.meta["seed"] for f in a] == [f.meta["seed"] for f in b]
    assert np.abs(pixels(a[0]) - pixels(b[0])).mean() > 1
    assert shifted.provenance()["shift_norm"] == pytest.approx(float(delta.norm()), rel=1e-5)

    save_file({"delta": torch.zeros(76, 512)}, str(tmp_path / "short.safetensors"))
    with pytest.raises(UsageError, match=r"has shape \(76, 512\)"):
        make(tiny_dir, shift=str(tmp_path / "short.safetensors"))

    save_file({"a": delta, "b": delta.clone()}, str(tmp_path / "two.safetensors"))
    with pytest.raises(UsageError, match="no tensor named 'delta'"):
        make(tiny_dir, shift=str(tmp_path / "two.safetensors"))
    save_file({"delta": torch.zeros(77, 768)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(UsageError, match=r"shape \(77, 768\)"):
        make(tiny_dir, shift=str(tmp_path / "wide.safetensors"))
    with pytest.raises(UsageError, match="does not exist"):
        Arc2FaceTransform(shift=str(tmp_path / "missing.safetensors"))


def test_postprocessing_overlaps_generation(tiny_dir, source):
    transform = make(tiny_dir, images_per_batch="2")
    spans = {"generate": [], "postprocess": []}
    lock = threading.Lock()

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with lock:
                    spans[name].append((start, time.perf_counter(), threading.current_thread().name))
        return wrapper

    transform.generator.generate = timed("generate", transform.generator.generate)
    transform.postprocess = timed("postprocess", transform.postprocess)
    results = list(transform(identities(source)))
    assert sum(len(r.faces) for r in results) == 16
    assert len(spans["generate"]) == 8 and len(spans["postprocess"]) == 8
    assert {t for _, _, t in spans["generate"]} == {threading.current_thread().name}
    assert all(t.startswith("arc2face-post") for _, _, t in spans["postprocess"])
    # post-processing of micro-batch b ran while micro-batch b+1 was being generated
    overlapping = [p for p in spans["postprocess"]
                   if any(g[0] < p[1] and p[0] < g[1] for g in spans["generate"])]
    assert len(overlapping) >= 4
    transform.close()


def test_the_stream_plans_and_generates_the_next_call_while_finishing_this_one(tiny_dir, source):
    """Across calls (issue 21 §1): call n+1 is planned while call n generates, and generated while call n's last
    micro-batch is post-processed; each stage waits for that event, which a call-by-call loop would only produce
    after the wait (WAIT: far above the milliseconds it takes). The results are a call per batch's, byte for byte."""
    wait = 10.0
    transform = make(tiny_dir, batch_size="1", images_per_batch="4")  # one identity, one micro-batch per call
    batches = [[identity] for identity in identities(source)[:3]]
    alone = [result for batch in batches for result in transform(batch)]
    planned = [threading.Event() for _ in batches]
    generating = [threading.Event() for _ in batches]
    waited = {"next planned": [], "next generating": []}
    plan_call, generate, postprocess = transform.plan_call, transform.generate, transform.postprocess
    calls = iter(range(len(batches)))  # one generator call per call

    def planning(batch):
        planned[batch[0].cls].set()
        return plan_call(batch)

    def generating_(cond, chunk):
        n = next(calls)
        generating[n].set()
        if n + 1 < len(batches):
            waited["next planned"].append(planned[n + 1].wait(wait))
        return generate(cond, chunk)

    def postprocessing(plans, chunk, images):
        n = plans[0].identity.cls
        if n + 1 < len(batches):
            waited["next generating"].append(generating[n + 1].wait(wait))
        return postprocess(plans, chunk, images)

    transform.plan_call, transform.generate, transform.postprocess = planning, generating_, postprocessing
    streamed = list(transform.stream(batches))
    transform.close()
    assert waited == {"next planned": [True, True], "next generating": [True, True]}
    assert [r.identity.id for r in streamed] == [b[0].id for b in batches]
    assert [[(f.image, f.meta, f.ref) for f in r.faces] for r in streamed] == \
        [[(f.image, f.meta, f.ref) for f in r.faces] for r in alone]
    assert not [t for t in threading.enumerate() if t.name == "arc2face-plan"]


def test_closing_the_stream_stops_generation_within_a_denoising_step(tiny_dir, source):
    """Ctrl-C closes the run's stages: the generation thread stops after the denoising step in progress, not after
    the micro-batch (1,000 steps here)."""
    transform = make(tiny_dir, steps="1000", batch_size="1", images_per_batch="1")
    assert transform.generator.between_steps is stop_if_closed
    steps, generating = [], threading.Event()

    def between_steps():
        steps.append(threading.current_thread().name)
        generating.set()
        stop_if_closed()

    transform.generator.between_steps = between_steps
    stage = run_ahead(transform.stream([identities(source)[:1]]), 1, "test-generate")
    assert generating.wait(60)
    stage.close()
    transform.close()
    assert 1 <= len(steps) < 500 and set(steps) == {"test-generate"}


def test_a_failure_planning_the_next_call_comes_after_this_calls_results(tiny_dir, source):
    """As in a call-by-call loop, the results before a failure are all handed over (and written) before it, even
    while they are still post-processed (slowly, here) when planning the next call fails."""
    transform = make(tiny_dir, batch_size="1", images_per_batch="4")
    batches = [[identity] for identity in identities(source)[:2]]
    plan_call, postprocess = transform.plan_call, transform.postprocess

    def planning(batch):
        if batch[0].cls == 1:
            raise UsageError("source image unreadable")
        return plan_call(batch)

    def slow_postprocessing(*args):
        time.sleep(0.5)
        return postprocess(*args)

    transform.plan_call, transform.postprocess = planning, slow_postprocessing
    got = []
    with pytest.raises(UsageError, match="source image unreadable"):
        for result in transform.stream(batches):
            got.append(result.identity.id)
    transform.close()
    assert got == [batches[0][0].id]


def test_missing_weights_and_bad_options_are_one_line_usage_errors(tmp_path, tiny_dir):
    empty = tmp_path / "models"
    empty.mkdir()
    with pytest.raises(UsageError, match="stable-diffusion-v1-5/stable-diffusion-v1-5 files missing"):
        Arc2FaceTransform(model_dir=str(empty)).setup("cpu")
    with pytest.raises(UsageError, match="not a directory"):
        Arc2FaceTransform(model_dir=str(tmp_path / "nowhere")).setup("cpu")
    with pytest.raises(UsageError, match="not a multiple of the VAE factor 8"):
        Arc2FaceTransform(model_dir=str(tiny_dir), resolution="100").setup("cpu")
    with pytest.raises(UsageError, match="latents"):
        Arc2FaceTransform(latents="0")


@pytest.mark.slow
def test_build_end_to_end_loads_with_datasets(tiny_dir, tmp_path, monkeypatch):
    src = write_folder_source(tmp_path / "src", identities=5, images_per_identity=3)
    out = tmp_path / "out"
    opts = [f"model_dir={tiny_dir}", "steps=3", "latents=2", "images_per_latent=3", "batch_size=2"]
    args = ["build", "--source", "folder", "--source-path", src, "--plugin", "arc2face", "--out", out,
            "--shard-size", 3]
    for opt in opts:
        args += ["--plugin-opt", opt]
    facegen(*args, env={"HF_HUB_OFFLINE": "1"}, check=True)

    ds = datasets.load_dataset(str(out), split="train")
    assert ds.num_rows == 5 * 2 * 3
    assert ds.column_names == ["png", "cls", "json", "__key__", "__url__"]
    assert set(ds.features["json"]) == {"identity", "source", "source_ref", "width", "height", "latent_index", "t",
                                        "image_index", "seed", "cosine_to_prototype"}
    assert ds.features["json"]["seed"] == datasets.Value("int64")
    rows = sorted(ds, key=lambda r: r["__key__"])  # the published order is shuffled
    first = rows[0]
    assert first["__key__"] == "000000_000" and first["cls"] == 0 and first["png"].size == (112, 112)
    assert first["json"]["identity"] == "0" and first["json"]["source"] == "folder"
    assert (first["json"]["width"], first["json"]["height"]) == (112, 112)
    assert [row["json"]["latent_index"] for row in rows[:6]] == [0, 0, 0, 1, 1, 1]

    stats = json.loads((out / ".facegen" / "units" / "000000.json").read_text())  # unit 0: identities 0-2
    assert stats["images"] == 3 * 6 and stats["quality"]["cosine_to_prototype"]["count"] == 18
    card = (out / "README.md").read_text()
    assert "FoivosPar/Arc2Face" in card and "stable-diffusion-v1-5" in card

    # offline with neither a model_dir nor a Hub cache: one line, exit 2
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))  # an empty cache
    proc = facegen("build", "--source", "folder", "--source-path", src, "--plugin", "arc2face", "--out",
                   tmp_path / "out2", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "hf download" in lines[0] and "Traceback" not in proc.stderr


def test_card_metadata_lists_every_model_with_its_licence():
    transform = Arc2FaceTransform()
    models = {m.id: m for m in transform.models()}
    assert set(models) == {"stable-diffusion-v1-5/stable-diffusion-v1-5", "FoivosPar/Arc2Face",
                           "FoivosPar/Arc2Face/arcface.onnx", "insightface/antelopev2/scrfd_10g_bnkps.onnx"}
    assert models["stable-diffusion-v1-5/stable-diffusion-v1-5"].revision == a2f.BASE_REVISION
    assert models["FoivosPar/Arc2Face"].revision == a2f.ARC2FACE_REVISION
    assert "OpenRAIL-M" in models["stable-diffusion-v1-5/stable-diffusion-v1-5"].license
    assert "WebFace42M" in models["FoivosPar/Arc2Face"].note
    assert "non-commercial" in models["insightface/antelopev2/scrfd_10g_bnkps.onnx"].license
    assert all(m.citation.startswith("@") for m in models.values())
    assert "george2025digi2real" in transform.citation and "paraperas2024arc2face" in transform.citation
    assert transform.license.commercial_use is False
    assert transform.quality_fields == ("cosine_to_prototype",)
    # align=off drops the detector from the licence chain
    assert len(Arc2FaceTransform(align="off").models()) == 3
