"""`facegen publish` against an in-process stand-in for the Hub (huggingface_hub.set_client_factory + MockTransport).

The stand-in keeps state like the Hub: repositories, branches, the files of each branch and the commits; its
preupload answer carries each known file's git oid, which is how huggingface_hub 2.x skips files already committed
when an interrupted upload is rerun.
"""

import base64
import hashlib
import json
import re
import tarfile
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
import xxhash
import yaml
from huggingface_hub import constants
from huggingface_hub.utils._http import default_client_factory

from conftest import cli
from facegen.builders import publish as publish_module
from facegen.builders.publish import IGNORE_PATTERNS, check_folder, files_to_upload
from facegen.testing.folder import write_folder_source
from facegen.testing.output import RESEARCH_ONLY, write_output_folder

TOKEN = "hf_FakeTokenForTests0123456789abcdef"


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Answers create-repo, branch, validate-yaml, preupload, commit and revision-info like the Hub does."""

    def __init__(self):
        self.repos = {}  # repo id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.commits = []  # {"repo", "branch", "files": {path: bytes}, "message"}
        self.requests = []  # (method, path, authorization header)
        self.fail_commits = set()  # commit attempt numbers (1-based) answered with an error
        self.commit_attempts = 0
        self.error_body = None  # when set, every request is refused with this body (status 401)

    def handler(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.requests.append((request.method, path, request.headers.get("authorization")))
        if self.error_body is not None:
            return httpx2.Response(401, json={"error": self.error_body})
        if path == "/api/repos/create":
            body = json.loads(request.content)
            repo = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
            assert body["type"] == "dataset"
            if repo in self.repos:
                return httpx2.Response(409, json={"error": "You already created this dataset repo",
                                                  "url": f"{request.url.scheme}://{request.url.host}/datasets/{repo}"})
            private = body.get("visibility") == "private" or bool(body.get("private"))
            self.repos[repo] = {"private": private, "branches": {"main": {}}}
            return httpx2.Response(200, json={"url": f"{request.url.scheme}://{request.url.host}/datasets/{repo}"})
        if path == "/api/validate-yaml":
            body = json.loads(request.content)
            try:  # the Hub parses the front matter; do the same
                yaml.safe_load(body["content"].split("---\n", 2)[1])
            except Exception as exc:
                return httpx2.Response(200, json={"errors": [{"message": str(exc)}], "warnings": []})
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        match = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/(branch|preupload|commit|revision)/(.+)", path)
        if not match or match.group(1) not in self.repos:
            return httpx2.Response(404, json={"error": "Repository not found"})
        repo, action, branch = match.group(1), match.group(2), match.group(3).replace("%2F", "/")
        branches = self.repos[repo]["branches"]
        if action == "branch":
            if branch in branches:
                return httpx2.Response(409, json={"error": "Branch already exists"})
            branches[branch] = dict(branches["main"])
            return httpx2.Response(200, json={})
        if branch not in branches:
            return httpx2.Response(404, json={"error": f"Revision not found: {branch}"})
        files = branches[branch]
        if action == "preupload":
            body = json.loads(request.content)
            return httpx2.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": git_oid(files[f["path"]]) if f["path"] in files else None}
                for f in body["files"]]})
        if action == "revision":
            return httpx2.Response(200, json={"id": repo, "sha": self._head(repo, branch), "private": False})
        # commit: NDJSON, a header line then one line per file with base64 content
        self.commit_attempts += 1
        if self.commit_attempts in self.fail_commits:
            return httpx2.Response(400, json={"error": "simulated interruption"})
        lines = [json.loads(line) for line in request.content.decode().splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        added = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                 for line in lines if line["key"] == "file"}
        files.update(added)
        self.commits.append({"repo": repo, "branch": branch, "files": added, "message": header["summary"]})
        oid = self._head(repo, branch)
        return httpx2.Response(200, json={"commitUrl": f"{request.url.scheme}://{request.url.host}/datasets/{repo}/"
                                                       f"commit/{oid}", "commitOid": oid})

    def _head(self, repo, branch):
        n = sum(1 for c in self.commits if c["repo"] == repo and c["branch"] == branch)
        return hashlib.sha1(f"{repo}@{branch}#{n}".encode()).hexdigest()

    def committed_paths(self):
        return [sorted(c["files"]) for c in self.commits]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The stand-in Hub for this test; the real client factory is restored afterwards, and no real login leaks in."""
    fake = FakeHub()
    huggingface_hub.set_client_factory(
        lambda: httpx2.Client(transport=httpx2.MockTransport(fake.handler), follow_redirects=True))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-login" / "token"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    yield fake
    huggingface_hub.set_client_factory(default_client_factory)




