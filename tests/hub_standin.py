"""A test double of the Hugging Face Hub's HTTP protocol, served on 127.0.0.1 by a thread.

Point ``HF_ENDPOINT`` (or ``huggingface_hub.constants.ENDPOINT``) at :attr:`HubStandIn.url` and the real
``huggingface_hub`` and ``datasets`` client code runs end to end against it: repo creation, settings (gating),
branches, YAML validation, preupload, NDJSON commits (regular files, LFS pointers, deletions), the LFS batch API with
basic uploads, revision info, tree and paths-info listings, and ``resolve`` downloads with the headers the clients
check (``ETag``, ``X-Repo-Commit``, ``Content-Length``, ``Range``; LFS files answer with a redirect and
``X-Linked-Etag``/``X-Linked-Size``). Xet is never offered: preupload answers ``regular`` (or ``lfs`` above
``lfs_threshold``, for clients run with ``HF_HUB_DISABLE_XET=1``).

Access: a private repo answers 404 ``RepoNotFound`` without a valid token; a gated repo answers 401 ``GatedRepo`` to
downloads without one. It is a test double, small on purpose: one user, no pull requests, no pagination.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Blob:
    data: bytes
    lfs: bool = False

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def oid(self) -> str:
        return git_oid(self.data)


@dataclass
class Repo:
    private: bool = False
    gated: bool | str = False
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)  # commit sha -> files
    log: list[dict] = field(default_factory=list)  # {"sha", "branch", "message", "added", "deleted"}

    def files(self, revision: str) -> dict[str, Blob] | None:
        sha = self.branches.get(revision, revision)
        return self.commits.get(sha)

    def head(self, revision: str) -> str | None:
        sha = self.branches.get(revision, revision)
        return sha if sha in self.commits else None


class HubStandIn:
    """The stand-in's state and server. ``with HubStandIn() as hub: …`` starts and stops it."""

    def __init__(self, tokens=("hf_StandInToken0123456789",), lfs_threshold: int | None = None):
        self.tokens = set(tokens)
        self.lfs_threshold = lfs_threshold
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, authorization)
        self.fail_commits: set[int] = set()  # commit attempts (1-based) answered with an error
        self.hold_commits_after: int | None = None  # commits beyond this many wait until `release()`
        self.commit_attempts = 0
        self.error_body: str | None = None  # when set, every request is refused with this text (401)
        self.held = threading.Event()  # set while a commit is being held
        self._release = threading.Event()
        self.lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> str:
        hub = self

        class Handler(_Handler):
            standin = hub

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self.url

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def release(self) -> None:
        self._release.set()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def serve_this_process(self, monkeypatch, home, token: str | None = None) -> None:
        """Point this process's huggingface_hub at the stand-in for one test, as ``HF_ENDPOINT`` and ``HF_HOME``
        would a new process (both are read at import): its endpoint and download URLs, an empty cache and no
        saved login under ``home``, ``token`` as ``HF_TOKEN``, no telemetry or progress bars."""
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", self.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            self.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HOME", str(home))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"))
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        if token:
            monkeypatch.setenv("HF_TOKEN", token)
        else:
            monkeypatch.delenv("HF_TOKEN", raising=False)

    # ---- views for tests -------------------------------------------------------------------------------

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return {path: blob.data for path, blob in (repo.files(revision) or {}).items()}

    def commits(self, repo_id: str) -> list[dict]:
        return list(self.repos[repo_id].log) if repo_id in self.repos else []

    # ---- state changes (called by the handler, under the lock) -------------------------------------------

    def commit(self, repo_id: str, branch: str, message: str, added: dict[str, Blob], deleted: list[str]) -> str:
        repo = self.repos[repo_id]
        files = dict(repo.files(branch) or {})
        for path in deleted:
            if path.endswith("/"):
                files = {p: b for p, b in files.items() if not p.startswith(path)}
            else:
                files.pop(path, None)
        files.update(added)
        sha = hashlib.sha1(f"{repo_id}:{branch}:{len(repo.log)}:{message}".encode()).hexdigest()
        repo.commits[sha] = files
        repo.branches[branch] = sha
        repo.log.append({"sha": sha, "branch": branch, "message": message, "added": sorted(added),
                         "deleted": sorted(deleted)})
        return sha


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):  # a killed client is normal
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    standin: HubStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    # ---- plumbing --------------------------------------------------------------------------------------

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict | None = None, head: bool = False) -> None:
        self._send(status, json.dumps(payload).encode(), headers, head)

    def _error(self, status: int, code: str, message: str, head: bool = False) -> None:
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message}, head)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

    def _authorised(self) -> bool:
        return self._token() in self.standin.tokens

    def _repo(self, repo_id: str, head: bool = False, download: bool = False) -> Repo | None:
        """The repo if this caller may see it; otherwise the Hub's answer is sent and None returned."""
        repo = self.standin.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorised()):
            self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}.", head)
            return None
        if download and repo.gated and not self._authorised():
            self._error(401, "GatedRepo", f"Access to dataset {repo_id} is restricted. You must have access to it "
                                          "and be authenticated to access it. Please log in.", head)
            return None
        return repo

    def _route(self, method: str) -> None:
        hub = self.standin
        url = urlsplit(self.path)
        path = url.path
        hub.requests.append((method, path, self.headers.get("Authorization")))
        if hub.error_body is not None:
            self._body()
            return self._error(401, "Unauthorized", hub.error_body, method == "HEAD")
        token = self._token()
        if token is not None and token not in hub.tokens and not path.startswith("/api/agent-harnesses"):
            self._body()
            return self._error(401, "Unauthorized", "Invalid credentials in Authorization header",
                               method == "HEAD")
        with hub.lock:
            routes = [
                ("POST", r"/api/repos/create", self.create_repo),
                ("POST", r"/api/validate-yaml", self.validate_yaml),
                ("PUT", r"/api/datasets/(?P<repo>[^/]+/[^/]+)/settings", self.settings),
                ("POST", r"/api/datasets/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>.+)", self.branch),
                ("POST", r"/api/datasets/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>.+)", self.preupload),
                ("POST", r"/api/datasets/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>.+)", self.commit),
                ("GET", r"/api/datasets/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>.+)", self.repo_info),
                ("GET", r"/api/datasets/(?P<repo>[^/]+/[^/]+)", self.repo_info),
                ("GET", r"/api/datasets/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", self.tree),
                ("POST", r"/api/datasets/(?P<repo>[^/]+/[^/]+)/paths-info/(?P<rev>.+)", self.paths_info),
                ("POST", r"/datasets/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", self.lfs_batch),
                ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self.lfs_upload),
                ("GET", r"/lfs-objects/(?P<oid>[0-9a-f]{64})", self.lfs_download),
                ("HEAD", r"/lfs-objects/(?P<oid>[0-9a-f]{64})", self.lfs_download),
                ("GET", r"/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self.resolve),
                ("HEAD", r"/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self.resolve),
            ]
            for verb, pattern, action in routes:
                match = re.fullmatch(pattern, path)
                if verb == method and match:
                    args = {k: unquote(v) if v is not None else None for k, v in match.groupdict().items()}
                    return action(query=parse_qs(url.query), **args)
        self._body()
        self._error(404, "EntryNotFound" if "/resolve/" in path else "NotFound", f"no route for {method} {path}",
                    method == "HEAD")

    def do_GET(self):
        self._route("GET")

    def do_HEAD(self):
        self._route("HEAD")

    def do_POST(self):
        self._route("POST")

    def do_PUT(self):
        self._route("PUT")

    # ---- write path ------------------------------------------------------------------------------------

    def create_repo(self, query):
        body = json.loads(self._body())
        if not self._authorised():
            return self._error(401, "Unauthorized", "You must be authenticated to create a repo")
        assert body.get("type") == "dataset", body
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        url = f"{self.standin.url}/datasets/{repo_id}"
        if repo_id in self.standin.repos:
            return self._json(409, {"error": "You already created this dataset repo", "url": url})
        repo = Repo(private=body.get("visibility") == "private" or bool(body.get("private")))
        self.standin.repos[repo_id] = repo
        self.standin.commit(repo_id, "main", "initial commit", {}, [])
        return self._json(200, {"url": url})

    def validate_yaml(self, query):
        body = json.loads(self._body())
        try:  # the Hub parses the front matter (and rejects what is not a mapping)
            meta = yaml.safe_load(body["content"].split("---\n", 2)[1])
            assert isinstance(meta, dict), "metadata must be a mapping"
        except Exception as exc:
            return self._json(200, {"errors": [{"message": str(exc)}], "warnings": []})
        return self._json(200, {"errors": [], "warnings": []})

    def settings(self, query, repo):
        body = json.loads(self._body() or b"{}")
        target = self._repo(repo)
        if target is None:
            return
        if not self._authorised():
            return self._error(401, "Unauthorized", "You must be authenticated to change settings")
        if "gated" in body:
            target.gated = body["gated"]
        if "private" in body:
            target.private = bool(body["private"])
        return self._json(200, {})

    def branch(self, query, repo, rev):
        self._body()
        target = self._repo(repo)
        if target is None:
            return
        if rev in target.branches:
            return self._error(409, "BranchExists", "Branch already exists")
        target.branches[rev] = target.branches["main"]
        return self._json(200, {})

    def preupload(self, query, repo, rev):
        body = json.loads(self._body())
        target = self._repo(repo)
        if target is None:
            return
        files = target.files(rev)
        if files is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        threshold = self.standin.lfs_threshold
        answer = []
        for f in body["files"]:
            existing = files.get(f["path"])
            lfs = threshold is not None and f.get("size", 0) > threshold
            answer.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                           "oid": (existing.sha256 if existing.lfs else existing.oid) if existing else None})
        return self._json(200, {"files": answer})

    def commit(self, query, repo, rev):
        hub = self.standin
        body = self._body()
        target = self._repo(repo)
        if target is None:
            return
        if not self._authorised():
            return self._error(401, "Unauthorized", "You must be authenticated to commit")
        hub.commit_attempts += 1
        attempt = hub.commit_attempts
        if hub.hold_commits_after is not None and attempt > hub.hold_commits_after:
            hub.held.set()
            hub.lock.release()  # let other requests (and the test) run while this one waits
            try:
                hub._release.wait(60)
            finally:
                hub.lock.acquire()
            return self._error(500, "Interrupted", "the upload was interrupted")
        if attempt in hub.fail_commits:
            return self._error(400, "BadRequest", "simulated interruption")
        if target.files(rev) is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        added, deleted = {}, []
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                added[value["path"]] = Blob(base64.b64decode(value["content"]))
            elif line["key"] == "lfsFile":
                if value["oid"] not in hub.lfs:
                    return self._error(400, "BadRequest", f"LFS object {value['oid']} was never uploaded")
                added[value["path"]] = Blob(hub.lfs[value["oid"]], lfs=True)
            elif line["key"] == "deletedFile":
                deleted.append(value["path"])
            elif line["key"] == "deletedFolder":
                deleted.append(value["path"].rstrip("/") + "/")
        sha = hub.commit(repo, rev, header["summary"], added, deleted)
        return self._json(200, {"commitUrl": f"{hub.url}/datasets/{repo}/commit/{sha}", "commitOid": sha})

    def lfs_batch(self, query, repo):
        body = json.loads(self._body())
        if self._repo(repo) is None:
            return
        objects = []
        for obj in body["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.standin.lfs:
                entry["actions"] = {"upload": {"href": f"{self.standin.url}/lfs-upload/{obj['oid']}"}}
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def lfs_upload(self, query, oid):
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, "BadRequest", "sha256 mismatch")
        self.standin.lfs[oid] = data
        return self._send(200)

    # ---- read path -------------------------------------------------------------------------------------

    def repo_info(self, query, repo, rev="main"):
        target = self._repo(repo)
        if target is None:
            return
        sha = target.head(rev)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        files = target.commits[sha]
        return self._json(200, {"id": repo, "_id": repo, "sha": sha, "private": target.private,
                                "gated": target.gated or False, "disabled": False, "downloads": 0, "likes": 0,
                                "tags": [], "lastModified": "2026-01-01T00:00:00.000Z",
                                "siblings": [{"rfilename": p} for p in sorted(files)]})

    @staticmethod
    def _entry(path: str, blob: Blob) -> dict:
        entry = {"type": "file", "path": path, "size": len(blob.data), "oid": blob.oid}
        if blob.lfs:
            entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": 134}
        return entry

    def tree(self, query, repo, rev, path=None):
        target = self._repo(repo)
        if target is None:
            return
        files = target.files(rev)
        if files is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        prefix = (path or "").strip("/")
        recursive = query.get("recursive", ["false"])[0] in ("true", "True", "1")
        entries, folders = [], set()
        for file_path in sorted(files):
            if prefix and not file_path.startswith(prefix + "/"):
                continue
            rest = file_path[len(prefix) + 1:] if prefix else file_path
            parts = rest.split("/")
            base = f"{prefix}/" if prefix else ""
            for depth in range(1, len(parts)):  # the folders on the way
                folder = base + "/".join(parts[:depth])
                if (recursive or depth == 1) and folder not in folders:
                    folders.add(folder)
                    entries.append({"type": "directory", "path": folder, "oid": git_oid(folder.encode())})
            if recursive or len(parts) == 1:
                entries.append(self._entry(file_path, files[file_path]))
        if prefix and not entries:
            return self._error(404, "EntryNotFound", f"{prefix} does not exist on {rev}")
        return self._json(200, entries)

    def paths_info(self, query, repo, rev):
        body = self._body()
        content_type = self.headers.get("Content-Type", "")
        if "json" in content_type:
            paths = json.loads(body).get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        target = self._repo(repo)
        if target is None:
            return
        files = target.files(rev)
        if files is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        entries = []
        for p in paths:
            p = p.strip("/")
            if p in files:
                entries.append(self._entry(p, files[p]))
            elif any(f.startswith(p + "/") for f in files):
                entries.append({"type": "directory", "path": p, "oid": git_oid(p.encode())})
        return self._json(200, entries)

    def _ranged(self, data: bytes, headers: dict, head: bool) -> None:
        """200 with the whole body, or 206 for a `Range: bytes=a-b` request."""
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if match:
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            if start >= len(data):
                return self._send(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"}, head)
            part = data[start:end + 1]
            return self._send(206, part, {**headers, "Content-Length": len(part),
                                          "Content-Range": f"bytes {start}-{start + len(part) - 1}/{len(data)}"},
                              head, content_type="application/octet-stream")
        self._send(200, data, {**headers, "Content-Length": len(data), "Accept-Ranges": "bytes"}, head,
                   content_type="application/octet-stream")

    def resolve(self, query, repo, rev, path):
        head = self.command == "HEAD"
        target = self._repo(repo, head=head, download=True)
        if target is None:
            return
        sha = target.head(rev)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        blob = target.commits[sha].get(path)
        if blob is None:
            return self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha,
                                          "X-Error-Message": f"{path} does not exist on {rev}"}, head)
        if blob.lfs:  # like the Hub: a redirect to the object store (another host name, so a HEAD is not followed
            # there), with the object's identity in X-Linked-*
            port = self.standin.url.rsplit(":", 1)[1]
            store = f"http://localhost:{port}/lfs-objects/{blob.sha256}?commit={sha}"
            return self._send(302, b"", {"Location": store,
                                         "X-Repo-Commit": sha, "ETag": f'"{blob.oid}"',
                                         "X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": len(blob.data)},
                              head)
        self._ranged(blob.data, {"ETag": f'"{blob.oid}"', "X-Repo-Commit": sha}, head)

    def lfs_download(self, query, oid):
        data = self.standin.lfs.get(oid)
        if data is None:
            return self._error(404, "EntryNotFound", "no such object", self.command == "HEAD")
        headers = {"ETag": f'"{oid}"', "X-Linked-Etag": f'"{oid}"', "X-Linked-Size": len(data)}
        if query.get("commit"):
            headers["X-Repo-Commit"] = query["commit"][0]
        self._ranged(data, headers, self.command == "HEAD")
