"""Transform `e4e`: the SFHQ correction method, StyleGAN2 (FFHQ) + the e4e encoder, in two modes.

* ``mode=truncation`` (SFHQ part 3), with ``--source seeds``: z -> w = mapping(z); push away from the average,
  w_hi = w_avg + psi * (w - w_avg) with psi > 1 (varied, often broken faces); render x = G(w_hi) with the stored
  noise; resize to 256; encode w_e4e = E(x) + latent_avg (e4e projects back onto the well-behaved part of W+);
  then move from w_e4e toward w_hi instead of toward the average: w_out = w_e4e + phi * (w_hi - w_e4e); render
  G(w_out).
* ``mode=project`` (SFHQ parts 1, 2, 4), with an image source (DigiFace renders, paintings, SD images): each source
  image is framed like FFHQ, resized to 256, encoded, and rendered; labels follow the source identity.

Each (image, candidate) gives a face. Candidate 0 renders the code as is; candidates 1 … k-1 add a small latent
perturbation, ``perturbation * (mapping(z_j) - w_avg)`` with a fresh z_j (a step toward a random face, the same at
every layer). ``noise=random`` draws fresh per-layer noise images for every candidate instead of the stored ones.
All random draws come from the identity's seed (on the CPU), so a batch gives what one-at-a-time gives.

SFHQ publishes no generation code; the reconstruction (psi/phi, candidates, the perturbation form) is ours, see
the card. Framing: StyleGAN2-FFHQ renders are FFHQ-aligned (no detector needed). ``align=arcface`` crops them to
the ArcFace 112x112 framing with a fixed box: the ArcFace 5-point template placed by the FFHQ alignment rule
(``eye_avg + 0.1 * eye_to_mouth`` at the centre, the frame 2 * max(2 |eye_to_eye|, 1.8 |eye_to_mouth|) wide).
``input_framing=arcface`` applies the inverse to ArcFace-aligned sources (DigiFace 112x112 crops): the crop is
scaled into that box of a 256 FFHQ frame and the border filled by edge replication.
"""

from __future__ import annotations

import io
import os
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from facegen.api import Face, Identity, IdentityResult, LicenseInfo, ModelInfo, Option, Skip, Transform, UsageError

ENCODER_SIZE = 256  # e4e's input resolution

# ArcFace (insightface) 5-point template at 112x112: eyes, nose tip, mouth corners
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]])


def arcface_box() -> tuple[float, float, float]:
    """(left, top, side) of the ArcFace 112 crop inside an FFHQ-aligned frame, as fractions of the frame side.

    FFHQ alignment (ffhq-dataset ``recreate_aligned_images``) centres ``eye_avg + 0.1 * eye_to_mouth`` and makes
    the frame ``2 * max(2 * |eye_to_eye|, 1.8 * |eye_to_mouth|)`` wide; applied to the ArcFace template this gives
    left 0.118, top 0.120, side 0.765 (the template's tilt of 0.3 degrees is ignored).
    """
    eye_l, eye_r, _, mouth_l, mouth_r = ARCFACE_TEMPLATE
    eye_avg, mouth_avg = (eye_l + eye_r) / 2, (mouth_l + mouth_r) / 2
    eye_to_eye, eye_to_mouth = eye_r - eye_l, mouth_avg - eye_avg
    half = max(2.0 * np.hypot(*eye_to_eye), 1.8 * np.hypot(*eye_to_mouth))  # in template pixels
    centre_x, centre_y = eye_avg + 0.1 * eye_to_mouth
    return float((half - centre_x) / (2 * half)), float((half - centre_y) / (2 * half)), float(112 / (2 * half))