@pytest.fixture
def built(tmp_path):
    """A real `facegen build`: 6 identities x 3 images in 3 shards, plus a hidden leftover and a stray note."""
    src = write_folder_source(tmp_path / "src", identities=6, images_per_identity=3)
    out = tmp_path / "out"
    assert cli("build", "--source", "folder", "--source-path", src, "--plugin", "passthrough", "--out", out,
               "--shard-samples", 6) == 0
    (out / "data" / "train" / ".train-000009.tar.tmp-123").write_bytes(b"half a shard")  # a killed writer's file
    (out / ".DS_Store").write_bytes(b"finder")
    (out / "notes.txt").write_text("my notes, not part of the dataset\n")
    return out


SHARDS = ["data/train/train-000000.tar", "data/train/train-000001.tar", "data/train/train-000002.tar"]
PUBLISHED = sorted(["LICENSE", "README.md", "_info.json", "preview.jpg", *SHARDS])


def test_publish_commits_exactly_the_dataset_files(built, hub, capsys):
    assert cli("publish", built, "--repo", "org/faces", "--private", "--token", TOKEN) == 0
    assert hub.repos["org/faces"]["private"] is True
    files = hub.repos["org/faces"]["branches"]["main"]
    assert sorted(files) == PUBLISHED  # no .facegen/, no hidden temp shard, no .DS_Store, no notes.txt
    for path in PUBLISHED:
        assert files[path] == (built / path).read_bytes()
    assert 'load_dataset("org/faces", split="train")' in files["README.md"].decode()  # the card names the repo
    # every request was authenticated with the token, and the token was never printed
    # (huggingface_hub's own anonymous `GET /api/agent-harnesses` probe carries no credentials at all)
    api_calls = [r for r in hub.requests if r[1] != "/api/agent-harnesses"]
    assert [path for _, path, _ in api_calls] == ["/api/repos/create", "/api/validate-yaml",
                                                  "/api/datasets/org/faces/preupload/main",
                                                  "/api/datasets/org/faces/commit/main"]
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in api_calls)
    assert all(auth is None for _, path, auth in hub.requests if path == "/api/agent-harnesses")
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err
    assert "token: --token" in captured.out and "published:" in captured.out

    # publishing the unchanged folder again commits nothing new (every file's oid matches)
    assert cli("publish", built, "--repo", "org/faces", "--token", TOKEN) == 0
    assert len(hub.commits) == 1


def test_dry_run_lists_files_and_target_and_contacts_nothing(built, hub, capsys):
    readme = (built / "README.md").read_bytes()
    assert cli("publish", built, "--repo", "org/faces", "--dry-run") == 0
    out = capsys.readouterr().out
    assert hub.requests == [] and hub.commits == []
    assert "target: https://huggingface.co/datasets/org/faces (branch main" in out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == PUBLISHED
    assert "token: none" in out and "dry run: nothing was uploaded" in out
    assert f"same upload with the hf CLI: hf upload org/faces {built} . --repo-type dataset --include README.md" in out
    assert (built / "README.md").read_bytes() == readme  # a dry run changes nothing locally either


def test_files_to_upload_uses_the_same_matcher_as_upload_folder(built):
    assert [f.path for f in files_to_upload(built)] == PUBLISHED
    assert ".facegen/**" in IGNORE_PATTERNS


