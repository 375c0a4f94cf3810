"""Arc2Face generation: ArcFace embedding -> CLIP prompt embeddings -> Stable Diffusion 1.5 images.

Model code only (liftable into a notebook): no facegen run machinery is imported here.

Steps, in the order a caller uses them (see ``facegen.plugins.arc2face`` for the Digi2Real recipe):

1. ``prototype(unit_embeddings)``: the normalised mean of an identity's unit ArcFace embeddings.
2. ``sample_variations(prototype, sources, n, alpha, seed)``: SLERP from the prototype toward source embeddings with
   t ~ Beta(alpha, alpha) (Digi2Real §3, eq. 3-5).
3. ``project_embeddings(tokenizer, text_encoder, embeddings)``: Arc2Face's projection. The prompt
   "photo of a id person" is tokenised, the token embedding of "id" is replaced by the unit ArcFace embedding
   zero-padded to the encoder width, then position embeddings, the causal CLIP transformer and the final layer
   norm run as usual. Output: ``last_hidden_state`` (N, 77, hidden), the UNet's ``encoder_hidden_states``.
4. ``apply_shift(cond, delta, scale)``: Digi2Real's domain-gap shift, ``cond + scale * delta``.
5. ``Arc2FaceGenerator.generate(cond, seeds)``: DPM-Solver++ sampling with classifier-free guidance, one
   initial-noise draw per image from its own seed, so a batch gives the same images as one image at a time.

``load_arc2face_pipeline`` assembles the models from the Hub (pinned revisions) or from a local folder laid out like
the Hub repositories (see ``MODEL_DIR_LAYOUT``).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from facegen.generators.embeddings import normalize

PROMPT = "photo of a id person"  # upstream spells it "a id" (arc2face/utils.py); the encoder was tuned on it
ID_WORD = "id"
ARCFACE_DIM = 512

BASE_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# Snapshot hash seen in local Hub caches of this repo (models--stable-diffusion-v1-5--stable-diffusion-v1-5/
# snapshots/451f4fe…); the repo is a copy of runwayml/stable-diffusion-v1-5 with the same history.
BASE_REVISION = "451f4fe16113bff5a5d2269ed5ad43b0592e9a14"
ARC2FACE_ID = "FoivosPar/Arc2Face"
# Revision used by several public projects to download arcface.onnx from this repo; arc2face/ and encoder/ were
# uploaded before arcface.onnx (they are on the earliest model cards), so the revision holds all three.
ARC2FACE_REVISION = "da2f1e9aa3954dad093213acfc9ae75a68da6ffd"

# Files each component needs, relative to its repository root (= the folder under model_dir).
BASE_DIRNAME = "stable-diffusion-v1-5"
ARC2FACE_DIRNAME = "arc2face"
BASE_FILES = (
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "scheduler/scheduler_config.json",
)
ARC2FACE_FILES = (
    "arc2face/config.json",
    "arc2face/diffusion_pytorch_model.safetensors",
    "encoder/config.json",
    "encoder/pytorch_model.bin",
)
RECOGNISER_FILE = "arcface.onnx"  # ArcFace R100 (WebFace42M) that Arc2Face was trained with

MODEL_DIR_LAYOUT = f"""\
MODEL_DIR/{BASE_DIRNAME}/      files of {BASE_ID} (revision {BASE_REVISION[:7]})
    vae/config.json, vae/diffusion_pytorch_model.safetensors
    tokenizer/vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    scheduler/scheduler_config.json
MODEL_DIR/{ARC2FACE_DIRNAME}/              files of {ARC2FACE_ID} (revision {ARC2FACE_REVISION[:7]})
    arc2face/config.json, arc2face/diffusion_pytorch_model.safetensors   (UNet)
    encoder/config.json, encoder/pytorch_model.bin (or model.safetensors)    (CLIP text encoder)
    arcface.onnx                                                          (recogniser)
