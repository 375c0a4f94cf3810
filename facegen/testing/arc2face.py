"""Tiny random-weight Arc2Face models in exactly the folder layout of the Hub repositories.

``write_tiny_arc2face(root)`` fills ``root`` the way ``model_dir=root`` expects it
(``facegen.generators.arc2face.MODEL_DIR_LAYOUT``)::

    root/stable-diffusion-v1-5/model_index.json
    root/stable-diffusion-v1-5/vae/{config.json, diffusion_pytorch_model.safetensors}
    root/stable-diffusion-v1-5/tokenizer/{vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json}
    root/stable-diffusion-v1-5/scheduler/scheduler_config.json      (SD1.5's own PNDM config, verbatim values)
    root/arc2face/arc2face/{config.json, diffusion_pytorch_model.safetensors}     (UNet)
    root/arc2face/encoder/{config.json, pytorch_model.bin}           (CLIP text encoder, 4.x key names)
    root/arc2face/arcface.onnx                                       (tiny recogniser, facegen.testing.arcface)
    root/antelopev2/scrfd_10g_bnkps.onnx          (SCRFD-shaped stand-in: one centred face on any non-flat image)

The weights are random: images are noise, only shapes, loading code, seeding and batching are real.
Sizes: UNet channels (32, 64) with cross-attention width 512 (= the tiny text encoder width; the ArcFace vector is
zero-padded into it, so the width must be >= 512); text encoder 2 layers, 8 heads; VAE with 4 blocks (factor 8, as
SD) of 8-16 channels, UNet sample size 16, so images are 128x128.

The tokenizer is a real byte-level BPE in CLIP's format with a small vocabulary: the 256 byte symbols, the same
with the ``</w>`` end-of-word suffix, merges that build the words of "photo of a id person" (so "id" is one token,
as in CLIP's vocabulary where it is 1014), then ``<|startoftext|>`` and ``<|endoftext|>`` last, as in CLIP.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

BASE_DIRNAME = "stable-diffusion-v1-5"
ARC2FACE_DIRNAME = "arc2face"
WORDS = ("photo", "of", "a", "id", "person")
TEXT_HIDDEN = 512
UNET_SAMPLE_SIZE = 16

# SD1.5's scheduler/scheduler_config.json (the pipeline swaps the class to DPMSolverMultistep, as upstream does).
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def tiny_vocab(words=WORDS) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of a CLIP-format BPE that spells ``words`` as one token each."""
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right: "p h", "ph o", "pho t", "phot o</w>"
            merge = (parts[0], parts[1])
            merged = parts[0] + parts[1]
            if " ".join(merge) not in merges:
                merges.append(" ".join(merge))
                vocab_list.append(merged)
            parts = [merged] + parts[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for token in vocab_list:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def write_tokenizer(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
              "tokenizer_class": "CLIPTokenizer", **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


# Full-size architectures (random weights), for speed measurements on a GPU: SD1.5's UNet and VAE configs and
# CLIP ViT-L/14's text encoder (Arc2Face keeps these shapes).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
TINY_UNET = dict(sample_size=UNET_SAMPLE_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
                 block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_HIDDEN,
                 attention_head_dim=8, norm_num_groups=32)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=32, sample_size=512)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=1, norm_num_groups=8, sample_size=UNET_SAMPLE_SIZE * 8)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 projection_dim=768)
TINY_TEXT = dict(hidden_size=TEXT_HIDDEN, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
                 projection_dim=TEXT_HIDDEN)


def write_text_encoder(folder: Path, vocab_size: int, bos: int, eos: int, seed: int, sizes=TINY_TEXT) -> None:
    """A CLIPTextModel saved as Arc2Face ships its encoder: config.json + pytorch_model.bin, 4.x key names."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                            pad_token_id=eos, hidden_act="quick_gelu", **sizes)
    torch.manual_seed(seed)
    model = CLIPTextModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    config.architectures = ["CLIPTextModel"]
    config.to_json_file(str(folder / "config.json"))
    state = model.state_dict()
    # transformers 4.x nests the modules under `text_model.`; 5.x strips that prefix when loading old checkpoints.
    if not any(k.startswith("text_model.") for k in state):
        state = {f"text_model.{k}": v for k, v in state.items()}
    torch.save({k: v.contiguous() for k, v in state.items()}, folder / "pytorch_model.bin")


def write_unet(folder: Path, seed: int, config=TINY_UNET) -> None:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    UNet2DConditionModel(**config).save_pretrained(folder)


def write_vae(folder: Path, seed: int, config=TINY_VAE) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(**config).save_pretrained(folder)


def write_face_models(root: Path, seed: int, full_size: bool = False) -> None:
    """Recogniser and detector stand-in of ``facegen.testing.arcface``, where ``model_dir=root`` looks for them:
    ``root/arc2face/arcface.onnx`` (as in the Arc2Face repo) and ``root/antelopev2/scrfd_10g_bnkps.onnx``;
    ``full_size``: the R100 and SCRFD-10G-size networks instead of the tiny ones."""
    from facegen.testing.arcface import write_arcface_r100, write_scrfd_10g, write_scrfd_standin, write_tiny_arcface

    if full_size:
        write_arcface_r100(root / ARC2FACE_DIRNAME / "arcface.onnx", seed=seed)
        write_scrfd_10g(root / "antelopev2" / "scrfd_10g_bnkps.onnx", seed=seed + 1)
    else:
        write_tiny_arcface(root / ARC2FACE_DIRNAME / "arcface.onnx", seed=seed)
        write_scrfd_standin(root / "antelopev2" / "scrfd_10g_bnkps.onnx")


def write_tiny_arc2face(root: str | os.PathLike, seed: int = 0, face_models: bool = True,
                        full_size: bool = False) -> Path:
    """Write the tiny model folder (layout above) and return ``root``. Writing takes about a second.

    ``full_size=True`` writes SD1.5's UNet/VAE and CLIP ViT-L/14's text-encoder architectures instead (random
    weights, ~4.5 GB), and the R100 / SCRFD-10G-size face models (``facegen.testing.arcface``): same speed per
    image as the real Arc2Face and its post-processing, for GPU benchmarks; images stay noise.
    """
    unet_config, vae_config, text_sizes = (SD15_UNET, SD15_VAE, SD15_TEXT) if full_size else (
        TINY_UNET, TINY_VAE, TINY_TEXT)
    root = Path(root)
    base = root / BASE_DIRNAME
    arc = root / ARC2FACE_DIRNAME
    write_tokenizer(base / "tokenizer")
    vocab, _ = tiny_vocab()
    write_vae(base / "vae", seed + 1, vae_config)
    (base / "scheduler").mkdir(parents=True, exist_ok=True)
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER_CONFIG, indent=2))
    (base / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
    write_unet(arc / "arc2face", seed + 2, unet_config)
    write_text_encoder(arc / "encoder", len(vocab), vocab["<|startoftext|>"], vocab["<|endoftext|>"], seed + 3,
                       text_sizes)
    if face_models:
        write_face_models(root, seed + 4, full_size)
    from facegen.generators.weights import write_test_model_marker

    write_test_model_marker(root, "Arc2Face / SD1.5 / face models")
    return root
