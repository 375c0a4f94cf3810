"""How commands end: each kind of failure is one line and its exit code (2: change the input, options or
environment; 1: a check the command exists to make failed, or a remote service did), a library caller gets the
exception itself, a bug stays a traceback, and Ctrl-C / SIGTERM stop any long command (here `download`, in a real
process) with 130 / 143, keeping what arrived."""

import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import BIN, run_cli
from facegen.builders.engine.lock import OutputLock
from facegen.errors import CheckFailed, SampleError
from facegen.plugins.digiface import DOWNLOAD_FILES
from facegen.testing.folder import write_folder_source
from facegen.testing.output import write_output_folder


def broken_output(tmp_path):
    """A finished build folder whose first shard was cut short: publish's check refuses it."""
    out = write_output_folder(tmp_path / "out", identities=4, shard_size=2)
    shard = out / "data" / "train" / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    return out


def strict_build(tmp_path):
    src = write_folder_source(tmp_path / "src", identities=2, images_per_identity=2, corrupt=1)
    return ["build", "--source", "folder", "--source-path", src, "--plugin", "passthrough", "--out", tmp_path / "o",
            "--strict"]


CASES = {  # name: (the command, made in tmp_path; exit code; what its one line says)
    "click usage": (lambda tmp: ["build", "--no-such-option"], 2, "No such option"),
    "UsageError": (lambda tmp: ["card", tmp / "nowhere"], 2, "no such folder"),
    "FolderBusy": (lambda tmp: ["card", tmp / "busy"], 2, "is being built by another facegen process"),
    "SampleError": (strict_build, 2, "bad sample 0/1.png: corrupt image"),
    "CheckFailed": (lambda tmp: ["publish", broken_output(tmp), "--repo", "org/x", "--dry-run"], 1,
                    "refusing to publish"),
    # a server that answers with a failure: exit 1 (a rerun may work); one that cannot be reached: exit 2 (the
    # network must change), as for the Hub
    "RemoteError": (lambda tmp: ["download", "digiface", "--to", tmp / "d", "--parts", "subjects_0-1999_72_imgs",
                                 "--base-url", "{failing server}", "--accept-license", "--retries", 0], 1,
                    "HTTP 500"),
    "unreachable": (lambda tmp: ["download", "digiface", "--to", tmp / "d", "--parts", "subjects_0-1999_72_imgs",
                                 "--base-url", "http://127.0.0.1:9/", "--accept-license", "--retries", 0], 2,
                    "cannot reach 127.0.0.1:9"),
}


class FailingServer:
    """Answers every request with HTTP 500."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.send_error(500)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("kind", list(CASES))
def test_each_kind_of_failure_is_one_line_and_its_exit_code(kind, tmp_path, capsys):
    make, expected_code, says = CASES[kind]
    args = make(tmp_path)
    lock = None
    if kind == "FolderBusy":  # this process holds the folder, as a running build would
        write_output_folder(tmp_path / "busy", identities=2, shard_size=2)
        lock = OutputLock(tmp_path / "busy")
        lock.acquire()
    server = FailingServer() if kind == "RemoteError" else None
    if server is not None:
        args = [server.url if a == "{failing server}" else a for a in args]
    try:
        code, _, err = run_cli(args, capsys)
    finally:
        if lock is not None:
            lock.release()
        if server is not None:
            server.close()
    assert code == expected_code, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("facegen: error: ")]
    assert len(errors) == 1 and says in errors[0], err


def test_the_hub_failing_is_exit_1_and_no_network_exit_2(monkeypatch):
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    from facegen.errors import RemoteError, UsageError
    from facegen.published import download_dataset

    request = httpx2.Request("GET", "https://huggingface.co/api/datasets/org/x")
    for raised, expected in ((HfHubHTTPError("503", response=httpx2.Response(503, request=request)), RemoteError),
                             (HfHubHTTPError("404", response=httpx2.Response(404, request=request)), UsageError),
                             (httpx2.ConnectError("no network", request=request), UsageError)):
        def snapshot_download(*args, **kwargs):
            raise raised

        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
        with pytest.raises(expected):
            download_dataset("org/x")


def test_a_library_caller_gets_the_exception_not_an_exit(tmp_path):
    from facegen.builders.engine.options import BuildConfig
    from facegen.builders.engine.run import build
    from facegen.builders.hub.publish import publish

    with pytest.raises(CheckFailed, match="refusing to publish"):
        publish(broken_output(tmp_path), "org/x", dry_run=True)
    src = write_folder_source(tmp_path / "src", identities=2, images_per_identity=2, corrupt=1)
    with pytest.raises(SampleError) as info:
        build(BuildConfig(source="folder", source_path=str(src), plugin="passthrough", out=str(tmp_path / "o"),
                          strict=True))
    assert info.value.ref == "0/1.png"


def test_an_unexpected_exception_stays_a_traceback(tmp_path, capsys, monkeypatch):
    """A bug must stay visible: the group maps only facegen's own errors."""
    from facegen.builders.hub import publish

    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(publish, "check_folder", bug)
    out = write_output_folder(tmp_path / "out", identities=2, shard_size=2)
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(["publish", out, "--repo", "org/x", "--dry-run"], capsys)


# --- signals on a long command other than build (build has its own test in test_messages.py) ---

PART = DOWNLOAD_FILES[0]
SENT = (1 << 20) + 1  # one read's worth (download.CHUNK) lands in the partial file; the last byte never completes


class StallingMirror:
    """Offers PART whole (its published size), sends SENT bytes, then stalls until closed; a resume (a Range
    request) is answered 503 and recorded."""

    def __init__(self):
        self.ranges: list[str | None] = []
        self.release = threading.Event()
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                mirror.ranges.append(self.headers.get("Range"))
                if self.headers.get("Range"):
                    self.send_error(503)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(PART.size))
                self.end_headers()
                self.wfile.write(bytes(SENT))
                self.wfile.flush()
                mirror.release.wait(600)
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_stopped_download_exits_130_or_143_keeps_what_arrived_and_resumes(tmp_path, capsys, sig, code, word):
    to = tmp_path / "digiface"
    partial = to / f".{PART.name}.part"
    with StallingMirror() as mirror:
        args = ["download", "digiface", "--to", to, "--parts", PART.name, "--base-url", mirror.url,
                "--accept-license", "--retries", 0]
        proc = subprocess.Popen([str(BIN / "facegen"), *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300  # over 10x the start of a process on a loaded machine (about 5 s)
        while proc.poll() is None and time.monotonic() < deadline and not (
                partial.exists() and partial.stat().st_size >= SENT - 1):
            time.sleep(0.01)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(sig)  # blocked in the socket read of the stalled transfer
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == code, err
        assert f"facegen: {word}: what arrived is kept in a partial file; rerun the same command to resume" in err
        assert "Traceback" not in err
        assert partial.stat().st_size == SENT - 1 and not (to / PART.name).exists()

        rerun, _, err = run_cli(args, capsys)
        assert mirror.ranges == [None, f"bytes={SENT - 1}-"]  # the rerun asks for the rest only
        assert rerun == 1 and "HTTP 503" in err and "rerun the same command to resume" in err, err
    assert partial.stat().st_size == SENT - 1
