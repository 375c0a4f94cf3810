"""StyleGAN2 (config-f) generator in plain PyTorch, state-dict compatible with rosinality's ``stylegan2-pytorch``.

The published FFHQ weights in PyTorch form are rosinality conversions: ``stylegan2-ffhq-config-f.pt``
(``{"g_ema": state_dict, "latent_avg": (512,)}``) and the ``decoder.*`` part of e4e's ``e4e_ffhq_encode.pt``. This
module rebuilds that network with the same parameter and buffer names and shapes, so those files load with
``strict=True``, but without compiled extensions: the FIR filtering (``upfirdn2d``) is a depthwise convolution and
the "fused" bias + leaky ReLU is two plain ops. It runs on CPU and GPU alike.

Names follow the published state dict (``style.N``, ``input.input``, ``conv1``, ``to_rgb1``, ``convs.N``,
``to_rgbs.N``, ``noises.noise_N``, blur kernels ``convs.N.conv.blur.kernel`` and ``to_rgbs.N.upsample.kernel``).

Usage::

    g = Generator(1024)
    g.load_state_dict(ckpt["g_ema"], strict=True)
    g.latent_avg.copy_(ckpt["latent_avg"])
    w = g.mapping(torch.randn(4, 512))             # (4, 512)
    w = g.truncate(w, psi=0.7)                     # toward latent_avg
    images = g.synthesis(g.broadcast(w))           # (4, 3, 1024, 1024) in [-1, 1]
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

BLUR_TAPS = (1, 3, 3, 1)
LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)  # keeps the activations' variance after the leaky ReLU, as in the original


def fir_kernel(taps: Sequence[float] = BLUR_TAPS, gain: float = 1.0) -> torch.Tensor:
    """2-D separable FIR kernel from 1-D taps, normalised to sum to ``gain``."""
    t = torch.tensor(taps, dtype=torch.float32)
    k = torch.outer(t, t)
    return k / k.sum() * gain


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad (negative = crop), filter with ``kernel``, keep every ``down``-th pixel.

    Same padding convention as NVIDIA's and rosinality's op (``pad = (before, after)`` on both axes). The filter
    is applied as a depthwise convolution with the flipped kernel, i.e. a true convolution.
    """
    n, c, h, w = x.shape
    if up > 1:
        spread = x.new_zeros(n, c, h * up, w * up)
        spread[:, :, ::up, ::up] = x
        x = spread
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    weight = torch.flip(kernel, [0, 1]).to(x.dtype)[None, None].expand(c, 1, *kernel.shape)
    return F.conv2d(x, weight, stride=down, groups=c)


def bias_leaky_relu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """What the CUDA ``fused_leaky_relu`` computes: (x + bias) -> leaky ReLU(0.2) -> * sqrt(2)."""
    shape = [1, -1] + [1] * (x.ndim - 2)
    return F.leaky_relu(x + bias.view(shape), LRELU_SLOPE) * LRELU_GAIN


class PixelNorm(nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class EqualLinear(nn.Module):
    """Linear layer with the equalised learning-rate scaling applied at run time (weights stored unscaled)."""

    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0, lr_mul: float = 1.0,
                 activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x):
        if self.activation:
            return bias_leaky_relu(F.linear(x, self.weight * self.scale), self.bias * self.lr_mul)
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class Blur(nn.Module):
    """FIR low-pass applied after a transposed (upsampling) convolution."""

    def __init__(self, pad: tuple[int, int], gain: float = 1.0):
        super().__init__()
        self.register_buffer("kernel", fir_kernel(BLUR_TAPS, gain))
        self.pad = pad

    def forward(self, x):
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    """2x FIR upsampling of the RGB skip branch."""

    def __init__(self, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", fir_kernel(BLUR_TAPS, factor ** 2))
        p = len(BLUR_TAPS) - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x):
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class ModulatedConv2d(nn.Module):
    """Convolution whose input channels are scaled by a per-sample style, with optional demodulation.

    Computed in the "non-fused" form (scale the activations, convolve with the shared weight, rescale the output),
    which is the same function as the per-sample weight form and lets the whole batch share one convolution.
    """

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int,
                 demodulate: bool = True, upsample: bool = False):
        super().__init__()
        self.in_channel, self.out_channel, self.kernel_size = in_channel, out_channel, kernel_size
        self.upsample = upsample
        self.demodulate = demodulate
        if upsample:
            # the transposed conv makes 2H + k - 2 pixels; the blur pads/crops back to exactly 2H
            factor = 2
            p = (len(BLUR_TAPS) - factor) - (kernel_size - 1)
            self.blur = Blur(pad=((p + 1) // 2 + factor - 1, p // 2 + 1), gain=factor ** 2)
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1.0)
        self.scale = 1.0 / math.sqrt(in_channel * kernel_size ** 2)
        self.padding = kernel_size // 2

    def forward(self, x, style):
        batch = x.shape[0]
        weight = self.weight[0] * self.scale  # (out, in, k, k)
        style = self.modulation(style)  # (batch, in)
        x = x * style.view(batch, -1, 1, 1)
        if self.upsample:
            out = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2)
            out = self.blur(out)
        else:
            out = F.conv2d(x, weight, padding=self.padding)
        if self.demodulate:
            # 1 / ||w * s|| per (sample, output channel), as if the weight itself had been modulated
            demod = torch.rsqrt(torch.einsum("oikl,bi->bo", weight.square(), style.square()) + 1e-8)
            out = out * demod.view(batch, -1, 1, 1)
        return out


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x, noise):
        return x + self.weight * noise


