"""The published synthetic face-recognition sets that the `folder`, `rec` and `lmdb` sources read, and what their
publishers state about them: licence, citation, homepage, description and counts.

A source given ``--source-opt dataset=NAME`` (the presets ``facegen build --recipe NAME`` do it) takes that set's
row and declares it as its own attributes (``dataset_name``, ``card_description``, ``license``, ``citation``,
``homepage``, ``synthetic``, ``expected_counts``), which the build records in run.json: the card, publish and
``--from-card`` read those declarations and never know a set by its name. The row also names the source whose
layout the set is published in (DCFace is a RecordIO file, HSFace an LMDB, the others image folders) and, for
SynFace, the file-name pattern that carries its identity-mixup labels (kept as json columns).

Facts and where they come from (read in the publishers' repositories and Hub cards):

- DCFace (Kim et al., CVPR 2023; github.com/mk-minchul/dcface at 1d2c523): ``dcface_0.5m_oversample_xid.zip`` and
  ``dcface_1.2m_oversample_xid.zip`` hold ``record/file.rec``, ``file.idx``, ``list.txt`` (README "Dataset
  Release"). No licence is stated in the repository or with the download. Channel order: the generator's output is
  RGB; ``sample_batch`` returns ``images[:, :, :, ::-1]`` (BGR) and ``Writer.write`` packs that array with
  ``mx.recordio.pack_img`` (``cv2.imencode``, which expects BGR; quality 100), so the JPEGs decode to RGB as
  usual, and the released converter (``convert/record.py``) agrees (``mx.image.imdecode`` gives RGB, reversed
  for ``cv2.imwrite``). The exact counts are not stated in the repository: none are declared.
- HSFace10K / HSFace20K (Wu et al., Vec2Face, ICLR 2025): LMDB files ``hsfaces/hsface10k.lmdb`` and
  ``hsface20k.lmdb`` in the Hub repository ``BooBooWu/Vec2Face``, whose card declares ``license: mit`` (as does
  github.com/HaiyuWu/Vec2Face's LICENSE). The card's tables give 0.5M images for HSFace10K and 15M images for
  300K identities (50 per identity): 10,000 x 50 and 20,000 x 50. The generator was trained on WebFace4M.
- SynFace (Qiu et al., ICCV 2021; github.com/haibo-qiu/SynFace at bbfb10a): identity folders ``{:05}`` of JPEGs
  named ``'{:03}_{:05}x{:.3f}_({:05})x{:.3f}.jpg'.format(j+1, i+1, ratio, idx+1, 1-ratio)``
  (``data/syn_images.py``): the image's number, the identity's own number and weight, the mixed-in identity's
  number and weight; the training loader parses them with ``(.*)_(.*)x(.*)_\\((.*)\\)x(.*).jpg``
  (``lib/datasets/dataset.py``). 10,000 identities (``--num_id 10000``); ``data/syn.sh`` generates 100 images per
  identity and ``experiments/WebFace.yaml`` trains on 50: the release's image count is not stated. No licence.
- SFace (Boutros et al., IJCB 2022; github.com/fdbtrs/SFace-Privacy-friendly-and-Accurate-Face-Recognition-using-
  Synthetic-Data): CC BY-NC-SA 4.0 (README "License"); one class per CASIA-WebFace identity, 10,572
  (``config/config.py``: ``num_classes = 10572``; ``generation/generate_all_classes.py`` writes
  ``{class:06d}/{seed:06d}.png``); about 0.6M images (the Vec2Face card's table), not stated exactly.
- IDiff-Face (Boutros et al., ICCV 2023; github.com/fdbtrs/IDiff-Face): CC BY-NC-SA 4.0 (README "License");
  "synthetic 10K identities x 50 images datasets" (README "Datasets and pretrained models").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from facegen.api import ExpectedCounts, LicenseInfo, UsageError

CC_BY_NC_SA = "https://creativecommons.org/licenses/by-nc-sa/4.0/"
NOT_STATED = ("no licence is stated in the publisher's repository or with the download: ask its authors before "
              "any use")


@dataclass(frozen=True)
class NameField:
    """One json column parsed from a file name: the pattern's group of that name, converted by ``type``."""

    name: str
    type: str  # "int32" or "float32" (a datasets Value dtype)
    description: str


@dataclass(frozen=True)
class NameFields:
    """Columns a set encodes in its image file names: a full-match pattern with named groups."""

    pattern: str
    fields: tuple[NameField, ...]

    def parse(self, file_name: str) -> dict | None:
        """The fields of ``file_name``, or None when it does not match the pattern."""
        match = re.fullmatch(self.pattern, file_name, re.IGNORECASE)
        if match is None:
            return None
        convert = {"int32": int, "float32": float}
        try:
            return {f.name: convert[f.type](match.group(f.name)) for f in self.fields}
        except ValueError:
            return None


