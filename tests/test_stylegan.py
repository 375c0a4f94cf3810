"""StyleGAN2 generator (plain PyTorch) and checkpoint loading, on tiny random-weight files in the published formats."""

import os

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from facegen.generators.stylegan2 import Generator, ModulatedConv2d, fir_kernel, generator_config, upfirdn2d
from facegen.generators.stylegan_checkpoints import (
    load_e4e,
    load_stylegan2,
    read_checkpoint,
    resolve_checkpoint,
)
from facegen.testing.stylegan import write_stylegan2_checkpoint


@pytest.fixture(scope="module")
def checkpoints(stylegan_checkpoints):
    return stylegan_checkpoints


def naive_upfirdn2d(x, kernel, up, down, pad):
    """The definition, with loops: zero-insert, pad, true convolution with the kernel, subsample."""
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    spread = np.zeros((n, c, h * up, w * up))
    spread[:, :, ::up, ::up] = x
    p0, p1 = pad
    padded = np.zeros((n, c, h * up + p0 + p1, w * up + p0 + p1))
    padded[:, :, p0:p0 + h * up, p0:p0 + w * up] = spread
    oh, ow = padded.shape[2] - kh + 1, padded.shape[3] - kw + 1
    out = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            for a in range(kh):
                for b in range(kw):
                    out[:, :, i, j] += padded[:, :, i + a, j + b] * kernel[kh - 1 - a, kw - 1 - b]
    return out[:, :, ::down, ::down]


@pytest.mark.parametrize("up,down,pad", [(2, 1, (2, 1)), (1, 1, (1, 1)), (1, 2, (1, 1))])
def test_upfirdn2d_matches_its_definition(up, down, pad):
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    kernel = torch.tensor([[1.0, 2, 3, 1], [0, 1, 2, 0], [4, 1, 0, 1], [1, 1, 2, 3]], dtype=torch.float64)
    ours = upfirdn2d(x, kernel, up=up, down=down, pad=pad).numpy()
    ref = naive_upfirdn2d(x.numpy(), kernel.numpy(), up, down, pad)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-10)


def test_blur_kernels_are_the_normalised_1331_filter():
    g = Generator(32, style_dim=16, n_mlp=1, channel_max=16)
    expected = torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 64 * 4
    assert torch.equal(fir_kernel((1, 3, 3, 1), 4), expected)
    kernels = {k: v for k, v in g.state_dict().items() if k.endswith("kernel")}
    assert sorted(kernels) == sorted([f"convs.{i}.conv.blur.kernel" for i in (0, 2, 4)]
                                     + [f"to_rgbs.{i}.upsample.kernel" for i in range(3)])
    assert all(torch.equal(v, expected) for v in kernels.values())