def crop_box(size: int) -> tuple[int, int, int]:
    """:func:`arcface_box` in pixels of a ``size`` x ``size`` frame."""
    left, top, side = arcface_box()
    return round(left * size), round(top * size), round(side * size)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of (N, 3, H, W) (what torchvision's Resize does to PIL images)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def ffhq_to_arcface(images: torch.Tensor, size: int = 112) -> torch.Tensor:
    """FFHQ-framed images -> the ArcFace 112 framing (fixed crop box, see :func:`arcface_box`)."""
    left, top, side = crop_box(images.shape[-1])
    return resize(images[:, :, top:top + side, left:left + side], size)


def arcface_to_ffhq(images: torch.Tensor, size: int = ENCODER_SIZE) -> torch.Tensor:
    """ArcFace-framed crops -> an FFHQ frame of ``size``: the crop scaled into its box, edges replicated outward."""
    left, top, side = crop_box(size)
    inner = resize(images, side)
    return F.pad(inner, [left, size - left - side, top, size - top - side], mode="replicate")


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded bytes -> (3, H, W) float in [-1, 1]; ValueError with the detail when unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
    except Exception as exc:  # PIL raises many types for broken files
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
    return torch.from_numpy(rgb).permute(2, 0, 1) / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def candidate_seed(identity_seed: int, image_index: int, candidate: int) -> int:
    """A seed per (identity, source image, candidate): independent of batching and of other images' draws."""
    state = np.random.SeedSequence([identity_seed, image_index, candidate]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


@dataclass
class Job:
    """One face to make: which identity, from which code, with which candidate draws."""

    slot: int  # index of the identity in the batch
    ref: str
    image_index: int
    candidate: int
    meta: dict[str, Any] = field(default_factory=dict)
    code: torch.Tensor | None = None  # W+ (n_latent, style_dim) before the candidate's perturbation


STYLEGAN2_LICENSE = LicenseInfo(
    id="other",
    name="nvidia-source-code-license-nc",
    link="https://nvlabs.github.io/stylegan2/license.html",
    text=(
        "The images in this dataset were generated with NVIDIA's StyleGAN2 FFHQ (config-f) weights (used through "
        "the rosinality PyTorch conversion and the e4e encoder, whose own code is MIT-licensed).\n\n"
        "Those weights are distributed under the NVIDIA Source Code License-NC "
        "(https://nvlabs.github.io/stylegan2/license.html): the work and derivative works may be used "
        "\"non-commercially\", i.e. for research or evaluation purposes only; redistribution must include that "
        "licence. The StyleGAN2 networks were trained on FFHQ (Flickr-Faces-HQ, NVIDIA, images under CC BY-NC-SA "
        "4.0 and other licences chosen by their owners).\n\n"
        "Nothing here grants commercial rights. Check the licences above before any use."
    ),
    commercial_use=False,
    note="non-commercial (research or evaluation) only: NVIDIA Source Code License-NC of the StyleGAN2 weights",
)

CITATION = """@inproceedings{karras2020analyzing,
  title     = {Analyzing and Improving the Image Quality of {StyleGAN}},
  author    = {Karras, Tero and Laine, Samuli and Aittala, Miika and Hellsten, Janne and Lehtinen, Jaakko and
               Aila, Timo},
  booktitle = {Proc. CVPR},
  year      = {2020}
}

@article{tov2021designing,
  title   = {Designing an Encoder for {StyleGAN} Image Manipulation},
  author  = {Tov, Omer and Alaluf, Yuval and Nitzan, Yotam and Patashnik, Or and Cohen-Or, Daniel},
  journal = {ACM Transactions on Graphics (TOG)},
  volume  = {40},
  number  = {4},
  pages   = {1--14},
  year    = {2021}
}

@misc{david_beniaguev_2022_SFHQ,
  title     = {Synthetic Faces High Quality ({SFHQ}) dataset},
  url       = {https://github.com/SelfishGene/SFHQ-dataset},
  doi       = {10.34740/kaggle/dsv/4737549},
  publisher = {GitHub},
  author    = {David Beniaguev},
  year      = {2022}
}"""


def optional_str(value: Any) -> str | None:
    text = "" if value is None else str(value).strip()
    return text or None


class E4ETransform(Transform):
    name = "e4e"
    synthetic = True  # the card may call the images synthetic
    description = "SFHQ-style correction with StyleGAN2 + e4e: truncation (from seeds) or project (from images)"
    card_description = (
        "Faces were made with the method of the SFHQ dataset (Beniaguev 2022): StyleGAN2 trained on FFHQ "
        "(Karras et al. 2020) and the encoder4editing (e4e) encoder (Tov et al. 2021). In `truncation` mode a "
        "latent is sampled and pushed away from the average with a truncation psi > 1, rendered, encoded by e4e, "
        "and moved from the e4e code back toward the original by a fraction phi before the final rendering "
        "(\"e4e truncation\"). In `project` mode each source image is encoded by e4e and re-rendered by StyleGAN2, "
        "turning renders or artwork into photographic faces; each sample's json names the source image it was made "
        "from (the source's own extras, such as landmarks, describe that image and are not copied). SFHQ does not "
        "publish its generation code; this is "
        "a reconstruction from its description (psi, phi, candidate perturbations as recorded per sample). "
        "Unlike SFHQ, no human or learned curation was applied."
    )
    homepage = "https://github.com/SelfishGene/SFHQ-dataset"
    citation = CITATION
    license = STYLEGAN2_LICENSE
    options = {
        "checkpoint": Option(None, "e4e checkpoint (e4e_ffhq_encode.pt): local file or Hub file "
                                   "owner/repo/file.pt@revision (required)", type=optional_str),
        "generator_checkpoint": Option(None, "StyleGAN2 generator, rosinality format (stylegan2-ffhq-config-f.pt); "
                                             "default: the decoder stored in the e4e checkpoint", type=optional_str),
        "mode": Option("truncation", "truncation: generate from seeds (SFHQ part 3); project: encode the source's "
                                     "images (SFHQ parts 1, 2, 4)", choices=("truncation", "project")),
        "psi": Option(1.5, "truncation mode: psi > 1 pushes the sampled w away from the average", type=float),
        "phi": Option(0.5, "truncation mode: fraction of the way from the e4e code back to the sampled w",
                      type=float),
        "candidates": Option(1, "faces per source image (truncation: per seed)", type=int),
        "perturbation": Option(0.1, "candidates 1…k-1: step toward a random face in W, "
                                    "perturbation * (mapping(z) - w_avg)", type=float),
        "noise": Option("const", "const: the stored noise images (deterministic renders); random: fresh noise per "
                                 "candidate from the seed", choices=("const", "random")),
        "input_framing": Option("ffhq", "project mode: ffhq (already FFHQ-aligned, e.g. SFHQ, portraits) or "
                                        "arcface (ArcFace-aligned crops, e.g. DigiFace 112x112)",
                                choices=("ffhq", "arcface")),
        "align": Option("none", "none: the generator's FFHQ framing; arcface: crop to the ArcFace 112x112 framing",
                        choices=("none", "arcface")),
        "size": Option(0, "output side in pixels (0: the generator's size, or 112 with align=arcface)", type=int),
        "batch_size": Option(8, "identities per call and images per forward pass", type=int),
    }

    def __init__(self, **options):
        super().__init__(**options)
        o = self.opts
        if not o["checkpoint"]:
            raise UsageError("transform 'e4e': option checkpoint is required (a local e4e_ffhq_encode.pt or a Hub "
                             "file owner/repo/e4e_ffhq_encode.pt@revision)")
        if o["candidates"] < 1:
            raise UsageError(f"transform 'e4e': candidates must be at least 1, got {o['candidates']}")
        if o["batch_size"] < 1:
            raise UsageError(f"transform 'e4e': batch_size must be at least 1, got {o['batch_size']}")
        if o["size"] < 0:
            raise UsageError(f"transform 'e4e': size must be >= 0, got {o['size']}")
        if o["perturbation"] < 0:
            raise UsageError(f"transform 'e4e': perturbation must be >= 0, got {o['perturbation']}")
        if o["candidates"] > 1 and o["perturbation"] == 0 and o["noise"] == "const":
            raise UsageError("transform 'e4e': candidates > 1 would all be identical; set perturbation > 0 or "
                             "noise=random")
        if not all(math.isfinite(o[k]) for k in ("psi", "phi")):
            raise UsageError("transform 'e4e': psi and phi must be finite numbers")
        from facegen.generators.stylegan_checkpoints import check_checkpoint_spec

        for key in ("checkpoint", "generator_checkpoint"):
            try:  # a missing local file is reported before the run starts writing anything
                if o[key]:
                    check_checkpoint_spec(o[key])
            except FileNotFoundError as exc:
                raise UsageError(f"transform 'e4e': {str(exc).replace('checkpoint', key, 1)}") from None
        self.batch_size = o["batch_size"]
        self.generator = None
        self.device = torch.device("cpu")
        self.sources: dict[str, str] = {}  # local path or hf://repo/file@commit (run.json only)
        self.loaded: dict[str, dict] = {}  # what setup() read (facegen.generators.weights.describe_loaded)

    # ---- card and schema ----------------------------------------------------------------------------------

    def output_format(self, source):
        return "png"

    def json_features(self, source):
        from datasets import Value

        features = dict(source.json_features()) if self.opts["mode"] == "project" else {}
        features.update({
            "mode": Value("string"),
            "seed": Value("int64"),
            "candidate": Value("int32"),
        })
        if self.opts["mode"] == "truncation":  # psi and phi exist only in truncation mode (never null)
            features.update({"psi": Value("float32"), "phi": Value("float32")})
        features.update({"perturbation": Value("float32"), "noise": Value("string")})
        return features

    def extra_features(self, source):
        # A source's extras (SFHQ landmarks, segmentation, CLIP features) describe its own image, not the face
        # re-rendered from it, so none are carried over; the json keeps the source image's meta (which file it was).
        return {}

    def models(self):
        e4e_source = self.sources.get("e4e", self.opts["checkpoint"])
        models = [ModelInfo(
            id=_model_name(self.opts["checkpoint"]), revision=_revision(e4e_source),
            role="e4e encoder (image -> W+ code)",
            license="MIT (encoder4editing code and released weights, (c) 2021 omertov)",
            license_link="https://github.com/omertov/encoder4editing/blob/main/LICENSE",
            citation=CITATION.split("\n\n")[1],
            note="trained against NVIDIA's StyleGAN2-FFHQ weights (non-commercial licence) on FFHQ images",
            source=e4e_source, loaded=self.loaded.get("e4e", {}),
        )]
        g_spec = self.opts["generator_checkpoint"]
        models.append(ModelInfo(
            id=_model_name(g_spec) if g_spec else f"{_model_name(self.opts['checkpoint'])} (decoder.*)",
            revision=_revision(self.sources.get("generator", g_spec or e4e_source)),
            role="StyleGAN2 FFHQ config-f generator (W+ code -> image)",
            license="NVIDIA Source Code License-NC", license_link="https://nvlabs.github.io/stylegan2/license.html",
            citation=CITATION.split("\n\n")[0],
            note="non-commercial: research or evaluation use only",
            source=self.sources.get("generator", g_spec or e4e_source), loaded=self.loaded.get("generator", {}),
        ))
        return models

    def provenance(self):
        facts = {"method": "SFHQ e4e correction (reconstruction)", "mode": self.opts["mode"]}
        if self.generator is not None:
            facts.update(generator_size=self.generator.size, n_latent=self.generator.n_latent,
                         arcface_box=[round(v, 4) for v in arcface_box()])
        return facts

    # ---- models ---------------------------------------------------------------------------------------------

    def setup(self, device):
        from facegen.generators.stylegan_checkpoints import load_e4e, load_stylegan2

        self.device = torch.device(device) if device is not None else torch.device("cpu")
        try:
            e4e = load_e4e(self.opts["checkpoint"])
            self.sources["e4e"] = e4e.source
            generator, self.sources["generator"] = e4e.generator, e4e.source
            if self.opts["generator_checkpoint"]:
                generator, self.sources["generator"] = load_stylegan2(self.opts["generator_checkpoint"])
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(f"transform 'e4e': {exc}") from None
        if generator.n_latent != e4e.encoder.n_latent or generator.style_dim != e4e.encoder.style_dim:
            raise UsageError(f"transform 'e4e': generator ({generator.size}px, {generator.n_latent} W+ layers) "
                             f"does not match the e4e encoder ({e4e.encoder.n_latent} W+ layers)")
        self._record_loaded()
        self.encoder = e4e.encoder.to(self.device)
        self.e4e_latent_avg = e4e.latent_avg.to(self.device)
        self.generator = generator.to(self.device)

    def _record_loaded(self) -> None:
        from facegen.generators.weights import describe_loaded

        for role, source in self.sources.items():
            if source.startswith("hf://"):
                repo_file, _, commit = source[len("hf://"):].rpartition("@")
                self.loaded[role] = {"hub": repo_file, "commit": commit}
            elif os.path.isfile(source):
                self.loaded[role] = describe_loaded(source)

    # ---- generation -----------------------------------------------------------------------------------------

    def __call__(self, batch: list[Identity]):
        results = [IdentityResult(identity) for identity in batch]
        with torch.inference_mode():
            # 1. the W+ code of every source image (project) or seed (truncation)
            if self.opts["mode"] == "truncation":
                jobs = self.truncation_codes(batch)
            else:
                jobs = self.projected_codes(batch, results)
            # 2. candidates: perturb, render, frame; faces keep (image, candidate) order per identity
            for start in range(0, len(jobs), self.batch_size):
                chunk = jobs[start:start + self.batch_size]
                images = to_uint8(self.render_candidates(chunk, batch))
                for job, pixels in zip(chunk, images):
                    results[job.slot].faces.append(Face(image=pixels, ext=None, ref=job.ref, meta=job.meta))
        yield from results

    def truncation_codes(self, batch: list[Identity]) -> list[Job]:
        """SFHQ part 3: z -> w_hi (psi > 1) -> render -> e4e -> lerp(w_e4e, w_hi, phi)."""
        g, psi, phi = self.generator, self.opts["psi"], self.opts["phi"]
        z = torch.cat([torch.randn(1, g.style_dim, generator=torch.Generator().manual_seed(i.seed)) for i in batch])
        codes = []
        for start in range(0, len(batch), self.batch_size):
            z_chunk = z[start:start + self.batch_size].to(self.device)
            w_hi = g.broadcast(g.truncate(g.mapping(z_chunk), psi))  # away from the average when psi > 1
            rendered = g.synthesis(w_hi)
            w_e4e = self.encode(resize(rendered, ENCODER_SIZE))
            codes.append(w_e4e + phi * (w_hi - w_e4e))  # toward the e4e code instead of toward w_avg
        codes = torch.cat(codes)
        jobs = []
        for slot, identity in enumerate(batch):
            for candidate in range(self.opts["candidates"]):
                meta = {"mode": "truncation", "seed": identity.seed, "candidate": candidate, "psi": psi, "phi": phi}
                jobs.append(Job(slot, f"seed:{identity.id}", 0, candidate, meta, code=codes[slot]))
        return jobs

    def projected_codes(self, batch: list[Identity], results: list[IdentityResult]) -> list[Job]:
        """SFHQ parts 1, 2, 4: source image -> FFHQ framing at 256 -> e4e code."""
        jobs, inputs = [], []
        for slot, identity in enumerate(batch):
            if not identity.images and not identity.skipped:
                results[slot].skipped.append(Skip(identity.id, "no source image",
                                                  "mode=project encodes source images; use mode=truncation with "
                                                  "--source seeds"))
            for index, image in enumerate(identity.images):
                try:
                    pixels = decode_image(image.data)
                except ValueError as exc:
                    results[slot].skipped.append(Skip(image.ref, "corrupt image", str(exc)))
                    continue
                inputs.append(self.frame_input(pixels))
                for candidate in range(self.opts["candidates"]):
                    meta = {**image.meta, "mode": "project", "seed": identity.seed, "candidate": candidate}
                    jobs.append(Job(slot, image.ref, index, candidate, meta))
        codes = [self.encode(torch.stack(inputs[s:s + self.batch_size]).to(self.device))
                 for s in range(0, len(inputs), self.batch_size)]
        codes = torch.cat(codes) if codes else None
        for n, job in enumerate(jobs):
            job.code = codes[n // self.opts["candidates"]]
        return jobs

    def frame_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """One decoded source image (3, H, W) -> the encoder's 256x256 FFHQ framing."""
        if self.opts["input_framing"] == "arcface":
            return arcface_to_ffhq(pixels[None], ENCODER_SIZE)[0]
        return resize(pixels[None], ENCODER_SIZE)[0]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images) + self.e4e_latent_avg

    def render_candidates(self, jobs: list[Job], batch: list[Identity]) -> torch.Tensor:
        """Perturb each job's code by its candidate draws, render with stored or drawn noise, frame the output."""
        g, o = self.generator, self.opts
        draws = [torch.Generator().manual_seed(candidate_seed(batch[job.slot].seed, job.image_index, job.candidate))
                 for job in jobs]
        # every candidate draws its z first and then its noise, so the draws never depend on the options
        z = torch.cat([torch.randn(1, g.style_dim, generator=d) for d in draws]).to(self.device)
        directions = g.mapping(z) - g.latent_avg  # toward random faces, the same at every layer
        codes, noises = [], []
        for job, d, direction in zip(jobs, draws, directions):
            step = o["perturbation"] if job.candidate > 0 else 0.0
            codes.append(job.code + step * direction if step else job.code)
            job.meta.update(perturbation=step, noise=o["noise"])
            if o["noise"] == "random":
                noises.append(g.random_noise(1, d))
        noise = None
        if noises:
            noise = [torch.cat(layer) for layer in zip(*noises)]
        images = g.synthesis(torch.stack(codes), noise)
        if o["align"] == "arcface":
            images = ffhq_to_arcface(images, o["size"] or 112)
        elif o["size"]:
            images = resize(images, o["size"])
        return images


def _model_name(spec: str | None) -> str:
    """A checkpoint as the card may name it: the Hub spec, or a local file's name (never its path)."""
    from facegen.generators.stylegan_checkpoints import HUB_FILE

    spec = os.fspath(spec or "")
    if not os.path.exists(os.path.expanduser(spec)) and HUB_FILE.match(spec):
        return spec
    return os.path.basename(spec)


def _revision(source: str | None) -> str | None:
    """The commit of a Hub source ``hf://repo/file@commit``; None for local files."""
    if source and source.startswith("hf://") and "@" in source:
        return source.rsplit("@", 1)[1]
    return None
