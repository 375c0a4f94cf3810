"""`facegen download digiface` against a local HTTP server (127.0.0.1) serving fixture zips.

The published sizes and sha256 belong to the real 3 GB parts; the tests swap in the fixture parts' values through
the source class's ``download_files`` (the test hook) and point ``--base-url`` at the local server.
"""

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from facegen import messages
from facegen.api import DownloadFile
from facegen.builders.hub.download import download_file
from facegen.cli import main
from facegen.errors import RemoteError
from facegen.plugins.digiface import DigiFaceSource
from facegen.testing.digiface import truncate_file, write_digiface_part

P72_A = "subjects_0-1999_72_imgs"
P5_A = "subjects_100000-133332_5_imgs"


class FixtureServer:
    """Serves ``files`` under /mirror/ with Range support; the first ``drops[name]`` GETs of a file send the
    headers of the whole response, half of the body, then close the connection."""

    def __init__(self, files: dict[str, bytes], drops: dict[str, int] | None = None, honour_range: bool = True):
        self.files = files
        self.drops = dict(drops or {})
        self.honour_range = honour_range
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.removeprefix("/mirror/")
                asked = self.headers.get("Range")
                server.requests.append((name, asked))
                data = server.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", asked or "")
                if match and server.honour_range:
                    start = int(match.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.drops.get(name, 0) > 0:
                    server.drops[name] -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/mirror/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def published(name, data, with_checksum=True):
    if not with_checksum:
        return DownloadFile(name)
    return DownloadFile(name, len(data), hashlib.sha256(data).hexdigest())


@pytest.fixture
def parts(tmp_path):
    """Two fixture parts: a 72-image-style one with known size/sha256, a 5-image-style one with neither."""
    made = tmp_path / "made"
    a = write_digiface_part(made, ids=range(6), images_per_identity=6, name=P72_A).read_bytes()
    b = write_digiface_part(made, ids=range(100000, 100004), images_per_identity=2, name=P5_A).read_bytes()
    return {f"{P72_A}.zip": a, f"{P5_A}.zip": b}


def cli(*args):
    """`facegen download …` in-process; returns the exit code."""
    try:
        main(["download", *map(str, args)], standalone_mode=False)
    except SystemExit as exc:
        return exc.code or 0
    return 0


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("facegen: error:")]


def test_interrupted_download_resumes_with_range_on_rerun(tmp_path, parts, monkeypatch, capsys):
    monkeypatch.setattr(DigiFaceSource, "download_files", [
        published(f"{P72_A}.zip", parts[f"{P72_A}.zip"]), published(f"{P5_A}.zip", parts[f"{P5_A}.zip"], False)])
    to = tmp_path / "digiface"
    with FixtureServer(parts, drops={f"{P72_A}.zip": 1}) as server:
        code = cli("digiface", "--to", to, "--base-url", server.url, "--accept-license", "--retries", 0)
        err = capsys.readouterr().err
        assert code == 1
        (line,) = error_lines(err)
        assert f"{P72_A}.zip: connection closed at byte" in line and "rerun the same command to resume" in line
        partial = to / f".{P72_A}.zip.part"
        half = len(parts[f"{P72_A}.zip"]) // 2
        assert partial.stat().st_size == half
        assert not (to / f"{P72_A}.zip").exists()  # nothing under the final name before verification

        code = cli("digiface", "--to", to, "--base-url", server.url, "--accept-license", "--retries", 0)
        out = capsys.readouterr().out
        assert code == 0
        assert server.requests == [(f"{P72_A}.zip", None), (f"{P72_A}.zip", f"bytes={half}-"),
                                   (f"{P5_A}.zip", None)]
    assert (to / f"{P72_A}.zip").read_bytes() == parts[f"{P72_A}.zip"]
    assert (to / f"{P5_A}.zip").read_bytes() == parts[f"{P5_A}.zip"]
    assert sorted(p.name for p in to.iterdir()) == sorted([f"{P5_A}.zip", f"{P72_A}.zip"])  # no partial files left
    assert out.index("Microsoft Research Use of Data Agreement") < out.index("downloaded and verified")
    assert f"{P72_A}.zip: downloaded and verified (size and sha256)" in out
    assert f"{P5_A}.zip: downloaded and verified (zip CRCs)" in out
    # the download is a valid source as it lies
    assert DigiFaceSource(to).identities() == [*map(str, range(6)), *map(str, range(100000, 100004))]

    # a third run has nothing to do
    assert cli("digiface", "--to", to, "--base-url", "http://127.0.0.1:9/", "--accept-license") == 0
    assert "already present" in capsys.readouterr().out


def test_dropped_connection_is_resumed_automatically_within_one_run(tmp_path, parts):
    remote = DownloadFile(f"{P72_A}.zip", len(parts[f"{P72_A}.zip"]),
                        hashlib.sha256(parts[f"{P72_A}.zip"]).hexdigest())
    with FixtureServer(parts, drops={f"{P72_A}.zip": 2}) as server, messages.captured() as said:
        path = download_file(server.url, tmp_path, remote, retries=3, progress=False, backoff=0.01)
    assert path.read_bytes() == parts[f"{P72_A}.zip"]
    size = len(parts[f"{P72_A}.zip"])
    first_cut = size // 2
    second_cut = first_cut + (size - first_cut) // 2
    assert server.requests == [(remote.name, None), (remote.name, f"bytes={first_cut}-"),
                               (remote.name, f"bytes={second_cut}-")]
    assert len(said) == 2 and all(m.level == messages.WARNING and "resuming (retry" in m.text for m in said)


