"""`facegen publish` against the Hub stand-in (tests/hub_standin.py): real HTTP on 127.0.0.1, the real
huggingface_hub client (`constants.ENDPOINT` points at the stand-in for the test).

The stand-in keeps state like the Hub: repositories, branches, commits and each file's git oid, which is how
huggingface_hub 2.x skips files already committed when an interrupted upload is rerun.
"""

import json
import shutil
import tarfile
from pathlib import Path

import huggingface_hub
import huggingface_hub._upload_pipeline  # the commit budget the multi-commit test lowers; not imported by the package
import pytest
import xxhash
import yaml
from huggingface_hub import constants

from conftest import cli
from facegen.builders.hub import publish as publish_module
from facegen.builders.hub.publish import IGNORE_PATTERNS, check_folder, files_to_upload
from facegen.testing.folder import write_folder_source
from facegen.testing.output import RESEARCH_ONLY, write_output_folder
from hub_standin import HubStandIn

TOKEN = "hf_FakeTokenForTests0123456789abcdef"
SAVED = "hf_SavedLoginToken987654321"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The stand-in Hub for this test; no real login leaks in, and nothing reaches the real Hub."""
    with HubStandIn(tokens=(TOKEN, SAVED)) as standin:
        monkeypatch.setattr(constants, "ENDPOINT", standin.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-login" / "token"))
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
        yield standin


def api_calls(hub):
    """Requests other than huggingface_hub's anonymous `GET /api/agent-harnesses` probe."""
    return [r for r in hub.requests if r[1] != "/api/agent-harnesses"]


@pytest.fixture(scope="module")
def built_once(tmp_path_factory):
    """A real `facegen build`: 6 identities x 3 images in 3 shards (built once; tests change copies)."""
    root = tmp_path_factory.mktemp("built")
    src = write_folder_source(root / "src", identities=6, images_per_identity=3)
    assert cli("build", "--source", "folder", "--source-path", src, "--plugin", "passthrough", "--out",
               root / "out", "--shard-samples", 6) == 0
    return root / "out"


@pytest.fixture
def built(built_once, tmp_path):
    """A copy of the module's build in this test's folder, plus hidden leftovers (never uploaded)."""
    out = shutil.copytree(built_once, tmp_path / "out")
    (out / "data" / "train" / ".train-000009.tar.tmp-123").write_bytes(b"half a shard")  # a killed writer's file
    (out / ".DS_Store").write_bytes(b"finder")
    return out


SHARDS = ["data/train/train-000000.tar", "data/train/train-000001.tar", "data/train/train-000002.tar"]
PUBLISHED = sorted(["LICENSE", "README.md", "_info.json", "preview.jpg", "provenance/checksums.json", *SHARDS])
LAST = ["README.md", "_info.json"]  # the card and timm's shard list are committed after everything else
FIRST = sorted(p for p in PUBLISHED if p not in LAST)


def test_publish_commits_exactly_the_dataset_files(built, hub, capsys):
    assert cli("publish", built, "--repo", "org/faces", "--private", "--token", TOKEN) == 0
    repo = hub.repos["org/faces"]
    assert repo.private is True
    files = hub.files("org/faces")
    assert sorted(files) == PUBLISHED  # no .facegen/, no hidden temp shard, no .DS_Store
    for path in PUBLISHED:
        assert files[path] == (built / path).read_bytes()
    assert 'load_dataset("org/faces", split="train")' in files["README.md"].decode()  # the card names the repo
    # the shards first, the card last; the folder source declares no licence, so the repo is gated first
    assert [c["added"] for c in hub.commits("org/faces")[1:]] == [FIRST, LAST]
    assert repo.gated == "auto"
    paths = [path for _, path, _ in api_calls(hub)]
    assert paths[:2] == ["/api/repos/create", "/api/datasets/org/faces/settings"]
    assert paths.index("/api/datasets/org/faces/settings") < paths.index("/api/datasets/org/faces/commit/main")
    # every request was authenticated with the token, and the token was never printed
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in api_calls(hub))
    assert all(auth is None for _, path, auth in hub.requests if path == "/api/agent-harnesses")
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err
    assert "token: --token" in captured.out and "published:" in captured.out

    # publishing the unchanged folder again commits nothing new (every file's oid matches)
    commits = len(hub.commits("org/faces"))
    assert cli("publish", built, "--repo", "org/faces", "--token", TOKEN) == 0
    assert len(hub.commits("org/faces")) == commits


