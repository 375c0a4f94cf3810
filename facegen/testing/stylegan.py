"""Tiny random-weight StyleGAN2 and e4e checkpoints in the published file formats.

The architecture is the published one (same module tree and key names) at a small generator size with narrow
channels, so a CPU test runs in seconds: ``write_stylegan2_checkpoint`` writes a rosinality-format file
(``{"g_ema": state_dict, "latent_avg": (style_dim,)}``), ``write_e4e_checkpoint`` an e4e-format file
(``{"opts": {plain values}, "state_dict": {"encoder.*", "decoder.*"}, "latent_avg": (n_latent, style_dim)}``).
The full-width key names and shapes at 1024 are checked separately against a table taken from the upstream code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from facegen.generators.e4e import Encoder4Editing
from facegen.generators.stylegan2 import Generator

TINY_GENERATOR = {"style_dim": 32, "n_mlp": 2, "channel_max": 32}
TINY_ENCODER_WIDTHS = (16, 16, 32, 32)  # the squeeze-excitation reduction of 16 needs at least 16 channels


def tiny_generator(size: int = 32, seed: int = 0) -> Generator:
    """A random-weight generator with the published structure, narrow channels and visible noise."""
    torch.manual_seed(seed)
    generator = Generator(size, **TINY_GENERATOR)
    with torch.no_grad():
        for name, param in generator.named_parameters():
            if name.endswith("noise.weight"):
                param.fill_(0.1)  # published weights have non-zero noise strengths; the init has zeros
            elif name.endswith("activate.bias") or (name.startswith("to_rgb") and name.count(".") <= 2
                                                     and name.endswith(".bias") and ".conv." not in name):
                param.normal_(0, 0.05)  # conv and RGB biases, zero at init
            elif name.startswith("to_rgb") and name.endswith(".conv.weight"):
                param.mul_(0.25)  # keeps random renders mostly inside [-1, 1]
        z = torch.randn(2000, generator.style_dim, generator=torch.Generator().manual_seed(seed + 1))
        generator.latent_avg.copy_(generator.mapping(z).mean(0))
    return generator.eval()


def tiny_encoder(size: int = 32, seed: int = 0) -> Encoder4Editing:
    torch.manual_seed(seed + 7)
    encoder = Encoder4Editing(size, style_dim=TINY_GENERATOR["style_dim"], widths=TINY_ENCODER_WIDTHS)
    with torch.no_grad():
        # make the predicted codes small, like a trained e4e's offsets from latent_avg
        for block in encoder.styles:
            block.linear.weight.mul_(0.3)
    return encoder.eval()


def write_stylegan2_checkpoint(path: str | os.PathLike, size: int = 32, seed: int = 0) -> Path:
    """A rosinality ``convert_weight.py``-style file: ``{"g_ema": state_dict, "latent_avg": (style_dim,)}``."""
    generator = tiny_generator(size, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"g_ema": generator.state_dict(), "latent_avg": generator.latent_avg.clone()}, path)
    return path


def e4e_opts(size: int) -> dict:
    """Plain-valued options like those ``vars(opts)`` stores in ``e4e_ffhq_encode.pt``."""
    return {
        "exp_dir": "experiments/tiny", "dataset_type": "ffhq_encode", "encoder_type": "Encoder4Editing",
        "batch_size": 8, "test_batch_size": 4, "workers": 8, "test_workers": 4, "learning_rate": 0.0001,
        "optim_name": "ranger", "train_decoder": False, "start_from_latent_avg": True, "lpips_type": "alex",
        "lpips_lambda": 0.8, "id_lambda": 0.5, "l2_lambda": 1.0, "stylegan_weights": "stylegan2-ffhq-config-f.pt",
        "stylegan_size": size, "checkpoint_path": None, "max_steps": 300000, "image_interval": 100,
        "board_interval": 50, "val_interval": 10000, "save_interval": 10000, "w_discriminator_lambda": 0.1,
        "w_discriminator_lr": 2e-05, "r1": 10, "d_reg_every": 16, "use_w_pool": True, "w_pool_size": 50,
        "delta_norm": 2, "delta_norm_lambda": 0.0002, "progressive_steps": [0, 20000, 22000, 24000],
        "progressive_start": 20000, "progressive_step_every": 2000, "save_training_data": False,
        "sub_exp_dir": None, "keep_optimizer": False, "resume_training_from_ckpt": None,
        "update_param_list": None, "device": "cuda:0",
    }


def write_e4e_checkpoint(path: str | os.PathLike, size: int = 32, seed: int = 0) -> Path:
    """An ``e4e_ffhq_encode.pt``-style file whose decoder is the generator of ``write_stylegan2_checkpoint``
    with the same ``size`` and ``seed`` (e4e trains its encoder against a frozen StyleGAN2)."""
    generator = tiny_generator(size, seed)
    encoder = tiny_encoder(size, seed)
    state_dict = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    state_dict.update({f"decoder.{k}": v for k, v in generator.state_dict().items()})
    latent_avg = generator.latent_avg.clone().unsqueeze(0).repeat(generator.n_latent, 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state_dict, "opts": e4e_opts(size), "latent_avg": latent_avg}, path)
    return path


def write_checkpoints(folder: str | os.PathLike, size: int = 32, seed: int = 0) -> tuple[Path, Path]:
    """Both files in ``folder``: (``e4e_tiny.pt``, ``stylegan2_tiny.pt``)."""
    from facegen.generators.weights import write_test_model_marker

    folder = Path(folder)
    files = (write_e4e_checkpoint(folder / "e4e_tiny.pt", size, seed),
             write_stylegan2_checkpoint(folder / "stylegan2_tiny.pt", size, seed))
    write_test_model_marker(folder, "e4e / StyleGAN2 checkpoints")
    return files
