"""A fixture Idiap DisCo / Dispersion / Langevin ensemble folder in the published layout.

Layout written (what ``synthetics generate-database … create-variations`` leaves after ``merge-samples``)::

    ROOT/samples.h5                       attrs magic='synthetics_collection', major=2, minor=0
        /<identity:05d>/<label>/          attrs network_type, embedding_type
            w_latent (1, 512) float32     embedding (1, 512) float32, raw (unnormalised)
            z_latent (1, 512)             only for 'reference' samples (random references)
            w_plus_latent (1, 18, 512)    optional (``w_plus=True``)
    ROOT/images_arcface_112x112/<identity:05d>/<label>.png     112x112 RGB PNG
    ROOT/stats.h5                         1-D float32 per-iteration dynamics (dist_min, dist_avg …)
    ROOT/command.yml                      yaml.dump of the click parameters (tuples as !!python/tuple)

Labels are ``reference`` and ``augmentation_0`` … ``augmentation_{N-1}``; with N >= 11 h5py's alphabetical order
(``augmentation_10`` before ``augmentation_2``) differs from the natural order.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import yaml

from facegen.testing.folder import draw_face, encode

MAGIC = "synthetics_collection"
IMAGES_DIR = "images_arcface_112x112"
STATS_DATASETS = ("dist_min", "dist_max", "dist_avg", "prop_ict", "w2wd_min", "w2wd_avg", "w2wd_max", "wavg_avg",
                  "intf_min", "intf_avg", "intf_max", "totf_min", "totf_avg", "totf_max", "timestep")


def disco_labels(augmentations: int, reference: bool = True) -> list[str]:
    """The labels of one identity in natural order."""
    return (["reference"] if reference else []) + [f"augmentation_{a}" for a in range(augmentations)]


def sample_embedding(identity: int, label: str, seed: int = 0) -> np.ndarray:
    """(1, 512) raw embedding: an identity direction plus per-sample noise, norm around 20 like a raw iResNet50."""
    base = np.random.default_rng([seed, identity]).normal(0, 1, 512)
    noise = np.random.default_rng([seed, identity, sum(map(ord, label)), len(label)]).normal(0, 0.6, 512)
    vector = base + noise
    return (vector / np.linalg.norm(vector) * 20.0 + 0.1).astype(np.float32)[None, :]


def write_disco_source(
    root: str | os.PathLike,
    identities: int = 3,
    augmentations: int = 12,
    reference_images: bool = True,
    network_type: str = "stylegan2-256",
    embedding_type: str = "iresnet50",
    w_plus: bool = False,
    magic: str = MAGIC,
    major: int = 2,
    minor: int = 0,
    missing_embedding: int = 0,
    missing_w_latent: int = 0,
    nan_embedding: int = 0,
    sample_without_image: int = 0,
    image_without_sample: int = 0,
    identity_dir_without_samples: int = 0,
    stats: bool = True,
    command: bool = True,
    seed: int = 0,
) -> Path:
    """Write an ensemble folder under ``root`` and return it.

    ``reference_images=False`` leaves the 'reference' images out, as in the published DisCo and Dispersion
    ensembles (the references' images live in the Langevin ensemble). Damage, each on a different sample counted
    from the last identity backwards: ``missing_embedding`` / ``missing_w_latent`` omit that dataset,
    ``nan_embedding`` writes NaNs into it, ``sample_without_image`` deletes the image of an h5 sample,
    ``image_without_sample`` writes an extra image ``augmentation_{N+k}.png`` that has no h5 group;
    ``identity_dir_without_samples`` writes image folders for identity numbers past the h5 identities.
    """
    root = Path(root)
    images = root / IMAGES_DIR
    images.mkdir(parents=True, exist_ok=True)
    damaged = [(i, a) for i in reversed(range(identities)) for a in reversed(range(augmentations))]
    damage_kinds = (["missing_embedding"] * missing_embedding + ["missing_w_latent"] * missing_w_latent
                    + ["nan_embedding"] * nan_embedding + ["sample_without_image"] * sample_without_image)
    damage = {damaged[k]: kind for k, kind in enumerate(damage_kinds)}

    with h5py.File(root / "samples.h5", "w") as f:
        f.attrs["magic"] = magic
        f.attrs["major"] = major
        f.attrs["minor"] = minor
        for identity in range(identities):
            folder = images / f"{identity:05d}"
            folder.mkdir(exist_ok=True)
            id_group = f.create_group(f"{identity:05d}")
            for label in disco_labels(augmentations):
                index = -1 if label == "reference" else int(label.rsplit("_", 1)[1])
                kind = damage.get((identity, index))
                group = id_group.create_group(label)
                group.attrs["network_type"] = network_type
                group.attrs["embedding_type"] = embedding_type
                rng = np.random.default_rng([seed, identity, index + 1])
                if kind != "missing_w_latent":
                    group.create_dataset("w_latent", data=rng.normal(0, 1, (1, 512)).astype(np.float32))
                if label == "reference":
                    group.create_dataset("z_latent", data=rng.normal(0, 1, (1, 512)).astype(np.float32))
                if w_plus:
                    group.create_dataset("w_plus_latent", data=rng.normal(0, 1, (1, 18, 512)).astype(np.float32))
                embedding = sample_embedding(identity, label, seed)
                if kind == "nan_embedding":
                    embedding[0, ::7] = np.nan
                if kind != "missing_embedding":
                    group.create_dataset("embedding", data=embedding)
                if (label == "reference" and not reference_images) or kind == "sample_without_image":
                    continue
                image = draw_face(identity + 1000 * seed, index + 1, size=112)
                (folder / f"{label}.png").write_bytes(encode(image, "png"))
    for k in range(image_without_sample):
        identity = identities - 1 - (k % identities)
        extra = images / f"{identity:05d}" / f"augmentation_{augmentations + k}.png"
        extra.write_bytes(encode(draw_face(identity, 500 + k, size=112), "png"))
    for k in range(identity_dir_without_samples):
        folder = images / f"{identities + k:05d}"
        folder.mkdir(exist_ok=True)
        (folder / "augmentation_0.png").write_bytes(encode(draw_face(identities + k, 0, size=112), "png"))

    if stats:
        iterations = 5
        with h5py.File(root / "stats.h5", "w") as f:
            for name in STATS_DATASETS:
                values = np.linspace(1.0, 0.5, iterations) if name != "timestep" else np.zeros(iterations)
                f.create_dataset(name, data=values.astype(np.float32))
    if command:
        # what synthetics' dump_command appends: one list item per (sub)command, click params as they were
        entries = [
            {"generate-database": {
                "network_type": network_type, "embedding_type": embedding_type, "num_identities": identities,
                "postprocessor_config": "arcface", "root_directory": str(root), "seed": seed,
                "git": {"branch": "main", "version": "f5efe3f"}}},
            {"create-variations": {
                "algorithm": "disco", "num_augmentations": augmentations, "ict": 1.4,
                "latent_directions": ("pose", "illumination", "expression"), "iterations": 20}},
            {"merge-samples": {"remove": True}},
        ]
        with open(root / "command.yml", "a", encoding="utf-8") as f:
            for entry in entries:
                yaml.dump([entry], f)
    return root
