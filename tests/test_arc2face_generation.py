"""Arc2Face generation (facegen.generators.arc2face) on tiny random-weight models in the Hub folder layout.

Projection onto the "id" token, SLERP statistics, the shift, seeding, batching equivalence, and that the
hand-written sampling loop is the diffusers pipeline's computation.
"""

import copy

import numpy as np
import pytest
import torch

from facegen.generators import arc2face as a2f
from facegen.testing.arc2face import tiny_vocab


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_dir(tiny_arc2face):
    return tiny_arc2face


@pytest.fixture(scope="module")
def models(tiny_dir):
    return a2f.load_arc2face_pipeline(str(tiny_dir), device="cpu")


@pytest.fixture(scope="module")
def generator(models):
    return a2f.Arc2FaceGenerator(models, steps=4, guidance=3.0)


def unit_rows(n, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, 512))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Layout and loading
# ---------------------------------------------------------------------------------------------------------------


def test_tiny_models_use_the_hub_layout_and_load_their_saved_weights(tiny_dir, models):
    for name in a2f.BASE_FILES:
        assert (tiny_dir / a2f.BASE_DIRNAME / name).is_file(), name
    for name in a2f.ARC2FACE_FILES:
        assert (tiny_dir / a2f.ARC2FACE_DIRNAME / name).is_file(), name
    assert (tiny_dir / a2f.ARC2FACE_DIRNAME / "arcface.onnx").is_file()
    assert type(models.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert models.scheduler.config.beta_schedule == "scaled_linear"  # SD1.5's betas kept
    assert models.unet.dtype == torch.float32  # CPU default
    # the encoder checkpoint uses transformers 4.x key names (text_model.*), as Arc2Face's pytorch_model.bin does;
    # every saved tensor must have been loaded, not re-initialised
    saved = torch.load(tiny_dir / "arc2face" / "encoder" / "pytorch_model.bin", weights_only=True)
    assert all(k.startswith("text_model.") for k in saved)
    loaded = models.text_encoder.state_dict()
    for key, value in saved.items():
        short = key.removeprefix("text_model.")
        target = loaded[short] if short in loaded else loaded[key]
        assert torch.equal(target, value), key


def test_missing_files_in_model_dir_are_named(tmp_path, tiny_dir):
    with pytest.raises(a2f.ModelsNotFoundError) as info:
        a2f.model_paths(str(tmp_path))
    message = str(info.value)
    assert "\n" not in message
    assert "vae/config.json" in message and "hf download stable-diffusion-v1-5/stable-diffusion-v1-5" in message

    # base present, Arc2Face UNet missing
    import shutil
    shutil.copytree(tiny_dir / a2f.BASE_DIRNAME, tmp_path / a2f.BASE_DIRNAME)
    (tmp_path / a2f.ARC2FACE_DIRNAME / "encoder").mkdir(parents=True)
    with pytest.raises(a2f.ModelsNotFoundError, match=r"FoivosPar/Arc2Face files missing .*arc2face/config.json"):
        a2f.model_paths(str(tmp_path))


def test_tokenizer_spells_the_prompt_like_clip(models):
    vocab, _ = tiny_vocab()
    ids = a2f.prompt_input_ids(models.tokenizer)[0].tolist()
    assert len(ids) == 77
    words = [vocab[w + "</w>"] for w in ("photo", "of", "a", "id", "person")]
    assert ids[:7] == [vocab["<|startoftext|>"], *words, vocab["<|endoftext|>"]]
    assert set(ids[7:]) == {vocab["<|endoftext|>"]}  # padded with EOS, as SD1.5's tokenizer
    assert a2f.id_token_id(models.tokenizer) == vocab["id</w>"] == ids[4]


# ---------------------------------------------------------------------------------------------------------------
# Projection
# ---------------------------------------------------------------------------------------------------------------


def test_projection_lands_on_the_id_token(models):
    tok, enc = models.tokenizer, models.text_encoder
    e = unit_rows(2, seed=1)
    out = a2f.project_embeddings(tok, enc, e)
    assert out.shape == (2, 77, enc.config.hidden_size)
    # the encoder is causal: positions before "id" (BOS photo of a = 0..3) cannot see the identity, every
    # position from 4 on can
    assert torch.equal(out[0, :4], out[1, :4])
    assert (out[0, 4:] - out[1, 4:]).abs().amax(dim=1).min() > 1e-3

    # reference: the same encoder with the "id" row of its embedding table replaced by the zero-padded vector
    token = a2f.id_token_id(tok)
    for i in range(2):
        reference = copy.deepcopy(enc)
        row = torch.zeros(enc.config.hidden_size)
        row[:512] = torch.from_numpy(e[i])
        with torch.no_grad():
            reference.get_input_embeddings().weight[token] = row
            expected = reference(input_ids=a2f.prompt_input_ids(tok))[0][0]
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-5)


