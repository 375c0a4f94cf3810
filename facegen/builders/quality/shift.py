"""Digi2Real's domain-gap shift Δ (`facegen estimate-shift`): real minus synthetic mean in Arc2Face's CLIP space.

What Δ is, exactly
------------------
For every sampled image of a set: its unit ArcFace embedding (Arc2Face's ``arcface.onnx``; 112x112 crops as they
are, or detected and aligned again with ``realign``; other images detected and aligned first) is projected with
``facegen.generators.arc2face.project_embeddings`` — the prompt "photo of a id person" with the "id" token
embedding replaced by the zero-padded unit vector, through Arc2Face's fine-tuned CLIP text encoder. The tensor
averaged is that encoder's ``last_hidden_state`` (after the final layer norm): shape (77, 768) per image, **all 77
positions** (BOS, the five prompt tokens, EOS and the EOS padding), which is exactly what the transform hands the
UNet as the conditional ``encoder_hidden_states`` and where it adds Δ. Means are taken in float64 over images.

    Δ = mean_real - mean_synthetic            (77, hidden), stored as float32 under the key ``delta``

The file also holds ``mean_real`` and ``mean_synthetic`` and string metadata (counts, norms, model ids, revisions
and paths, the source specs, the sampling settings).

Sampling: per set (all ``--real`` specs together, all ``--synthetic`` specs together) up to ``max_images``
images; identities are visited in a seeded random order and each contributes up to
``ceil(max_images / identities)`` randomly chosen images, so a set with many small identities (DigiFace) gives one
image per identity and a folder of a few large folders (FFHQ's 1000-image folders) is sampled across folders.

SOURCE_SPEC: ``NAME:PATH`` or ``NAME:PATH:key=value,key=value`` (source plugin name, its path, its options),
e.g. ``folder:/data/ffhq`` or ``digiface:/data/digiface:parts=72``.

API summary
-----------
- ``parse_source_spec(spec) -> SourceSpec(name, path, options)``
- ``sample_unit_embeddings(specs, embedder, max_images, seed) -> (embeddings (N, 512), counts, skipped)``
- ``load_text_encoder(model_dir=None, base_revision=None, arc2face_revision=None, device="cpu")
  -> (tokenizer, text_encoder, sources)``
- ``mean_projection(tokenizer, text_encoder, embeddings, batch_size=32) -> (77, hidden) float64 numpy``
- ``estimate_shift(real, synthetic, model_dir=None, max_images=1000, seed=0, ...) -> ShiftEstimate``;
  ``ShiftEstimate.save(path)``; ``.lines()`` for printing.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from facegen.errors import UsageError
from facegen.fileio import atomic_write, sorted_safetensors
from facegen.messages import count, skipped_line
from facegen.records import SourceImage, Skip

SHIFT_KEY = "delta"  # the tensor the arc2face transform reads (its SHIFT_KEY)
FORMAT = "facegen-digi2real-delta/1"
TENSOR_DESCRIPTION = (
    "last_hidden_state of Arc2Face's CLIP text encoder for 'photo of a id person' with the unit ArcFace embedding "
    "in place of the 'id' token; all 77 positions; mean over images (float64), real minus synthetic"
)


@dataclass
class SourceSpec:
    name: str
    path: str
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.name}:{self.path}" + (f":{opts}" if opts else "")


def parse_source_spec(spec: str) -> SourceSpec:
    """``NAME:PATH`` or ``NAME:PATH:k=v,k=v``."""
    name, sep, rest = spec.partition(":")
    if not sep or not name or not rest:
        raise UsageError(f"source spec {spec!r} must be NAME:PATH or NAME:PATH:key=value,... (e.g. folder:/data/ffhq)")
    path, options = rest, {}
    head, sep, tail = rest.rpartition(":")
    if sep and head and "=" in tail:
        path = head
        for pair in tail.split(","):
            key, eq, value = pair.partition("=")
            if not eq or not key.strip():
                raise UsageError(f"source spec {spec!r}: option {pair!r} is not key=value")
            options[key.strip()] = value
    return SourceSpec(name.strip(), os.path.expanduser(path), options)  # the shell leaves "folder:~/x" alone


def sample_unit_embeddings(specs: list[SourceSpec], embedder, max_images: int, seed: int = 0,
                           progress: bool = True) -> tuple[np.ndarray, dict[str, int], list[Skip]]:
    """Unit embeddings of up to ``max_images`` images sampled across the identities of ``specs`` (see module doc)."""
    from tqdm.auto import tqdm

    from facegen.builders.quality.identities import open_source

    sources = [open_source(s.name, s.path, s.options) for s in specs]
    pairs = [(k, identity_id) for k, source in enumerate(sources) for identity_id in source.identities()]
    if not pairs:
        raise UsageError(f"no identities in {', '.join(map(str, specs))}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pairs))
    quota = max(1, math.ceil(max_images / len(pairs)))
    vectors, skipped = [], []
    counts = {str(s): 0 for s in specs}
    bar = tqdm(total=max_images, unit="img", desc=f"embed {specs[0].name}", disable=not progress)
    taken = 0
    for index in order:
        if taken >= max_images:
            break
        k, identity_id = pairs[index]
        items = sources[k].load(identity_id)
        skipped.extend(i for i in items if isinstance(i, Skip))
        images = [i for i in items if isinstance(i, SourceImage)]
        want = min(quota, max_images - taken, len(images))
        if want == 0:
            continue
        picked = [images[j] for j in sorted(rng.choice(len(images), size=want, replace=False))]
        unit, _refs, skips = embedder.embed_images(picked)
        skipped.extend(skips)
        vectors.append(unit)
        counts[str(specs[k])] += len(unit)
        taken += len(unit)
        bar.update(len(unit))
    bar.close()
    for source in sources:
        source.close()
    if taken == 0:
        raise UsageError(f"no usable face image in {', '.join(map(str, specs))}")
    return np.concatenate(vectors).astype(np.float32), counts, skipped


def load_text_encoder(model_dir: str | None = None, base_revision: str | None = None,
                      arc2face_revision: str | None = None, device: str = "cpu"):
    """Arc2Face's tokenizer (SD1.5 base) and fine-tuned CLIP text encoder only (no UNet, no VAE)."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    from facegen.generators import arc2face as a2f

    base_revision = base_revision or a2f.BASE_REVISION
    arc2face_revision = arc2face_revision or a2f.ARC2FACE_REVISION
    base_local = os.path.join(model_dir, a2f.BASE_DIRNAME) if model_dir else None
    arc_local = os.path.join(model_dir, a2f.ARC2FACE_DIRNAME) if model_dir else None
    try:
        base = a2f.resolve_repo(a2f.BASE_ID, base_revision,
                                [f for f in a2f.BASE_FILES if f.startswith("tokenizer/")], base_local)
        arc = a2f.resolve_repo(a2f.ARC2FACE_ID, arc2face_revision,
                               [f for f in a2f.ARC2FACE_FILES if f.startswith("encoder/")], arc_local)
    except a2f.ModelsNotFoundError as exc:
        raise UsageError(str(exc)) from None
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(arc, subfolder="encoder")
    text_encoder.to(device=torch.device(device), dtype=torch.float32).eval().requires_grad_(False)
    sources = {"tokenizer": os.path.join(base, "tokenizer"), "text_encoder": os.path.join(arc, "encoder"),
               "base_id": a2f.BASE_ID, "base_revision": base_revision,
               "arc2face_id": a2f.ARC2FACE_ID, "arc2face_revision": arc2face_revision}
    return tokenizer, text_encoder, sources