def test_rerun_after_a_failed_first_commit_completes(built, hub, capsys):
    hub.fail_commits = {1}
    assert cli("publish", built, "--repo", "org/faces", "--token", TOKEN) == 1
    err = capsys.readouterr().err
    assert "rerun the same command to resume" in err and TOKEN not in err and err.count("\n") == 1
    assert hub.repos["org/faces"]["branches"]["main"] == {}
    assert cli("publish", built, "--repo", "org/faces", "--token", TOKEN) == 0
    assert sorted(hub.repos["org/faces"]["branches"]["main"]) == PUBLISHED


def test_rerun_after_an_interrupted_multi_commit_upload_skips_what_was_committed(built, hub, monkeypatch, capsys):
    # a large folder is committed in several batches; make every file its own batch and kill the 4th commit
    monkeypatch.setattr(huggingface_hub._upload_pipeline, "REGULAR_CONTENT_BYTES_BUDGET", 1)
    hub.fail_commits = {4}
    assert cli("publish", built, "--repo", "org/faces", "--token", TOKEN) == 1
    first = hub.committed_paths()
    assert first == [["LICENSE"], ["README.md"], ["_info.json"]]
    assert cli("publish", built, "--repo", "org/faces", "--token", TOKEN) == 0
    second = hub.committed_paths()[len(first):]
    # the rerun sends only the files not committed yet, and the repo ends complete and byte-exact
    assert sorted(p for c in second for p in c) == ["data/train/train-000000.tar", "data/train/train-000001.tar",
                                                    "data/train/train-000002.tar", "preview.jpg"]
    files = hub.repos["org/faces"]["branches"]["main"]
    assert sorted(files) == PUBLISHED and all(files[p] == (built / p).read_bytes() for p in PUBLISHED)
    assert TOKEN not in capsys.readouterr().err


def test_token_from_env_or_saved_login_and_refusal_without_one(built, hub, monkeypatch, capsys, tmp_path):
    readme = (built / "README.md").read_bytes()
    assert cli("publish", built, "--repo", "org/a") == 2
    err = capsys.readouterr().err
    assert "no Hugging Face token" in err and hub.requests == []
    assert (built / "README.md").read_bytes() == readme  # refused before touching anything

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert cli("publish", built, "--repo", "org/a") == 0
    assert "token: HF_TOKEN" in capsys.readouterr().out
    assert all(auth == f"Bearer {TOKEN}" for _, path, auth in hub.requests if path != "/api/agent-harnesses")

    monkeypatch.delenv("HF_TOKEN")
    saved = tmp_path / "hf-home" / "token"
    saved.parent.mkdir()
    saved.write_text("hf_SavedLoginToken987654321\n")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(saved))
    hub.requests.clear()
    assert cli("publish", built, "--repo", "org/b") == 0
    out = capsys.readouterr().out
    assert "token: saved login" in out and "hf_SavedLoginToken987654321" not in out
    assert all(auth == "Bearer hf_SavedLoginToken987654321" for _, path, auth in hub.requests
               if path != "/api/agent-harnesses")
    # each repo's card names that repo in its loading examples
    assert 'load_dataset("org/a", split="train")' in hub.repos["org/a"]["branches"]["main"]["README.md"].decode()
    assert 'load_dataset("org/b", split="train")' in hub.repos["org/b"]["branches"]["main"]["README.md"].decode()


def test_hub_error_is_one_masked_line(built, hub, capsys):
    hub.error_body = f"Invalid credentials in Authorization header: {TOKEN}"  # a server echoing the token back
    assert cli("publish", built, "--repo", "org/faces", "--token", TOKEN) == 1
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err
    assert captured.err.startswith("facegen: error: upload to org/faces failed") and captured.err.count("\n") == 1


def test_revision_commits_to_a_new_branch(built, hub):
    assert cli("publish", built, "--repo", "org/faces", "--revision", "v1", "--token", TOKEN) == 0
    branches = hub.repos["org/faces"]["branches"]
    assert branches["main"] == {} and sorted(branches["v1"]) == PUBLISHED
    assert ("POST", "/api/datasets/org/faces/branch/v1", f"Bearer {TOKEN}") in hub.requests


