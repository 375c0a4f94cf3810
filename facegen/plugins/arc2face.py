"""Transform `arc2face`: the Digi2Real realism transform (George & Marcel, WACV-W 2025, §3) on Arc2Face.

Per identity:

1. ArcFace embeddings of its source images with Arc2Face's own recogniser (``arcface.onnx``); a source that
   hands embeddings over (``SourceImage.hints["embedding"]``, DisCo) is used directly. 112x112 images (DigiFace,
   DisCo) are embedded as they are (``realign=true``: detected and aligned again first, as Arc2Face's demo does
   with its inputs); ``hints["landmarks5"]`` (5x2, ArcFace order, e.g. SFHQ) are warped; other images are
   detected and aligned first. Every image the source hands over counts (DigiFace's ``max_images`` limits them).
2. Prototype = normalised mean of the unit embeddings; ``latents`` variations by SLERP from the prototype toward
   the source embeddings, t ~ Beta(alpha, alpha).
3. Projection through Arc2Face's CLIP text encoder ("photo of a id person", "id" row = the embedding).
4. Domain-gap shift: ``cond + shift_scale * delta`` (``shift=delta.safetensors`` from ``facegen estimate-shift``).
5. ``images_per_latent`` images per latent with SD1.5 + Arc2Face's UNet (DPM-Solver++, 25 steps, guidance 3),
   batched across the identities of a call; each image's noise comes from (identity seed, latent, image) only.
6. SCRFD detection + ArcFace 5-point alignment to 112x112; an image without a face is dropped and counted
   ("no face detected"). Each sample's json records latent_index, t, image_index, seed and the ArcFace cosine
   similarity of the aligned output to its prototype.

Generation runs in the thread iterating :meth:`Arc2FaceTransform.stream` (the GPU), one micro-batch after another,
across calls; steps 1-2 of the next call run on a planning thread meanwhile, and detection, alignment, embedding and
PNG encoding of each micro-batch on worker threads (``post_workers``) while the next ones are generated. Results
are yielded in input order, each identity as soon as its images are post-processed.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import Value

from facegen.api import (Face, IdentityResult, LicenseInfo, ModelInfo, Option, Skip, Transform, UsageError, run_ahead,
                         sha256_file, stop_if_closed, to_bool)

SHIFT_KEY = "delta"  # tensor name in delta.safetensors (a file holding exactly one tensor is accepted too)
SOURCE_THREADS = min(8, os.cpu_count() or 1)  # threads decoding (and detecting) source images while planning
PLANS_AHEAD = 1  # calls planned ahead of the one generating


def positive_int(value: Any) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be >= 1")
    return number


def positive_float(value: Any) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("must be > 0")
    return number


def optional_str(value: Any) -> str | None:
    text = str(value).strip()
    return None if text.lower() in ("", "none", "null", "off") else os.path.expanduser(text)


def encode_png(image_rgb: np.ndarray) -> bytes:
    import cv2  # releases the GIL while compressing, unlike a pure-Python path

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image_rgb[:, :, ::-1]))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def free_device_memory(device) -> int | None:
    """Free bytes on a CUDA device once this process's cached blocks are released; None elsewhere."""
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


@dataclass
class IdentityPlan:
    """What one identity of a call will generate: its prototype and variations (empty when it cannot)."""

    identity: Any
    prototype: np.ndarray | None = None
    variations: list = field(default_factory=list)
    source_refs: list[str] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)


@dataclass
class ImageJob:
    """One image to generate: whose, which latent, which image of that latent, its seed."""

    plan_index: int
    latent_index: int
    image_index: int
    seed: int
    cond_row: int  # row of the projected (and shifted) embeddings of this call


