"""Hub ids, read one way everywhere: a dataset given to `build --source facegen`, `report`, `curate`, `--against` or
`--from-card`, the repository named by `publish --repo` and `card --repo`, and a Hub dataset a build recorded.

The rule. A text is a Hub dataset id when

1. it reads ``ORG/NAME``, ``ORG/NAME@REVISION`` or ``hf://datasets/ORG/NAME[@REVISION]`` (a final ``/`` is
   allowed); ``hf://`` followed by anything but ``datasets/`` (a model, a Space) is refused in one line;
2. ORG and NAME are letters, digits, ``-``, ``_`` and ``.``, each starting with a letter or a digit, with exactly one
   ``/`` between them (so an id never starts with ``.``, ``/`` or ``~``), and the Hub accepts the pair as a
   repository id (``huggingface_hub.utils.validate_repo_id``: no ``--`` or ``..``, at most 96 characters);
   REVISION is letters, digits, ``_``, ``.``, ``-`` and ``/`` (a branch, a tag or a commit);
3. given on the command line (:func:`dataset_id`), it names no local path: an existing file or folder is a path,
   and so is a text whose ORG is an existing local folder (``out/nope`` next to a folder ``out/`` is a mistyped
   path: "no such folder", never a download).

:func:`parse` applies 1-2 alone (ids as recorded in run.json or a card, where a local path is always absolute);
:func:`check_repo_name` checks a ``--repo`` (2 alone: no revision, no ``hf://``).
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

from facegen.errors import UsageError

DATASETS_PREFIX = "hf://datasets/"
PART = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
DATASET_ID = re.compile(rf"(?P<repo>{PART}/{PART})(?:@(?P<revision>[A-Za-z0-9_./-]+))?/?")


class HubId(NamedTuple):
    repo_id: str  # ORG/NAME
    revision: str | None


def _valid_repo_id(repo_id: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True


def parse(text: str | None) -> HubId | None:
    """The id in ``text`` by rules 1-2, else None (never raises, never looks at the file system)."""
    if not isinstance(text, str):
        return None
    text = text.strip()
    if text.startswith(DATASETS_PREFIX):
        text = text[len(DATASETS_PREFIX):]
    match = DATASET_ID.fullmatch(text)
    if match is None or not _valid_repo_id(match["repo"]):
        return None
    revision = match["revision"]
    return HubId(match["repo"], revision.rstrip("/") if revision else None)


def dataset_id(text: str | os.PathLike) -> HubId | None:
    """A dataset named on the command line: its Hub id by rules 1-3, or None when it is (or looks like) a local path.
    Raises UsageError for an ``hf://`` URL that is not a dataset's."""
    text = os.fspath(text).strip()
    if text.startswith("hf://") and not text.startswith(DATASETS_PREFIX):
        raise UsageError(f"{text}: only Hub dataset repositories (hf://datasets/ORG/NAME) are facegen datasets")
    if not text.startswith(DATASETS_PREFIX):
        if os.path.exists(text) or os.path.isdir(text.split("/", 1)[0]):
            return None
    return parse(text)


def check_repo_name(text: str) -> str:
    """``--repo ORG/NAME`` checked (rule 2), or a one-line UsageError."""
    if not text or text.count("/") != 1:
        raise UsageError(f"--repo must be ORG/NAME (a user or organisation, a slash, a name), got {text!r}")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError as exc:
        raise UsageError(f"--repo {text!r} is not a valid repository id: {str(exc).splitlines()[0]}") from None
    if not re.fullmatch(f"{PART}/{PART}", text):
        raise UsageError(f"--repo {text!r} is not a valid repository id: ORG and NAME are letters, digits, '-', "
                         "'_' and '.', starting with a letter or a digit")
    return text
