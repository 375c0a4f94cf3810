"""Verified, resumable downloads of a source's published files (``facegen download SOURCE``).

A source class that can be downloaded declares it (``facegen.api``; plugins never import this module):

    download_url = "https://host/path/"                  # base URL; a file's URL is base + name
    download_files = [DownloadFile("part1.zip", size=123, sha256="ab…"), …]   # size/sha256 may be None

For each file: the licence is shown first and must be accepted; the file streams into a hidden partial file
``.NAME.part`` next to its final place, with a progress bar; an interrupted transfer resumes from the partial
file's length with an HTTP Range request (automatically a few times, and again when the command is rerun). The
complete file is verified (size and sha256 where published, otherwise every zip member's CRC) and only then
renamed to ``NAME``: nothing unverified or truncated ever sits under the final name.
"""

from __future__ import annotations

import http.client
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

import facegen
from facegen.api import DownloadFile, Source
from facegen.errors import RemoteError, UsageError
from facegen.fileio import sha256_file
from facegen.messages import info, warn

CHUNK = 1 << 20
RETRYABLE_HTTP = {408, 429, 500, 502, 503, 504}


class Interrupted(Exception):
    """The transfer stopped early; what arrived is kept in the partial file."""


class Unreachable(Interrupted):
    """No connection to the server (refused, DNS, timeout): the network must change, not the server."""


def remote_files(source_cls: type[Source]) -> list[DownloadFile]:
    if not source_cls.download_files or not source_cls.download_url:
        raise UsageError(f"source {source_cls.name!r} has no download; fetch its files from its homepage and pass "
                         "the folder as --source-path")
    return list(source_cls.download_files)


def select_files(files: Sequence[DownloadFile], names: Sequence[str] | None) -> list[DownloadFile]:
    """The files named (with or without their extension), in the order given; None or empty means all."""
    if not names:
        return list(files)
    by_name = {}
    for f in files:
        by_name[f.name] = f
        by_name[f.name.rsplit(".", 1)[0]] = f
    unknown = [n for n in names if n not in by_name]
    if unknown:
        known = ", ".join(f.name.rsplit(".", 1)[0] for f in files)
        raise UsageError(f"unknown part {unknown[0]!r} (parts: {known})")
    chosen = []
    for n in names:
        if by_name[n] not in chosen:
            chosen.append(by_name[n])
    return chosen


def license_notice(source_cls: type[Source]) -> str:
    lic, name = source_cls.license, source_cls.name
    if lic is None:
        return f"{name}: no licence is declared; check its homepage {source_cls.homepage}"
    lines = [f"{name} is licensed under: {lic.name or lic.id}"]
    if lic.link:
        lines.append(f"  {lic.link}")
    if lic.text:
        lines += ["", lic.text.rstrip()]
    return "\n".join(lines)


def sha256_of(path: Path, desc: str, progress: bool) -> str:
    with tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
              disable=not progress, leave=False) as bar:
        return sha256_file(path, progress=bar.update)


