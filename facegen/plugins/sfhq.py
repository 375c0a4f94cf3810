"""Source `sfhq`: Synthetic Faces High Quality (SFHQ) parts 1-4 as downloaded from Kaggle.

Every image is its own identity (identity id = file stem, ``SFHQ_pt{part}_{number:08d}``). Per image the dataset
has four files sharing the stem, found by name wherever they lie under the part's folder (Kaggle archives double
the folder names: ``images/images/…``)::

    images/<stem>.jpg                  1024x1024 JPEG
    landmarks/<stem>.npz               key 'landmarks': (110, 2) pixel coordinates of the 1024x1024 image
    segmentations/<stem>.png           face-parsing label ids 0-18 (BiSeNet / CelebAMask-HQ order)
    pretrained_features/<stem>.pickle  {model name: (1, D) feature array}

Extras become typed columns: ``landmarks.npy`` (Array2D (110, 2) float32), ``seg.png`` (Image, mode L) and one
``<model>.npy`` column per feature model (List(float32, length=D)). The pickles are read with a restricted
unpickler that lets only numpy arrays out; a pickle that names anything else is skipped and counted, never run.
Transforms also get ``hints["landmarks"]`` (110, 2) and ``hints["landmarks5"]`` (5, 2: eyes, nose tip, mouth
corners in ArcFace order), float32 pixel coordinates of the image handed over (after any resize or alignment).

Feature columns must be known before any sample is loaded (the card declares them), so the constructor reads the
first readable pickle of every selected part and keeps the models present in all of them; a later pickle that
lacks one of those models (or has another dimension) makes that sample a skip ("bad features").
"""

from __future__ import annotations

import io
import os
import pickle
import re
from collections import Counter
from typing import Any

import cv2
import numpy as np
from PIL import Image

from facegen.api import (
    LicenseInfo,
    Option,
    Skip,
    Source,
    SourceImage,
    UsageError,
    printable_name,
    to_bool,
    to_list,
    warn,
)
from facegen.generators.landmarks import (
    SFHQ_LEFT_EYE,
    SFHQ_MOUTH_LEFT,
    SFHQ_MOUTH_RIGHT,
    SFHQ_NOSE_TIP,
    SFHQ_RIGHT_EYE,
    arcface_matrix,
    compose,
    five_points_from_sfhq,
    load_npz_array,
    scale_matrix,
    transform_points,
    warp,
)
from facegen.generators.safe_pickle import UnsafePickleError, load_array_dict

STEM = re.compile(r"SFHQ_pt(\d+)_(\d+)")
# the published extension of each kind of file, and its slot in the per-stem index
KINDS = {".jpg": 0, ".npz": 1, ".png": 2, ".pickle": 3}
IMAGE, LANDMARKS, SEGMENTATION, FEATURES = range(4)
KIND_NAMES = ("image", "landmarks", "segmentation", "features")
# Part 1 and 2 ship copies of some images in "tiny sample (30 images)/", "a small sample (650 images)/" …
SAMPLE_FOLDER = re.compile(r"sample\s*\(\d+\s*images\)", re.IGNORECASE)
PART_FOLDER = re.compile(r"part[\s_-]*(\d+)$", re.IGNORECASE)
EXTRAS = ("landmarks", "segmentation", "features")
NUM_LANDMARKS = 110
FEATURE_PROBES = 20  # pickles tried per part when looking for the feature models
MAX_LANDMARKS_BYTES = 1 << 20  # 110 x 2 float64 is 1,760 bytes
# Memory bounds: the run holds ~9 identities (images) read ahead, each checked before it is read or decoded
MAX_FILE_BYTES = 16 << 20  # a 1024x1024 SFHQ JPEG or segmentation PNG is well under 1 MB
MAX_PIXELS = 4096 * 4096  # decoded (resize, align, segmentation): 48 MB as RGB; SFHQ images are 1024x1024


def parse_size(value: Any) -> int | str:
    """``native`` (keep the stored pixels) or a side length in pixels."""
    if str(value).strip().lower() == "native":
        return "native"
    size = int(value)
    if not 16 <= size <= 4096:
        raise ValueError("size must be between 16 and 4096 pixels, or 'native'")
    return size