@dataclass
class Call:
    """One call's batch on its way through the stream: its plans, its images, and what came back of them."""

    plans: list[IdentityPlan]
    jobs: list[ImageJob]
    cond: Any  # the projected, shifted embeddings of its latents (a tensor on the device; None: no latent)
    collected: list[list] = field(init=False)  # per identity: its Faces and Skips, in job order
    remaining: list[int] = field(init=False)  # per identity: images not post-processed yet
    emitted: int = 0  # identities yielded so far

    def __post_init__(self):
        self.collected = [[] for _ in self.plans]
        self.remaining = [0] * len(self.plans)
        for job in self.jobs:
            self.remaining[job.plan_index] += 1

    def micro_batches(self, size: int):
        for start in range(0, len(self.jobs), size):
            yield self.jobs[start:start + size]

    def collect(self, items: list) -> None:
        for job, item in items:
            self.collected[job.plan_index].append(item)
            self.remaining[job.plan_index] -= 1


SD15_CITATION = """@inproceedings{rombach2022high,
  title={High-Resolution Image Synthesis with Latent Diffusion Models},
  author={Rombach, Robin and Blattmann, Andreas and Lorenz, Dominik and Esser, Patrick and Ommer, Bj{\\"o}rn},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages={10684--10695},
  year={2022}
}"""

ARC2FACE_CITATION = """@misc{paraperas2024arc2face,
  title={Arc2Face: A Foundation Model of Human Faces},
  author={Foivos Paraperas Papantoniou and Alexandros Lattas and Stylianos Moschoglou and Jiankang Deng and Bernhard Kainz and Stefanos Zafeiriou},
  year={2024},
  eprint={2403.11641},
  archivePrefix={arXiv},
  primaryClass={cs.CV}
}"""

ARCFACE_CITATION = """@inproceedings{deng2019arcface,
  title={ArcFace: Additive Angular Margin Loss for Deep Face Recognition},
  author={Deng, Jiankang and Guo, Jia and Xue, Niannan and Zafeiriou, Stefanos},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages={4690--4699},
  year={2019}
}
@inproceedings{zhu2021webface260m,
  title={WebFace260M: A Benchmark Unveiling the Power of Million-Scale Deep Face Recognition},
  author={Zhu, Zheng and Huang, Guan and Deng, Jiankang and Ye, Yun and Huang, Junjie and Chen, Xinze and Zhu, Jiagang and Yang, Tian and Lu, Jiwen and Du, Dalong and Zhou, Jie},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages={10492--10502},
  year={2021}
}"""

SCRFD_CITATION = """@inproceedings{guo2022sample,
  title={Sample and Computation Redistribution for Efficient Face Detection},
  author={Guo, Jia and Deng, Jiankang and Lattas, Alexandros and Zafeiriou, Stefanos},
  booktitle={International Conference on Learning Representations (ICLR)},
  year={2022}
}"""

DIGI2REAL_CITATION = """@inproceedings{george2025digi2real,
  title={Digi2Real: Bridging the Realism Gap in Synthetic Data Face Recognition via Foundation Models},
  author={George, Anjith and Marcel, S{\\'e}bastien},
  booktitle={Proceedings of the Winter Conference on Applications of Computer Vision (WACV) Workshops},
  pages={1469--1478},
  year={2025},
  eprint={2411.02188},
  archivePrefix={arXiv}
}"""