@dataclass(frozen=True)
class PublishedSet:
    name: str  # as its publishers write it; the card's licence table names the data by it
    reader: str  # the source plugin whose layout the set is published in
    description: str  # the card's paragraph on the source data
    homepage: str
    license: LicenseInfo
    citation: str  # BibTeX
    expected: ExpectedCounts | None = None
    name_fields: NameFields | None = None


DCFACE_CITATION = """@inproceedings{kim2023dcface,
  title     = {DCFace: Synthetic Face Generation with Dual Condition Diffusion Model},
  author    = {Kim, Minchul and Liu, Feng and Jain, Anil and Liu, Xiaoming},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2023}
}"""

VEC2FACE_CITATION = """@misc{wu2024vec2face,
  title  = {Vec2Face: Scaling Face Dataset Generation with Loosely Constrained Vectors},
  author = {Wu, Haiyu and Singh, Jaskirat and Tian, Sicong and Zheng, Liang and Bowyer, Kevin W.},
  year   = {2024}
}"""

SYNFACE_CITATION = """@inproceedings{qiu2021synface,
  title     = {SynFace: Face Recognition with Synthetic Data},
  author    = {Qiu, Haibo and Yu, Baosheng and Gong, Dihong and Li, Zhifeng and Liu, Wei and Tao, Dacheng},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision},
  pages     = {10880--10890},
  year      = {2021}
}"""

SFACE_CITATION = """@inproceedings{Sface_Boutros,
  author    = {Fadi Boutros and Marco Huber and Patrick Siebke and Tim Rieber and Naser Damer},
  title     = {SFace: Privacy-friendly and Accurate Face Recognition using Synthetic Data},
  booktitle = {{IEEE} International Joint Conference on Biometrics, {IJCB} 2022, Abu Dhabi, United Arab Emirates,
               October 10-13, 2022},
  pages     = {1--11},
  publisher = {{IEEE}},
  year      = {2022},
  url       = {https://doi.org/10.1109/IJCB54206.2022.10007961},
  doi       = {10.1109/IJCB54206.2022.10007961}
}"""

IDIFF_FACE_CITATION = """@inproceedings{Boutros2023IDiffFace,
  author    = {Fadi Boutros and Jonas Henry Grebe and Arjan Kuijper and Naser Damer},
  title     = {IDiff-Face: Synthetic-based Face Recognition through Fizzy Identity-conditioned Diffusion Models},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  month     = {October},
  year      = {2023}
}"""


def _undeclared(homepage: str, note: str) -> LicenseInfo:
    """A set whose publisher states no licence: the card says "not declared", and the terms are unknown."""
    return LicenseInfo(id="", name="", link=homepage, note=f"{NOT_STATED}; {note}")


def _hsface(identities: int) -> PublishedSet:
    name = f"HSFace{identities // 1000}K"
    return PublishedSet(
        name=name, reader="lmdb",
        description=(f"{name} (Wu et al., Vec2Face, ICLR 2025): {identities:,} synthetic identities generated by "
                     "Vec2Face from sampled identity vectors, 50 images each, published as a Vec2Face LMDB "
                     f"(`hsfaces/{name.lower()}.lmdb` in the Hub repository BooBooWu/Vec2Face); each image's "
                     "bytes are copied as stored."),
        homepage="https://huggingface.co/BooBooWu/Vec2Face",
        license=LicenseInfo(
            id="mit", name="MIT", link="https://github.com/HaiyuWu/Vec2Face/blob/main/LICENSE", commercial_use=False,
            note="MIT as declared by the BooBooWu/Vec2Face Hub card and the Vec2Face repository; the images were "
                 "generated by Vec2Face, which was trained on WebFace4M, a subset of WebFace260M, released for "
                 "non-commercial research only"),
        citation=VEC2FACE_CITATION,
        expected=ExpectedCounts(identities, identities * 50,
                                "the BooBooWu/Vec2Face card: 0.5M images for HSFace10K, 15M for 300K identities, 50 "
                                "per identity"))