def test_no_gating_leaves_the_access_form_and_the_gate_out(built, hub):
    assert cli("publish", built, "--repo", "org/open", "--no-gating", "--token", TOKEN) == 0
    meta = yaml.safe_load(hub.files("org/open")["README.md"].decode().split("---\n", 2)[1])
    assert "extra_gated_fields" not in meta and "extra_gated_prompt" not in meta
    assert hub.repos["org/open"].gated is False
    assert not any(path.endswith("/settings") for _, path, _ in hub.requests)
    # the next publish without the flag gates it again
    assert cli("publish", built, "--repo", "org/open", "--token", TOKEN) == 0
    meta = yaml.safe_load(hub.files("org/open")["README.md"].decode().split("---\n", 2)[1])
    assert meta["extra_gated_fields"]["Country"] == "country" and hub.repos["org/open"].gated == "auto"


def test_dry_run_lists_files_and_target_and_contacts_nothing(built, hub, capsys):
    readme = (built / "README.md").read_bytes()
    (built / ".hidden").write_text("a hidden file at the top level\n")
    assert cli("publish", built, "--repo", "org/faces", "--dry-run") == 0
    out = capsys.readouterr().out
    assert hub.requests == [] and hub.repos == {}
    assert f"target: {hub.url}/datasets/org/faces (branch main" in out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == FIRST + LAST  # in upload order; no .hidden
    assert "token: none" in out and "dry run: nothing was uploaded" in out
    hf = next(line for line in out.splitlines() if line.startswith("same upload with the hf CLI"))
    assert f"hf upload org/faces {built} . --repo-type dataset --include 'LICENSE*' --include preview.jpg" in hf
    assert "--delete 'data/**'" in hf and hf.index("--include README.md") > hf.index("&&")
    legacy = next(line for line in out.splitlines() if line.startswith("with huggingface_hub 0.x"))
    first, second = legacy.split(": ", 1)[1].split(" && ")
    # argparse nargs="*": each flag once, with all its patterns, after the positionals
    for command in (first, second):
        assert command.startswith(f"huggingface-cli upload org/faces {built} . --repo-type dataset")
        assert command.count("--include") == 1 and command.count("--exclude") == 1
    assert "--include 'LICENSE*' preview.jpg 'data/**' 'provenance/**' 'report/**' --exclude" in first
    assert "--exclude '.facegen/**' '.*' '**/.*'" in first and "--include README.md _info.json" in second
    assert (built / "README.md").read_bytes() == readme  # a dry run changes nothing locally either


def test_files_to_upload_uses_the_same_matcher_as_upload_folder(built):
    (built / ".hidden").write_text("x")
    assert [f.path for f in files_to_upload(built)] == FIRST + LAST
    assert ".facegen/**" in IGNORE_PATTERNS


def test_rerun_after_a_failed_first_commit_completes(built, hub, capsys):
    hub.fail_commits = {1}
    assert cli("publish", built, "--repo", "org/faces", "--token", TOKEN) == 1
    err = capsys.readouterr().err
    assert "rerun the same command to resume" in err and TOKEN not in err and err.count("\n") == 1
    assert hub.files("org/faces") == {}
    assert cli("publish", built, "--repo", "org/faces", "--token", TOKEN) == 0
    assert sorted(hub.files("org/faces")) == PUBLISHED


def test_rerun_after_an_interrupted_multi_commit_upload_skips_what_was_committed(built, hub, monkeypatch, capsys):
    # a large folder is committed in several batches; make every file its own batch and kill the 4th commit
    monkeypatch.setattr(huggingface_hub._upload_pipeline, "REGULAR_CONTENT_BYTES_BUDGET", 1)
    hub.fail_commits = {4}
    assert cli("publish", built, "--repo", "org/faces", "--token", TOKEN) == 1
    first = [c["added"] for c in hub.commits("org/faces")[1:]]
    assert first == [["LICENSE"], ["data/train/train-000000.tar"], ["data/train/train-000001.tar"]]
    # an interrupted upload never looks complete: neither the card nor timm's shard list is there yet
    assert not set(LAST) & set(hub.files("org/faces"))
    assert cli("publish", built, "--repo", "org/faces", "--token", TOKEN) == 0
    second = [c["added"] for c in hub.commits("org/faces")[1 + len(first):]]
    # the rerun sends only the files not committed yet, and the repo ends complete and byte-exact
    assert sorted(p for c in second for p in c) == ["README.md", "_info.json", "data/train/train-000002.tar",
                                                    "preview.jpg", "provenance/checksums.json"]
    assert sorted(p for c in second[-2:] for p in c) == LAST  # the card and _info.json last
    files = hub.files("org/faces")
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
    assert all(auth == f"Bearer {TOKEN}" for _, path, auth in api_calls(hub))

    monkeypatch.delenv("HF_TOKEN")
    saved = tmp_path / "hf-home" / "token"
    saved.parent.mkdir()
    saved.write_text(SAVED + "\n")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(saved))
    hub.requests.clear()
    assert cli("publish", built, "--repo", "org/b") == 0
    out = capsys.readouterr().out
    assert "token: saved login" in out and SAVED not in out
    assert all(auth == f"Bearer {SAVED}" for _, path, auth in api_calls(hub))
    # each repo's card names that repo in its loading examples
    assert 'load_dataset("org/a", split="train")' in hub.files("org/a")["README.md"].decode()
    assert 'load_dataset("org/b", split="train")' in hub.files("org/b")["README.md"].decode()