MODEL_DIR/antelopev2/scrfd_10g_bnkps.onnx     face detector (insightface's antelopev2 pack), used by the transform
Fill it with:
    hf download {BASE_ID} --revision {BASE_REVISION} --local-dir MODEL_DIR/{BASE_DIRNAME} \\
        vae/config.json vae/diffusion_pytorch_model.safetensors tokenizer/vocab.json tokenizer/merges.txt \\
        tokenizer/tokenizer_config.json tokenizer/special_tokens_map.json scheduler/scheduler_config.json
    hf download {ARC2FACE_ID} --revision {ARC2FACE_REVISION} --local-dir MODEL_DIR/{ARC2FACE_DIRNAME} \\
        arc2face/config.json arc2face/diffusion_pytorch_model.safetensors encoder/config.json \\
        encoder/pytorch_model.bin arcface.onnx
    and unzip insightface's antelopev2.zip (model-zoo release) into MODEL_DIR/antelopev2/.
"""


class ModelsNotFoundError(FileNotFoundError):
    """Weights are missing locally and could not be downloaded. The message is one line saying what and how."""


class ModelFileError(ModelsNotFoundError):
    """A weights file is there but cannot be loaded (corrupt, or a pickle that ``weights_only`` refuses). One line
    naming the file; a ModelsNotFoundError, so that every caller that reports those reports this too."""


WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin",
                "diffusion_pytorch_model.bin")


def load_component(what: str, folder: str, load: Callable[[], Any]) -> Any:
    """``load()`` (a ``from_pretrained``), with any failure turned into a one-line ModelFileError naming the file."""
    try:
        return load()
    except Exception as exc:
        from facegen.generators.safe_pickle import describe_refusal

        present = [n for n in WEIGHT_FILES if os.path.isfile(os.path.join(folder, n))]
        if isinstance(exc, pickle.UnpicklingError):  # only a .bin is a pickle
            present = [n for n in present if n.endswith(".bin")] or present
        where = os.path.join(folder, present[0]) if present else folder
        refused = "refused to unpickle anything but tensors: " if isinstance(exc, pickle.UnpicklingError) else ""
        raise ModelFileError(f"cannot load the {what} from {where}: {refused}{describe_refusal(exc)}") from None


# --------------------------------------------------------------------------------------------------------------
# 1-2. Prototype and SLERP variations (Digi2Real §3)
# --------------------------------------------------------------------------------------------------------------


def prototype(unit_embeddings: np.ndarray) -> np.ndarray:
    """The class prototype: the mean of the identity's unit embeddings, projected back onto the sphere (in float64;
    the embeddings are normalised here again, so raw ones give the same prototype)."""
    mean = normalize(unit_embeddings, dtype=np.float64).mean(axis=0)
    if not np.any(mean):
        raise ValueError("the embeddings cancel out: their mean has no direction")
    return normalize(mean, dtype=np.float64).astype(np.float32)


def slerp(start: np.ndarray, end: np.ndarray, t: float) -> np.ndarray:
    """Spherical interpolation between unit vectors: angle(start, result) = t * angle(start, end)."""
    start, end = normalize(start, dtype=np.float64), normalize(end, dtype=np.float64)
    theta = float(np.arccos(np.clip(np.dot(start, end), -1.0, 1.0)))
    if theta < 1e-6:  # same direction: every point of the arc is the start
        return start.astype(np.float32)
    result = (np.sin((1.0 - t) * theta) * start + np.sin(t * theta) * end) / np.sin(theta)
    return normalize(result, dtype=np.float64).astype(np.float32)


def variation_rng(identity_seed: int) -> np.random.Generator:
    """The generator for an identity's SLERP draws (its own stream, independent of the image noise seeds)."""
    return np.random.default_rng(np.random.SeedSequence([int(identity_seed), 0x5EED_0001]))


@dataclass
class Variation:
    """One latent of an identity: the interpolated unit embedding and how it was drawn."""

    embedding: np.ndarray  # (512,) float32, unit norm
    t: float  # interpolation factor from the prototype (0) toward the target (1)
    target: int  # index of the source embedding it moves toward


