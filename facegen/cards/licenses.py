"""The licence chain of a dataset: every input's licence, and the terms of the result (the most restrictive governs).

Inputs are the source dataset, the transform itself when it declares a licence, and each model the transform used.
Sources and transforms state ``commercial_use`` explicitly (``LicenseInfo``); models state a licence name and a
note, so their commercial status is read from a table of well-known licences and, failing that, from the words
of the licence and the note. A licence we cannot classify counts as *not* granting commercial use: a dataset card
must never claim more rights than the inputs give.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from facegen.layout.records import ModelRecord, PluginRecord, RunRecord

# Hub licence ids (https://huggingface.co/docs/hub/repositories-licenses) whose terms put no restriction on using
# or sharing derived data beyond attribution; with these as the only inputs, commercial use is allowed.
PERMISSIVE = {
    "apache-2.0", "mit", "bsd", "bsd-2-clause", "bsd-3-clause", "bsd-3-clause-clear", "cc0-1.0", "cc-by-2.0",
    "cc-by-2.5", "cc-by-3.0", "cc-by-4.0", "unlicense", "zlib", "isc", "pddl", "odc-by", "cdla-permissive-1.0",
    "cdla-permissive-2.0", "bsl-1.0", "ecl-2.0", "afl-3.0", "artistic-2.0", "ms-pl", "postgresql", "ncsa",
    "wtfpl", "c-uda", "etalab-2.0", "ofl-1.1", "lppl-1.3c", "cc-by-sa-3.0", "cc-by-sa-4.0", "odbl",
    "cdla-sharing-1.0", "gpl-3.0", "lgpl-3.0", "agpl-3.0", "mpl-2.0", "epl-2.0", "eupl-1.1", "gpl-2.0",
    "lgpl-2.1", "openrail", "openrail++", "creativeml-openrail-m", "bigscience-openrail-m", "bigcode-openrail-m",
    "bigscience-bloom-rail-1.0",
}
# Permissive for commercial use, but with terms that travel with derived data (share-alike, copyleft, the C-UDA's
# limits on redistribution): always among the governing licences, and named in the summary.
COPYLEFT = {
    "cc-by-sa-3.0", "cc-by-sa-4.0", "odbl", "cdla-sharing-1.0", "gpl-2.0", "gpl-3.0", "lgpl-2.1", "lgpl-3.0",
    "agpl-3.0", "mpl-2.0", "epl-2.0", "eupl-1.1", "c-uda",
}
# Hub licence ids that forbid commercial use.
NON_COMMERCIAL = {
    "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0",
    "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0", "cc-by-nd-4.0", "deepfloyd-if-license", "intel-research",
}
# Words that mark a licence (or a note on it) as research-only / non-commercial.
NON_COMMERCIAL_WORDS = re.compile(
    r"non[- ]?commercial|\bnc\b|-nc-|\bnc-|research[- ](?:use|only|purposes)|research and educational|"
    r"academic (?:use|only)|not for commercial|evaluation only|r-uda|use of data agreement",
    re.IGNORECASE,
)
# Hub ids with use-based restrictions that travel with derived outputs (OpenRAIL): commercial use is allowed but
# the restrictions are part of the resulting terms.
USE_RESTRICTED = {"openrail", "openrail++", "creativeml-openrail-m", "bigscience-openrail-m",
                  "bigcode-openrail-m", "bigscience-bloom-rail-1.0"}


@dataclass
class LicenceInput:
    """One input of the dataset and its licence as the card states it."""

    role: str  # "source dataset", "transform", "model: UNet"
    name: str  # what the input is (dataset name, model id)
    licence: str  # the licence's name as its owner states it ("" when not declared)
    hub_id: str | None  # a Hub licence id when the licence has one ("other" and None do not count)
    link: str = ""
    note: str = ""
    commercial_use: bool | None = None  # None: not stated and not recognisable
    text: str = ""  # licence text or summary for the LICENSE file (sources and transforms)

    @property
    def commercial_text(self) -> str:
        if self.commercial_use is None:
            return "not stated (treated as no)"
        return "yes" if self.commercial_use else "no"


@dataclass
class LicenceChain:
    inputs: list[LicenceInput] = field(default_factory=list)
    hub_id: str = "other"  # the card's `license`
    name: str | None = None  # `license_name` when hub_id is "other"
    link: str | None = None  # `license_link` when hub_id is "other"
    commercial_use: bool = False
    use_restricted: list[str] = field(default_factory=list)  # inputs with OpenRAIL-style use restrictions
    copyleft: list[str] = field(default_factory=list)  # inputs whose share-alike/copyleft terms travel
    undeclared: list[str] = field(default_factory=list)  # inputs without any licence statement
    governing: list[LicenceInput] = field(default_factory=list)  # the inputs whose terms bind the result

    @property
    def summary(self) -> str:
        """A few plain sentences on the resulting terms (no nested brackets: licences are named without their
        parenthetical remarks, which the Licence table keeps)."""
        restrictions = ""
        if self.use_restricted:
            restrictions = " Use is also subject to the use restrictions of " + "; ".join(self.use_restricted) + "."
        if self.copyleft:
            restrictions += (" The share-alike/copyleft or redistribution terms of " + "; ".join(self.copyleft)
                             + " apply to the dataset and what is derived from it.")
        non_commercial = "; ".join(_named(i) for i in self.inputs if i.commercial_use is False)
        if self.undeclared:
            known = (f" At the very least it is for non-commercial use only: {non_commercial}."
                     if non_commercial else "")
            return ("The licence of " + ", ".join(self.undeclared) + " is not declared, so the terms of this dataset "
                    "are unknown: do not use or share it beyond what its owner allows." + known + restrictions)
        if not self.commercial_use:
            names = "; ".join(_named(i) for i in self.governing if i.commercial_use is not True)
            return ("Non-commercial use only. The most restrictive inputs govern the dataset; these do not allow "
                    f"commercial use: {names}." + restrictions)
        if self.use_restricted or self.copyleft:
            return "Every input allows commercial use." + restrictions
        return "Every input allows commercial use; keep the attribution each licence asks for."


def plain(text: str) -> str:
    """A licence name without its parenthetical remarks: "A (b (c)) d" -> "A d"."""
    previous = None
    while previous != text:
        previous, text = text, re.sub(r"\s*\([^()]*\)", "", text)
    return re.sub(r"\s+", " ", text).strip(" ;,") or previous


def _named(i: "LicenceInput") -> str:
    return f"{i.name}: {plain(i.licence) or 'not declared'}"


def short_id(text: str, words: int = 5, length: int = 40) -> str:
    """A short Hub `license_name` id: lowercase, hyphens, at most a few words ("my-license-1.0")."""
    if re.fullmatch(r"[a-z0-9][a-z0-9.-]{0,63}", text):  # already an id, as its owner spells it
        return text
    head = re.split(r"[;,:]", plain(text), maxsplit=1)[0]
    parts = [p for p in _slug(head).split("-") if p][:words]
    while len("-".join(parts)) > length and len(parts) > 1:
        parts.pop()
    return "-".join(parts) or "unknown"


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.")
    return slug or "unknown"


def _key(name: str) -> str:
    """A licence name as a Hub id would spell it: "CC BY-NC 4.0" -> "cc-by-nc-4.0"."""
    return re.sub(r"[\s_]+", "-", name.strip().lower())


def classify(licence: str, note: str = "", hub_id: str | None = None) -> bool | None:
    """True/False when a licence (by Hub id, name or note) clearly allows/forbids commercial use, else None."""
    candidates = [c for c in (hub_id, licence) if c]
    for candidate in candidates:
        key = _key(candidate)
        if key in NON_COMMERCIAL:
            return False
    if NON_COMMERCIAL_WORDS.search(f"{licence} {note}"):
        return False
    for candidate in candidates:
        key = _key(candidate)
        if key in PERMISSIVE:
            return True
    return None


def _hub_id_of(name: str) -> str | None:
    key = _key(name)
    return key if key in PERMISSIVE or key in NON_COMMERCIAL else None


def _plugin_input(role: str, record: PluginRecord) -> LicenceInput:
    lic, name = record.license, record.name
    if lic is None:
        return LicenceInput(role=role, name=name, licence="", hub_id=None, commercial_use=None)
    hub_id = lic.id or None
    stated = lic.name or hub_id or ""
    commercial = lic.commercial_use
    if not stated:  # declared without a licence (a publisher that states none): unknown unless its note says more
        commercial = classify("", lic.note)
    elif commercial is None:
        commercial = bool(classify(stated, lic.note, hub_id))
    elif commercial and NON_COMMERCIAL_WORDS.search(f"{stated} {lic.note}"):
        commercial = False  # an explicit "non-commercial" note wins over a flag set by mistake
    return LicenceInput(role=role, name=name, licence=stated, hub_id=None if hub_id == "other" else hub_id,
                        link=lic.link, note=lic.note, commercial_use=commercial, text=lic.text)


def _model_input(model: ModelRecord) -> LicenceInput:
    stated = model.license
    hub_id = _hub_id_of(stated)
    commercial = model.commercial_use
    if commercial is None:
        commercial = classify(stated, model.note, hub_id)
    role = f"model: {model.role}" if model.role else "model"
    from facegen.cards.public import scrub

    return LicenceInput(role=role, name=scrub(model.id), licence=stated, hub_id=hub_id,
                        link=model.license_link, note=model.note, commercial_use=commercial)


def licence_chain(run: RunRecord) -> LicenceChain:
    """Compose the licences of the source, the transform and its models into the dataset's terms."""
    chain = LicenceChain()
    source, transform = run.source, run.transform
    source_input = _plugin_input("source dataset", source)
    source_input.name = source.dataset_name or source_input.name  # what the source says it reads
    chain.inputs.append(source_input)
    if transform.license:
        chain.inputs.append(_plugin_input("transform", transform))
    seen = set()
    for model in transform.models:
        key = (model.id, model.revision)
        if key in seen:
            continue
        seen.add(key)
        chain.inputs.append(_model_input(model))

    chain.undeclared = [i.name for i in chain.inputs if not i.licence]
    chain.use_restricted = [_named(i) for i in chain.inputs
                            if (i.hub_id or "").lower() in USE_RESTRICTED or "openrail" in i.licence.lower()]
    chain.copyleft = [_named(i) for i in chain.inputs if (i.hub_id or "").lower() in COPYLEFT]
    chain.commercial_use = all(i.commercial_use is True for i in chain.inputs)
    # Governing = every input whose terms say more than "attribute me": non-commercial, unknown, custom (`other`)
    # or use-restricted licences. The dataset is bound by all of them at once.
    plain = PERMISSIVE - USE_RESTRICTED - COPYLEFT
    chain.governing = [i for i in chain.inputs if i.commercial_use is not True or (i.hub_id or "") not in plain]

    # The card's `license`: a Hub id only when that one licence is all that governs (the other inputs being
    # plainly permissive) or every input has it; anything else is `other` with a LICENSE file listing every input.
    # An input restricted beyond its Hub id (e.g. CC0 images declared non-commercial because of how they were made)
    # cannot lend that id to the card: the YAML must not claim more rights than the text.
    governing_ids = {None if i.commercial_use is False and (i.hub_id or "") in PERMISSIVE else i.hub_id
                     for i in chain.governing}
    all_ids = {i.hub_id for i in chain.inputs}
    if chain.undeclared:
        chain.hub_id = "other"
    elif chain.governing:
        chain.hub_id = governing_ids.pop() if len(governing_ids) == 1 and None not in governing_ids else "other"
    else:
        chain.hub_id = all_ids.pop() if len(all_ids) == 1 and None not in all_ids else "other"
    if chain.hub_id == "other":
        if chain.undeclared:
            chain.name = "undeclared"
        elif len(chain.governing) == 1:
            chain.name = short_id(chain.governing[0].licence)
        else:
            chain.name = short_id(f"{source.name}-{transform.name}-terms")
        chain.link = "LICENSE"
    return chain
