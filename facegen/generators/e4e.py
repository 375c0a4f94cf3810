"""The e4e encoder (encoder4editing, Tov et al. 2021) in plain PyTorch, state-dict compatible with
``e4e_ffhq_encode.pt`` (its ``encoder.*`` keys with the prefix removed).

Structure (as published): an IR-SE50 body (24 bottleneck units with squeeze-excitation, stages of 3/4/14/3 units
of 64/128/256/512 channels), three taps (after units 6, 20, 23: 64x64, 32x32, 16x16 for a 256x256 input), an FPN
that merges them, and one GradualStyleBlock per W+ layer. Block 0 predicts a single w from the coarsest features;
every other block predicts a delta added to it at its own layer (the "progressive" e4e design, at its final
stage where all deltas are on).

``forward(x)`` takes (N, 3, 256, 256) images in [-1, 1] and returns (N, n_latent, 512) codes *before*
``latent_avg`` is added (e4e adds the checkpoint's ``latent_avg`` afterwards).

``widths`` and ``style_dim`` exist for the tiny random-weight test fixtures; the published encoder uses the
defaults.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from facegen.generators.stylegan2 import EqualLinear

IR50_UNITS = (3, 4, 14, 3)  # bottleneck units per stage of IR-50
TAPS = (6, 20, 23)  # body indices whose outputs feed the FPN: last unit of stages 2, 3, 4
COARSE_END, MIDDLE_END = 3, 7  # W+ layers [0, 3) read 16x16 features, [3, 7) 32x32, [7, n) 64x64
INPUT_SIZE = 256


class SqueezeExcite(nn.Module):
    """Channel attention: global average -> bottleneck 1x1 convs -> sigmoid gate (names fc1, fc2)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x):
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * gate


class IRSEUnit(nn.Module):
    """Improved-residual bottleneck with squeeze-excitation (``shortcut_layer`` + ``res_layer``)."""

    def __init__(self, in_channel: int, depth: int, stride: int):
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)  # a plain subsampling when the width does not change
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channel, depth, 1, stride, bias=False), nn.BatchNorm2d(depth)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SqueezeExcite(depth, 16),
        )

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)


class GradualStyleBlock(nn.Module):
    """Stride-2 convs down to 1x1 (log2(spatial) of them), then an equalised linear layer -> one style vector."""

    def __init__(self, in_channel: int, out_channel: int, spatial: int):
        super().__init__()
        self.out_channel = out_channel
        layers: list[nn.Module] = []
        for i in range(int(math.log2(spatial))):
            layers += [nn.Conv2d(in_channel if i == 0 else out_channel, out_channel, 3, stride=2, padding=1),
                       nn.LeakyReLU()]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(out_channel, out_channel)

    def forward(self, x):
        return self.linear(self.convs(x).reshape(-1, self.out_channel))


def upsample_add(coarse: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
    """FPN merge: bilinear (align_corners=True) upsampling of the coarser map to the lateral's size, plus it."""
    return F.interpolate(coarse, size=lateral.shape[-2:], mode="bilinear", align_corners=True) + lateral


class Encoder4Editing(nn.Module):
    def __init__(self, stylegan_size: int = 1024, style_dim: int = 512,
                 widths: tuple[int, int, int, int] = (64, 128, 256, 512)):
        super().__init__()
        self.n_latent = 2 * int(round(math.log2(stylegan_size))) - 2
        self.style_dim = style_dim
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.PReLU(widths[0])
        )
        units = []
        in_channel = widths[0]
        for depth, count in zip(widths, IR50_UNITS):
            for i in range(count):  # the first unit of each stage halves the resolution
                units.append(IRSEUnit(in_channel, depth, stride=2 if i == 0 else 1))
                in_channel = depth
        self.body = nn.Sequential(*units)

        top = widths[3]
        self.styles = nn.ModuleList()
        for i in range(self.n_latent):
            spatial = 16 if i < COARSE_END else 32 if i < MIDDLE_END else 64
            self.styles.append(GradualStyleBlock(top, style_dim, spatial))
        self.latlayer1 = nn.Conv2d(widths[2], top, 1)  # 32x32 lateral
        self.latlayer2 = nn.Conv2d(widths[1], top, 1)  # 64x64 lateral

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 1. backbone, keeping the three feature maps the FPN needs
        x = self.input_layer(x)
        taps = []
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in TAPS:
                taps.append(x)
        fine, middle, coarse = taps  # 64x64, 32x32, 16x16 for a 256x256 input

        # 2. one base w from the coarsest features, used at every layer
        w = self.styles[0](coarse)
        codes = [w] * self.n_latent

        # 3. a delta per further layer, from the FPN level that layer reads
        features = coarse
        for i in range(1, self.n_latent):
            if i == COARSE_END:
                features = p_middle = upsample_add(coarse, self.latlayer1(middle))
            elif i == MIDDLE_END:
                features = upsample_add(p_middle, self.latlayer2(fine))
            codes[i] = w + self.styles[i](features)
        return torch.stack(codes, dim=1)


def encoder_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """Constructor arguments of :class:`Encoder4Editing` read from its (prefix-free) state dict."""
    try:
        n_latent = sum(1 for k in state_dict if k.startswith("styles.") and k.endswith(".linear.weight"))
        style_dim = state_dict["styles.0.linear.weight"].shape[0]
        widths = (
            state_dict["input_layer.0.weight"].shape[0],
            state_dict["latlayer2.weight"].shape[1],
            state_dict["latlayer1.weight"].shape[1],
            state_dict["latlayer1.weight"].shape[0],
        )
    except KeyError as exc:
        raise ValueError(f"not an e4e encoder state dict (missing {exc.args[0]!r})") from None
    return {"stylegan_size": 2 ** ((n_latent + 2) // 2), "style_dim": style_dim, "widths": widths}