def test_bad_repo_id_is_a_usage_error(built, hub, capsys):
    assert cli("publish", built, "--repo", "faces", "--dry-run") == 2
    assert "ORG/NAME" in capsys.readouterr().err


def _rewrite_shard(out: Path, index: int, edit) -> None:
    """Rewrite one shard's tar through ``edit(name, data) -> data`` and update its stats (size, checksum)."""
    import io

    path = out / "data" / "train" / f"train-{index:06d}.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            data = edit(member.name, data)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    stats_path = out / ".facegen" / "shards" / f"{index:06d}.json"
    stats = json.loads(stats_path.read_text())
    stats["tar_bytes"] = len(buf.getvalue())
    stats["tar_xxh3_128"] = xxhash.xxh3_128(buf.getvalue()).hexdigest()
    stats_path.write_text(json.dumps(stats))


def test_refuses_a_broken_folder_with_every_problem_and_contacts_nothing(tmp_path, hub, capsys):
    out = write_output_folder(tmp_path / "out", identities=6, shard_size=2, source_license=RESEARCH_ONLY)
    assert check_folder(out) == []
    (out / "LICENSE").unlink()
    shard1 = out / "data" / "train" / "train-000001.tar"
    shard1.write_bytes(shard1.read_bytes()[:3000])  # a truncated tar (a killed copy)
    stats2 = json.loads((out / ".facegen" / "shards" / "000002.json").read_text())
    stats2["images"] += 1
    (out / ".facegen" / "shards" / "000002.json").write_text(json.dumps(stats2))
    (out / "data" / "train" / "train-000003.tar.tmp").write_bytes(b"x")  # `datasets` would load this as a shard
    assert cli("publish", out, "--repo", "org/faces", "--token", TOKEN) == 2
    err = capsys.readouterr().err
    assert err.startswith("facegen: error: refusing to publish")
    for expected in ("`license_link: LICENSE` but that file is missing",
                     "data/train/train-000001.tar: not a complete tar",
                     "data/train/train-000002.tar: 6 images but its stats say 7",
                     "run.json counts 18 images but the shard stats add up to 19",
                     "data/train/train-000003.tar.tmp: not a shard of this build"):
        assert expected in err
    assert hub.requests == []


def test_load_check_catches_a_value_that_does_not_fit_its_declared_type(tmp_path):
    out = write_output_folder(tmp_path / "out", identities=4, shard_size=2)

    def bad_json(name, data):
        if name == "000003_001.json":
            meta = json.loads(data)
            meta["image_index"] = "not a number"  # declared int32
            return json.dumps(meta).encode()
        return data

    _rewrite_shard(out, 1, bad_json)
    problems = check_folder(out)
    assert len(problems) == 1 and problems[0].startswith("load_dataset(OUT, streaming=True) fails")


def test_check_folder_on_a_card_out_of_date(tmp_path):
    out = write_output_folder(tmp_path / "out", identities=4, shard_size=2)
    run = json.loads((out / ".facegen" / "run.json").read_text())
    run["features"]["json"]["extra_field"] = {"dtype": "string", "_type": "Value"}
    (out / ".facegen" / "run.json").write_text(json.dumps(run))
    assert check_folder(out) == ["README.md declares other columns than .facegen/run.json (run `facegen card OUT`)"]
    (out / "README.md").write_text("---\nlicense: [unclosed\n---\n# x\n")
    problems = check_folder(out)
    assert len(problems) == 1 and "YAML front matter does not parse" in problems[0]


def test_mask_removes_tokens():
    assert publish_module.mask(f"bad {TOKEN} and hf_abcdefghij123", TOKEN) == "bad hf_*** and hf_***"


RECIPES = sorted((Path(__file__).parent.parent / "facegen" / "builders" / "recipes").glob("*.yaml"))


