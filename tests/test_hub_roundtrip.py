"""`facegen publish` then `load_dataset("org/x")`, end to end over HTTP against the Hub stand-in.

Loading runs in subprocesses with ``HF_ENDPOINT`` pointing at the stand-in (huggingface_hub and datasets read it at
import; datasets' file systems are cached per process), each with its own empty ``HF_HOME``; so does an upload that
is killed. The other facegen commands run in this process, with huggingface_hub's constants pointed at the stand-in
as ``HF_ENDPOINT`` and ``HF_HOME`` would (`HubStandIn.serve_this_process`). The real clients' upload path
(preupload, NDJSON commits, LFS, settings, tree listings) and loading path (resolve with its headers, revision info,
tree, paths-info, redirects) run unchanged.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import yaml

from conftest import BIN, cli, facegen
from facegen.testing.folder import write_folder_source
from hub_standin import HubStandIn

TOKEN = "hf_RoundTripToken0123456789abcdef"

# Prints one JSON line per row: key, cls, json, sha256 of the image bytes (the image is not decoded).
LOADER = r"""
import hashlib, json, sys
import datasets
from datasets import Image, load_dataset

repo, streaming = sys.argv[1], sys.argv[2] == "stream"
ds = load_dataset(repo, split="train", streaming=streaming)
ds = ds.cast_column("png", Image(decode=False))
for row in ds:
    print(json.dumps({"key": row["__key__"], "cls": row["cls"], "json": row["json"],
                      "png": hashlib.sha256(row["png"]["bytes"]).hexdigest()}, sort_keys=True))
"""


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The stand-in; facegen commands run in this process talk to it, with TOKEN and their own HF_HOME."""
    with HubStandIn(tokens=(TOKEN,)) as standin:
        standin.serve_this_process(monkeypatch, tmp_path / "hf-home", TOKEN)
        yield standin