class ConstantInput(nn.Module):
    def __init__(self, channel: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, batch: int):
        return self.input.expand(batch, -1, -1, -1)


class BiasLeakyReLU(nn.Module):
    """Holds the bias of a styled conv (state-dict name ``activate.bias``)."""

    def __init__(self, channel: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel))

    def forward(self, x):
        return bias_leaky_relu(x, self.bias)


class StyledConv(nn.Module):
    def __init__(self, in_channel: int, out_channel: int, style_dim: int, upsample: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, 3, style_dim, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = BiasLeakyReLU(out_channel)

    def forward(self, x, style, noise):
        return self.activate(self.noise(self.conv(x, style), noise))


class ToRGB(nn.Module):
    def __init__(self, in_channel: int, style_dim: int, upsample: bool = True):
        super().__init__()
        if upsample:
            self.upsample = Upsample()
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x, style, skip=None):
        out = self.conv(x, style) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


def channel_table(channel_multiplier: int = 2, channel_max: int = 512) -> dict[int, int]:
    """Feature channels per resolution (config-f: 512 up to 32x32, then halving; ``channel_max`` caps all)."""
    table = {4: 512, 8: 512, 16: 512, 32: 512}
    for res, base in ((64, 256), (128, 128), (256, 64), (512, 32), (1024, 16)):
        table[res] = base * channel_multiplier
    return {res: min(c, channel_max) for res, c in table.items()}


