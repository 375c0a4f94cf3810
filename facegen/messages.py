"""The one way facegen's code tells a person something: :func:`info` (what happened) to stdout, :func:`warn`
(what to know or act on) to stderr; :func:`count` writes a number with its noun ("1 shard", "3 identities"). Progress is shown by tqdm bars only, and a command's failure is an exception
(``facegen.errors``) that the command line prints. No other module prints or logs.

Lines go through ``tqdm.write``, so that they never tear a progress bar on the terminal. :func:`captured` collects
them instead of printing them: for tests, and for a library caller that shows them its own way.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tqdm.auto import tqdm

INFO = "info"
WARNING = "warning"


@dataclass(frozen=True)
class Message:
    level: str  # INFO or WARNING
    text: str


_lock = threading.Lock()
_collectors: list[list[Message]] = []  # innermost last; empty: print


def info(text: str) -> None:
    """Something that happened (a summary line, a file written), on stdout."""
    _say(Message(INFO, text))


def warn(text: str) -> None:
    """Something a person should know or act on (a skipped folder, a lock taken over, a retry), on stderr."""
    _say(Message(WARNING, text))


def _say(message: Message) -> None:
    with _lock:
        if _collectors:
            _collectors[-1].append(message)
            return
    # looked up now, not at import: pytest's capture and a caller's redirection replace sys.stdout
    stream = sys.stderr if message.level == WARNING else sys.stdout
    tqdm.write(message.text, file=stream)
    stream.flush()  # a waiting build's line must show at once, also when the stream is a pipe


def plural(noun: str, n: int) -> str:
    """``noun`` as it reads after the number ``n``: "shard"/"shards", "identity"/"identities", "planned shard"/
    "planned shards", "unit of work"/"units of work"."""
    if n == 1:
        return noun
    head, of, tail = noun.partition(" of ")
    words = head.split(" ")
    last = words[-1]
    words[-1] = last[:-1] + "ies" if last.endswith("y") and last[-2:-1] not in "aeiou" else last + "s"
    return " ".join(words) + of + tail


def count(n: int, noun: str) -> str:
    """``n`` and its noun, plural when it must be: "1 shard", "2 shards", "0 identities"."""
    return f"{n} {plural(noun, n)}"


def skipped_line(reasons: list[str]) -> str:
    """One line for skipped images by reason: "skipped 3 images (corrupt image: 2, no face detected: 1)"."""
    by_reason: dict[str, int] = {}
    for reason in reasons:
        by_reason[reason] = by_reason.get(reason, 0) + 1
    return (f"skipped {count(len(reasons), 'image')} ("
            + ", ".join(f"{reason}: {n}" for reason, n in sorted(by_reason.items())) + ")")


@contextmanager
def captured() -> Iterator[list[Message]]:
    """Collect every message said in the block (from any thread) instead of printing it."""
    collected: list[Message] = []
    with _lock:
        _collectors.append(collected)
    try:
        yield collected
    finally:
        with _lock:
            _collectors.remove(collected)
