"""Loading the published StyleGAN2 (rosinality format) and e4e checkpoints into :mod:`stylegan2` / :mod:`e4e`.

Formats:

* rosinality ``stylegan2-ffhq-config-f.pt`` (from ``convert_weight.py``): ``{"g_ema": state_dict,
  "latent_avg": (512,)}``, sometimes with ``"g"`` and ``"d"``; training checkpoints add optimiser states and an
  ``argparse.Namespace`` under ``"args"``.
* e4e ``e4e_ffhq_encode.pt``: ``{"opts": dict of plain values, "state_dict": {"encoder.*", "decoder.*"},
  "latent_avg": (18, 512)}``; the decoder is a rosinality ``Generator(opts["stylegan_size"], 512, 8, 2)``.

Every file is read with ``torch.load(weights_only=True)``: tensors and plain containers only, nothing executed
(``argparse.Namespace`` is the one class allowed, for rosinality training checkpoints). A checkpoint is a local
path or a Hub file ``owner/repo/path/in/repo.pt@revision`` (optionally written ``hf://…``), fetched with
``huggingface_hub.hf_hub_download`` (its cache, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` apply). Problems raise
FileNotFoundError or ValueError with a one-line message; nothing here knows about facegen runs.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from facegen.generators.e4e import Encoder4Editing, encoder_config
from facegen.generators.safe_pickle import describe_refusal
from facegen.generators.stylegan2 import Generator, generator_config

HUB_FILE = re.compile(r"^(?:hf://)?(?P<repo>[\w.-]+/[\w.-]+)/(?P<file>[^@]+?)(?:@(?P<revision>[\w./-]+))?$")
LATENT_AVG_SAMPLES = 10_000  # e4e computes the average w from 10,000 samples when a checkpoint lacks it


@dataclass
class ResolvedFile:
    path: str  # local file
    source: str  # what to record: the local path, or hf://repo/file@commit


def check_checkpoint_spec(spec: str) -> None:
    """Cheap early check (no download): a local file that exists, or something shaped like a Hub file."""
    local = os.path.expanduser(os.fspath(spec))
    if os.path.isfile(local):
        return
    if os.path.isdir(local):
        raise FileNotFoundError(f"checkpoint {spec} is a directory; give the .pt file inside it")
    if HUB_FILE.match(spec) is None or spec.startswith((".", "/", "~")):
        raise FileNotFoundError(f"checkpoint {spec} not found (give a local .pt file or a Hub file "
                                "owner/repo/file.pt@revision)")


def resolve_checkpoint(spec: str) -> ResolvedFile:
    """A local path, or a Hub file ``owner/repo/file@revision`` downloaded into the Hub cache."""
    spec = os.fspath(spec)
    check_checkpoint_spec(spec)
    local = os.path.expanduser(spec)
    if os.path.isfile(local):
        return ResolvedFile(os.path.abspath(local), os.path.abspath(local))
    match = HUB_FILE.match(spec)
    from huggingface_hub import hf_hub_download

    repo, filename, revision = match["repo"], match["file"], match["revision"]
    try:
        path = hf_hub_download(repo_id=repo, filename=filename, revision=revision)
    except Exception as exc:  # offline, 404, gated, auth: one line, with the reason the Hub gave
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(f"checkpoint {spec} is not a local file and could not be fetched from the Hub "
                                f"({type(exc).__name__}: {reason})") from None
    # the cache path is …/snapshots/<commit>/<file>: record the commit actually used
    parts = os.path.normpath(path).split(os.sep)
    commit = parts[parts.index("snapshots") + 1] if "snapshots" in parts else revision or "main"
    return ResolvedFile(path, f"hf://{repo}/{filename}@{commit}")


def read_checkpoint(path: str) -> dict[str, Any]:
    """``torch.load`` restricted to tensors and plain values (memory-mapped when the file format allows)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                ckpt = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except pickle.UnpicklingError as exc:
        # torch's message is a page of advice; keep the part that names what was refused
        what = describe_refusal(exc)
        if "nsupported global" in what.lower():
            raise ValueError(f"{path}: refused to unpickle anything but tensors and plain values ({what})") \
                from None
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({what})") from None
    except Exception as exc:  # random or truncated bytes raise about anything (KeyError, IndexError, MemoryError…)
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True, assign=True)`` with a one-line message naming the mismatch."""
    result = None
    try:
        result = module.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = "; ".join(lines[1:3]) if len(lines) > 1 else lines[0] if lines else ""
        raise ValueError(f"{what} does not match the published architecture: {detail[:300]}") from None
    assert result is None or (not result.missing_keys and not result.unexpected_keys)


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def build_generator(state_dict: dict[str, torch.Tensor], latent_avg: torch.Tensor | None, what: str) -> Generator:
    """A :class:`Generator` with the architecture read from ``state_dict``, loaded strictly, set to eval."""
    config = generator_config(state_dict)
    with torch.device("meta"):  # no random init of weights that are about to be replaced
        generator = Generator(**config)
    load_strict(generator, state_dict, what)
    if latent_avg is None:
        # the convention of rosinality/e4e when the file has no average: the mean w of many samples
        with torch.no_grad():
            z = torch.randn(LATENT_AVG_SAMPLES, generator.style_dim, generator=torch.Generator().manual_seed(0))
            latent_avg = generator.mapping(z).mean(0)
    latent_avg = latent_avg.float().reshape(-1, generator.style_dim)[0].clone()
    generator.register_buffer("latent_avg", latent_avg, persistent=False)
    return _frozen(generator)


def load_stylegan2(spec: str) -> tuple[Generator, str]:
    """Generator from a rosinality file (``g_ema``), an e4e file (``decoder.*``) or a bare generator state dict.

    Returns the generator (on CPU, eval, no grad, ``latent_avg`` set) and the file's recorded source.
    """
    resolved = resolve_checkpoint(spec)
    ckpt = read_checkpoint(resolved.path)
    if "g_ema" in ckpt:
        state_dict = ckpt["g_ema"]
    elif isinstance(ckpt.get("state_dict"), dict) and any(k.startswith("decoder.") for k in ckpt["state_dict"]):
        state_dict = strip_prefix(ckpt["state_dict"], "decoder.")
    elif "style.1.weight" in ckpt:
        state_dict = ckpt
    else:
        raise ValueError(f"{spec}: no StyleGAN2 generator found (expected a rosinality file with 'g_ema', or an "
                         "e4e file with decoder.* weights)")
    latent_avg = ckpt.get("latent_avg") if isinstance(ckpt.get("latent_avg"), torch.Tensor) else None
    return build_generator(state_dict, latent_avg, f"generator in {spec}"), resolved.source


@dataclass
class E4EModels:
    """What ``e4e_ffhq_encode.pt`` holds: the encoder, its StyleGAN2 decoder and the W+ average."""

    encoder: Encoder4Editing
    generator: Generator
    latent_avg: torch.Tensor  # (n_latent, style_dim), added to the encoder's output
    opts: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, 256, 256) in [-1, 1] -> W+ codes (N, n_latent, style_dim)."""
        return self.encoder(images) + self.latent_avg


