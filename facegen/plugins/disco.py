"""Source `disco`: an Idiap Langevin / Dispersion / DisCo ensemble folder (data package of Geissbühler et al. 2024).

An ensemble folder holds ``samples.h5`` (a ``synthetics`` SampleCollection: attrs ``magic='synthetics_collection'``,
``major=2``; groups ``/<identity:05d>/<label>/`` with ``w_latent`` (1, 512), ``embedding`` (1, 512, raw), optional
``z_latent``, ``w_plus_latent``, ``c_label``, attrs ``network_type`` and ``embedding_type``), one aligned PNG per
sample under ``images_arcface_112x112/<identity:05d>/<label>.png``, ``stats.h5`` and ``command.yml``.

Identity ids are the 5-digit group names; labels come ``reference`` first, then in natural order
(``augmentation_2`` before ``augmentation_10``, unlike h5py's alphabetical listing). The HDF5 file is opened
lazily, once per process, on the first ``load`` (never at import, and a 30K x 64 ensemble is never read whole):
``load`` reads just that identity's group. Each sample's raw embedding is handed to transforms as
``SourceImage.hints["embedding"]`` (float32 (512,)) so that they need not recompute it.

The published DisCo and Dispersion ensembles do not repeat the reference images (they are in the Langevin
ensemble): ``reference=auto`` includes the ``reference`` samples only when their images are found, in this folder
or in ``reference_path`` (the Langevin ensemble folder).
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any

import numpy as np
import yaml

from facegen.api import LicenseInfo, Option, Skip, Source, SourceImage, UsageError, natural_key, warn

MAGIC = "synthetics_collection"
MAJOR = 2
EMBEDDING_DIM = LATENT_DIM = 512
IDENTITY_GROUP = re.compile(r"\d{5}")
DEFAULT_IMAGES_DIR = "images_arcface_112x112"
MAX_IMAGE_BYTES = 16 << 20  # a published image is a ~25 KB 112x112 PNG


def label_key(label: str):
    """The identity's 'reference' first, then the other labels in natural order."""
    return (label != "reference", natural_key(label))


def _text(value: Any) -> str:
    """An HDF5 string attribute as str, whether h5py returns str, bytes or a numpy scalar."""
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _text(value[()])
    return str(value)


def _integer(value: Any) -> int | None:
    """An HDF5 attribute as an int when it is one integer (python, numpy or a 0-d array), else None."""
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    return None


def link_problem(group, name: str) -> str | None:
    """Why ``group[name]`` cannot be used, or None: a soft link that leads nowhere, or any external link (a
    samples.h5 holds its own data; another file named by a link is never opened)."""
    import h5py

    try:
        link = group.get(name, getlink=True)
    except (KeyError, RuntimeError, OSError) as exc:
        return f"unreadable link: {exc}"
    if isinstance(link, h5py.ExternalLink):
        return f"external link to {os.path.basename(link.filename)}:{link.path}, not followed"
    if isinstance(link, h5py.SoftLink):
        try:
            target = group.get(name, getclass=True)
        except (KeyError, RuntimeError, OSError):
            target = None
        if target is None:
            return f"soft link to {link.path}, which does not exist"
    return None


class _PlainYamlLoader(yaml.SafeLoader):
    """Safe YAML that reads python-specific tags as plain data (``!!python/tuple`` -> list, others -> their
    scalar/list/mapping) and never constructs an object: command.yml is written by ``yaml.dump`` of click params."""