def mean_projection(tokenizer, text_encoder, embeddings: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Mean over images of ``project_embeddings`` (N, 77, hidden) -> (77, hidden), accumulated in float64."""
    from facegen.generators.arc2face import project_embeddings

    total = None
    for start in range(0, len(embeddings), batch_size):
        projected = project_embeddings(tokenizer, text_encoder, embeddings[start:start + batch_size])
        part = projected.double().sum(dim=0).cpu().numpy()
        total = part if total is None else total + part
    return total / len(embeddings)


@dataclass
class ShiftEstimate:
    delta: np.ndarray  # (77, hidden) float32
    mean_real: np.ndarray
    mean_synthetic: np.ndarray
    real_counts: dict[str, int]
    synthetic_counts: dict[str, int]
    skipped: list[Skip]
    models: dict[str, str]
    settings: dict[str, str]
    id_position: int

    @property
    def real_count(self) -> int:
        return sum(self.real_counts.values())

    @property
    def synthetic_count(self) -> int:
        return sum(self.synthetic_counts.values())

    def norms(self) -> dict[str, float]:
        return {
            "delta_norm": float(np.linalg.norm(self.delta)),
            "delta_id_token_norm": float(np.linalg.norm(self.delta[self.id_position])),
            "delta_max_position_norm": float(np.linalg.norm(self.delta, axis=1).max()),
            "mean_real_norm": float(np.linalg.norm(self.mean_real)),
            "mean_synthetic_norm": float(np.linalg.norm(self.mean_synthetic)),
        }

    def metadata(self) -> dict[str, str]:
        meta = {
            "format": FORMAT,
            "tensor": TENSOR_DESCRIPTION,
            "shape": "x".join(map(str, self.delta.shape)),
            "id_token_position": str(self.id_position),
            "real_count": str(self.real_count),
            "synthetic_count": str(self.synthetic_count),
            "real_sources": "; ".join(f"{k} ({count(v, 'image')})" for k, v in self.real_counts.items()),
            "synthetic_sources": "; ".join(f"{k} ({count(v, 'image')})" for k, v in self.synthetic_counts.items()),
            "skipped_images": str(len(self.skipped)),
        }
        meta.update({k: f"{v:.6g}" for k, v in self.norms().items()})
        meta.update(self.models)
        meta.update(self.settings)
        return meta

    def save(self, path: str | os.PathLike) -> None:
        import torch
        from safetensors.torch import save

        tensors = {
            SHIFT_KEY: torch.from_numpy(np.ascontiguousarray(self.delta, dtype=np.float32)),
            "mean_real": torch.from_numpy(np.ascontiguousarray(self.mean_real, dtype=np.float32)),
            "mean_synthetic": torch.from_numpy(np.ascontiguousarray(self.mean_synthetic, dtype=np.float32)),
        }
        atomic_write(path, sorted_safetensors(save(tensors, metadata=self.metadata())))

    def lines(self) -> list[str]:
        norms = self.norms()
        out = [f"real: {count(self.real_count, 'image')}"]
        out += [f"  {k}: {v}" for k, v in self.real_counts.items()]
        out.append(f"synthetic: {count(self.synthetic_count, 'image')}")
        out += [f"  {k}: {v}" for k, v in self.synthetic_counts.items()]
        if self.skipped:
            out.append(skipped_line([skip.reason for skip in self.skipped]))
        out.append(f"|mean real| = {norms['mean_real_norm']:.4f}   |mean synthetic| = "
                   f"{norms['mean_synthetic_norm']:.4f}")
        out.append(f"|delta| = {norms['delta_norm']:.4f} over {self.delta.shape[0]}x{self.delta.shape[1]}; "
                   f"at the id token (position {self.id_position}): {norms['delta_id_token_norm']:.4f}; "
                   f"largest at one position: {norms['delta_max_position_norm']:.4f}")
        return out


def estimate_shift(real: list[SourceSpec], synthetic: list[SourceSpec], model_dir: str | None = None,
                   max_images: int = 1000, seed: int = 0, device: str | None = None, detector: str = "scrfd",
                   det_size: int = 640, base_revision: str | None = None, arc2face_revision: str | None = None,
                   progress: bool = True, realign: bool = False) -> ShiftEstimate:
    import torch

    from facegen.builders.quality.identities import FaceEmbedder
    from facegen.generators.arc2face import id_token_id, prompt_input_ids

    if not real or not synthetic:
        raise UsageError("estimate-shift needs at least one --real and one --synthetic source")
    if max_images < 1:
        raise UsageError("--max-images must be at least 1")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, text_encoder, models = load_text_encoder(model_dir, base_revision, arc2face_revision, device)
    embedder = FaceEmbedder(model_dir, detector=detector, det_size=det_size,
                            arc2face_revision=models["arc2face_revision"], realign=realign)
    models["recogniser"] = embedder.recogniser_path

    real_units, real_counts, real_skips = sample_unit_embeddings(real, embedder, max_images, seed, progress)
    synth_units, synth_counts, synth_skips = sample_unit_embeddings(synthetic, embedder, max_images, seed, progress)
    mean_real = mean_projection(tokenizer, text_encoder, real_units)
    mean_synth = mean_projection(tokenizer, text_encoder, synth_units)
    ids = prompt_input_ids(tokenizer)[0].tolist()
    id_position = ids.index(id_token_id(tokenizer))
    settings = {"max_images": str(max_images), "seed": str(seed), "detector": detector, "det_size": str(det_size)}
    if realign:  # absent: 112x112 crops were embedded as they are (files made before the option read the same)
        settings["realign"] = "true"
    return ShiftEstimate(
        delta=(mean_real - mean_synth).astype(np.float32),
        mean_real=mean_real.astype(np.float32),
        mean_synthetic=mean_synth.astype(np.float32),
        real_counts=real_counts,
        synthetic_counts=synth_counts,
        skipped=real_skips + synth_skips,
        models=models,
        settings=settings,
        id_position=id_position,
    )