def test_hub_error_is_one_masked_line(built, hub, capsys):
    hub.error_body = f"Invalid credentials in Authorization header: {TOKEN}"  # a server echoing the token back
    assert cli("publish", built, "--repo", "org/faces", "--token", TOKEN) == 1
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err
    assert captured.err.startswith("facegen: error: upload to org/faces failed") and captured.err.count("\n") == 1


def test_revision_commits_to_a_new_branch(built, hub):
    assert cli("publish", built, "--repo", "org/faces", "--revision", "v1", "--token", TOKEN) == 0
    assert hub.files("org/faces", "main") == {} and sorted(hub.files("org/faces", "v1")) == PUBLISHED
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
    assert cli("publish", out, "--repo", "org/faces", "--token", TOKEN) == 1  # the check publish exists to make
    err = capsys.readouterr().err
    assert err.startswith("facegen: error: refusing to publish")
    for expected in ("`license_link: LICENSE` but that file is missing",
                     "data/train/train-000001.tar: not a complete tar",
                     "data/train/train-000002.tar: 6 images but its stats say 7",
                     "run.json counts 18 images but the shard stats add up to 19"):
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


RECIPES = sorted((Path(__file__).parent.parent / "facegen" / "builders" / "engine" / "recipes").glob("*.yaml"))


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
    if source == "folder":  # file names in SynFace's pattern, which the other folder presets accept too
        from facegen.testing.folder import draw_face, encode

        for i, n in ((1, 1), (1, 2), (2, 1)):
            (root / f"{i:05d}").mkdir(parents=True, exist_ok=True)
            (root / f"{i:05d}" / f"{n:03d}_{i:05d}x0.700_(00042)x0.300.jpg").write_bytes(
                encode(draw_face(i, n, size=32), "jpg"))
        return root
    if source == "lmdb":
        from facegen.testing.vec2face import write_vec2face_lmdb

        return write_vec2face_lmdb(root / "set.lmdb", identities=2, images_per_identity=2)
    if source == "rec":
        return Path(__file__).parent / "fixtures" / "recordio" / "dcface"
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
    committed = sorted(hub.files(f"org/{recipe.stem}"))
    assert committed == sorted(f.path for f in files_to_upload(out))
    assert "README.md" in committed and any(p.startswith("data/train/") for p in committed)


@pytest.mark.slow
def test_an_arc2face_build_with_tiny_models_passes_the_publish_checks(tmp_path, tiny_arc2face):
    """A generative transform's output (models, quality figures, non-commercial inputs) through card and checks."""
    from conftest import facegen

    tiny = tiny_arc2face
    src = write_folder_source(tmp_path / "src", identities=3, images_per_identity=2)
    out = tmp_path / "out"
    args = ["build", "--source", "folder", "--source-path", src, "--plugin", "arc2face", "--out", out,
            "--shard-size", 2, "--shard-samples", 3]
    for opt in (f"model_dir={tiny}", "steps=2", "latents=1", "images_per_latent=2", "batch_size=2"):
        args += ["--plugin-opt", opt]
    facegen(*args, env={"HF_HUB_OFFLINE": "1"}, check=True)
    assert check_folder(out) == []
    meta = yaml.safe_load((out / "README.md").read_text().split("---\n", 2)[1])
    text = (out / "README.md").read_text()
    # the folder source declares no licence, so the terms are unknown; every model is listed with its own terms
    assert meta["license"] == "other" and meta["license_name"] == "undeclared" and "is not declared" in text
    licence = (out / "LICENSE").read_text()
    assert "FoivosPar/Arc2Face" in licence and "insightface" in licence and "Commercial use: no" in licence
    assert "| `cosine_to_prototype` |" in text  # the transform's quality figure is summarised
    # what was loaded, not a hard-coded default: the tiny folders by name with their weights' sha256, and the
    # random-weights marker at the top of the card; no local path anywhere publishable
    run = json.loads((out / ".facegen" / "run.json").read_text())
    loaded = {m["id"]: m["loaded"] for m in run["transform"]["models"]}
    assert loaded["FoivosPar/Arc2Face"]["folder"] == "arc2face" and "test_model" in loaded["FoivosPar/Arc2Face"]
    assert set(loaded["FoivosPar/Arc2Face"]["sha256"]) == {"arc2face/diffusion_pytorch_model.safetensors",
                                                           "encoder/pytorch_model.bin"}
    assert "| `FoivosPar/Arc2Face` | local folder `arc2face` (sha256 of its weights below) — **random test weights**" \
        in text
    assert "> **Test models: these images are noise.**" in text and "@451f4fe" not in text
    for f in files_to_upload(out):
        for local in (tmp_path, tiny):
            assert str(local).encode() not in (out / f.path).read_bytes(), (f.path, local)
    proc = facegen("publish", out, "--repo", "org/digi2real-test", "--dry-run", check=True)
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