def _construct_plain(loader: yaml.SafeLoader, suffix: str, node: yaml.Node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_PlainYamlLoader.add_multi_constructor("tag:yaml.org,2002:python/", _construct_plain)
_PlainYamlLoader.add_multi_constructor("!", _construct_plain)


MAX_COMMAND_YML_BYTES = 1 << 20  # DisCo's command.yml is a few KB of click parameters
MAX_COMMAND_YML_NODES = 100_000  # after aliases are expanded: a "billion laughs" file of a few KB counts 10**9


def _expanded_nodes(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many nodes ``node`` holds once every alias is expanded (as json.dumps of the record would expand it);
    aliases share node objects, so each is counted once per reference, computed once."""
    if id(node) not in memo:
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        memo[id(node)] = 1 + sum(_expanded_nodes(child, memo) for child in children)
    return memo[id(node)]


def read_command_yml(path: str) -> Any:
    """The parsed command.yml (a list of {command: params}); raises ValueError when it is not YAML, or larger than
    a command file is (its bytes, or its nodes once aliases are expanded)."""
    if os.path.getsize(path) > MAX_COMMAND_YML_BYTES:
        raise ValueError(f"command.yml is larger than {MAX_COMMAND_YML_BYTES >> 20} MB")
    with open(path, encoding="utf-8") as f:
        text = f.read(MAX_COMMAND_YML_BYTES + 1)
    try:
        node = yaml.compose(text, Loader=_PlainYamlLoader)  # noqa: S506 - a SafeLoader subclass
        if node is not None and _expanded_nodes(node, {}) > MAX_COMMAND_YML_NODES:
            raise ValueError(f"command.yml expands to more than {MAX_COMMAND_YML_NODES:,} values (aliases)")
        return yaml.load(text, Loader=_PlainYamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ValueError(str(exc).splitlines()[0]) from None
    except RecursionError:
        raise ValueError("command.yml is nested too deeply to read") from None


class DiscoSource(Source):
    name = "disco"
    synthetic = True  # the card may call the images synthetic
    image_format = "png"
    description = "Idiap Langevin/Dispersion/DisCo ensemble: samples.h5 + images_arcface_112x112 (lazy HDF5)"
    card_description = (
        "Synthetic identities from the data package of 'Synthetic Face Datasets Generation via Latent Space "
        "Exploration from Brownian Identity Diffusion' (Geissbühler, Otroshi Shahreza, Marcel; Idiap): StyleGAN2 "
        "faces whose identities were spread apart by Langevin dynamics on face-recognition embeddings, with "
        "intra-class variations from the Dispersion or DisCo algorithms. Images are 112x112 and ArcFace-aligned "
        "as published; the identity is the 5-digit group of samples.h5 and `json.label` is the sample label "
        "(`reference`, `augmentation_<n>`). `embedding.npy` is the sample's face-recognition embedding as "
        "stored in samples.h5: raw and NOT L2-normalised (`json.embedding_norm` gives its norm; normalise before "
        "cosine similarity); `json.embedding_type` names the network that made it. `w_latent.npy` is the "
        "StyleGAN2 W latent (512) the image was generated from (`json.network_type`)."
    )
    homepage = "https://www.idiap.ch/paper/synthetics-disco"
    citation = """@article{geissbuhler2024synthetic,
  title={Synthetic Face Datasets Generation via Latent Space Exploration from Brownian Identity Diffusion},
  author={Geissb{\\"u}hler, David and Shahreza, Hatef Otroshi and Marcel, S{\\'e}bastien},
  journal={arXiv preprint arXiv:2405.00228},
  year={2024}
}"""
    license = LicenseInfo(
        id="other",
        name="Idiap non-commercial research and educational use only (README of the code says MIT)",
        link="https://github.com/idiap/face_synthetics",
        text=(
            "Licence as found. The data package's README names no licence. The companion software "
            "(github.com/idiap/face_synthetics), which defines this format and generated the data, says in its "
            "README: 'This package is released under the MIT license … it is based on non-commercial libraries "
            "which cannot be used in a commercial scenario'. Its file headers, however, carry "
            "SPDX-License-Identifier: LicenseRef-IdiapNCResearchAndEducationalOnly ('License - for "
            "Non-Commercial Research and Educational Use Only', Copyright (c) Idiap Research Institute: "
            "redistribution and use 'permitted for non-commercial research and educational use only', keeping "
            "the copyright notice and disclaimer; commercial use: contact tto@idiap.ch). The images were made "
            "with NVIDIA's StyleGAN2 FFHQ weights (NVIDIA Source Code License-NC). Treat this dataset as "
            "non-commercial research and educational use only."
        ),
        commercial_use=False,
        note="README says MIT, file headers say Idiap non-commercial research/education only: the stricter applies.",
    )

    options = {
        "images": Option("", f"Image folder inside the ensemble (default: {DEFAULT_IMAGES_DIR}, or the only "
                         "images* folder)"),
        "reference": Option("auto", "Include the 'reference' samples: auto (when their images exist), include "
                            "(missing images are skipped and counted), exclude", choices=("auto", "include",
                                                                                         "exclude")),
        "reference_path": Option("", "Ensemble folder holding the reference images (the Langevin ensemble)",
                                 path=True),
    }

    def __init__(self, path, **options):
        super().__init__(path, **options)
        self.root = self.path if os.path.isdir(self.path) else os.path.dirname(self.path)
        self.samples_path = os.path.join(self.root, "samples.h5")
        if not os.path.isfile(self.samples_path):
            raise UsageError(f"source 'disco': no samples.h5 in {self.root} (give the ensemble folder, e.g. "
                             "sg2_n10k_arc_r14_disco_n64_rl14)")
        self.images_dir = self._find_images_dir(self.root, self.opts["images"])
        self.reference_images_dir = None
        if self.opts["reference_path"]:
            ref_root = self.opts["reference_path"]
            if not os.path.isdir(ref_root):
                raise UsageError(f"source 'disco': reference_path {ref_root} is not a directory")
            self.reference_images_dir = self._find_images_dir(ref_root, os.path.basename(self.images_dir))
        # read the header and the identity list, then close: the handle for loading is opened per process
        import h5py

        try:
            with h5py.File(self.samples_path, "r") as h5:
                self.file_attrs = self._check_header(h5)
                names = list(h5.keys())
                # identities behind a broken link stay in the plan: each becomes a counted skip, and is warned about
                self.broken_links = {n: p for n in names if IDENTITY_GROUP.fullmatch(n)
                                     for p in [link_problem(h5, n)] if p}
                self._ids = sorted((n for n in names if IDENTITY_GROUP.fullmatch(n) and (
                    n in self.broken_links or h5.get(n, getclass=True) is h5py.Group)), key=int)
                self.other_groups = sorted(set(names) - set(self._ids))
                usable = [n for n in self._ids if n not in self.broken_links]
                first_labels = list(h5[usable[0]].keys()) if usable else []
        except OSError as exc:
            raise UsageError(f"source 'disco': cannot read {self.samples_path} as HDF5: {exc}") from None
        if not self._ids:
            raise UsageError(f"source 'disco': {self.samples_path} holds no /<identity:05d>/ groups")
        if self.broken_links and os.environ.get("RANK", "0") == "0":
            first = next(iter(sorted(self.broken_links)))
            warn(f"disco: {len(self.broken_links)} identity group(s) of samples.h5 are broken links and are "
                 f"skipped (e.g. /{first}: {self.broken_links[first]})")
        self.include_reference = self._decide_reference(first_labels)
        self._h5 = None
        self._h5_pid = None
        self._h5_lock = threading.Lock()
        self._listing: dict[str, list[tuple[str, str]]] = {}  # identity -> its items (filled on first use)

    # --- construction helpers ---

    @staticmethod
    def _find_images_dir(root: str, name: str) -> str:
        if name:
            folder = os.path.join(root, name)
            if not os.path.isdir(folder):
                raise UsageError(f"source 'disco': no image folder {name!r} in {root}")
            return folder
        if os.path.isdir(os.path.join(root, DEFAULT_IMAGES_DIR)):
            return os.path.join(root, DEFAULT_IMAGES_DIR)
        candidates = sorted(e.name for e in os.scandir(root) if e.is_dir() and e.name.startswith("images"))
        if len(candidates) == 1:
            return os.path.join(root, candidates[0])
        if not candidates:
            raise UsageError(f"source 'disco': no images* folder in {root} (expected {DEFAULT_IMAGES_DIR}/)")
        raise UsageError(f"source 'disco': several image folders in {root} ({', '.join(candidates)}); "
                         "choose one with --source-opt images=NAME")

    def _check_header(self, h5) -> dict[str, Any]:
        attrs = {k: h5.attrs[k] for k in ("magic", "major", "minor") if k in h5.attrs}
        magic = _text(attrs["magic"]) if "magic" in attrs else None
        if magic != MAGIC:
            hint = " (a single-sample file, not a collection)" if magic == "synthetics" else ""
            raise UsageError(f"source 'disco': {self.samples_path} is not a synthetics sample collection: "
                             f"magic is {magic!r}, expected {MAGIC!r}{hint}")
        try:
            major = int(attrs["major"])
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"source 'disco': {self.samples_path} has no integer 'major' version attribute") from None
        minor = attrs.get("minor")
        if major != MAJOR:
            raise UsageError(f"source 'disco': {self.samples_path} is format version {major}.{minor}; this plugin "
                             f"reads major version {MAJOR}")
        header = {"magic": magic, "major": major, "minor": None if minor is None else _integer(minor)}
        if minor is not None and header["minor"] is None:  # informative only: say so, and go on
            shown = _text(minor) if not isinstance(minor, np.ndarray) or minor.size <= 8 else f"an array {minor.shape}"
            header["minor_unreadable"] = shown[:80]
            if os.environ.get("RANK", "0") == "0":
                warn(f"disco: samples.h5 attribute 'minor' is {shown[:80]!r}, not an integer; ignored")
        return header

    def _decide_reference(self, first_labels: list[str]) -> bool:
        mode = self.opts["reference"]
        if mode != "auto":
            return mode == "include"
        if "reference" not in first_labels:
            return False
        first = next(n for n in self._ids if n not in self.broken_links)
        return self._image_path(first, "reference") is not None

    def _image_path(self, identity: str, label: str) -> str | None:
        path = os.path.join(self.images_dir, identity, f"{label}.png")
        if os.path.isfile(path):
            return path
        if label == "reference" and self.reference_images_dir:
            path = os.path.join(self.reference_images_dir, identity, f"{label}.png")
            if os.path.isfile(path):
                return path
        return None

    # --- the HDF5 handle: opened on first use in each process, kept until close() ---

    def _samples(self):
        with self._h5_lock:
            if self._h5 is None or self._h5_pid != os.getpid():
                import h5py

                # a handle inherited through fork is not usable in the child: open our own
                self._h5 = h5py.File(self.samples_path, "r")
                self._h5_pid = os.getpid()
            return self._h5

    def close(self):
        with self._h5_lock:
            if self._h5 is not None and self._h5_pid == os.getpid():
                self._h5.close()
            self._h5 = None

    # --- the Source API ---

    def identities(self):
        return self._ids

    def json_features(self):
        from datasets import Value

        return {"label": Value("string"), "network_type": Value("string"), "embedding_type": Value("string"),
                "embedding_norm": Value("float32")}

    def extra_features(self):
        from datasets import List, Value

        return {"embedding.npy": List(Value("float32"), length=EMBEDDING_DIM),
                "w_latent.npy": List(Value("float32"), length=LATENT_DIM)}

    def _entries(self, identity_id: str) -> list[tuple[str, str]]:
        """The identity's items in order: ("sample", label) per h5 sample group (("broken", label) where that
        group is a broken or external link: a counted skip), then ("orphan", file name) per image that has no h5
        sample (counted as a skip, never written). An identity group that is itself a broken link is one item,
        ("broken identity", id). Listed once per process."""
        entries = self._listing.get(identity_id)
        if entries is None:
            import h5py

            if identity_id in self.broken_links:  # never opened: an external link would open another file
                entries = [("broken identity", identity_id)]
                self._listing[identity_id] = entries
                return entries
            group = self._samples()[identity_id]
            broken = {n for n in group.keys() if link_problem(group, n)}
            labels = sorted([n for n in group.keys() if n in broken or group.get(n, getclass=True) is h5py.Group],
                            key=label_key)
            entries = [("broken" if label in broken else "sample", label) for label in labels
                       if label != "reference" or self.include_reference]
            folder = os.path.join(self.images_dir, identity_id)
            known = set(labels)
            if os.path.isdir(folder):
                for file_name in sorted(os.listdir(folder), key=natural_key):
                    stem, ext = os.path.splitext(file_name)
                    if ext.lower() == ".png" and stem not in known:
                        entries.append(("orphan", file_name))
            self._listing[identity_id] = entries
        return entries

    def image_refs(self, identity_id):
        refs = []
        for kind, name in self._entries(identity_id):
            if kind == "broken identity":
                refs.append(identity_id)
            else:
                refs.append(f"{identity_id}/{os.path.splitext(name)[0] if kind == 'orphan' else name}")
        return refs

    def load(self, identity_id):
        return self.load_images(identity_id, range(len(self._entries(identity_id))))

    def load_images(self, identity_id, indices):
        entries = self._entries(identity_id)
        if identity_id in self.broken_links:
            problem = self.broken_links[identity_id]
            return [Skip(identity_id, "broken HDF5 link", f"samples.h5 /{identity_id}: {problem}") for _ in indices]
        group = self._samples()[identity_id]
        items: list[SourceImage | Skip] = []
        for index in indices:
            kind, label = entries[index]
            if kind == "orphan":  # an image of this identity without h5 sample: no embedding, no latent
                stem = os.path.splitext(label)[0]
                items.append(Skip(f"{identity_id}/{stem}", "image without h5 sample",
                                  f"{os.path.basename(self.images_dir)}/{identity_id}/{label}"))
                continue
            ref = f"{identity_id}/{label}"
            if kind == "broken":
                problem = link_problem(group, label)
                warn(f"disco: samples.h5 /{ref} is skipped: {problem}")
                items.append(Skip(ref, "broken HDF5 link", f"samples.h5 /{ref}: {problem}"))
                continue
            sample = self._read_sample(group[label], ref)
            if isinstance(sample, Skip):
                items.append(sample)
                continue
            image_path = self._image_path(identity_id, label)
            if image_path is None:
                items.append(Skip(ref, "missing image", f"no {os.path.basename(self.images_dir)}/{ref}.png"))
                continue
            try:
                with open(image_path, "rb") as f:
                    if os.fstat(f.fileno()).st_size > MAX_IMAGE_BYTES:
                        items.append(Skip(ref, "file too large", f"over the {MAX_IMAGE_BYTES} bytes limit"))
                        continue
                    data = f.read(MAX_IMAGE_BYTES + 1)
            except OSError as exc:
                items.append(Skip(ref, "unreadable file", str(exc.strerror or exc)))
                continue
            embedding, w_latent, meta = sample
            items.append(SourceImage(ref=ref, data=data, ext="png", meta=meta,
                                     extras={"embedding.npy": embedding, "w_latent.npy": w_latent},
                                     hints={"embedding": embedding, "w_latent": w_latent}))
        return items

    def _read_sample(self, group, ref: str):
        """(embedding, w_latent, meta) of one sample group, or a Skip saying what is wrong with it."""
        import h5py

        vectors = {}
        for name, dim in (("embedding", EMBEDDING_DIM), ("w_latent", LATENT_DIM)):
            problem = link_problem(group, name) if name in group else None
            if problem:
                warn(f"disco: samples.h5 /{ref}/{name} is skipped: {problem}")
                return Skip(ref, "broken HDF5 link", f"samples.h5 /{ref}/{name}: {problem}")
            dataset = group.get(name)
            if dataset is None:
                return Skip(ref, "missing dataset", f"samples.h5 /{ref} has no '{name}'")
            # shape and type first: a few hundred bytes of compressed HDF5 can declare gigabytes
            shape = getattr(dataset, "shape", None)
            if (not isinstance(dataset, h5py.Dataset) or shape != (1, dim) or dataset.dtype.kind != "f"
                    or dataset.dtype.itemsize > 8):
                dtype = getattr(dataset, "dtype", type(dataset).__name__)
                return Skip(ref, "bad dataset", f"/{ref}/{name} is {shape} {dtype}, expected (1, {dim}) floats")
            try:
                array = dataset[()]
            except (OSError, KeyError, TypeError, AttributeError, ValueError, RuntimeError) as exc:
                return Skip(ref, "bad dataset", f"/{ref}/{name}: {exc}")
            vector = array.reshape(dim).astype(np.float32)
            if not np.isfinite(vector).all():
                return Skip(ref, f"non-finite {name.replace('_', ' ')}", f"/{ref}/{name} holds NaN or inf")
            vectors[name] = vector
        attrs = group.attrs
        try:
            network_type, embedding_type = attrs.get("network_type"), attrs.get("embedding_type")
        except (OSError, KeyError, TypeError, ValueError, RuntimeError) as exc:  # a type h5py cannot read
            return Skip(ref, "bad attribute", f"/{ref}: {exc}")
        for attr, value in (("network_type", network_type), ("embedding_type", embedding_type)):
            if value is None:
                return Skip(ref, "missing attribute", f"/{ref} has no '{attr}' attribute")
            if isinstance(value, np.ndarray) and value.shape != ():
                return Skip(ref, "bad attribute", f"/{ref} attribute '{attr}' is an array {value.shape}, "
                                                  "expected a string")
        meta = {
            "label": ref.split("/", 1)[1],
            "network_type": _text(network_type),
            "embedding_type": _text(embedding_type),
            "embedding_norm": float(np.linalg.norm(vectors["embedding"])),
        }
        return vectors["embedding"], vectors["w_latent"], meta

    def column_descriptions(self):
        return {
            "json.label": "sample label in samples.h5: 'reference' or 'augmentation_<n>'",
            "json.network_type": "generator that made the image (samples.h5 attribute network_type)",
            "json.embedding_type": "face-recognition network of the embedding (attribute embedding_type)",
            "json.embedding_norm": "L2 norm of the raw embedding",
            "embedding.npy": "raw face-recognition embedding from samples.h5, NOT L2-normalised",
            "w_latent.npy": "StyleGAN2 W latent of the sample (samples.h5 w_latent)",
        }

    def provenance(self):
        record: dict[str, Any] = {
            "samples_h5": dict(self.file_attrs),
            "images_dir": os.path.basename(self.images_dir),
            "reference_samples": "included" if self.include_reference else "excluded",
            "reference_images_from": self.reference_images_dir,
            "embedding": "raw output of the embedding network (json.embedding_type), not L2-normalised",
            "non_identity_groups_ignored": self.other_groups,
            "columns": self.column_descriptions(),
        }
        # image folders of identities that samples.h5 does not have (not written: no embedding, no latent)
        known = set(self._ids)
        orphans = sorted(e.name for e in os.scandir(self.images_dir) if e.is_dir() and e.name not in known)
        record["image_folders_without_h5_identity"] = {"count": len(orphans), "first": orphans[:10]}
        command_path = os.path.join(self.root, "command.yml")
        if os.path.isfile(command_path):
            try:
                record["command_yml"] = read_command_yml(command_path)
            except (OSError, ValueError) as exc:
                record["command_yml_error"] = str(exc)
        stats_path = os.path.join(self.root, "stats.h5")
        if os.path.isfile(stats_path):
            record["stats_h5"] = summarise_stats(stats_path)
        return record


def summarise_stats(path: str) -> dict[str, Any]:
    """Length and first/last values of each 1-D dataset of stats.h5 (per-iteration dynamics)."""
    import h5py

    summary: dict[str, Any] = {}
    try:
        with h5py.File(path, "r") as h5:
            for name in sorted(h5.keys()):
                if link_problem(h5, name):
                    continue
                item = h5[name]
                if (not isinstance(item, h5py.Dataset) or item.ndim != 1 or item.shape[0] == 0
                        or item.dtype.kind not in "iuf"):
                    continue
                # two values, never the whole dataset (which a small file can declare gigabytes long)
                summary[name] = {"iterations": int(item.shape[0]), "first": float(item[0]),
                                 "last": float(item[-1])}
    except (OSError, KeyError, RuntimeError, TypeError, ValueError) as exc:
        return {"error": str(exc)}
    return summary