class Arc2FaceTransform(Transform):
    name = "arc2face"
    synthetic = True  # the card may call the images synthetic
    description = "Digi2Real realism transform: SLERP variations of each identity's ArcFace prototype, generated by Arc2Face"
    card_description = (
        "Images were generated with Arc2Face (Stable Diffusion 1.5 fine-tuned to be conditioned on ArcFace "
        "embeddings) following Digi2Real (George & Marcel, 2025): for each source identity, the ArcFace embeddings "
        "of its images are averaged into a prototype on the unit sphere; latent variations are drawn by spherical "
        "interpolation (SLERP) from the prototype toward the source embeddings with t ~ Beta(alpha, alpha); each "
        "latent is projected into Arc2Face's CLIP text-encoder space, shifted by the real-minus-synthetic offset "
        "Delta, and decoded into several images by DPM-Solver++ sampling with classifier-free guidance. Faces are "
        "then detected with SCRFD and aligned to 112x112 with the ArcFace 5-point template; images without a "
        "detected face are dropped and counted. Each sample records its latent index, interpolation factor t, "
        "image index, noise seed and the ArcFace cosine similarity of the aligned face to its prototype."
    )
    homepage = "https://www.idiap.ch/paper/digi2real"
    citation = DIGI2REAL_CITATION + "\n" + ARC2FACE_CITATION
    license = LicenseInfo(
        id="other",
        name="research-only (model terms of Arc2Face / Stable Diffusion 1.5 / InsightFace)",
        link="https://huggingface.co/FoivosPar/Arc2Face",
        text=("The images were generated with models whose terms restrict use: Stable Diffusion 1.5 (CreativeML "
              "OpenRAIL-M use restrictions), Arc2Face (MIT-labelled weights trained on WebFace42M, whose terms are "
              "non-commercial research only) and InsightFace's SCRFD detector (non-commercial research only). "
              "Treat the generated data as non-commercial research data; the source dataset's licence applies as "
              "well."),
        commercial_use=False,
        note="research only in practice: WebFace42M-trained recogniser/generator and InsightFace models",
    )
    quality_fields = ("cosine_to_prototype",)
    batch_size = 8

    options = {
        "model_dir": Option(None, "local folder laid out like the Hub repos (see MODEL_DIR_LAYOUT in "
                                  "facegen.generators.arc2face); default: Hub download at pinned revisions",
                            type=optional_str, path=True, placeholder="model folder", optional_on_rebuild=True),
        "base_revision": Option(None, "revision of stable-diffusion-v1-5/stable-diffusion-v1-5 (default: pinned)",
                                type=optional_str, revision_of="stable-diffusion-v1-5/stable-diffusion-v1-5"),
        "arc2face_revision": Option(None, "revision of FoivosPar/Arc2Face (default: pinned)", type=optional_str,
                                    revision_of="FoivosPar/Arc2Face"),
        "steps": Option(25, "DPM-Solver++ steps", type=positive_int),
        "guidance": Option(3.0, "classifier-free guidance scale (1 = off)", type=float),
        "resolution": Option(0, "generated image size in pixels (0 = the UNet's native size, 512 for SD1.5)",
                             type=int),
        "latents": Option(4, "latent variations (SLERP samples) per identity", type=positive_int),
        "images_per_latent": Option(5, "images generated per latent", type=positive_int),
        "alpha": Option(2.0, "t ~ Beta(alpha, alpha) for the SLERP factor", type=positive_float),
        "shift": Option(None, "delta.safetensors from `facegen estimate-shift` (none = no shift)",
                        type=optional_str, provenance_file="shift.safetensors"),
        "shift_scale": Option(1.0, "multiplier of the shift Delta", type=float),
        "batch_size": Option(8, "identities per call (generated together)", type=positive_int),
        "images_per_batch": Option(40, "images per UNet micro-batch (x2 with guidance); a CUDA out-of-memory "
                                       "error names the size that fits", type=positive_int),
        "post_workers": Option(0, "threads detecting/aligning/embedding/encoding outputs while the GPU generates "
                                  "(0 = auto: 2 on CUDA, 1 on CPU)", type=int),
        "dtype": Option("auto", "model precision (auto: float16 on CUDA, float32 on CPU)",
                        choices=("auto", "float16", "bfloat16", "float32")),
        "realign": Option(False, "detect and 5-point align source images that are already 112x112 crops (DigiFace) "
                                 "before embedding them, as Arc2Face's demo does with any input (off: embed them as "
                                 "they are, as Digi2Real projects DigiFace's aligned crops)", type=to_bool),
        "source_embeddings": Option(True, "use embeddings a source hands over (DisCo) instead of recomputing "
                                          "them with arcface.onnx", type=to_bool),
        "align": Option(True, "detect and align outputs to 112x112 (off: keep the full generated image)",
                        type=to_bool),
        "detector": Option("scrfd", "face detector for outputs (scrfd: antelopev2's SCRFD-10GF)",
                           choices=("scrfd", "dlib")),
        "detector_dir": Option(None, "folder holding antelopev2/scrfd_10g_bnkps.onnx (default: model_dir, then "
                                     "~/.insightface/models)", type=optional_str, path=True),
        "det_size": Option(640, "SCRFD input size (square)", type=positive_int),
        "det_thresh": Option(0.5, "detection score threshold", type=float),
    }

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.batch_size = self.opts["batch_size"]
        shift = self.opts["shift"]
        if shift is not None and not os.path.isfile(shift):
            raise UsageError(f"transform 'arc2face': shift file {shift} does not exist "
                             "(make one with `facegen estimate-shift`, or pass shift=none)")
        if self.opts["resolution"] < 0:
            raise UsageError("transform 'arc2face': resolution must be >= 0")
        if not self.opts["align"]:
            self.quality_fields = ()  # no cosine is measured on an unaligned image
        self.generator = None
        self._sources: dict[str, str] = {}
        self._loaded: dict[str, dict] = {}  # what setup() read, per role (facegen.generators.weights)

    # ----------------------------------------------------------------------------------------------------------
    # Card metadata
    # ----------------------------------------------------------------------------------------------------------

    def revisions(self) -> tuple[str, str]:
        from facegen.generators.arc2face import ARC2FACE_REVISION, BASE_REVISION

        return self.opts["base_revision"] or BASE_REVISION, self.opts["arc2face_revision"] or ARC2FACE_REVISION

    def models(self) -> list[ModelInfo]:
        from facegen.generators.arc2face import ARC2FACE_ID, BASE_ID

        base_rev, arc_rev = self.revisions()
        models = [
            ModelInfo(BASE_ID, base_rev, role="VAE, tokenizer and scheduler config (Stable Diffusion 1.5)",
                      license="CreativeML OpenRAIL-M",
                      license_link="https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/blob/main/LICENSE.md",
                      citation=SD15_CITATION, note="use-based restrictions (Attachment A of the licence)",
                      source=self._sources.get("base", ""), loaded=self._loaded.get("base", {})),
            ModelInfo(ARC2FACE_ID, arc_rev, role="Arc2Face UNet (arc2face/) and CLIP text encoder (encoder/)",
                      license="MIT (model card); trained on WebFace42M",
                      license_link="https://huggingface.co/FoivosPar/Arc2Face",
                      citation=ARC2FACE_CITATION,
                      note="research only in practice: fine-tuned from SD1.5 (OpenRAIL-M) on WebFace42M, whose "
                           "terms are non-commercial research only",
                      source=self._sources.get("arc2face", ""), loaded=self._loaded.get("arc2face", {})),
            ModelInfo(f"{ARC2FACE_ID}/arcface.onnx", arc_rev,
                      role="face recogniser: source embeddings and output cosine similarity (ArcFace R100)",
                      license="MIT (model card); trained on WebFace42M",
                      license_link="https://huggingface.co/FoivosPar/Arc2Face", citation=ARCFACE_CITATION,
                      note="research only in practice (WebFace42M terms)",
                      source=self._sources.get("recogniser", ""), loaded=self._loaded.get("recogniser", {})),
        ]
        if self.opts["align"] or self.opts["realign"]:
            if self.opts["detector"] == "scrfd":
                models.append(ModelInfo(
                    "insightface/antelopev2/scrfd_10g_bnkps.onnx", None,
                    role="face detector (SCRFD-10GF, 5 landmarks) for ArcFace alignment",
                    license="InsightFace model licence: non-commercial research purposes only",
                    license_link="https://github.com/deepinsight/insightface#license", citation=SCRFD_CITATION,
                    note="non-commercial research only", source=self._sources.get("detector", ""),
                    loaded=self._loaded.get("detector", {})))
            else:
                models.append(ModelInfo(
                    "dlib HOG detector + shape_predictor_68_face_landmarks", None,
                    role="face detector stand-in (68 landmarks -> 5 ArcFace points)",
                    license="dlib: Boost Software License; the 68-point model was trained on iBUG 300-W, whose "
                            "licence excludes commercial use",
                    license_link="https://github.com/davisking/dlib-models", note="non-commercial research only",
                    source=self._sources.get("detector", ""), loaded=self._loaded.get("detector", {})))
        return models

    def output_format(self, source) -> str:
        return "png"

    def json_features(self, source) -> dict[str, Any]:
        features = {
            "latent_index": Value("int32"),  # which SLERP variation of the identity (0..latents-1)
            "t": Value("float32"),  # interpolation factor from the prototype toward the target source embedding
            "image_index": Value("int32"),  # which image of that latent (0..images_per_latent-1)
            "seed": Value("int64"),  # seed of this image's initial noise
        }
        if self.opts["align"]:  # measured on the aligned crop only: without alignment the field does not exist
            features["cosine_to_prototype"] = Value("float32")  # ArcFace cosine of the aligned output to the prototype
        return features

    def column_descriptions(self) -> dict[str, str]:
        return {
            "json.source_ref": "the source image whose embedding this sample's latent was interpolated toward",
            "json.latent_index": "which SLERP variation of the identity's prototype (0 … latents − 1)",
            "json.t": "SLERP factor from the prototype (0) toward the source embedding (1), drawn from "
                      f"Beta({self.opts['alpha']:g}, {self.opts['alpha']:g})",
            "json.image_index": "which image generated from that latent (0 … images_per_latent − 1)",
            "json.seed": "seed of the image's initial noise, derived from (identity seed, latent, image)",
            "json.cosine_to_prototype": "ArcFace (arcface.onnx) cosine similarity of the aligned 112x112 output "
                                        "to the identity's prototype (not in align=off builds)",
        }

    def provenance(self) -> dict[str, Any]:
        from facegen.generators.arc2face import PROMPT, describe

        facts: dict[str, Any] = {"prompt": PROMPT, "columns": self.column_descriptions()}
        facts["recipe"] = {k: self.opts[k] for k in ("latents", "images_per_latent", "alpha", "shift_scale",
                                                     "align", "realign", "detector", "det_size", "det_thresh")}
        facts["prototype"] = (
            "normalised mean of the unit ArcFace embeddings of every image the source hands over for the identity "
            "(a source option such as max_images limits them; Digi2Real uses five per subject), which are also the "
            "SLERP targets; 112x112 crops are " + ("detected and 5-point aligned again before embedding"
                                                   if self.opts["realign"] else "embedded as they are"))
        if self.generator is not None:
            facts["sampling"] = describe(self.generator)
        if self.opts["shift"]:
            facts["shift_sha256"] = sha256_file(self.opts["shift"])
            if getattr(self, "delta", None) is not None:
                facts["shift_norm"] = float(self.delta.float().norm())
        return facts

    # ----------------------------------------------------------------------------------------------------------
    # Setup: models once per process
    # ----------------------------------------------------------------------------------------------------------

    def setup(self, device: Any) -> None:
        import torch

        from facegen.generators import arc2face as a2f
        from facegen.generators.alignment import FaceAligner
        from facegen.generators.arcface import ArcFaceEmbedder, resolve_arcface

        device = torch.device(device if device is not None else "cpu")
        dtype = None if self.opts["dtype"] == "auto" else getattr(torch, self.opts["dtype"])
        base_rev, arc_rev = self.revisions()
        model_dir = self.opts["model_dir"]
        if model_dir is not None and not os.path.isdir(model_dir):
            raise UsageError(f"transform 'arc2face': model_dir {model_dir} is not a directory")
        try:
            pipeline = a2f.load_arc2face_pipeline(model_dir, base_revision=base_rev, arc2face_revision=arc_rev,
                                                  device=device, dtype=dtype)
        except a2f.ModelsNotFoundError as exc:
            raise UsageError(f"transform 'arc2face': {exc}") from None
        self._sources.update(pipeline.sources)
        arc_dir = os.path.join(model_dir, a2f.ARC2FACE_DIRNAME) if model_dir else None
        recogniser = resolve_arcface(  # MissingModelError is a UsageError
            arc_dir, revision=arc_rev,
            pass_model_dir=f"pass `--plugin-opt model_dir=M` with DIR as M/{a2f.ARC2FACE_DIRNAME}")
        self._sources["recogniser"] = recogniser

        providers = self._onnx_providers(device)
        self.embedder = ArcFaceEmbedder(recogniser, providers=providers)
        self.aligner = None
        if self.opts["align"] or self.opts["realign"]:
            size = self.opts["det_size"]
            self.aligner = FaceAligner(detector=self.opts["detector"],
                                       model_dir=self.opts["detector_dir"] or model_dir,
                                       det_size=(size, size), det_thresh=self.opts["det_thresh"],
                                       providers=providers)
            self._sources["detector"] = self.aligner.model_path
        self.source_aligner = self.aligner  # source images; outputs are aligned only with align=on
        if not self.opts["align"]:
            self.aligner = None
        try:
            self.generator = a2f.Arc2FaceGenerator(pipeline, steps=self.opts["steps"],
                                                   guidance=self.opts["guidance"],
                                                   resolution=self.opts["resolution"] or None,
                                                   # the run closing the stream (Ctrl-C) stops within a step
                                                   between_steps=stop_if_closed)
        except ValueError as exc:  # e.g. a resolution the VAE cannot produce
            raise UsageError(f"transform 'arc2face': {exc}") from None
        self.delta = self._load_shift(pipeline.text_encoder.config.hidden_size)
        self._record_loaded()
        # micro-batches are post-processed in submission order's futures, so several workers keep output order
        self.post_workers = self.opts["post_workers"] or (2 if device.type == "cuda" else 1)
        self._post = ThreadPoolExecutor(self.post_workers, thread_name_prefix="arc2face-post")

    def _record_loaded(self) -> None:
        """What each model role read (Hub commit, or folder name + sha256 of its weights) for run.json."""
        from facegen.generators import arc2face as a2f
        from facegen.generators.weights import describe_loaded

        files = {"base": a2f.BASE_FILES, "arc2face": a2f.ARC2FACE_FILES}
        for role, path in self._sources.items():
            if path and os.path.exists(path):
                self._loaded[role] = describe_loaded(path, files.get(role))

    @staticmethod
    def _onnx_providers(device) -> list | None:
        """ONNX Runtime on this process's GPU when it has CUDA, else its defaults."""
        import onnxruntime

        if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        return None

    def _load_shift(self, hidden: int):
        path = self.opts["shift"]
        if path is None:
            return None
        import torch
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise UsageError(f"transform 'arc2face': cannot read shift file {path}: {exc}") from None
        if SHIFT_KEY in tensors:
            delta = tensors[SHIFT_KEY]
        elif len(tensors) == 1:
            delta = next(iter(tensors.values()))
        else:
            raise UsageError(f"transform 'arc2face': shift file {path} has no tensor named {SHIFT_KEY!r} "
                             f"(found {', '.join(sorted(tensors)) or 'none'})")
        try:  # Δ is added to (N, 77, hidden) conditioning: it must broadcast to one prompt's (1, 77, hidden)
            fits = torch.broadcast_shapes(tuple(delta.shape), (1, 77, hidden)) == (1, 77, hidden)
        except RuntimeError:
            fits = False
        if not fits:
            raise UsageError(f"transform 'arc2face': shift in {path} has shape {tuple(delta.shape)}; expected "
                             f"(77, {hidden}) or ({hidden},) for this text encoder")
        return delta.float()

    def close(self) -> None:
        post = getattr(self, "_post", None)
        if post is not None:
            post.shutdown(wait=True)

    # ----------------------------------------------------------------------------------------------------------
    # The stream of calls: plan ahead, generate, post-process behind
    # ----------------------------------------------------------------------------------------------------------

    def __call__(self, batch):
        yield from self.stream([batch])

    def stream(self, batches):
        """Every call's results in input order, each yielded once its images are post-processed; the generator
        does not wait on the CPU between micro-batches or between calls:

        - steps 1-4 of the next call (source embeddings, prototypes, variations, their projection and shift) run
          on the thread ``arc2face-plan`` while this call generates (``PLANS_AHEAD`` calls ahead);
        - step 5 runs here, one micro-batch of ``images_per_batch`` images after another;
        - step 6 of each micro-batch runs on the ``post_workers`` while the next ones generate, the next call's too
          (at most ``2 x post_workers`` micro-batches wait for them: then generation waits, and memory stays flat).

        A micro-batch never mixes calls: every image is what a call of its batch alone makes, whatever the stream.
        """
        if self.generator is None:
            raise RuntimeError("Arc2FaceTransform.setup(device) must be called before generating")
        calls: deque[Call] = deque()  # calls whose results are not all yielded yet, in order
        pending: deque = deque()  # (call, future) of the micro-batches being post-processed, in order
        keep = 2 * self.post_workers
        with run_ahead((self.plan_call(batch) for batch in batches), PLANS_AHEAD, "arc2face-plan") as planned:
            try:
                while True:
                    try:
                        call = next(planned, None)
                    except Exception:  # reading or planning the next call failed: the calls before are handed
                        yield from self._finished(calls, pending, 0)  # over first, as a call-by-call loop would
                        raise
                    if call is None:
                        break
                    calls.append(call)
                    for chunk in call.micro_batches(self.opts["images_per_batch"]):
                        images = self.generate(call.cond, chunk)
                        pending.append((call, self._post.submit(self.postprocess, call.plans, chunk, images)))
                        yield from self._finished(calls, pending, keep)
                    yield from self._finished(calls, pending, keep)  # a call without images is complete at once
                yield from self._finished(calls, pending, 0)
            finally:
                for _, future in pending:  # closed early (a failure downstream, Ctrl-C): drop what has not started
                    future.cancel()

    def plan_call(self, batch) -> Call:
        """Steps 1-4 of a call, and its images: whose, which latent, which image, which noise seed."""
        from facegen.generators.arc2face import apply_shift, image_seed

        # 1-2. source embeddings, prototypes, SLERP variations
        plans = self.plan_identities(batch)
        jobs: list[ImageJob] = []
        row = 0
        for p, plan in enumerate(plans):
            for j, _ in enumerate(plan.variations):
                for k in range(self.opts["images_per_latent"]):
                    jobs.append(ImageJob(p, j, k, image_seed(plan.identity.seed, j, k), row))
                row += 1
        # 3-4. one projection for every latent of the call, then the domain-gap shift
        latents = [v.embedding for plan in plans for v in plan.variations]
        cond = None
        if latents:
            cond = apply_shift(self.generator.project(np.stack(latents)), self.delta, self.opts["shift_scale"])
        return Call(plans, jobs, cond)

    def generate(self, cond, chunk: list[ImageJob]) -> np.ndarray:
        """Step 5 for one micro-batch: its images, each from its own noise seed."""
        import torch

        rows = torch.tensor([job.cond_row for job in chunk], device=cond.device)
        try:
            images = self.generator.generate(cond[rows], [job.seed for job in chunk])
        except torch.OutOfMemoryError:
            images = None  # leaving the handler frees the failed batch's tensors before memory is read
        if images is None:
            raise UsageError(f"transform 'arc2face': {self._out_of_memory()}")
        return images

    def _finished(self, calls: deque[Call], pending: deque, keep: int):
        """Collect the post-processed micro-batches (waiting for the oldest while more than ``keep`` are pending),
        then yield every identity whose images are all in, in input order."""
        while pending and (len(pending) > keep or pending[0][1].done()):
            call, future = pending.popleft()
            call.collect(future.result())
        while calls:
            call = calls[0]
            while call.emitted < len(call.plans) and call.remaining[call.emitted] == 0:
                yield self._result(call.plans[call.emitted], call.collected[call.emitted])
                call.emitted += 1
            if call.emitted < len(call.plans):
                return
            calls.popleft()

    def _out_of_memory(self) -> str:
        """The one line of a CUDA out-of-memory error: the images_per_batch that fits, from the memory table of
        ``facegen.generators.arc2face`` (never a silent retry at a smaller size: the user sets it)."""
        from facegen.generators.arc2face import out_of_memory_message

        generator = self.generator
        return out_of_memory_message(self.opts["images_per_batch"], generator.resolution,
                                     str(generator.dtype).replace("torch.", ""), str(generator.device),
                                     free_device_memory(generator.device))

    def plan_identities(self, batch) -> list[IdentityPlan]:
        """Source embeddings (facegen.generators.embeddings' rule, one recogniser call for the whole batch),
        prototypes and variations."""
        from facegen.generators.arc2face import prototype, sample_variations
        from facegen.generators.embeddings import embed_source_images, normalize

        plans = [IdentityPlan(identity) for identity in batch]
        # decoding (and detecting) up to 8 x 72 DigiFace images is most of planning: threads
        embedded = embed_source_images([identity.images for identity in batch], self.embedder,
                                       lambda: self.source_aligner, realign=self.opts["realign"],
                                       use_given=self.opts["source_embeddings"], threads=SOURCE_THREADS)
        for plan, sources in zip(plans, embedded):
            plan.skipped += sources.skipped
            if not sources.refs:
                plan.skipped.append(Skip(plan.identity.id, "no usable source image",
                                         "no source image of this identity could be embedded"))
                continue
            plan.source_refs = sources.refs
            units = normalize(sources.embeddings, dtype=np.float64)
            plan.prototype = prototype(units)
            plan.variations = sample_variations(plan.prototype, units, self.opts["latents"], self.opts["alpha"],
                                                plan.identity.seed)
        return plans

    def postprocess(self, plans: list[IdentityPlan], chunk: list[ImageJob], images: np.ndarray) -> list:
        """(job, Face or Skip) per generated image: align, embed, cosine to the prototype, encode (worker thread)."""
        from facegen.generators.embeddings import normalize

        crops = self.aligner.align(list(images)) if self.aligner is not None else list(images)
        cosines: dict[int, float] = {}
        found = [i for i, crop in enumerate(crops) if crop is not None]
        if self.aligner is not None and found:
            embeddings = normalize(self.embedder.embed(np.stack([crops[i] for i in found])))
            for i, embedding in zip(found, embeddings):
                cosines[i] = float(embedding @ plans[chunk[i].plan_index].prototype)
        out = []
        for i, job in enumerate(chunk):
            plan = plans[job.plan_index]
            variation = plan.variations[job.latent_index]
            ref = f"{plan.identity.id}/latent{job.latent_index}_image{job.image_index}"
            if crops[i] is None:
                out.append((job, Skip(ref, "no face detected", f"seed {job.seed}")))
                continue
            meta = {"latent_index": job.latent_index, "t": round(variation.t, 6), "image_index": job.image_index,
                    "seed": job.seed}
            if i in cosines:  # align=off measures no cosine: the field is not in that build (never null)
                meta["cosine_to_prototype"] = round(cosines[i], 6)
            out.append((job, Face(image=encode_png(crops[i]), ext="png", ref=plan.source_refs[variation.target],
                                  meta=meta)))
        return out

    @staticmethod
    def _result(plan: IdentityPlan, items: list) -> IdentityResult:
        result = IdentityResult(plan.identity, skipped=list(plan.skipped))
        # jobs were created latent-major, image-minor and chunks complete in order, so items are in that order
        for item in items:
            (result.skipped if isinstance(item, Skip) else result.faces).append(item)
        return result