def hub_env(hub, tmp_path, token=TOKEN, **extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_DATASETS_CACHE", "HF_HUB_CACHE")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_UPDATE_DOWNLOAD_COUNTS="0", HF_HUB_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="1", **extra)
    if token:
        env["HF_TOKEN"] = token
    return env


def publish(out, *args):
    """`facegen publish OUT ARGS` in this process, to the stand-in of the `hub` fixture."""
    return facegen("publish", out, *args)


def load_rows(hub, tmp_path, repo, streaming=False, token=TOKEN, cache="cache"):
    env = hub_env(hub, tmp_path / cache, token)
    return subprocess.run([sys.executable, "-c", LOADER, repo, "stream" if streaming else "download"],
                          capture_output=True, text=True, env=env, timeout=600)


def local_rows(out):
    """The same rows read straight from the local shards."""
    rows = {}
    for tar_path in sorted((out / "data" / "train").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                row = rows.setdefault(key, {"key": key})
                if ext == "png":
                    row["png"] = hashlib.sha256(data).hexdigest()
                elif ext == "cls":
                    row["cls"] = int(data)
                elif ext == "json":
                    row["json"] = json.loads(data)
    return sorted(rows.values(), key=lambda r: r["key"])


def parsed(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")),
                  key=lambda r: r["key"])


def same_rows(loaded, local):
    """Rows equal, json compared on the fields the shard holds (datasets fills declared fields with None)."""
    assert [r["key"] for r in loaded] == [r["key"] for r in local]
    for got, want in zip(loaded, local):
        assert got["png"] == want["png"] and got["cls"] == want["cls"]
        assert {k: got["json"][k] for k in want["json"]} == want["json"]


def build(tmp_path, name="out", identities=6, images=2, shard_samples=4, extra=()):
    src = tmp_path / "src"
    if not src.exists():
        write_folder_source(src, identities=identities, images_per_identity=images, size=48)
    out = tmp_path / name
    assert cli("build", "--source", "folder", "--source-path", src, "--plugin", "passthrough", "--out", out,
               "--shard-samples", shard_samples, *extra) == 0
    return out


@pytest.mark.slow
def test_publish_then_load_dataset_from_the_hub_equals_the_local_folder(tmp_path, hub, monkeypatch):
    ids = tmp_path / "ids.txt"
    ids.write_text("0\n1\n2\n4\n5\n")
    # 10 samples of at most 5 per shard would be 2 shards: --shards-multiple-of 3 makes 3, which the card must carry
    out = build(tmp_path, shard_samples=5, extra=("--identities-file", ids, "--shards-multiple-of", 3))
    proc = publish(out, "--repo", "org/x")
    assert proc.returncode == 0, proc.stderr
    local = local_rows(out)
    same_rows(parsed(load_rows(hub, tmp_path, "org/x")), local)
    same_rows(parsed(load_rows(hub, tmp_path, "org/x", streaming=True, cache="cache2")), local)
    # what the loaders asked for: the card, revision info, tree listings, each shard through resolve
    asked = {path for _, path, _ in hub.requests}
    assert "/datasets/org/x/resolve/main/README.md" in asked
    assert any(p.startswith("/api/datasets/org/x/tree/") for p in asked)
    assert any(p.endswith("/data/train/train-000002.tar") and "/resolve/" in p for p in asked)
    # timm's shard list names the repo's shards, relative to the repo root (where it lies: timm's --data-dir)
    remote = hub.files("org/x")
    info = json.loads(remote["_info.json"])["splits"]["train"]
    assert info["filenames"] == sorted(p for p in remote if p.startswith("data/")) and info["num_samples"] == 10

    # a second publish uploads nothing new
    commits = len(hub.commits("org/x"))
    proc = publish(out, "--repo", "org/x")
    assert proc.returncode == 0, proc.stderr
    assert len(hub.commits("org/x")) == commits

    # a stranger rebuilds it from the Hub card: options, identity list and checksums come from the repo
    ids.unlink()
    hub.serve_this_process(monkeypatch, tmp_path / "stranger" / "hf-home", TOKEN)  # an empty Hub cache
    proc = facegen("build", "--from-card", "org/x", "--source-path", tmp_path / "src", "--out", tmp_path / "rebuilt")
    assert proc.returncode == 0, proc.stderr
    assert "all 3 shards are byte-identical to the card's" in proc.stdout
    for shard in (out / "data" / "train").glob("*.tar"):
        assert (tmp_path / "rebuilt" / "data" / "train" / shard.name).read_bytes() == shard.read_bytes()


@pytest.mark.slow
def test_lfs_uploads_and_redirected_downloads(tmp_path, hub, monkeypatch):
    """Without hf_xet the client uploads large files through the LFS batch API; downloads follow the Hub's
    redirect with X-Linked-Etag/X-Linked-Size."""
    from huggingface_hub import constants

    hub.lfs_threshold = 20_000  # shards and the preview are LFS files, the card, LICENSE and _info.json regular
    out = build(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # HF_HUB_DISABLE_XET=1
    proc = publish(out, "--repo", "org/lfs")
    assert proc.returncode == 0, proc.stderr
    assert any(path == "/datasets/org/lfs.git/info/lfs/objects/batch" for _, path, _ in hub.requests)
    repo = hub.repos["org/lfs"]
    files = repo.files("main")
    assert files["data/train/train-000000.tar"].lfs and files["preview.jpg"].lfs
    assert not files["README.md"].lfs and not files["_info.json"].lfs
    same_rows(parsed(load_rows(hub, tmp_path, "org/lfs")), local_rows(out))
    assert any(path.startswith("/lfs-objects/") for _, path, _ in hub.requests)


@pytest.mark.slow
def test_gated_and_private_repos_load_with_a_token_and_fail_clearly_without(tmp_path, hub):
    out = build(tmp_path)
    # the folder source declares no licence: the card carries the access form and the repo is gated
    assert publish(out, "--repo", "org/gated").returncode == 0
    assert hub.repos["org/gated"].gated == "auto"
    meta = yaml.safe_load(hub.files("org/gated")["README.md"].decode().split("---\n", 2)[1])
    assert meta["extra_gated_fields"] and "not declared" in meta["extra_gated_prompt"]
    denied = load_rows(hub, tmp_path, "org/gated", token=None, cache="anon")
    assert denied.returncode != 0 and "DatasetNotFoundError" in denied.stderr
    assert "gated" in denied.stderr.lower()
    same_rows(parsed(load_rows(hub, tmp_path, "org/gated")), local_rows(out))

    assert publish(out, "--repo", "org/private", "--private", "--no-gating").returncode == 0
    assert hub.repos["org/private"].private and not hub.repos["org/private"].gated
    denied = load_rows(hub, tmp_path, "org/private", token=None, cache="anon2")
    assert denied.returncode != 0 and "DatasetNotFoundError" in denied.stderr
    assert "doesn't exist on the Hub or cannot be accessed" in denied.stderr
    same_rows(parsed(load_rows(hub, tmp_path, "org/private", cache="tok2")), local_rows(out))


@pytest.mark.slow
def test_republishing_a_rebuilt_dataset_deletes_the_shards_it_no_longer_has(tmp_path, hub):
    out = build(tmp_path, shard_samples=4)  # 12 samples: 3 shards
    assert publish(out, "--repo", "org/re").returncode == 0
    assert len([p for p in hub.files("org/re") if p.startswith("data/")]) == 3
    build(tmp_path, shard_samples=6, extra=("--overwrite",))  # the same folder rebuilt into 2 shards
    proc = publish(out, "--repo", "org/re")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p for p in hub.files("org/re") if p.startswith("data/")) == [
        "data/train/train-000000.tar", "data/train/train-000001.tar"]
    assert any("data/train/train-000002.tar" in c["deleted"] for c in hub.commits("org/re"))
    same_rows(parsed(load_rows(hub, tmp_path, "org/re", cache="after")), local_rows(out))


@pytest.mark.slow
def test_an_upload_of_2000_shards_killed_midway_is_completed_by_the_rerun(tmp_path, hub):
    out = build(tmp_path, identities=2000, images=1, shard_samples=1)
    files = sorted(p.relative_to(out).as_posix() for p in (out / "data" / "train").glob("*.tar"))
    assert len(files) == 2000
    hub.hold_commits_after = 2  # the third commit hangs: the upload is killed while it waits
    started = time.monotonic()
    proc = subprocess.Popen([str(BIN / "facegen"), "publish", str(out), "--repo", "org/big"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=hub_env(hub, tmp_path),
                            start_new_session=True)
    try:
        assert hub.held.wait(300), "the upload never reached its third commit"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first_run = time.monotonic() - started
    committed = {p for c in hub.commits("org/big") for p in c["added"]}
    assert 0 < len(committed) < 2000 and not {"README.md", "_info.json"} & committed
    hub.hold_commits_after = None
    hub.release()
    before = len(hub.commits("org/big"))
    rerun = publish(out, "--repo", "org/big")
    assert rerun.returncode == 0, rerun.stderr
    remote = hub.files("org/big")
    assert sorted(p for p in remote if p.startswith("data/")) == files
    assert all(remote[p] == (out / p).read_bytes() for p in files)
    # the rerun sent only what the killed run had not committed, and the card came last
    second = hub.commits("org/big")[before:]
    assert not {p for c in second for p in c["added"]} & committed
    # several commits, the card and timm's shard list last
    assert second[-1]["added"] == ["README.md", "_info.json"] and len(second) > 2
    print(f"2000 shards: killed after {len(committed)} committed files ({first_run:.1f} s); "
          f"rerun {len(hub.commits('org/big')) - 1} commits in all")