def test_projection_batched_equals_one_at_a_time_and_normalises(models):
    tok, enc = models.tokenizer, models.text_encoder
    e = unit_rows(5, seed=2)
    batched = a2f.project_embeddings(tok, enc, e)
    single = torch.cat([a2f.project_embeddings(tok, enc, e[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)
    # raw (unnormalised) ArcFace vectors give the same result as their unit versions
    scaled = a2f.project_embeddings(tok, enc, e * np.array([[3.0], [0.5], [10.0], [1.0], [7.0]], np.float32))
    torch.testing.assert_close(scaled, batched, rtol=0, atol=1e-5)
    # the hook is removed afterwards: a plain prompt call is unaffected
    plain = enc(input_ids=a2f.prompt_input_ids(tok))[0]
    assert not torch.allclose(plain[0, 4:], batched[0, 4:])
    with pytest.raises(ValueError, match="exceeds"):
        a2f.project_embeddings(tok, enc, np.ones((1, enc.config.hidden_size + 1), np.float32))


# ---------------------------------------------------------------------------------------------------------------
# Prototype and SLERP
# ---------------------------------------------------------------------------------------------------------------


def test_prototype_is_the_normalised_mean():
    e = unit_rows(5, seed=3) * 4.0  # raw norms do not matter
    p = a2f.prototype(e)
    unit = e / np.linalg.norm(e, axis=1, keepdims=True)
    mean = unit.mean(axis=0)
    np.testing.assert_allclose(p, mean / np.linalg.norm(mean), atol=1e-6)


def angle(a, b):
    return float(np.arccos(np.clip(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b), -1, 1)))


def test_slerp_stays_on_the_geodesic_and_never_passes_the_source():
    sources = unit_rows(5, seed=4)
    proto = a2f.prototype(sources)
    variations = a2f.sample_variations(proto, sources, 400, alpha=2.0, seed=7)
    for v in variations:
        theta = angle(proto, sources[v.target])
        assert abs(np.linalg.norm(v.embedding) - 1) < 1e-5
        assert 0.0 <= v.t <= 1.0
        assert angle(proto, v.embedding) <= theta + 1e-5
        assert abs(angle(proto, v.embedding) - v.t * theta) < 1e-4  # constant-speed arc
        assert abs(angle(v.embedding, sources[v.target]) - (1 - v.t) * theta) < 1e-4
        # on the great circle through prototype and target: no component outside their plane
        basis = np.linalg.qr(np.stack([proto, sources[v.target]]).T)[0]
        assert np.linalg.norm(v.embedding - basis @ (basis.T @ v.embedding)) < 1e-5
    # every source is a target before any repeats
    assert sorted(v.target for v in variations[:5]) == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(a2f.slerp(proto, proto, 0.3), proto, atol=1e-6)


def test_slerp_t_follows_beta_alpha_alpha():
    from scipy import stats

    sources = unit_rows(5, seed=5)
    proto = a2f.prototype(sources)
    t2 = np.array([v.t for v in a2f.sample_variations(proto, sources, 20000, alpha=2.0, seed=11)])
    assert abs(t2.mean() - 0.5) < 0.01
    assert abs(t2.var() - 1 / 20) < 0.002  # Beta(2, 2): variance 1 / (4 (2a + 1)) = 0.05
    assert stats.kstest(t2, stats.beta(2, 2).cdf).pvalue > 0.01
    t1 = np.array([v.t for v in a2f.sample_variations(proto, sources, 20000, alpha=1.0, seed=11)])
    assert abs(t1.var() - 1 / 12) < 0.003  # alpha = 1 is uniform
    assert stats.kstest(t2, stats.uniform.cdf).pvalue < 1e-6


def test_variations_and_seeds_depend_only_on_the_identity_seed():
    sources = unit_rows(5, seed=6)
    proto = a2f.prototype(sources)
    first = a2f.sample_variations(proto, sources, 4, 2.0, seed=123)
    again = a2f.sample_variations(proto, sources, 4, 2.0, seed=123)
    other = a2f.sample_variations(proto, sources, 4, 2.0, seed=124)
    assert [(v.t, v.target) for v in first] == [(v.t, v.target) for v in again]
    assert [v.t for v in first] != [v.t for v in other]
    seeds = {a2f.image_seed(s, j, k) for s in (1, 2) for j in range(4) for k in range(5)}
    assert len(seeds) == 40 and all(0 <= s < 2 ** 63 for s in seeds)
    assert a2f.image_seed(1, 2, 3) == a2f.image_seed(1, 2, 3) != a2f.image_seed(1, 3, 2)


# ---------------------------------------------------------------------------------------------------------------
# Shift
# ---------------------------------------------------------------------------------------------------------------


def test_shift_is_added_to_the_conditional_embeddings():
    cond = torch.randn(3, 77, 512)
    delta = torch.randn(77, 512)
    torch.testing.assert_close(a2f.apply_shift(cond, delta, 1.0), cond + delta)
    torch.testing.assert_close(a2f.apply_shift(cond, delta, 0.5), cond + 0.5 * delta)
    vector = torch.randn(512)
    torch.testing.assert_close(a2f.apply_shift(cond, vector, 2.0), cond + 2.0 * vector.view(1, 1, 512))
    assert a2f.apply_shift(cond, None, 1.0) is cond
    assert a2f.apply_shift(cond, delta, 0.0) is cond
    with pytest.raises(RuntimeError):
        a2f.apply_shift(cond, torch.randn(76, 512), 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------


def test_batched_generation_equals_one_identity_at_a_time(generator):
    cond = generator.project(unit_rows(3, seed=8))
    rows = torch.tensor([0, 0, 1, 1, 2, 2])  # 3 identities x 2 images
    seeds = [a2f.image_seed(s, 0, k) for s in (10, 11, 12) for k in range(2)]
    batched = generator.generate(cond[rows], seeds)
    assert batched.shape == (6, 128, 128, 3) and batched.dtype == np.uint8
    alone = np.concatenate([generator.generate(cond[rows[i:i + 2]], seeds[i:i + 2]) for i in (0, 2, 4)])
    assert np.abs(batched.astype(int) - alone.astype(int)).max() <= 1
    # same seeds, same images; other seeds, other images
    assert np.array_equal(generator.generate(cond[rows], seeds), batched)
    changed = generator.generate(cond[rows[:2]], [seeds[0] + 1, seeds[1]])
    assert np.abs(changed[0].astype(int) - batched[0].astype(int)).mean() > 1
    assert np.abs(changed[1].astype(int) - batched[1].astype(int)).max() <= 1


def test_sampling_loop_matches_the_diffusers_pipeline(models, generator):
    cond = generator.project(unit_rows(2, seed=9))
    seeds = [5, 6]
    ours = generator.generate(cond, seeds)
    pipe = models.diffusers_pipeline()
    size = generator.resolution // generator.vae_scale
    latents = a2f.initial_latents(seeds, (4, size, size), "cpu", torch.float32)
    theirs = pipe(prompt_embeds=cond, latents=latents, num_inference_steps=4, guidance_scale=3.0,
                  height=generator.resolution, width=generator.resolution, output_type="np").images
    theirs = (theirs * 255).round().astype(np.uint8)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_dtype_is_applied_to_every_module(tiny_dir):
    half = a2f.load_arc2face_pipeline(str(tiny_dir), device="cpu", dtype=torch.bfloat16)
    assert {half.unet.dtype, half.vae.dtype, half.text_encoder.dtype} == {torch.bfloat16}
    out = a2f.project_embeddings(half.tokenizer, half.text_encoder, unit_rows(2))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 77, 512)
    assert a2f.default_dtype("cuda") == torch.float16 and a2f.default_dtype("cpu") == torch.float32