def sample_variations(proto: np.ndarray, sources: np.ndarray, count: int, alpha: float,
                      seed: int) -> list[Variation]:
    """``count`` SLERP variations from ``proto`` toward the identity's source embeddings, t ~ Beta(alpha, alpha).

    Targets: a seeded permutation of the sources, cycled when ``count`` exceeds their number, so every source is
    used before any is used twice. All draws come from ``variation_rng(seed)``.
    """
    sources = normalize(np.atleast_2d(sources), dtype=np.float64)
    rng = variation_rng(seed)
    order = rng.permutation(len(sources))
    ts = rng.beta(alpha, alpha, size=count)
    variations = []
    for j in range(count):
        target = int(order[j % len(order)])
        variations.append(Variation(slerp(proto, sources[target], float(ts[j])), float(ts[j]), target))
    return variations


def image_seed(identity_seed: int, latent_index: int, image_index: int) -> int:
    """Seed of one image's initial noise, from (identity seed, latent index, image index) only (63-bit)."""
    state = np.random.SeedSequence([int(identity_seed), int(latent_index), int(image_index)]).generate_state(
        2, np.uint32)
    return int((int(state[0]) << 32 | int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF)


# --------------------------------------------------------------------------------------------------------------
# 3. Projection into the CLIP text-encoder space
# --------------------------------------------------------------------------------------------------------------


def id_token_id(tokenizer) -> int:
    """The vocabulary id of the placeholder word "id" (1014 in the CLIP vocabulary)."""
    ids = tokenizer.encode(ID_WORD, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"tokenizer splits {ID_WORD!r} into {len(ids)} tokens; Arc2Face needs a single token")
    return int(ids[0])


def prompt_input_ids(tokenizer) -> torch.Tensor:
    """(1, max_length) token ids of the Arc2Face prompt, padded like the upstream code."""
    return tokenizer(PROMPT, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def project_embeddings(tokenizer, text_encoder, embeddings) -> torch.Tensor:
    """Arc2Face's ID projection, batched: (N, 512) ArcFace embeddings -> (N, 77, hidden) prompt embeddings.

    The embeddings are L2-normalised here (upstream expects unit vectors; normalising twice changes nothing).
    The "id" token's row of the token-embedding lookup is overwritten through a forward hook on
    ``text_encoder.get_input_embeddings()``, so position embeddings, the causal transformer and the final layer
    norm are the encoder's own code on any transformers version (the upstream wrapper copies a 4.x forward).
    """
    embeddings = torch.as_tensor(np.asarray(embeddings, dtype=np.float32) if not torch.is_tensor(embeddings)
                                 else embeddings).float()
    if embeddings.ndim != 2:
        raise ValueError(f"expected (N, {ARCFACE_DIM}) embeddings, got shape {tuple(embeddings.shape)}")
    hidden = text_encoder.config.hidden_size
    if embeddings.shape[1] > hidden:
        raise ValueError(f"embedding width {embeddings.shape[1]} exceeds the text encoder width {hidden}")
    device = text_encoder.device
    dtype = text_encoder.get_input_embeddings().weight.dtype
    unit = torch.nn.functional.normalize(embeddings, dim=1)
    padded = torch.nn.functional.pad(unit, (0, hidden - unit.shape[1])).to(device=device, dtype=dtype)

    token = id_token_id(tokenizer)
    input_ids = prompt_input_ids(tokenizer).to(device).repeat(len(unit), 1)  # (N, 77): one mask row per sample

    def put_identity(module, args, kwargs, output):
        ids = args[0] if args else kwargs["input"]
        mask = ids == token
        if not torch.equal(mask.sum(dim=1), torch.ones(len(ids), dtype=mask.sum(dim=1).dtype, device=ids.device)):
            raise RuntimeError("expected exactly one 'id' token per prompt")
        output = output.clone()
        output[mask] = padded  # row-major mask order = sample order, one row each
        return output

    handle = text_encoder.get_input_embeddings().register_forward_hook(put_identity, with_kwargs=True)
    try:
        return text_encoder(input_ids=input_ids)[0]
    finally:
        handle.remove()


@torch.no_grad()
def empty_prompt_embeddings(tokenizer, text_encoder) -> torch.Tensor:
    """(1, 77, hidden) encoder output of the empty prompt: the unconditional branch diffusers uses by default."""
    ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(text_encoder.device)
    return text_encoder(input_ids=ids)[0]


# --------------------------------------------------------------------------------------------------------------
# 4. Domain-gap shift (Digi2Real eq. 2)
# --------------------------------------------------------------------------------------------------------------


def apply_shift(cond: torch.Tensor, delta: torch.Tensor | None, scale: float = 1.0) -> torch.Tensor:
    """``cond + scale * delta``; ``delta`` is (77, hidden) or anything broadcastable to ``cond`` (N, 77, hidden)."""
    if delta is None or scale == 0:
        return cond
    delta = torch.as_tensor(delta).to(device=cond.device, dtype=cond.dtype)
    torch.broadcast_shapes(delta.shape, cond.shape)  # raises a clear error on a mismatched shift
    return cond + scale * delta


# --------------------------------------------------------------------------------------------------------------
# Model loading
# --------------------------------------------------------------------------------------------------------------


def default_dtype(device: torch.device | str) -> torch.dtype:
    """fp16 on CUDA (as upstream), fp32 elsewhere (fp16 convolutions on CPU are slow or unsupported)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def _missing(root: str, files: Sequence[str]) -> list[str]:
    missing = []
    for name in files:
        if name == "encoder/pytorch_model.bin":  # a safetensors copy of the encoder is accepted too
            if not any(os.path.isfile(os.path.join(root, "encoder", f))
                       for f in ("pytorch_model.bin", "model.safetensors")):
                missing.append(name)
        elif not os.path.isfile(os.path.join(root, name)):
            missing.append(name)
    return missing


def resolve_repo(repo_id: str, revision: str | None, files: Sequence[str], local_dir: str | None) -> str:
    """Folder that holds ``files`` of ``repo_id``: ``local_dir`` when given, else a Hub snapshot (cached).

    Raises ModelsNotFoundError (one line: what is missing and how to provide it) when neither works.
    """
    if local_dir is not None:
        missing = _missing(local_dir, files)
        if missing:
            raise ModelsNotFoundError(
                f"{repo_id} files missing in {local_dir}: {', '.join(missing)} (download them with "
                f"`hf download {repo_id} --revision {revision} --local-dir {local_dir}`)")
        return local_dir
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = list(files)
    if "encoder/pytorch_model.bin" in patterns:
        patterns.append("encoder/model.safetensors")
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        from huggingface_hub import constants

        from facegen.errors import RemoteError, server_failed

        if server_failed(exc):  # the Hub failing, not the machine: a rerun may work (exit 1)
            raise RemoteError(f"{repo_id}@{revision} cannot be downloaded: the Hub answered "
                              f"{exc.response.status_code}; rerun later, or pass model_dir=DIR") from None

        if constants.HF_HUB_OFFLINE:
            reason = "HF_HUB_OFFLINE is set"
        else:
            text = str(exc).strip()
            reason = text.splitlines()[0][:120] if text else type(exc).__name__
        raise ModelsNotFoundError(
            f"{repo_id}@{revision} is not in the Hub cache and cannot be downloaded ({reason}); download it "
            f"where the Hub is reachable (`hf download {repo_id} --revision {revision}`, likewise "
            f"{ARC2FACE_ID} --revision {ARC2FACE_REVISION}) or pass model_dir=DIR holding "
            f"DIR/{BASE_DIRNAME}/ and DIR/{ARC2FACE_DIRNAME}/ (layout: facegen.generators.arc2face.MODEL_DIR_LAYOUT)"
        ) from None
    missing = _missing(path, files)
    if missing:
        raise ModelsNotFoundError(f"{repo_id}@{revision} lacks {', '.join(missing)}")
    return path


def model_paths(model_dir: str | None = None, base_id: str = BASE_ID, base_revision: str | None = BASE_REVISION,
                arc2face_id: str = ARC2FACE_ID, arc2face_revision: str | None = ARC2FACE_REVISION,
                ) -> tuple[str, str]:
    """(base folder, Arc2Face folder), local under ``model_dir`` or downloaded (see ``MODEL_DIR_LAYOUT``)."""
    base_local = os.path.join(model_dir, BASE_DIRNAME) if model_dir else None
    arc_local = os.path.join(model_dir, ARC2FACE_DIRNAME) if model_dir else None
    base = resolve_repo(base_id, base_revision, BASE_FILES, base_local)
    arc = resolve_repo(arc2face_id, arc2face_revision, ARC2FACE_FILES, arc_local)
    return base, arc


def recogniser_path(model_dir: str | None = None, arc2face_id: str = ARC2FACE_ID,
                    arc2face_revision: str | None = ARC2FACE_REVISION) -> str:
    """Path of Arc2Face's ``arcface.onnx`` (local under ``model_dir/arc2face/`` or downloaded)."""
    local = os.path.join(model_dir, ARC2FACE_DIRNAME) if model_dir else None
    return os.path.join(resolve_repo(arc2face_id, arc2face_revision, (RECOGNISER_FILE,), local), RECOGNISER_FILE)


@dataclass
class Arc2FaceModels:
    """The five components of the Arc2Face pipeline, and where their weights came from."""

    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    sources: dict[str, str]

    def diffusers_pipeline(self):
        """The same components as a diffusers ``StableDiffusionPipeline`` (upstream's way of calling Arc2Face)."""
        from diffusers import StableDiffusionPipeline

        pipeline = StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                           unet=self.unet, scheduler=self.scheduler, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline


def load_arc2face_pipeline(model_dir: str | None = None, base_id: str = BASE_ID,
                           base_revision: str | None = BASE_REVISION, arc2face_id: str = ARC2FACE_ID,
                           arc2face_revision: str | None = ARC2FACE_REVISION, device: str | torch.device = "cpu",
                           dtype: torch.dtype | None = None) -> Arc2FaceModels:
    """The Arc2Face components, assembled as upstream Arc2Face does it.

    VAE, tokenizer and scheduler config from the SD1.5 base; UNet (``arc2face/``) and CLIP text encoder
    (``encoder/``) from the Arc2Face repo; DPMSolverMultistepScheduler; no safety checker; fp16 on CUDA, fp32 on
    CPU unless ``dtype`` is given. ``.diffusers_pipeline()`` wraps them in a ``StableDiffusionPipeline``.
    Raises ModelsNotFoundError when weights are neither local nor downloadable.
    """
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    base, arc = model_paths(model_dir, base_id, base_revision, arc2face_id, arc2face_revision)

    vae = load_component("VAE", os.path.join(base, "vae"),
                         lambda: AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=dtype))
    tokenizer = load_component("tokenizer", os.path.join(base, "tokenizer"),
                               lambda: CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"))
    # SD1.5 ships a PNDM config; upstream Arc2Face swaps the class to DPM-Solver++ keeping the betas
    scheduler = DPMSolverMultistepScheduler.from_pretrained(base, subfolder="scheduler")
    unet = load_component("UNet", os.path.join(arc, "arc2face"),
                          lambda: UNet2DConditionModel.from_pretrained(arc, subfolder="arc2face", torch_dtype=dtype))
    # encoder/pytorch_model.bin is a pickle: transformers reads it with torch.load(weights_only=True)
    text_encoder = load_component("text encoder", os.path.join(arc, "encoder"),
                                  lambda: CLIPTextModel.from_pretrained(arc, subfolder="encoder")).to(dtype=dtype)
    for module in (vae, unet, text_encoder):
        module.to(device).eval().requires_grad_(False)
    return Arc2FaceModels(vae, unet, text_encoder, tokenizer, scheduler, {"base": base, "arc2face": arc})


# --------------------------------------------------------------------------------------------------------------
# 5. Batched, per-image-seeded sampling
# --------------------------------------------------------------------------------------------------------------


def initial_latents(seeds: Sequence[int], shape: tuple[int, int, int], device, dtype) -> torch.Tensor:
    """One (C, h, w) standard-normal draw per seed, on a CPU generator so the noise is device-independent."""
    draws = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)), dtype=torch.float32)
             for s in seeds]
    return torch.stack(draws).to(device=device, dtype=dtype)


