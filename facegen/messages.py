"""The one way facegen's code tells a person something: :func:`info` (what happened) to stdout, :func:`warn`
(what to know or act on) to stderr. Progress is shown by tqdm bars only, and a command's failure is an exception
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