@pytest.mark.parametrize("upsample,demodulate", [(False, True), (True, True), (False, False)])
def test_modulated_conv_equals_the_per_sample_weight_form(upsample, demodulate):
    """StyleGAN2 defines the layer by a per-sample modulated (and demodulated) weight; we compute it by scaling the
    activations instead. Both must give the same function."""
    torch.manual_seed(0)
    conv = ModulatedConv2d(6, 5, 3, style_dim=4, demodulate=demodulate, upsample=upsample)
    with torch.no_grad():
        conv.modulation.bias.normal_()
    x, style = torch.randn(3, 6, 8, 8), torch.randn(3, 4)
    with torch.no_grad():
        ours = conv(x, style)
        s = conv.modulation(style)
        ref = []
        for b in range(3):
            w = conv.weight[0] * conv.scale * s[b].view(1, -1, 1, 1)
            if demodulate:
                w = w * torch.rsqrt(w.square().sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
            if upsample:
                out = F.conv_transpose2d(x[b:b + 1], w.transpose(0, 1), stride=2)
                out = upfirdn2d(out, conv.blur.kernel, pad=conv.blur.pad)
            else:
                out = F.conv2d(x[b:b + 1], w, padding=1)
            ref.append(out)
    ref = torch.cat(ref)
    assert ours.shape == ref.shape == (3, 5, 16 if upsample else 8, 16 if upsample else 8)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_generator_shapes_and_stored_noise_determinism():
    torch.manual_seed(1)
    g = Generator(64, style_dim=32, n_mlp=2, channel_max=32).eval()
    assert g.n_latent == 10 and g.num_layers == 9
    noise_shapes = [tuple(n.shape) for n in g.stored_noise()]
    assert noise_shapes == [(1, 1, 4, 4)] + [(1, 1, r, r) for r in (8, 16, 32, 64) for _ in range(2)]
    with torch.no_grad():
        w = g.mapping(torch.randn(3, 32))
        assert w.shape == (3, 32)
        w_plus = g.broadcast(w)
        first, second = g.synthesis(w_plus), g.synthesis(w_plus)
        assert first.shape == (3, 3, 64, 64)
        assert torch.equal(first, second)  # stored noise: a deterministic function of the code
        for layer in g.convs:
            layer.noise.weight.fill_(0.5)
        stored = g.synthesis(w_plus)
        fresh = g.synthesis(w_plus, g.random_noise(3, torch.Generator().manual_seed(0)))
        assert not torch.allclose(stored, fresh)
        # every sample is computed independently of the others in its batch
        one = torch.cat([g.synthesis(w_plus[i:i + 1]) for i in range(3)])
        torch.testing.assert_close(stored, one, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="W\\+ codes"):
        g.synthesis(w)


def test_truncation_moves_along_the_line_through_the_average():
    g = Generator(32, style_dim=8, n_mlp=1, channel_max=8)
    g.latent_avg.copy_(torch.arange(8.0))
    w = torch.randn(2, 8)
    torch.testing.assert_close(g.truncate(w, 0.0), g.latent_avg.expand(2, -1))
    torch.testing.assert_close(g.truncate(w, 1.0), w)
    torch.testing.assert_close(g.truncate(w, 1.5) - g.latent_avg, 1.5 * (w - g.latent_avg))
    target = torch.randn(2, 8)
    torch.testing.assert_close(g.truncate(w, 0.25, target), target + 0.25 * (w - target))


@pytest.mark.parametrize("kwargs", [dict(size=32, style_dim=32, n_mlp=2, channel_max=32),
                                    dict(size=128, style_dim=16, n_mlp=3, channel_multiplier=1, channel_max=512)])
def test_generator_config_is_read_back_from_a_state_dict(kwargs):
    with torch.device("meta"):
        g = Generator(**kwargs)
        rebuilt = Generator(**generator_config(g.state_dict()))
    assert [(k, v.shape) for k, v in g.state_dict().items()] == [(k, v.shape) for k, v in rebuilt.state_dict().items()]


def test_rosinality_checkpoint_loads_strictly(checkpoints):
    _, g_path = checkpoints
    saved = torch.load(g_path, weights_only=True)
    assert set(saved) == {"g_ema", "latent_avg"} and saved["latent_avg"].shape == (32,)
    g, source = load_stylegan2(str(g_path))
    assert source == str(g_path.resolve())
    assert (g.size, g.n_latent, g.style_dim) == (32, 8, 32)
    assert not g.training and not any(p.requires_grad for p in g.parameters())
    state = g.state_dict()
    assert list(state) == list(saved["g_ema"])
    assert all(torch.equal(state[k], v) for k, v in saved["g_ema"].items())
    assert torch.equal(g.latent_avg, saved["latent_avg"])


def test_e4e_checkpoint_loads_encoder_decoder_and_latent_avg(checkpoints):
    e4e_path, g_path = checkpoints
    saved = torch.load(e4e_path, weights_only=True)  # the opts are plain values: weights_only reads them
    assert saved["opts"]["encoder_type"] == "Encoder4Editing" and saved["latent_avg"].shape == (8, 32)
    models = load_e4e(str(e4e_path))
    enc_state = models.encoder.state_dict()
    assert list(enc_state) == [k[len("encoder."):] for k in saved["state_dict"] if k.startswith("encoder.")]
    assert all(torch.equal(enc_state[k[8:]], v) for k, v in saved["state_dict"].items() if k.startswith("encoder."))
    assert torch.equal(models.latent_avg, saved["latent_avg"])
    # the decoder inside the e4e file is the same network as the rosinality file
    g, _ = load_stylegan2(str(g_path))
    decoder_state = models.generator.state_dict()
    assert all(torch.equal(decoder_state[k], v) for k, v in g.state_dict().items())
    # the generator loader also accepts the e4e file (its decoder)
    from_e4e, _ = load_stylegan2(str(e4e_path))
    assert torch.equal(from_e4e.latent_avg, g.latent_avg)


def test_mismatched_checkpoints_are_refused_with_the_key(tmp_path, checkpoints):
    _, g_path = checkpoints
    ckpt = torch.load(g_path, weights_only=True)
    missing = dict(ckpt, g_ema={k: v for k, v in ckpt["g_ema"].items() if k != "noises.noise_3"})
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="noises.noise_3"):
        load_stylegan2(str(tmp_path / "missing.pt"))
    extra = dict(ckpt, g_ema={**ckpt["g_ema"], "conv1.extra": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="conv1.extra"):
        load_stylegan2(str(tmp_path / "extra.pt"))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no StyleGAN2 generator"):
        load_stylegan2(str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="not an e4e checkpoint"):
        load_e4e(str(g_path))


class Payload:
    """Unpickling this would create a file: the loader must refuse it before anything runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoints_with_code_are_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"g_ema": {}, "latent_avg": torch.zeros(2), "trap": Payload(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(ValueError, match="refused to unpickle"):
        read_checkpoint(str(path))
    assert not marker.exists()
    with pytest.raises(ValueError, match="Unsupported global: GLOBAL io.open"):
        read_checkpoint(str(path))
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(str(tmp_path / "cut.pt"))


def test_rosinality_training_checkpoint_with_namespace_args_loads(tmp_path):
    import argparse

    path = write_stylegan2_checkpoint(tmp_path / "g.pt", size=32)
    ckpt = torch.load(path, weights_only=True)
    ckpt.update(g=ckpt["g_ema"], args=argparse.Namespace(size=32, latent=512, n_mlp=8))
    del ckpt["latent_avg"]  # training checkpoints have none: the average is computed from the mapping network
    torch.save(ckpt, tmp_path / "train.pt")
    g, _ = load_stylegan2(str(tmp_path / "train.pt"))
    with torch.no_grad():
        z = torch.randn(10_000, 32, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(g.latent_avg, g.mapping(z).mean(0))


def test_hub_files_resolve_from_the_cache_with_their_commit(tmp_path, monkeypatch, checkpoints):
    """An offline cluster with a pre-filled Hub cache: `owner/repo/file@revision` resolves without network."""
    import huggingface_hub.constants

    e4e_path, _ = checkpoints
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "hub" / "models--someone--e4e-mirror"
    (repo_dir / "snapshots" / commit).mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    os.link(e4e_path, repo_dir / "snapshots" / commit / "e4e_ffhq_encode.pt")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for spec in (f"someone/e4e-mirror/e4e_ffhq_encode.pt@{commit}", "hf://someone/e4e-mirror/e4e_ffhq_encode.pt"):
        resolved = resolve_checkpoint(spec)
        assert resolved.source == f"hf://someone/e4e-mirror/e4e_ffhq_encode.pt@{commit}"
    models = load_e4e(f"someone/e4e-mirror/e4e_ffhq_encode.pt@{commit}")
    assert models.source.endswith(commit) and models.encoder.n_latent == 8
    with pytest.raises(FileNotFoundError, match="could not be fetched from the Hub") as info:
        resolve_checkpoint("someone/e4e-mirror/missing.pt@main")
    assert "\n" not in str(info.value)


def test_missing_local_files_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found") as info:
        resolve_checkpoint(str(tmp_path / "nothere.pt"))
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="directory"):
        resolve_checkpoint(str(tmp_path))


def test_legacy_pre_zip_checkpoints_load(tmp_path, checkpoints):
    """Files saved by torch < 1.6 cannot be memory-mapped; they are read the ordinary (still weights-only) way."""
    e4e_path, _ = checkpoints
    torch.save(torch.load(e4e_path, weights_only=True), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    models = load_e4e(str(tmp_path / "legacy.pt"))
    reference = load_e4e(str(e4e_path))
    assert all(torch.equal(a, b) for a, b in zip(models.encoder.state_dict().values(),
                                                 reference.encoder.state_dict().values()))