class Generator(nn.Module):
    """StyleGAN2 generator: ``mapping`` (z -> w) and ``synthesis`` (W+ codes -> images in [-1, 1]).

    ``channel_max`` is not part of the published architecture (it is always 512 there); the test fixtures use a
    small value to make tiny random-weight generators with the same key names.
    """

    def __init__(self, size: int, style_dim: int = 512, n_mlp: int = 8, channel_multiplier: int = 2,
                 lr_mlp: float = 0.01, channel_max: int = 512):
        super().__init__()
        log_size = int(round(math.log2(size)))
        if size < 8 or 2 ** log_size != size:
            raise ValueError(f"StyleGAN2 size must be a power of two >= 8, got {size}")
        self.size, self.style_dim, self.log_size = size, style_dim, log_size
        self.channels = channel_table(channel_multiplier, channel_max)

        # mapping network: index 0 is the (parameter-free) PixelNorm, so the linears are style.1 … style.n_mlp
        self.style = nn.Sequential(
            PixelNorm(), *[EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation=True) for _ in range(n_mlp)]
        )

        # synthesis network: 4x4 block, then one (upsampling conv, conv, toRGB) triple per doubling
        self.input = ConstantInput(self.channels[4])
        self.conv1 = StyledConv(self.channels[4], self.channels[4], style_dim)
        self.to_rgb1 = ToRGB(self.channels[4], style_dim, upsample=False)
        self.convs = nn.ModuleList()
        self.upsamples = nn.ModuleList()  # empty, kept because the published module has it
        self.to_rgbs = nn.ModuleList()
        # one stored noise image per styled conv: 4x4, then two per resolution 8x8 … size x size
        self.num_layers = (log_size - 2) * 2 + 1
        self.noises = nn.Module()
        for i in range(self.num_layers):
            res = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, res, res))
        in_channel = self.channels[4]
        for res_log in range(3, log_size + 1):
            out_channel = self.channels[2 ** res_log]
            self.convs.append(StyledConv(in_channel, out_channel, style_dim, upsample=True))
            self.convs.append(StyledConv(out_channel, out_channel, style_dim))
            self.to_rgbs.append(ToRGB(out_channel, style_dim))
            in_channel = out_channel

        self.n_latent = log_size * 2 - 2
        # the average w: not in the published state dict (stored next to it as "latent_avg"), so not persistent
        self.register_buffer("latent_avg", torch.zeros(style_dim), persistent=False)

    # ---- mapping ---------------------------------------------------------------------------------------------

    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, style_dim) -> w (N, style_dim)."""
        return self.style(z)

    def truncate(self, w: torch.Tensor, psi: float, target: torch.Tensor | None = None) -> torch.Tensor:
        """w_avg + psi * (w - w_avg); psi < 1 pulls toward the average, psi > 1 pushes away from it.

        ``target`` replaces ``latent_avg`` as the point to move toward (any shape that broadcasts against ``w``).
        """
        avg = self.latent_avg if target is None else target
        return avg + psi * (w - avg)

    def broadcast(self, w: torch.Tensor) -> torch.Tensor:
        """(N, style_dim) -> the W+ code (N, n_latent, style_dim) that uses the same w at every layer."""
        return w.unsqueeze(1).expand(-1, self.n_latent, -1)

    # ---- synthesis -------------------------------------------------------------------------------------------

    def stored_noise(self) -> list[torch.Tensor]:
        return [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]

    def random_noise(self, batch: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Fresh noise images (batch, 1, r, r) for every layer, drawn on the CPU (same draws on any device)."""
        device = self.input.input.device
        return [torch.randn(batch, 1, *n.shape[-2:], generator=generator).to(device) for n in self.stored_noise()]

    def synthesis(self, w_plus: torch.Tensor, noise: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """W+ codes (N, n_latent, style_dim) -> images (N, 3, size, size), roughly in [-1, 1].

        ``noise`` (one tensor per layer, broadcastable to (N, 1, r, r)) defaults to the stored noise buffers, so the
        output is a deterministic function of ``w_plus``.
        """
        if w_plus.ndim != 3 or w_plus.shape[1] != self.n_latent:
            raise ValueError(f"expected W+ codes (N, {self.n_latent}, {self.style_dim}), got {tuple(w_plus.shape)}")
        noise = self.stored_noise() if noise is None else list(noise)
        x = self.input(w_plus.shape[0])
        x = self.conv1(x, w_plus[:, 0], noise[0])
        skip = self.to_rgb1(x, w_plus[:, 1])
        layer = 1
        for up_conv, conv, to_rgb in zip(self.convs[::2], self.convs[1::2], self.to_rgbs):
            x = up_conv(x, w_plus[:, layer], noise[layer])
            x = conv(x, w_plus[:, layer + 1], noise[layer + 1])
            skip = to_rgb(x, w_plus[:, layer + 2], skip)
            layer += 2
        return skip

    def forward(self, z: torch.Tensor, psi: float = 1.0) -> torch.Tensor:
        """z -> images with the same w at every layer (truncated toward ``latent_avg`` when psi != 1)."""
        w = self.mapping(z)
        if psi != 1.0:
            w = self.truncate(w, psi)
        return self.synthesis(self.broadcast(w))


def generator_config(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    """Constructor arguments of :class:`Generator` read from a rosinality-format state dict.

    Raises ValueError when the dict does not look like a StyleGAN2 generator.
    """
    try:
        style_dim = state_dict["style.1.weight"].shape[0]
        channel_max = state_dict["input.input"].shape[1]
    except KeyError as exc:
        raise ValueError(f"not a StyleGAN2 generator state dict (missing {exc.args[0]!r})") from None
    n_mlp = sum(1 for k in state_dict if re.fullmatch(r"style\.\d+\.weight", k))
    n_blocks = sum(1 for k in state_dict if re.fullmatch(r"to_rgbs\.\d+\.bias", k))
    size = 2 ** (n_blocks + 2)
    # channel_multiplier shows in the first resolution above 32 that is not capped by channel_max
    channel_multiplier = 2
    for res_log in range(6, n_blocks + 3):
        width = state_dict[f"convs.{2 * (res_log - 3)}.conv.weight"].shape[1]
        base = {64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}.get(2 ** res_log)
        if base and width < channel_max:
            channel_multiplier = max(1, width // base)
            break
    return {"size": size, "style_dim": style_dim, "n_mlp": n_mlp, "channel_multiplier": channel_multiplier,
            "channel_max": channel_max}