def test_server_that_ignores_range_restarts_cleanly(tmp_path, parts):
    data = parts[f"{P72_A}.zip"]
    remote = DownloadFile(f"{P72_A}.zip", len(data), hashlib.sha256(data).hexdigest())
    with FixtureServer(parts, drops={remote.name: 1}, honour_range=False) as server:
        path = download_file(server.url, tmp_path, remote, retries=1, progress=False, backoff=0.01)
    assert path.read_bytes() == data


def test_checksum_mismatch_exits_non_zero_with_one_line(tmp_path, parts, monkeypatch, capsys):
    wrong = DownloadFile(f"{P72_A}.zip", len(parts[f"{P72_A}.zip"]), "0" * 64)
    monkeypatch.setattr(DigiFaceSource, "download_files", [wrong])
    to = tmp_path / "digiface"
    with FixtureServer(parts) as server:
        code = cli("digiface", "--to", to, "--base-url", server.url, "--accept-license")
    assert code == 1  # the server sent other bytes than the published ones
    (line,) = error_lines(capsys.readouterr().err)
    assert f"{P72_A}.zip: sha256 mismatch: expected {'0' * 64}, got " in line
    assert not (to / f"{P72_A}.zip").exists() and not (to / f".{P72_A}.zip.part").exists()
    assert (to / f".{P72_A}.zip.failed").read_bytes() == parts[f"{P72_A}.zip"]  # kept aside, never used


def test_part_without_checksum_is_verified_as_a_zip(tmp_path, parts, monkeypatch, capsys):
    crc_broken = write_digiface_part(tmp_path / "bad", ids=[100000], images_per_identity=2, name=P5_A,
                                     bad_crc=1).read_bytes()
    monkeypatch.setattr(DigiFaceSource, "download_files", [published(f"{P5_A}.zip", crc_broken, False)])
    to = tmp_path / "digiface"
    with FixtureServer({f"{P5_A}.zip": crc_broken}) as server:
        code = cli("digiface", "--to", to, "--base-url", server.url, "--accept-license")
    assert code == 1  # the server sent other bytes than the published ones
    (line,) = error_lines(capsys.readouterr().err)
    assert f"{P5_A}.zip: member '100000/0.png' fails its CRC" in line
    assert not (to / f"{P5_A}.zip").exists()

    cut = truncate_file(tmp_path / "bad" / f"{P5_A}.zip", 0.7).read_bytes()
    with FixtureServer({f"{P5_A}.zip": cut}) as server:
        code = cli("digiface", "--to", to, "--base-url", server.url, "--accept-license")
    assert code == 1  # the server sent other bytes than the published ones
    (line,) = error_lines(capsys.readouterr().err)
    assert f"{P5_A}.zip: not a valid zip" in line
    assert not (to / f"{P5_A}.zip").exists()


def test_server_size_differing_from_the_published_size_is_an_error(tmp_path, parts):
    remote = DownloadFile(f"{P72_A}.zip", len(parts[f"{P72_A}.zip"]) + 5, None)
    with FixtureServer(parts) as server, pytest.raises(RemoteError, match="server offers .* bytes, the published"):
        download_file(server.url, tmp_path, remote, retries=0, progress=False)
    assert not (tmp_path / remote.name).exists()


def test_missing_file_on_the_mirror_is_one_line(tmp_path, parts, monkeypatch, capsys):
    monkeypatch.setattr(DigiFaceSource, "download_files", [published("subjects_x.zip", b"", False)])
    with FixtureServer(parts) as server:
        code = cli("digiface", "--to", tmp_path, "--base-url", server.url, "--accept-license")
    assert code == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "HTTP 404" in line and "check --base-url" in line


def test_licence_must_be_accepted_and_parts_must_exist(tmp_path, capsys):
    to = tmp_path / "digiface"
    assert cli("digiface", "--to", to) == 2  # stdin is not a terminal under pytest: no question, no download
    captured = capsys.readouterr()
    assert "Microsoft Research Use of Data Agreement" in captured.out
    (line,) = error_lines(captured.err)
    assert "--accept-license" in line
    assert not to.exists()

    assert cli("digiface", "--to", to, "--parts", "subjects_0-1999_72_imgs,P9", "--accept-license") == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "unknown part 'P9'" in line and "subjects_166666-199998_5_imgs" in line

    assert cli("folder", "--to", to, "--accept-license") == 2
    assert "has no download" in capsys.readouterr().err


def test_complete_partial_file_left_by_a_kill_is_verified_without_downloading_again(tmp_path, parts):
    data = parts[f"{P5_A}.zip"]
    (tmp_path / f".{P5_A}.zip.part").write_bytes(data)  # killed after the last byte, before verify + rename
    with FixtureServer(parts) as server:
        path = download_file(server.url, tmp_path, DownloadFile(f"{P5_A}.zip"), retries=0, progress=False)
    assert server.requests == [(f"{P5_A}.zip", f"bytes={len(data)}-")]  # answered 416: nothing left to send
    assert path.read_bytes() == data and not (tmp_path / f".{P5_A}.zip.part").exists()


def test_interactive_answer_decides(tmp_path, parts, monkeypatch):
    from facegen.builders.hub.download import download_source
    from facegen.errors import UsageError

    monkeypatch.setattr(DigiFaceSource, "download_files", [published(f"{P72_A}.zip", parts[f"{P72_A}.zip"])])
    questions = []
    with FixtureServer(parts) as server:
        with pytest.raises(UsageError, match="licence not accepted"):
            download_source(DigiFaceSource, tmp_path, base_url=server.url, progress=False,
                            confirm=lambda q: questions.append(q) or False)
        assert server.requests == []
        done = download_source(DigiFaceSource, tmp_path, base_url=server.url, progress=False,
                               confirm=lambda q: questions.append(q) or True)
    assert done == [tmp_path / f"{P72_A}.zip"] and len(questions) == 2 and "licence of digiface" in questions[0]