def test_publish_refuses_a_licence_the_inputs_do_not_imply(tmp_path, hub, capsys):
    out = write_output_folder(tmp_path / "out", identities=4, shard_size=2, source_license=RESEARCH_ONLY)
    assert check_folder(out) == []
    readme = out / "README.md"
    original = readme.read_text()
    readme.write_text(original.replace("license: other\n", "license: mit\n", 1))
    problems = check_folder(out)
    assert "README.md: `license: mit` but the build's inputs imply `other` (run `facegen card OUT` to write the " \
           "licence they imply)" in problems
    readme.write_text(original)
    (out / "LICENSE").write_text("MIT License\n\nPermission is hereby granted, free of charge…\n")
    assert "LICENSE: its text is not the one the build's inputs imply" in " ".join(check_folder(out))
    assert cli("publish", out, "--repo", "org/x", "--dry-run") == 2  # not what facegen wrote: one line
    err = capsys.readouterr().err
    assert "LICENSE changed since facegen wrote it: rerun `facegen card OUT`" in err and hub.requests == []


def test_publish_checks_every_linked_file_and_the_info_file(tmp_path):
    out = write_output_folder(tmp_path / "out", identities=6, shard_size=2)
    (out / "preview.jpg").unlink()
    assert check_folder(out) == ["README.md links to preview.jpg, which is missing"]
    write_card_again(out)
    shards = [f"data/train/train-{i:06d}.tar" for i in range(3)]
    info = {"name": "x", "splits": {"train": {"name": "train", "num_samples": 18, "filenames": shards,
                                              "shard_lengths": [6, 6, 6]}}}
    (out / "_info.json").write_text(json.dumps(info))
    assert check_folder(out) == []
    assert "_info.json" in [f.path for f in files_to_upload(out)][-2:]  # uploaded with the card, last
    info["splits"]["train"].update(filenames=shards[:2] + ["data/train/train-000009.tar"],
                                   shard_lengths=[6, 5, 6], num_samples=17)
    (out / "_info.json").write_text(json.dumps(info))
    assert check_folder(out) == [
        "_info.json lists data/train/train-000009.tar, which is not a shard of this build",
        "_info.json does not list the shard data/train/train-000002.tar",
        "_info.json gives data/train/train-000001.tar 5 samples; it holds 6",
        "_info.json: num_samples 17, the shards hold 18"]
    (out / "_info.json").write_text("{}")
    assert check_folder(out)[0].startswith("_info.json: not timm's format")


def write_card_again(out):
    from facegen.cards import write_card

    write_card(out)


def test_dry_run_turns_the_gate_on_before_any_upload_command(built, hub, capsys):
    assert cli("publish", built, "--repo", "org/faces", "--dry-run") == 0
    lines = capsys.readouterr().out.splitlines()
    gate = next(i for i, line in enumerate(lines) if line.startswith("first create the repo and turn its gate on"))
    upload = next(i for i, line in enumerate(lines) if line.startswith("same upload with the hf CLI"))
    assert gate < upload and 'gated="auto"' in lines[gate]


def test_publish_refuses_symlinks_and_foreign_provenance_files(built, hub, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the dataset\n")
    (built / "LICENSE-extra").symlink_to(secret)
    (built / "provenance" / "notes.json").write_text("{}\n")
    assert cli("publish", built, "--repo", "org/faces", "--dry-run") == 2  # the user must move them: one line
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "LICENSE-extra is a symbolic link" in err and "1 other file like it" in err
    (built / "LICENSE-extra").unlink()
    assert cli("publish", built, "--repo", "org/faces", "--dry-run") == 2
    assert "provenance/notes.json was not written by facegen" in capsys.readouterr().err
    assert hub.requests == []


def test_card_refuses_a_repo_id_that_is_not_one(built, capsys):
    readme = (built / "README.md").read_bytes()
    assert cli("card", built, "--repo", "bad repo`; rm -rf ~") == 2
    assert "--repo" in capsys.readouterr().err
    assert (built / "README.md").read_bytes() == readme