def _fixture_source(source: str, root: Path) -> Path | None:
    """A tiny fixture in the published layout of a recipe's source (None when facegen has no fixture for it)."""
    if source == "digiface":
        from facegen.testing.digiface import write_digiface_part

        write_digiface_part(root, ids=range(3), images_per_identity=2)
        return root
    if source == "sfhq":
        from facegen.testing.sfhq import write_sfhq_source

        write_sfhq_source(root, parts=(1,), images_per_part=3, size=64)
        return root
    if source == "disco":
        from facegen.testing.disco import write_disco_source

        write_disco_source(root, identities=2, augmentations=2)
        return root
    return None


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_a_real_build_of_each_recipe_passes_the_publish_checks(recipe, tmp_path, hub):
    values = yaml.safe_load(recipe.read_text())
    if values["plugin"] != "passthrough":
        pytest.skip("a generative recipe needs models and files from earlier steps (see the arc2face test below)")
    source = values["source"]
    src = _fixture_source(source, tmp_path / "src")
    if src is None:
        pytest.skip(f"no fixture source for {source!r}")
    out = tmp_path / "out"
    assert cli("build", "--recipe", recipe.stem, "--source-path", src, "--out", out) == 0
    assert check_folder(out) == []  # card, licence, tars, counts, and load_dataset(streaming) with every extra
    assert cli("publish", out, "--repo", f"org/{recipe.stem}", "--token", TOKEN) == 0
    committed = sorted(hub.repos[f"org/{recipe.stem}"]["branches"]["main"])
    assert committed == [f.path for f in files_to_upload(out)]
    assert "README.md" in committed and any(p.startswith("data/train/") for p in committed)


@pytest.mark.slow
def test_an_arc2face_build_with_tiny_models_passes_the_publish_checks(tmp_path):
    """A generative transform's output (models, quality figures, non-commercial inputs) through card and checks."""
    from conftest import run_facegen
    from facegen.testing.arc2face import write_tiny_arc2face

    tiny = write_tiny_arc2face(tmp_path / "tiny")
    src = write_folder_source(tmp_path / "src", identities=3, images_per_identity=2)
    out = tmp_path / "out"
    args = ["build", "--source", "folder", "--source-path", src, "--plugin", "arc2face", "--out", out,
            "--shard-size", 2, "--shard-samples", 3]
    for opt in (f"model_dir={tiny}", "steps=2", "latents=1", "images_per_latent=2", "batch_size=2"):
        args += ["--plugin-opt", opt]
    run_facegen(*args, env={"HF_HUB_OFFLINE": "1"}, check=True)
    assert check_folder(out) == []
    meta = yaml.safe_load((out / "README.md").read_text().split("---\n", 2)[1])
    text = (out / "README.md").read_text()
    # the folder source declares no licence, so the terms are unknown; every model is listed with its own terms
    assert meta["license"] == "other" and meta["license_name"] == "undeclared" and "is not declared" in text
    licence = (out / "LICENSE").read_text()
    assert "FoivosPar/Arc2Face" in licence and "insightface" in licence and "Commercial use: no" in licence
    assert "| `cosine_to_prototype` |" in text  # the transform's quality figure is summarised
    proc = run_facegen("publish", out, "--repo", "org/digi2real-test", "--dry-run", check=True)
    assert "data/train/train-000001.tar" in proc.stdout and "dry run: nothing was uploaded" in proc.stdout


def test_a_shard_changed_after_a_real_build_is_refused(tmp_path):
    """The run records each shard's checksum; a byte flipped inside an image (same size, still a tar) is caught."""
    src = write_folder_source(tmp_path / "src", identities=4, images_per_identity=2)
    out = tmp_path / "out"
    assert cli("build", "--source", "folder", "--source-path", src, "--plugin", "passthrough", "--out", out,
               "--shard-size", "2") == 0
    assert check_folder(out) == []
    stats = json.loads((out / ".facegen" / "shards" / "000000.json").read_text())
    tar_path = out / stats["tar"]
    assert stats["tar_xxh3_128"] == xxhash.xxh3_128(tar_path.read_bytes()).hexdigest()
    data = bytearray(tar_path.read_bytes())
    data[2000] ^= 0xFF  # inside the first PNG's data, past its 512-byte header
    tar_path.write_bytes(bytes(data))
    problems = check_folder(out)
    assert any("checksum (XXH3-128) differs" in p for p in problems), problems