class Arc2FaceGenerator:
    """Classifier-free-guided DPM-Solver++ sampling from prompt embeddings, batched across identities.

    Equivalent to ``StableDiffusionPipeline(prompt_embeds=cond, latents=initial_latents(seeds, …))`` with the
    empty-prompt negative branch, but the noise of every image comes from its own seed, the negative embeddings
    are computed once, and the output is a uint8 array (no PIL round trip). ``between_steps`` is called after each
    denoising step (a caller that stops a run there raises from it).
    """

    def __init__(self, pipeline: Arc2FaceModels, steps: int = 25, guidance: float = 3.0, resolution: int | None = None,
                 vae_batch: int = 8, between_steps: Callable[[], None] | None = None):
        self.pipeline = pipeline
        self.between_steps = between_steps
        self.unet, self.vae = pipeline.unet, pipeline.vae
        self.tokenizer, self.text_encoder = pipeline.tokenizer, pipeline.text_encoder
        self.scheduler = pipeline.scheduler
        self.steps, self.guidance, self.vae_batch = int(steps), float(guidance), int(vae_batch)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = int(resolution or self.unet.config.sample_size * self.vae_scale)
        if self.resolution % self.vae_scale:
            raise ValueError(f"resolution {self.resolution} is not a multiple of the VAE factor {self.vae_scale}")
        self.negative = empty_prompt_embeddings(self.tokenizer, self.text_encoder)  # (1, 77, hidden)

    @property
    def device(self):
        return self.unet.device

    @property
    def dtype(self):
        return self.unet.dtype

    def project(self, embeddings) -> torch.Tensor:
        return project_embeddings(self.tokenizer, self.text_encoder, embeddings)

    @torch.no_grad()
    def generate(self, cond: torch.Tensor, seeds: Sequence[int]) -> np.ndarray:
        """(B, 77, hidden) conditional embeddings + B seeds -> (B, H, W, 3) uint8 RGB images."""
        if len(cond) != len(seeds):
            raise ValueError(f"{len(cond)} embeddings but {len(seeds)} seeds")
        cond = cond.to(device=self.device, dtype=self.dtype)
        size = self.resolution // self.vae_scale
        latents = initial_latents(seeds, (self.unet.config.in_channels, size, size), self.device, self.dtype)

        # 1. timesteps and the initial noise scale
        self.scheduler.set_timesteps(self.steps, device=self.device)
        latents = latents * self.scheduler.init_noise_sigma

        # 2. denoise: unconditional and conditional halves in one UNet batch
        use_cfg = self.guidance > 1.0
        context = torch.cat([self.negative.expand(len(cond), -1, -1), cond]) if use_cfg else cond
        for t in self.scheduler.timesteps:
            model_input = torch.cat([latents, latents]) if use_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            noise = self.unet(model_input, t, encoder_hidden_states=context).sample
            if use_cfg:
                uncond, text = noise.chunk(2)
                noise = uncond + self.guidance * (text - uncond)
            latents = self.scheduler.step(noise, t, latents).prev_sample
            if self.between_steps is not None:
                self.between_steps()

        # 3. decode in chunks (the VAE decoder dominates memory at 512²)
        images = []
        for start in range(0, len(latents), self.vae_batch):
            chunk = latents[start:start + self.vae_batch] / self.vae.config.scaling_factor
            decoded = self.vae.decode(chunk).sample
            decoded = (decoded.float() / 2 + 0.5).clamp(0, 1)
            images.append((decoded.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy())
        return np.concatenate(images)


# --------------------------------------------------------------------------------------------------------------
# GPU memory per micro-batch (what a CUDA out-of-memory error is answered with)
# --------------------------------------------------------------------------------------------------------------

# Peak GPU memory (GiB) of ``Arc2FaceGenerator.generate`` per images_per_batch, with guidance (the UNet runs 2 x
# images_per_batch rows) and the VAE decoding ``vae_batch=8`` images at a time, the models loaded (MEMORY_WEIGHTS_GIB
# of it): torch.cuda.max_memory_allocated in benchmarks/gpu_check.py's memory section, SD1.5/CLIP-L-size models
# (random weights: the real ones' memory), benchmarks/results/gpu.json. Beyond 40 images the UNet dominates and
# grows by 0.127 GiB per image at 512x512; up to 40 the VAE's 8-image decode (~4 GiB) does. The 768x768 rows are
# 2.25 times the 512x512 ones above the weights, the pixel ratio: other sizes and dtypes are scaled so.
MEMORY_MEASURED = "NVIDIA H200, torch 2.11.0+cu130, diffusers 0.42.1, 2026-12-04, benchmarks/gpu_check.py"
MEMORY_WEIGHTS_GIB = 1.991
MEMORY_TABLE = {  # (resolution, dtype): {images_per_batch: peak GiB}
    (512, "float16"): {1: 2.587, 8: 5.996, 16: 6.024, 40: 7.087, 80: 12.182, 160: 22.372, 320: 42.753, 640: 83.514},
    (768, "float16"): {8: 10.999, 40: 13.439, 160: 47.78},
}
MEMORY_MARGIN = 0.9  # of the free memory: the allocator's fragmentation and other GPUs' kernels' workspaces


def memory_above_weights(resolution: int, dtype: str) -> tuple[dict[int, float], bool]:
    """GiB above the loaded weights per images_per_batch at ``resolution`` and ``dtype`` (e.g. "float16"), and
    whether they were scaled from 512x512 float16 (by pixel count and bytes per value) rather than measured."""
    measured = MEMORY_TABLE.get((resolution, dtype))
    if measured is not None:
        return {n: peak - MEMORY_WEIGHTS_GIB for n, peak in measured.items()}, False
    scale = (resolution / 512) ** 2 * (2 if dtype == "float32" else 1)
    return {n: (peak - MEMORY_WEIGHTS_GIB) * scale for n, peak in MEMORY_TABLE[(512, "float16")].items()}, True


def out_of_memory_message(images_per_batch: int, resolution: int, dtype: str, device: str,
                          free_bytes: int | None) -> str:
    """One line for an out-of-memory error at ``images_per_batch``: the largest size of the memory table that fits
    in ``free_bytes`` (the device's free memory with the models loaded; None where it cannot be read)."""
    above, estimated = memory_above_weights(resolution, dtype)
    how = (f"{'estimated from the 512x512 float16 figures' if estimated else 'measured'} on an {MEMORY_MEASURED}")
    what = f"out of memory generating images_per_batch={images_per_batch} at {resolution}x{resolution} {dtype}"
    smaller = sorted(n for n in above if n < images_per_batch)
    if free_bytes is None:
        if not smaller:
            return f"{what} on {device}: even images_per_batch=1 is too large here; free memory on {device}"
        size = smaller[-1]
        return (f"{what} on {device}: set images_per_batch={size}, the next size of the memory table "
                f"({above[size]:.1f} GiB above the weights on a GPU, {how})")
    free_gib = free_bytes / 2**30
    fits = [n for n in smaller if above[n] <= MEMORY_MARGIN * free_gib]
    where = f"{what} with {free_gib:.1f} GiB free on {device} beside the loaded models"
    if not fits:
        least = min(above)
        return (f"{where}: even images_per_batch={least} needs {above[least]:.1f} GiB ({how}); free GPU memory "
                "(other processes?) or lower the resolution")
    size = fits[-1]
    return f"{where}: set images_per_batch={size}, which needs {above[size]:.1f} GiB beside them ({how})"


def describe(generator: Arc2FaceGenerator) -> dict[str, Any]:
    """Sampling settings, for provenance."""
    return {"scheduler": type(generator.scheduler).__name__, "steps": generator.steps,
            "guidance": generator.guidance, "resolution": generator.resolution,
            "dtype": str(generator.dtype).replace("torch.", "")}