def load_e4e(spec: str) -> E4EModels:
    """The e4e encoder, decoder and ``latent_avg`` of a published-format e4e checkpoint (on CPU, eval, no grad)."""
    resolved = resolve_checkpoint(spec)
    ckpt = read_checkpoint(resolved.path)
    state_dict = ckpt.get("state_dict")
    if not isinstance(state_dict, dict) or not any(k.startswith("encoder.") for k in state_dict):
        raise ValueError(f"{spec} is not an e4e checkpoint (expected 'state_dict' with encoder.* weights)")
    opts = ckpt.get("opts") if isinstance(ckpt.get("opts"), dict) else {}
    encoder_type = opts.get("encoder_type", "Encoder4Editing")
    if encoder_type != "Encoder4Editing":
        raise ValueError(f"{spec} holds a {encoder_type} encoder; only Encoder4Editing (e4e) checkpoints are "
                         "supported")
    encoder_sd = strip_prefix(state_dict, "encoder.")
    config = encoder_config(encoder_sd)
    if "stylegan_size" in opts and int(opts["stylegan_size"]) != config["stylegan_size"]:
        raise ValueError(f"{spec}: opts say stylegan_size={opts['stylegan_size']} but the encoder weights are "
                         f"for size {config['stylegan_size']}")
    with torch.device("meta"):
        encoder = Encoder4Editing(**config)
    load_strict(encoder, encoder_sd, f"e4e encoder in {spec}")
    _frozen(encoder)

    latent_avg = ckpt.get("latent_avg")
    if not isinstance(latent_avg, torch.Tensor):
        latent_avg = None
    if not any(k.startswith("decoder.") for k in state_dict):
        raise ValueError(f"{spec} has no decoder.* weights (an e4e checkpoint carries its StyleGAN2 decoder)")
    generator = build_generator(strip_prefix(state_dict, "decoder."), latent_avg, f"e4e decoder in {spec}")
    if generator.n_latent != encoder.n_latent:
        raise ValueError(f"{spec}: the encoder predicts {encoder.n_latent} W+ layers but the decoder has "
                         f"{generator.n_latent}")
    if latent_avg is None:
        # e4e: the mean w when trained from the average, nothing otherwise
        latent_avg = generator.latent_avg if opts.get("start_from_latent_avg", True) else \
            torch.zeros(encoder.style_dim)
    latent_avg = latent_avg.float().reshape(-1, encoder.style_dim).expand(encoder.n_latent, -1).clone()
    return E4EModels(encoder, generator, latent_avg, dict(opts), resolved.source)