PUBLISHED_SETS: dict[str, PublishedSet] = {
    "dcface": PublishedSet(
        name="DCFace", reader="rec",
        description=("DCFace (Kim et al., CVPR 2023): synthetic identities from a dual-condition diffusion model "
                     "(an identity image combined with style images from CASIA-WebFace), published as "
                     "`dcface_0.5m_oversample_xid` and `dcface_1.2m_oversample_xid`, each an MXNet RecordIO file "
                     "(`record/file.rec`, `file.idx`) with `list.txt` naming each record's `identity/image.jpg`; "
                     "the identity is the path's folder, and each JPEG's bytes are copied as stored (RGB)."),
        homepage="https://github.com/mk-minchul/dcface",
        license=_undeclared("https://github.com/mk-minchul/dcface",
                            "the generator was trained on CASIA-WebFace, whose images also serve as its styles"),
        citation=DCFACE_CITATION),
    "hsface10k": _hsface(10_000),
    "hsface20k": _hsface(20_000),
    "synface": PublishedSet(
        name="SynFace", reader="folder",
        description=("SynFace (Qiu et al., ICCV 2021): synthetic identities rendered by DiscoFaceGAN with identity "
                     "mixup, one folder per identity; each file name carries the two identities mixed into the "
                     "image and their weights, kept as the `mixup_*` json columns. Each JPEG's bytes are copied as "
                     "stored."),
        homepage="https://github.com/haibo-qiu/SynFace",
        license=_undeclared("https://github.com/haibo-qiu/SynFace",
                            "the images were rendered by DiscoFaceGAN, which was trained on FFHQ"),
        citation=SYNFACE_CITATION,
        expected=ExpectedCounts(10_000, None, "github.com/haibo-qiu/SynFace: --num_id 10000 in data/syn.sh"),
        name_fields=NameFields(
            pattern=r"(?P<mixup_image>\d+)_(?P<mixup_identity>\d+)x(?P<mixup_weight>[0-9.]+)"
                    r"_\((?P<mixup_other_identity>\d+)\)x(?P<mixup_other_weight>[0-9.]+)\.(?:jpg|jpeg|png)",
            fields=(
                NameField("mixup_image", "int32", "SynFace's number of the image within its identity (from 1), "
                                                  "from the file name"),
                NameField("mixup_identity", "int32", "SynFace's number of the image's own identity (from 1, as "
                                                     "its folder name), from the file name"),
                NameField("mixup_weight", "float32", "the weight of the image's own identity in the identity "
                                                     "mixup, from the file name"),
                NameField("mixup_other_identity", "int32", "SynFace's number of the identity mixed in (from 1), "
                                                           "from the file name"),
                NameField("mixup_other_weight", "float32", "the weight of the identity mixed in, from the file "
                                                           "name"),
            ))),
    "sface": PublishedSet(
        name="SFace", reader="folder",
        description=("SFace (Boutros et al., IJCB 2022): synthetic faces from a class-conditional StyleGAN2-ADA "
                     "trained on CASIA-WebFace, one folder per class (10,572 classes, about 0.6M images), "
                     "aligned; each image's bytes are copied as stored."),
        homepage="https://github.com/fdbtrs/SFace-Privacy-friendly-and-Accurate-Face-Recognition-using-Synthetic-Data",
        license=LicenseInfo(id="cc-by-nc-sa-4.0", name="CC BY-NC-SA 4.0", link=CC_BY_NC_SA, commercial_use=False,
                            note="as the SFace repository's README states (Copyright (c) 2021 Fraunhofer IGD)"),
        citation=SFACE_CITATION,
        expected=ExpectedCounts(10_572, None, "the SFace repository's config/config.py: num_classes = 10572")),
    "idiff-face": PublishedSet(
        name="IDiff-Face", reader="folder",
        description=("IDiff-Face (Boutros et al., ICCV 2023): synthetic identities from an identity-conditioned "
                     "latent diffusion model trained on FFHQ, 10,000 identities of 50 aligned 112x112 images, one "
                     "folder per identity; each image's bytes are copied as stored."),
        homepage="https://github.com/fdbtrs/IDiff-Face",
        license=LicenseInfo(id="cc-by-nc-sa-4.0", name="CC BY-NC-SA 4.0", link=CC_BY_NC_SA, commercial_use=False,
                            note="as the IDiff-Face repository's README states (Copyright (c) 2023 Fraunhofer IGD)"),
        citation=IDIFF_FACE_CITATION,
        expected=ExpectedCounts(10_000, 500_000, "the IDiff-Face README: 10K identities x 50 images")),
}


def names_read_by(reader: str) -> tuple[str, ...]:
    """The ``dataset=`` values a source accepts: the sets published in its layout."""
    return tuple(name for name, row in PUBLISHED_SETS.items() if row.reader == reader)


def declare(source, key: str) -> PublishedSet | None:
    """Give ``source`` the metadata of the published set ``key`` (its ``dataset=`` option; "" for none) as its own
    declared attributes; the set's row, or None."""
    if not key:
        return None
    row = PUBLISHED_SETS.get(key)
    if row is None or row.reader != source.name:
        readers = ", ".join(names_read_by(source.name)) or "none"
        raise UsageError(f"source {source.name!r}: dataset={key!r} is not a set published in its layout (known: "
                         f"{readers})")
    source.dataset_name = row.name
    source.card_description = row.description
    source.homepage = row.homepage
    source.license = row.license
    source.citation = row.citation
    source.synthetic = True
    source.expected_counts = row.expected
    return row
