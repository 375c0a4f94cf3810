"""Source `facegen`: any facegen dataset (a local folder or a Hub id) as the input of another build.

Identities, images (bytes as stored) and each sample's json come back as they were; only what a new build must
own changes: ``cls`` is the identity's position in the new plan (the parent's label is kept as ``parent_cls``),
``source`` is ``facegen`` and ``source_ref`` points into the parent dataset
(``hf://datasets/ORG/NAME/data/train/train-000003.tar#000012_004``, or the folder's name instead of the Hub URL
for an unpublished folder); the parent's own ``source`` and ``source_ref`` become ``parent_source`` and
``parent_source_ref``. Extra columns (e.g. ``embedding.npy``) are copied as bytes.

The licence is the parent dataset's (its card's ``license`` and its LICENSE text), so the new card's licence chain
includes every term the parent carried; the citation is the parent's BibTeX entries plus an entry for the parent
dataset itself.

``curation=FILE`` (written by `facegen curate`) leaves out identities and samples; the plan is made after that, so
labels stay contiguous. The file's decisions are recorded in the run's provenance and listed in the card.
"""

from __future__ import annotations

import re
from itertools import accumulate

from facegen.api import LicenseInfo, Option, Skip, Source, SourceImage, UsageError, sha256_file
# this source's format is facegen's own output folder (its layout and records, as published)
from facegen.layout import LICENSE
from facegen.layout.records import Curation, RecordError
from facegen.published import MemberTooLarge, PublishedDataset

BIBTEX_BLOCK = re.compile(r"```bibtex\n(.*?)\n```", re.DOTALL)
OWNED_FIELDS = ("identity", "source", "source_ref")  # set by the new build's shard writer
# An identity of a facegen dataset holds a few MB (72 DigiFace images: 2 MB; 50 Arc2Face PNGs: 20 MB). Its samples
# are read while the ones before them, plus themselves, fit in this (each sample weighed by its span in the tar, known
# before anything is read), so that loading one identity, or one of its images alone, holds at most this much.
MAX_IDENTITY_BYTES = 256 << 20