def check_zip(path: Path) -> str | None:
    """None when the central directory reads and every member's CRC matches; otherwise what is wrong."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as exc:  # BadZipFile, zlib.error, EOFError…: any of them means the file is damaged
        return f"not a valid zip ({exc or type(exc).__name__})"
    return None if bad is None else f"member {bad!r} fails its CRC"


def _fetch(url: str, partial: Path, remote: DownloadFile, timeout: float, progress: bool) -> None:
    """Append the missing bytes to ``partial`` (Range from its length); raise Interrupted on a short transfer."""
    have = partial.stat().st_size if partial.exists() else 0
    if remote.size is not None and have > remote.size:
        partial.unlink()  # longer than the published file: not a prefix of it
        have = 0
    if remote.size is not None and have == remote.size:
        return
    headers = {"User-Agent": f"facegen/{facegen.__version__}", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # "range not satisfiable": the partial file may already be complete
            total = (exc.headers.get("Content-Range") or "").rpartition("/")[2]
            if total.isdigit() and int(total) == have:
                return
            partial.unlink()
            raise Interrupted(f"server refused to resume from byte {have}; starting over") from None
        if exc.code in RETRYABLE_HTTP:
            raise Interrupted(f"HTTP {exc.code} {exc.reason}") from None
        raise RemoteError(f"{url}: HTTP {exc.code} {exc.reason} (check --base-url)") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # refused, DNS, timeout, reset
        reason = getattr(exc, "reason", exc)
        raise Unreachable(f"cannot reach {urllib.parse.urlsplit(url).netloc}: {reason}") from None
    with response:
        if have and response.status == 206:
            start = (response.headers.get("Content-Range") or "").removeprefix("bytes ").partition("-")[0]
            if start != str(have):
                raise RemoteError(f"{url}: server resumed at byte {start or '?'} instead of {have}")
            mode = "ab"
        else:  # 200: the whole file (a server that ignores Range sends it all again)
            have, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else remote.size
        if remote.size is not None and total is not None and total != remote.size:
            raise RemoteError(f"{url}: server offers {total} bytes, the published file has {remote.size} "
                              "(check --base-url)")
        with open(partial, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                            unit_divisor=1024, desc=remote.name, disable=not progress) as bar:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (OSError, http.client.HTTPException) as exc:  # reset, timeout, IncompleteRead
                    raise Interrupted(f"connection lost at byte {f.tell()}: {exc or type(exc).__name__}") from None
                if not chunk:
                    break
                f.write(chunk)  # a local error (disk full) is not an interruption: it propagates
                bar.update(len(chunk))
            received = f.tell()
        if total is not None and received < total:
            raise Interrupted(f"connection closed at byte {received} of {total}")


def verify(partial: Path, remote: DownloadFile, progress: bool) -> None:
    """Size and sha256 where published, zip CRCs otherwise; a failing file is moved aside (never resumed)."""
    size = partial.stat().st_size
    problem = None
    if remote.size is not None and size != remote.size:
        problem = f"size {size} bytes, expected {remote.size}"
    elif remote.sha256:
        actual = sha256_of(partial, f"sha256 {remote.name}", progress)
        if actual != remote.sha256.lower():
            problem = f"sha256 mismatch: expected {remote.sha256.lower()}, got {actual}"
    elif remote.name.lower().endswith(".zip"):
        problem = check_zip(partial)
    if problem:
        bad = partial.with_name(f".{remote.name}.failed")
        os.replace(partial, bad)
        raise RemoteError(f"{remote.name}: {problem}; the download was kept as {bad} and will not be used; "
                          "rerun to download it again")


def download_file(base_url: str, directory: Path, remote: DownloadFile, retries: int = 3, timeout: float = 60.0,
                  progress: bool = True, backoff: float = 1.0) -> Path:
    """Download, verify and place one file; returns its final path. Resumes a partial file left by a rerun."""
    final = directory / remote.name
    partial = directory / f".{remote.name}.part"
    if final.exists():
        if remote.size is not None and final.stat().st_size != remote.size:
            raise UsageError(f"{final} exists with {final.stat().st_size} bytes, the published file has "
                             f"{remote.size}; move it away and rerun")
        info(f"{remote.name}: already present (verified when it was downloaded), skipped")
        return final
    url = urllib.parse.urljoin(base_url if base_url.endswith("/") else base_url + "/", remote.name)
    attempt = 0
    while True:
        try:
            _fetch(url, partial, remote, timeout, progress)
            break
        except OSError as exc:  # writing the partial file: disk full, permissions
            raise UsageError(f"{remote.name}: cannot write {partial}: {exc.strerror or exc}; free space or fix "
                             "it, then rerun to resume") from None
        except Interrupted as exc:
            attempt += 1
            if attempt > retries:
                if isinstance(exc, Unreachable):  # no answer at all: exit 2, as for the Hub
                    kept = (f"{partial.stat().st_size} bytes kept in {partial}" if partial.exists()
                            else "nothing was downloaded")
                    raise UsageError(f"{remote.name}: {exc}; {kept}: rerun the same command once the server can be "
                                     "reached (check the network and --base-url)") from None
                if partial.exists():
                    raise RemoteError(f"{remote.name}: {exc}; {partial.stat().st_size} bytes kept in {partial}: "
                                      "rerun the same command to resume") from None
                raise RemoteError(f"{remote.name}: {exc}; nothing was downloaded: rerun the same command when "
                                  "the server can be reached") from None
            warn(f"{remote.name}: {exc}; resuming (retry {attempt} of {retries})")
            time.sleep(backoff * min(2 ** (attempt - 1), 30))
    try:
        verify(partial, remote, progress)
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, final)  # only now, verified, does the file get its name
    except OSError as exc:
        raise UsageError(f"{remote.name}: cannot verify or place {partial}: {exc.strerror or exc}") from None
    return final


def download_source(
    source_cls: type[Source],
    directory: str | os.PathLike,
    parts: Sequence[str] | None = None,
    base_url: str | None = None,
    accept_license: bool = False,
    confirm: Callable[[str], bool] | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
) -> list[Path]:
    """Download the chosen files of ``source_cls`` into ``directory`` after the licence is accepted.

    ``accept_license`` accepts it up front; otherwise ``confirm(question)`` is asked (None: refuse with a
    UsageError telling to pass --accept-license).
    """
    files = select_files(remote_files(source_cls), parts)
    info(license_notice(source_cls))
    if not accept_license:
        question = f"Do you accept the licence of {source_cls.name}?"
        if confirm is None:
            raise UsageError("the licence must be accepted first: pass --accept-license (or answer yes when run "
                             "in a terminal)")
        if not confirm(question):
            raise UsageError("licence not accepted; nothing was downloaded")
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {directory}: {exc.strerror or exc}") from None
    base = base_url or source_cls.download_url
    done = []
    for remote in files:
        present = (directory / remote.name).exists()
        done.append(download_file(base, directory, remote, retries=retries, timeout=timeout, progress=progress))
        if not present:
            check = "size and sha256" if remote.sha256 else "zip CRCs" if remote.name.endswith(".zip") else "size"
            info(f"{remote.name}: downloaded and verified ({check}): {done[-1]}")
    return done