def feature_column(model: str) -> str:
    """Column name of a feature model: ``CLIP_ViTL_14@336`` -> ``clip_vitl_14_336.npy``."""
    return re.sub(r"[^a-z0-9]+", "_", model.lower()).strip("_") + ".npy"


class SFHQSource(Source):
    name = "sfhq"
    synthetic = True  # the card may call the images synthetic
    image_format = "jpg"
    description = "SFHQ (Synthetic Faces High Quality) parts 1-4 from Kaggle: one identity per image, with extras"
    card_description = (
        "Synthetic Faces High Quality (SFHQ, David Beniaguev 2022): about 425,000 curated 1024x1024 synthetic "
        "faces in 4 parts, made by encoding 'inspiration' images (paintings, drawings, 3D renders, Stable "
        "Diffusion v1.4/v2.1 images, StyleGAN2 samples) into StyleGAN2's latent space with e4e and nudging them "
        "to photo-realism, then curated by the author with a learned taste model; near duplicates (CLIP "
        "similarity > ~0.92) were removed. Every image is a different identity, so `cls` is one label per image. "
        "Optional columns: `landmarks.npy`, the 110 landmarks (iBUG-68 points then inner and outer hairlines; "
        "computed on 256x256 downscales and upscaled, per the SFHQ readme) as float32 (x, y) pixel coordinates "
        "of the image in the same row (scaled with it when resized, moved with it when aligned); `seg.png`, the "
        "face-parsing segmentation (label ids 0 background, 1 skin, 2/3 brows, 4/5 eyes, 6 glasses, 7/8 ears, 9 "
        "earring, 10 nose, 11 mouth, 12/13 lips, 14 neck, 15 necklace, 16 cloth, 17 hair, 18 hat), resized "
        "with nearest neighbour; and one column per pretrained feature model (e.g. `clip_vitl_14_336.npy`, "
        "OpenAI CLIP ViT-L/14@336px image features, unnormalised, as published)."
    )
    homepage = "https://github.com/SelfishGene/SFHQ-dataset"
    citation = """@misc{david_beniaguev_2022_SFHQ,
	title={Synthetic Faces High Quality (SFHQ) dataset},
	url={https://github.com/SelfishGene/SFHQ-dataset},
	DOI={10.34740/kaggle/dsv/4737549},
	publisher={GitHub},
	author={David Beniaguev},
	year={2022}
}"""
    license = LicenseInfo(
        id="cc0-1.0",
        name="CC0 1.0 (images, per the Kaggle listing); MIT (the SFHQ-dataset code)",
        link="https://www.kaggle.com/datasets/selfishgene/synthetic-faces-high-quality-sfhq-part-1",
        text=(
            "SFHQ images: the Kaggle listing of the dataset states 'CC0: Public Domain' (checked for part 1; "
            "parts 2-4 are listed by the same author). The SFHQ-dataset GitHub repository (explore_dataset.py) "
            "is under the MIT licence, (c) 2022 David Beniaguev. The readme says the images have 'no privacy "
            "issues or license issues'. Note: the images were produced with NVIDIA's StyleGAN2 FFHQ weights and "
            "the e4e encoder from inspiration images of other datasets (AAHQ, Close-Up Humans, UIBVFED, "
            "Microsoft Face Synthetics, Stable Diffusion outputs); their own licences (NVIDIA Source Code "
            "License-NC for StyleGAN2, FFHQ's CC BY-NC-SA 4.0) are not addressed by the CC0 statement."
        ),
        commercial_use=False,
        note=(
            "CC0 as stated on Kaggle would allow any use, but the generator weights used to make the images are "
            "non-commercial (NVIDIA Source Code License-NC): treat as research use unless you have checked."
        ),
    )

    options = {
        "parts": Option([], "Parts to include, comma list of 1-4 (default: every part found)", type=to_list),
        "extras": Option(list(EXTRAS), "Extra columns, comma list of landmarks, segmentation, features "
                         "(empty: none)", type=to_list),
        "size": Option("native", "Output side in pixels, or 'native' (stored JPEG bytes copied); resized images "
                       "are re-encoded as JPEG", type=parse_size),
        "align": Option(False, "ArcFace-align each face from its landmarks (112x112, or 'size' when given)",
                        type=to_bool),
        "quality": Option(95, "JPEG quality of re-encoded images", type=int),
    }

    def __init__(self, path, **options):
        super().__init__(path, **options)
        if not os.path.isdir(self.path):
            raise UsageError(f"source 'sfhq': {self.path} is not a directory")
        unknown = sorted(set(self.opts["extras"]) - set(EXTRAS))
        if unknown:
            raise UsageError(f"source 'sfhq': unknown extra {unknown[0]!r} (extras: {', '.join(EXTRAS)})")
        self.extras = [e for e in EXTRAS if e in self.opts["extras"]]
        try:
            self.parts = sorted({int(p) for p in self.opts["parts"]})
        except ValueError:
            given = ",".join(self.opts["parts"])
            raise UsageError(f"source 'sfhq': parts must be numbers 1-4, got {given!r}") from None
        if any(p not in (1, 2, 3, 4) for p in self.parts):
            raise UsageError(f"source 'sfhq': parts must be numbers 1-4, got {','.join(map(str, self.parts))}")
        if not 1 <= self.opts["quality"] <= 100:
            raise UsageError("source 'sfhq': quality must be between 1 and 100")
        self.align = self.opts["align"]
        self.size = self.opts["size"]
        self.crop_size = (112 if self.size == "native" else self.size) if self.align else None
        self.needs_landmarks = self.align or "landmarks" in self.extras

        self._index_files()
        self._ids = sorted((stem for stem, slots in self._files.items() if slots[IMAGE] >= 0), key=_stem_order)
        if not self._ids:
            if self.parts and self.part_folders_found:
                raise UsageError(f"source 'sfhq': part {self.parts[0]} not found under {self.path} (part folders "
                                 f"found: {', '.join(map(str, self.part_folders_found))})")
            which = f" of part(s) {','.join(map(str, self.parts))}" if self.parts else ""
            raise UsageError(f"source 'sfhq': no SFHQ images{which} (SFHQ_pt<part>_<number>.jpg) under {self.path}")
        found_parts = sorted({_stem_order(s)[0] for s in self._ids})
        missing_parts = sorted(set(self.parts) - set(found_parts))
        if missing_parts:
            raise UsageError(f"source 'sfhq': part {missing_parts[0]} not found under {self.path} "
                             f"(found parts: {', '.join(map(str, found_parts))})")
        self.found_parts = found_parts
        required = [(LANDMARKS, "landmarks", self.needs_landmarks),
                    (SEGMENTATION, "segmentation", "segmentation" in self.extras),
                    (FEATURES, "features", "features" in self.extras)]
        for slot, extra, wanted in required:
            if wanted and not any(self._files[s][slot] >= 0 for s in self._ids):
                fix = "set align=false" if extra == "landmarks" and self.align else f"drop {extra} from extras="
                raise UsageError(f"source 'sfhq': no {KIND_NAMES[slot]} files next to the images under {self.path} "
                                 f"(download them, or {fix})")
        self.feature_models: dict[str, tuple[str, int]] = {}  # model -> (column, dimension)
        self.feature_probe: dict[int, str] = {}
        self.dropped_models: list[str] = []
        if "features" in self.extras:
            self._declare_feature_models()

    # --- the file index: one walk per part folder ---

    def _walk_roots(self) -> list[str]:
        """Part folders (``…sfhq-part-1``, ``SFHQ_part2`` …) when the path holds them, else the path itself."""
        with os.scandir(self.path) as entries:
            part_dirs = {}
            for entry in entries:
                match = PART_FOLDER.search(entry.name)
                if match and entry.is_dir():
                    part_dirs.setdefault(int(match.group(1)), []).append(entry.path)
        self.part_folders_found = sorted(part_dirs)
        if not part_dirs:
            return [self.path]
        chosen = self.parts or sorted(part_dirs)
        return sorted(path for part in chosen for path in part_dirs.get(part, []))

    def _index_files(self) -> None:
        self._dirs: list[str] = []
        self._files: dict[str, list[int]] = {}
        self.duplicates = 0
        self.ignored_sample_folders = 0
        self.non_utf8_folders: list[str] = []  # their files are skipped: no json can hold their names
        wanted_parts = set(self.parts)
        seen_dirs: set[str] = set()
        for top in self._walk_roots():
            for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
                real = os.path.realpath(dirpath)
                if real in seen_dirs:  # a symlink loop or a folder linked twice
                    dirnames[:] = []
                    continue
                seen_dirs.add(real)
                kept = [d for d in dirnames if not d.startswith(".") and not SAMPLE_FOLDER.search(d)]
                self.ignored_sample_folders += sum(1 for d in dirnames if SAMPLE_FOLDER.search(d))
                dirnames[:] = sorted(kept)
                dir_index = -1
                for file_name in sorted(filenames):
                    stem, ext = os.path.splitext(file_name)
                    slot = KINDS.get(ext.lower())
                    match = STEM.fullmatch(stem) if slot is not None else None
                    if match is None or (wanted_parts and int(match.group(1)) not in wanted_parts):
                        continue
                    if dir_index < 0:
                        self._dirs.append(dirpath)
                        dir_index = len(self._dirs) - 1
                        relative = os.path.relpath(dirpath, self.path)
                        if printable_name(relative) != relative:
                            self.non_utf8_folders.append(printable_name(relative))
                    slots = self._files.setdefault(stem, [-1, -1, -1, -1])
                    if slots[slot] >= 0:
                        self.duplicates += 1  # first one in sorted walk order wins
                        continue
                    slots[slot] = dir_index
        self._exts = (".jpg", ".npz", ".png", ".pickle")
        if self.non_utf8_folders and os.environ.get("RANK", "0") == "0":
            shown = ", ".join(self.non_utf8_folders[:3])
            warn(f"sfhq: {len(self.non_utf8_folders)} folder(s) with a name that is not UTF-8 hold SFHQ "
                 f"files; their images are skipped (e.g. {shown})")

    def _file(self, stem: str, slot: int) -> str | None:
        index = self._files[stem][slot]
        if index < 0:
            return None
        return os.path.join(self._dirs[index], stem + self._exts[slot])

    # --- feature models, declared before any sample is loaded ---

    def _declare_feature_models(self) -> None:
        per_part: dict[int, dict[str, int]] = {}
        for part in self.found_parts:
            stems = [s for s in self._ids if _stem_order(s)[0] == part and self._files[s][FEATURES] >= 0]
            errors = []
            for stem in stems[:FEATURE_PROBES]:
                try:
                    arrays = load_array_dict(self._file(stem, FEATURES))
                except (UnsafePickleError, pickle.UnpicklingError, OSError) as exc:
                    errors.append(f"{stem}: {exc}")
                    continue
                per_part[part] = {m: int(np.asarray(a).size) for m, a in arrays.items()}
                self.feature_probe[part] = stem
                break
            else:
                detail = f" (first error: {errors[0]})" if errors else ""
                raise UsageError(f"source 'sfhq': no readable features pickle among the first {FEATURE_PROBES} of "
                                 f"part {part}{detail}; drop features from extras=")
        first = per_part[self.found_parts[0]]
        common = sorted(m for m in first if all(d.get(m) == first[m] for d in per_part.values()))
        self.dropped_models = sorted({m for d in per_part.values() for m in d} - set(common))
        if not common:
            raise UsageError("source 'sfhq': the parts' feature pickles share no model with the same dimension; "
                             "drop features from extras=")
        columns = Counter(feature_column(m) for m in common)
        reserved = {"landmarks.npy"}
        for model in common:
            column = feature_column(model)
            if columns[column] > 1 or column in reserved or column == ".npy":
                raise UsageError(f"source 'sfhq': feature model name {model!r} gives an ambiguous column {column!r}")
            self.feature_models[model] = (column, first[model])

    # --- the Source API ---

    def identities(self):
        return self._ids

    def json_features(self):
        from datasets import Value

        return {"part": Value("int32"), "index": Value("int32")}

    def extra_features(self):
        from datasets import Array2D, Image as ImageFeature, List, Value

        features: dict[str, Any] = {}
        if "landmarks" in self.extras:
            features["landmarks.npy"] = Array2D((NUM_LANDMARKS, 2), "float32")
        if "segmentation" in self.extras:
            features["seg.png"] = ImageFeature()
        for column, dim in self.feature_models.values():
            features[column] = List(Value("float32"), length=dim)
        return features

    def image_refs(self, identity_id):
        # one image per identity; a name that is not UTF-8 as load's skip shows it
        return [printable_name(os.path.relpath(self._file(identity_id, IMAGE), self.path))]

    def load_images(self, identity_id, indices):
        return self.load(identity_id) if list(indices) == [0] else []

    def load(self, identity_id):
        stem = identity_id
        image_path = self._file(stem, IMAGE)
        ref = os.path.relpath(image_path, self.path)
        part, index = _stem_order(stem)
        if printable_name(ref) != ref:  # a folder name json cannot hold (warned about at construction)
            return [Skip(printable_name(ref), "name not UTF-8", "a folder name on its path is not UTF-8")]
        try:
            data = _read_small(image_path)
        except OSError as exc:
            return [Skip(ref, "unreadable file", str(exc.strerror or exc))]
        except ValueError as exc:
            return [Skip(ref, "file too large", str(exc))]

        # 1. read the side files this run needs; a missing or bad one makes the sample a skip
        landmarks = None
        landmarks_path = self._file(stem, LANDMARKS)
        if landmarks_path is None and self.needs_landmarks:
            return [Skip(ref, "missing landmarks", f"no {stem}.npz next to the images")]
        if landmarks_path is not None:
            try:
                landmarks = read_landmarks(landmarks_path)
            except ValueError as exc:
                if self.needs_landmarks:
                    return [Skip(ref, "bad landmarks", f"{stem}.npz: {exc}")]
                # otherwise they were only a hint for transforms: go on without them
        extras: dict[str, Any] = {}
        if "features" in self.extras:
            problem = self._read_features(stem, extras)
            if problem is not None:
                return [Skip(ref, *problem)]
        seg_data = None
        if "segmentation" in self.extras:
            seg_path = self._file(stem, SEGMENTATION)
            if seg_path is None:
                return [Skip(ref, "missing segmentation", f"no {stem}.png next to the images")]
            try:
                seg_data = _read_small(seg_path)
            except OSError as exc:
                return [Skip(ref, "unreadable file", f"{stem}.png: {exc.strerror or exc}")]
            except ValueError as exc:
                return [Skip(ref, "file too large", f"{stem}.png: {exc}")]

        # 2. geometry: keep the stored pixels, resize, or align; landmarks and segmentation follow the image
        try:
            data, matrix, image_size = self._transform_image(data, landmarks)
        except _BadLandmarks as exc:
            return [Skip(ref, "bad landmarks", f"{stem}.npz: {exc}")]
        except _TooLarge as exc:
            return [Skip(ref, "image too large", str(exc))]
        except Exception as exc:  # PIL raises many types for broken JPEGs
            return [Skip(ref, "corrupt image", f"{type(exc).__name__}: {exc}")]
        if seg_data is not None:
            try:
                extras["seg.png"] = self._transform_segmentation(seg_data, matrix, image_size)
            except _TooLarge as exc:
                return [Skip(ref, "image too large", f"{stem}.png: {exc}")]
            except Exception as exc:
                return [Skip(ref, "corrupt segmentation", f"{stem}.png: {type(exc).__name__}: {exc}")]

        hints: dict[str, Any] = {}
        if landmarks is not None:
            moved = landmarks if matrix is None else transform_points(landmarks, matrix)
            moved = moved.astype(np.float32)
            hints["landmarks"] = moved
            try:
                hints["landmarks5"] = five_points_from_sfhq(moved).astype(np.float32)
            except ValueError:
                pass
            if "landmarks" in self.extras:
                extras["landmarks.npy"] = moved
        changes = [] if matrix is None else [  # counted in the card: the JPEG was decoded and encoded again
            f"aligned to a {self.crop_size}x{self.crop_size} ArcFace crop (JPEG re-encoded)" if self.align else
            f"resized to {self.size} px wide (JPEG re-encoded)"]
        return [SourceImage(ref=ref, data=data, ext="jpg", meta={"part": part, "index": index},
                            extras=extras, hints=hints, changes=changes)]

    def _read_features(self, stem: str, extras: dict[str, Any]) -> tuple[str, str] | None:
        """Fill ``extras`` with one float32 vector per declared model, or return (reason, detail) of a skip."""
        path = self._file(stem, FEATURES)
        if path is None:
            return "missing features", f"no {stem}.pickle next to the images"
        try:
            arrays = load_array_dict(path, MAX_FILE_BYTES)
        except UnsafePickleError as exc:
            return "unsafe pickle", f"{stem}.pickle: {exc}"
        except (pickle.UnpicklingError, OSError) as exc:
            return "bad features", f"{stem}.pickle: {exc}"
        for model, (column, dim) in self.feature_models.items():
            if model not in arrays:
                return "bad features", f"{stem}.pickle has no {model!r}"
            vector = np.asarray(arrays[model]).reshape(-1)
            if vector.size != dim:
                return "bad features", f"{stem}.pickle: {model!r} has {vector.size} values, expected {dim}"
            if not np.isfinite(vector).all():
                return "bad features", f"{stem}.pickle: {model!r} has NaN or infinite values"
            extras[column] = vector.astype(np.float32)
        return None

    def _transform_image(self, data: bytes, landmarks: np.ndarray | None):
        """(jpeg bytes, 2x3 matrix from stored pixels to output pixels or None, stored (width, height))."""
        if not self.align and self.size == "native":
            return data, None, None
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            _check_pixels(width, height)
            if self.align:
                try:
                    five = five_points_from_sfhq(landmarks)
                except ValueError as exc:
                    raise _BadLandmarks(str(exc)) from None
                matrix = arcface_matrix(five, self.crop_size)
                scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
                out_w = out_h = self.crop_size
            else:
                if width == self.size:
                    return data, None, None
                scale = self.size / width
                out_w, out_h = self.size, max(1, round(height * scale))
                matrix = scale_matrix(out_w / width, out_h / height)
            # JPEG DCT scaling decodes at 1/2, 1/4 or 1/8 directly when the output is that much smaller
            im.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))
            pixels = np.asarray(im.convert("RGB"))
        decoded = scale_matrix(pixels.shape[1] / width, pixels.shape[0] / height)
        from_decoded = compose(matrix, np.linalg.inv(np.vstack([decoded, [0, 0, 1]]))[:2])
        if self.align:
            out = warp(pixels, from_decoded, self.crop_size)
        else:
            shrink = out_w < pixels.shape[1]
            out = cv2.resize(pixels, (out_w, out_h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=self.opts["quality"])
        return buf.getvalue(), matrix, (width, height)

    def _transform_segmentation(self, seg_data: bytes, matrix: np.ndarray | None, image_size) -> bytes:
        with Image.open(io.BytesIO(seg_data)) as im:
            _check_pixels(*im.size)
            if matrix is None and im.format == "PNG" and im.mode == "L":
                return seg_data  # the stored file, untouched
            labels = np.asarray(im.convert("L"))
        if matrix is not None:
            # the segmentation may be stored at another size than the image: map its pixels onto the image's first
            seg_to_image = scale_matrix(image_size[0] / labels.shape[1], image_size[1] / labels.shape[0])
            seg_matrix = compose(matrix, seg_to_image)
            if self.align:
                labels = warp(labels, seg_matrix, self.crop_size, interpolation=cv2.INTER_NEAREST)
            else:
                out_w = round(seg_matrix[0, 0] * labels.shape[1])
                out_h = round(seg_matrix[1, 1] * labels.shape[0])
                labels = cv2.resize(labels, (out_w, out_h), interpolation=cv2.INTER_NEAREST)
        buf = io.BytesIO()
        Image.fromarray(labels).save(buf, format="PNG")
        return buf.getvalue()

    def column_descriptions(self) -> dict[str, str]:
        """What each column this source adds means (for the card's column table)."""
        where = ("pixel coordinates of the 112x112 ArcFace crop" if self.align and self.crop_size == 112 else
                 f"pixel coordinates of the {self.crop_size}x{self.crop_size} ArcFace crop" if self.align else
                 "pixel coordinates of the stored image (1024x1024 in SFHQ)" if self.size == "native" else
                 f"pixel coordinates of the image resized to {self.size} px")
        columns = {"json.part": "SFHQ part (1-4)", "json.index": "image number within the part (with gaps)"}
        if "landmarks" in self.extras:
            columns["landmarks.npy"] = f"110 (x, y) landmarks, iBUG-68 order then hairlines, {where}"
        if "segmentation" in self.extras:
            columns["seg.png"] = "face-parsing label map (0 background, 1 skin … 17 hair, 18 hat), nearest-resized"
        for model, (column, dim) in self.feature_models.items():
            columns[column] = f"{model} image features ({dim} float32, unnormalised, as published)"
        return columns

    def provenance(self):
        missing = Counter()
        for stem in self._ids:
            slots = self._files[stem]
            for slot in (LANDMARKS, SEGMENTATION, FEATURES):
                if slots[slot] < 0:
                    missing[KIND_NAMES[slot]] += 1
        without_image = Counter()
        for slots in self._files.values():
            if slots[IMAGE] < 0:
                for slot in (LANDMARKS, SEGMENTATION, FEATURES):
                    if slots[slot] >= 0:
                        without_image[KIND_NAMES[slot]] += 1
        per_part = Counter(_stem_order(s)[0] for s in self._ids)
        record: dict[str, Any] = {
            "images_per_part": {str(p): n for p, n in sorted(per_part.items())},
            "images_missing_side_file": dict(missing),
            "side_files_without_image": dict(without_image),
            "duplicate_files_ignored": self.duplicates,
            "sample_folders_ignored": self.ignored_sample_folders,
            "folders_not_utf8": self.non_utf8_folders[:10],
            "extras": self.extras,
            "geometry": ("ArcFace-aligned" if self.align else "native" if self.size == "native" else "resized"),
            "columns": self.column_descriptions(),
        }
        if self.needs_landmarks:
            record["landmarks_coordinates"] = (
                "(x, y) pixel coordinates of the output image (pixel centres at integer coordinates)"
            )
        if self.align:
            record["alignment"] = {
                "template": "ArcFace 112x112 (insightface arcface_dst)"
                            + (f", scaled to {self.crop_size}" if self.crop_size != 112 else ""),
                "five_points_from_landmarks": {
                    "left_eye": f"mean of {SFHQ_LEFT_EYE[0]}-{SFHQ_LEFT_EYE[-1]}",
                    "right_eye": f"mean of {SFHQ_RIGHT_EYE[0]}-{SFHQ_RIGHT_EYE[-1]}",
                    "nose_tip": SFHQ_NOSE_TIP, "mouth_left": SFHQ_MOUTH_LEFT, "mouth_right": SFHQ_MOUTH_RIGHT,
                },
                "transform": "least-squares similarity (Umeyama), cv2.warpAffine bilinear, area pre-shrink",
            }
        if self.feature_models:
            record["feature_columns"] = {m: {"column": c, "dimension": d} for m, (c, d) in self.feature_models.items()}
            record["feature_models_read_from"] = {str(p): s for p, s in self.feature_probe.items()}
            record["feature_models_dropped"] = self.dropped_models
        return record


class _BadLandmarks(ValueError):
    pass


class _TooLarge(ValueError):
    pass


def _check_pixels(width: int, height: int) -> None:
    """Refuse to decode an image of more than MAX_PIXELS (a small file can declare a huge canvas)."""
    if width * height > MAX_PIXELS:
        raise _TooLarge(f"{width}x{height} pixels, over the {MAX_PIXELS} pixels limit")


def _read_small(path: str) -> bytes:
    """A file's bytes, refused (ValueError) above MAX_FILE_BYTES before anything is read."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_FILE_BYTES:
            raise ValueError(f"{size} bytes, over the {MAX_FILE_BYTES} bytes limit")
        return f.read(MAX_FILE_BYTES + 1)


def _stem_order(stem: str) -> tuple[int, int]:
    match = STEM.fullmatch(stem)
    return int(match.group(1)), int(match.group(2))


def read_landmarks(path: str) -> np.ndarray:
    """(110, 2) float32 landmarks of an SFHQ ``.npz`` (key ``landmarks``); ValueError when unusable.

    Sizes are checked before anything is inflated (a small ``.npz`` can inflate to gigabytes).
    """
    points = load_npz_array(path, "landmarks", MAX_LANDMARKS_BYTES)
    if points.shape != (NUM_LANDMARKS, 2) or points.dtype.kind not in "iuf":
        raise ValueError(f"expected a ({NUM_LANDMARKS}, 2) numeric array, got {points.shape} {points.dtype}")
    points = points.astype(np.float32)
    if not np.isfinite(points).all():
        raise ValueError("NaN or infinite coordinates")
    return points