class FacegenSource(Source):
    name = "facegen"
    description = "A facegen dataset (folder or Hub id ORG/NAME): identities, images and json as they were"
    options = {
        "curation": Option(None, "JSON file written by `facegen curate`: identities and samples to leave out",
                           provenance_file="curation.json"),
    }
    columns = {
        "json.parent_cls": "the sample's label in the parent dataset",
        "json.parent_source": "the parent dataset's source plugin",
        "json.parent_source_ref": "the sample's source reference in the parent dataset",
    }

    def __init__(self, path, **options):
        if not path:
            raise UsageError("source 'facegen': --source-path must be a facegen dataset folder or a Hub id")
        self.dataset = PublishedDataset(path)  # a Hub id is downloaded first: Source checks the local folder
        super().__init__(self.dataset.root, **options)
        self.image_format = self.dataset.image_column
        self.curation = self._read_curation(self.opts["curation"])
        removed = {r["identity"] for r in self.curation.removed_identities} if self.curation else set()
        self._removed_samples = {r["key"] for r in self.curation.removed_samples} if self.curation else set()
        self._ids = [i for i in self.dataset.identities if i not in removed]
        self._weights: dict[str, list[int]] = {}  # identity -> bytes its samples take up to each one, in order
        self.license = self._parent_license()
        self.citation = self._parent_citation()
        name = self.dataset.name
        self.dataset_name = f"{name} (facegen dataset)"  # the licence table names the parent, not this plugin
        self.homepage = f"https://huggingface.co/datasets/{name}" if self.dataset.repo_id or "/" in name else ""
        self.card_description = (
            f"The facegen dataset **{name}**, read back from its shards: its identities, images (bytes as "
            "published) and per-sample metadata, with labels renumbered for this build (the parent's label is "
            f"`json.parent_cls`, the parent sample `json.source_ref`). Licence: the parent dataset's."
        )

    # ------------------------------------------------------------------ the parent's card

    def _read_curation(self, path) -> Curation | None:
        if path is None:
            return None
        try:
            curation = Curation.read(path)
        except (OSError, RecordError) as exc:
            raise UsageError(f"source 'facegen': cannot read curation file {path}: {exc}") from None
        expected = curation.parent_fingerprint
        if expected and expected != self.dataset.fingerprint():
            raise UsageError(f"source 'facegen': the shards of {self.dataset.given} changed since the curation "
                             f"file {path} was made; run `facegen curate` again")
        known_ids, known_keys = set(self.dataset.identities), {s.key for s in self.dataset.samples}
        for row in curation.removed_identities:
            if row["identity"] not in known_ids:
                raise UsageError(f"source 'facegen': curation file names identity {row['identity']!r}, which "
                                 f"is not in {self.dataset.given}")
        for row in curation.removed_samples:
            if row["key"] not in known_keys:
                raise UsageError(f"source 'facegen': curation file names sample {row['key']!r}, which is not "
                                 f"in {self.dataset.given}")
        self._curation_sha256 = sha256_file(path)
        return curation

    def _card_field(self, name: str) -> str:
        """A text field of the parent's card ("" when absent); any other type is one line (a card is input)."""
        value = self.dataset.card.get(name)
        if name == "license" and isinstance(value, list) and value:  # the Hub allows a list of licences
            value = value[0]
        if value is None:
            return ""
        if not isinstance(value, str):
            raise UsageError(f"source 'facegen': the card of {self.dataset.given} has a {type(value).__name__} as "
                             f"`{name}`, which must be text")
        return value

    def _parent_license(self) -> LicenseInfo | None:
        hub_id = self._card_field("license")
        name, link = self._card_field("license_name"), self._card_field("license_link")
        if not hub_id or name == "undeclared":
            return None  # undeclared in the parent, so undeclared here: the new card says so
        text = self.dataset.license_text
        terms = ""
        if "RESULTING TERMS" in text:  # facegen's own LICENSE: the paragraph after this heading
            terms = text.split("RESULTING TERMS", 1)[1].strip().split("\n\n", 1)[0].replace("\n", " ")
        if link == LICENSE and self.homepage_for_link():
            link = f"{self.homepage_for_link()}/blob/main/LICENSE"
        return LicenseInfo(
            id=hub_id, name=name or hub_id, link=link, text=text.strip(),
            commercial_use=None,  # the card classifies the parent's licence (and the terms below) itself
            note=f"the licence of the parent dataset {self.dataset.name}" + (f": {terms}" if terms else ""),
        )

    def homepage_for_link(self) -> str:
        return f"https://huggingface.co/datasets/{self.dataset.repo_id}" if self.dataset.repo_id else ""

    def _parent_citation(self) -> str:
        entries = [block.strip() for block in BIBTEX_BLOCK.findall(self.dataset.card_text)]
        name = self.dataset.name
        title = self._card_field("pretty_name") or name
        key = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "parent"
        where = f"https://huggingface.co/datasets/{name}" if "/" in name else name
        entries.insert(0, "@misc{" + key + ",\n  title = {" + title + "},\n  howpublished = {" + where
                       + "},\n  note = {facegen dataset}\n}")
        return "\n\n".join(dict.fromkeys(entries))

    # ------------------------------------------------------------------ Source

    def identities(self):
        return self._ids

    def _samples(self, identity_id):
        return [s for s in self.dataset.by_identity[identity_id] if s.key not in self._removed_samples]

    def image_refs(self, identity_id):
        """From the index of the parent's samples: no image is read (per-image transforms plan shards from it)."""
        return [self.dataset.ref(sample) for sample in self._samples(identity_id)]

    def load(self, identity_id):
        samples = self._samples(identity_id)
        return self.load_images(identity_id, range(len(samples)), samples)

    def _weight_up_to(self, identity_id, samples) -> list[int]:
        """Bytes of the identity's samples up to and including each one (the positional bound: an image is read
        alone exactly when it would be read with its whole identity)."""
        if identity_id not in self._weights:
            sizes = (sample.span[1] if sample.span is not None else sum(size for _, size in sample.members.values())
                     for sample in samples)
            self._weights[identity_id] = list(accumulate(sizes))
        return self._weights[identity_id]

    def load_images(self, identity_id, indices, samples=None):
        samples = samples if samples is not None else self._samples(identity_id)
        extras_wanted = self.dataset.extra_columns()
        weight = self._weight_up_to(identity_id, samples)
        items: list[SourceImage | Skip] = []
        for i in indices:
            sample = samples[i]
            ref = self.dataset.ref(sample)
            if weight[i] > MAX_IDENTITY_BYTES:
                items.append(Skip(ref, "identity over the size limit", f"its samples up to this one add up to "
                                  f"{weight[i]:,} bytes, over {MAX_IDENTITY_BYTES:,}"))
                continue
            try:
                data = self.dataset.image(sample)
                extras = {name: self.dataset.read(sample, name) for name in extras_wanted
                          if name in self.dataset.members(sample)}
            except MemberTooLarge as exc:
                items.append(Skip(ref, "member too large", str(exc)))
                continue
            except OSError as exc:
                items.append(Skip(ref, "unreadable member", str(exc)))
                continue
            parent = self.dataset.meta(sample)
            meta = {k: v for k, v in parent.items() if k not in OWNED_FIELDS}
            meta.update(parent_cls=sample.cls, parent_source=str(parent.get("source", "")),
                        parent_source_ref=str(parent.get("source_ref", "")))
            items.append(SourceImage(ref=ref, data=data, ext=self.image_format, meta=meta, extras=extras))
        return items

    def json_features(self):
        from datasets import Value

        parent = (self.dataset.features or {}).get("json") or {}
        fields = {k: v for k, v in parent.items() if k not in OWNED_FIELDS} if isinstance(parent, dict) else {}
        fields.update(parent_cls=Value("int64"), parent_source=Value("string"), parent_source_ref=Value("string"))
        return fields

    def extra_features(self):
        features = self.dataset.features or {}
        return {name: features[name] for name in self.dataset.extra_columns()}

    def provenance(self):
        record = {
            "parent": self.dataset.name,
            "parent_revision": self.dataset.root.name if self.dataset.repo_id else None,
            "parent_identities": len(self.dataset.identities),
            "parent_samples": len(self.dataset.samples),
            "parent_license": self._card_field("license") or None,
            "parent_unreadable": dict(self.dataset.skipped),
        }
        if self.curation is not None:
            record["curation"] = {**{k: v for k, v in self.curation.to_dict().items() if k != "parent_fingerprint"},
                                  "sha256": self._curation_sha256}
        return record
