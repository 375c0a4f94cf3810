"""Issue 18 (§2-§5, §8): the surfaces around a build held to its standard. Publish uploads exactly what facegen
wrote; nothing local reaches a card; a card is input, checked before anything runs; report and curate never change
the user's files or a refused command's inputs; messages say what is true ("no such folder", "1 shard").

Each hostile case has its own fixture; the memory case is measured on a real child process (its own VmHWM)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import cli, run_cli
from facegen.errors import CheckFailed, UsageError
from facegen.layout.records import own_files, write_own_files
from facegen.testing.folder import write_folder_source
from facegen.testing.output import write_output_folder


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """One real passthrough build (6 identities x 2 images, 2 shards), copied by each test that changes it."""
    root = tmp_path_factory.mktemp("trust")
    src = write_folder_source(root / "src", identities=6, images_per_identity=2, size=48)
    assert cli("build", "--source", "folder", "--source-path", src, "--plugin", "passthrough", "--out",
               root / "out", "--shard-samples", 6) == 0
    return root


@pytest.fixture
def built(template, tmp_path):
    shutil.copytree(template / "out", tmp_path / "out")
    return tmp_path / "out"


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("facegen: error:")]
    assert len(lines) == 1, err
    return lines[0]


def publish_dry_run(out, capsys) -> tuple[int, str]:
    code, _, err = run_cli(["publish", out, "--repo", "org/faces", "--dry-run"], capsys)
    return code, err


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` with its bytes and modification time."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ §2 publish


@pytest.mark.parametrize("name", ["LICENSE.txt", "LICENSE-key", "report/private-notes.txt", "notes.txt",
                                  "data/train/extra.tar", "provenance/identities.txt"])
def test_publish_refuses_a_file_facegen_did_not_write(built, capsys, name):
    (built / name).parent.mkdir(parents=True, exist_ok=True)
    (built / name).write_text("MIT License: commercial use allowed\n")
    code, err = publish_dry_run(built, capsys)
    assert code == 2 and f"{name} was not written by facegen" in one_error_line(err)


@pytest.mark.parametrize("name, rerun", [("README.md", "`facegen card OUT`"),
                                         ("provenance/checksums.json", "`facegen card OUT`"),
                                         ("_info.json", "the build command")])
def test_publish_refuses_a_file_changed_since_facegen_wrote_it(built, capsys, name, rerun):
    path = built / name
    path.write_bytes(path.read_bytes().replace(b"\n", b"\n\n", 1) + b"Licence: MIT. Free for commercial use.\n")
    code, err = publish_dry_run(built, capsys)
    assert code == 2 and f"{name} changed since facegen wrote it: rerun {rerun}" in one_error_line(err)


def test_publish_refuses_hard_and_symbolic_links(built, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("a secret\n")
    os.link(built / "provenance" / "checksums.json", tmp_path / "another-name.json")
    code, err = publish_dry_run(built, capsys)
    assert code == 2 and "provenance/checksums.json has 2 names (a hard link)" in one_error_line(err)
    (tmp_path / "another-name.json").unlink()
    (built / "report").mkdir()
    (built / "report" / "consistency.png").symlink_to(secret)
    code, err = publish_dry_run(built, capsys)
    assert code == 2 and "report/consistency.png is a symbolic link" in one_error_line(err)


def test_a_damaged_shard_stays_a_failed_check(built, capsys):
    shard = built / "data" / "train" / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, err = publish_dry_run(built, capsys)
    assert code == 1 and "checksum (XXH3-128) differs from its stats" in err


HOLD_LOCK = """
import sys, time
from facegen.builders.engine.lock import OutputLock
OutputLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_publish_and_card_wait_for_a_live_build(built, capsys):
    """A live process holding the folder's lock (as a build does): publish and card stop in one line, exit 2,
    naming no option they do not have, and change nothing."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(built)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        before = (built / "README.md").read_bytes()
        for command in (["publish", built, "--repo", "org/faces", "--token", "hf_x" * 4],
                        ["card", built, "--repo", "org/other"]):
            code, _, err = run_cli(command, capsys)
            line = one_error_line(err)
            assert code == 2 and "is being built by another facegen process" in line, line
            assert "--break-lock" not in line
        assert (built / "README.md").read_bytes() == before
    finally:
        holder.kill()
        holder.wait()


def test_overwrite_removes_every_file_facegen_wrote_and_keeps_the_users(built, tmp_path, capsys):
    write_own_files(built, {"report/consistency.png": b"old plot", "report/separability.png": b"old plot 2"})
    (built / "report" / "mine.png").write_bytes(b"the user's")
    other = write_folder_source(tmp_path / "other", identities=3, images_per_identity=2, size=48, start=50)
    assert cli("build", "--source", "folder", "--source-path", other, "--plugin", "passthrough", "--out", built,
               "--overwrite") == 0
    assert sorted(p.name for p in (built / "report").iterdir()) == ["mine.png"]
    assert "report/consistency.png" not in own_files(built).files
    code, err = publish_dry_run(built, capsys)
    assert code == 2 and "report/mine.png was not written by facegen" in err


# ------------------------------------------------------------------------------------------ §3 nothing local


def test_relative_paths_never_reach_the_card(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_folder_source(Path("data/realfaces"), identities=4, images_per_identity=2, size=48)
    Path("lists").mkdir()
    Path("lists/ids.txt").write_text("0\n1\n3\n")
    args = ["build", "--source", "folder", "--source-path", "data/realfaces", "--plugin", "passthrough",
            "--identities-file", "lists/ids.txt", "--out", "out/faces"]
    monkeypatch.setattr(sys, "argv", ["facegen", *args])  # the card shows the command as it was typed
    assert cli(*args) == 0
    text = Path("out/faces/README.md").read_text()
    for local in ("data/realfaces", "out/faces", "lists/ids.txt", str(tmp_path)):
        assert local not in text, local
    assert ("facegen build --source folder --source-path '<folder source folder>' --plugin passthrough "
            "--identities-file provenance/identities.txt --out NEW") in text
    code, err = publish_dry_run("out/faces", capsys)
    assert code == 0, err


def test_the_command_as_it_was_run_names_no_folder_of_curate(tmp_path):
    """`facegen curate out/faces --out out/faces-curated2` as run.json records it (OUT and NEW absolute)."""
    from dataclasses import replace

    from facegen.cards.public import public_command_args
    from facegen.layout.records import load_run

    run = load_run(write_output_folder(tmp_path / "out", identities=2, shard_size=2, card=False))
    run = replace(run, command=["facegen", "curate", "out/faces", "--out=out/faces-curated2", "--max-removed", "0.9",
                                "--min-images", "2"],
                  options=replace(run.options, source_path="/work/out/faces", out="/work/out/faces-curated2"))
    assert public_command_args(run) == ["facegen", "curate", "<fixture source folder>", "--out=NEW",
                                        "--max-removed", "0.9", "--min-images", "2"]


def test_only_arguments_that_hold_a_path_are_replaced(tmp_path):
    """A recipe, a seed or a plugin name that happens to share its text with a folder's last name stays as typed:
    `--recipe digiface --source-path digiface` (the source folder named after its recipe), `--out 0 --seed 0`."""
    from dataclasses import replace

    from facegen.cards.public import public_command_args
    from facegen.layout.records import load_run

    run = load_run(write_output_folder(tmp_path / "out", identities=2, shard_size=2, card=False))
    run = replace(run, command=["facegen", "build", "--recipe", "fixture", "--source-path", "fixture", "--out", "0",
                                "--seed", "0", "--plugin", "fixture"],
                  options=replace(run.options, source_path="/work/fixture", out="/work/0"))
    assert public_command_args(run) == ["facegen", "build", "--recipe", "fixture", "--source-path",
                                        "<fixture source folder>", "--out", "NEW", "--seed", "0", "--plugin",
                                        "fixture"]


def test_publish_finds_a_recorded_path_in_the_text_it_uploads(built, capsys):
    from facegen.builders.hub.publish import check_folder
    from facegen.layout.records import load_run

    source = load_run(built).options.source_path
    readme = (built / "README.md").read_text()
    write_own_files(built, {"README.md": (readme + f"\nBuilt from {source}/0.\n").encode()})
    problems = check_folder(built, verify="header")
    assert problems == [f"README.md names the local path shown as <folder source folder> ({source}): nothing "
                        "published may name a local path (rerun `facegen card OUT`)"]


# ------------------------------------------------------------------------------------------ §4 a card is input


def card_folder(tmp_path: Path, record: dict, name: str = "card") -> Path:
    """A folder holding only a card whose `facegen:` record is ``record`` (as a stranger's clone would)."""
    folder = tmp_path / name
    folder.mkdir()
    meta = {"license": "mit", "facegen": record}
    (folder / "README.md").write_text("---\n" + yaml.safe_dump(meta) + "---\n# a card\n")
    return folder


GOOD = {"version": "0.1.0", "options": {"source": "folder", "source_path": "<folder source folder>",
                                        "plugin": "passthrough", "seed": 0, "shard_samples": 6}}


@pytest.mark.parametrize("field, value, said", [
    ("seed", "abc", "options.seed: expected int, got str"),
    ("seed", 1.5, "options.seed: expected int, got float"),
    ("seed", float("nan"), "options.seed: expected int, got float"),
    ("strict", "maybe", "options.strict: expected bool, got str"),
    ("shard_samples", "x", "options.shard_samples: expected int, got str"),
    ("shard_samples", 0, "options.shard_samples: must be at least 1"),
    ("source_opts", [1, 2], "options.source_opts: expected an object, got list"),
    ("plugin_opts", "abc", "options.plugin_opts: expected an object, got str"),
    ("models", "abc", "models: expected a list, got str"),
    ("models", [{"id": "a/b", "loaded": {"hub": "a/b", "commit": 5}}], "models['a/b'].loaded.commit: expected text"),
    ("models", [{"id": "a/b", "loaded": {"folder": "b", "sha256": {"w.bin": "x"}}}],
     "models['a/b'].loaded.sha256.w.bin: expected 64 hexadecimal digits"),
    ("plan", [1, 2], "plan: expected an object, got list"),
    ("provenance", [1, {"a": "b"}], "provenance[0]: expected str, got int"),
    ("provenance", ["../../etc/passwd"], "'../../etc/passwd' is not a provenance file"),
    ("provenance", ["/etc/passwd"], "'/etc/passwd' is not a provenance file"),
])
def test_every_field_of_a_card_is_checked_before_anything_runs(tmp_path, capsys, field, value, said):
    record = json.loads(json.dumps(GOOD))
    (record if field in ("models", "plan", "provenance") else record["options"])[field] = value
    src = write_folder_source(tmp_path / "src", identities=2, images_per_identity=1, size=48)
    code, _, err = run_cli(["build", "--from-card", card_folder(tmp_path, record), "--source-path", src, "--out",
                            tmp_path / "new"], capsys)
    line = one_error_line(err)
    assert code == 2 and "the card's facegen record is not valid" in line and said in line, line
    assert not (tmp_path / "new").exists()


def test_a_card_model_may_record_more_text_facts_than_facegens_own():
    """What a plugin's setup() recorded of a model it loaded (``ModelInfo.loaded``) reaches the card as it is; a
    card is refused for a value that is not text, not for a fact facegen's own plugins do not record."""
    from facegen.layout.records import CardBuild, RecordError

    record = {**GOOD, "models": [{"id": "a/b", "loaded": {"hub": "a/b", "commit": "c" * 40, "variant": "fp16"}}]}
    assert CardBuild.from_dict(record).models[0].loaded["variant"] == "fp16"
    record["models"][0]["loaded"]["variant"] = ["fp16"]
    with pytest.raises(RecordError, match=r"loaded.variant: expected text, got list"):
        CardBuild.from_dict(record)


def test_a_card_never_chooses_a_local_path_or_file(tmp_path, capsys):
    secret = tmp_path / "hostname"
    secret.write_text("secret-host-name\n")
    record = {"options": {"source": "folder", "source_path": str(tmp_path / "src"), "plugin": "passthrough"}}
    write_folder_source(tmp_path / "src", identities=2, images_per_identity=1, size=48)
    code, _, err = run_cli(["build", "--from-card", card_folder(tmp_path, record), "--out", tmp_path / "n"], capsys)
    assert code == 2 and "the card's build read a local folder: pass --source-path" in one_error_line(err)
    record["options"]["identities_file"] = str(secret)
    code, out, err = run_cli(["build", "--from-card", card_folder(tmp_path, record, "card2"), "--source-path",
                              tmp_path / "src", "--out", tmp_path / "n"], capsys)
    assert code == 2 and "identity list that is not published with the card" in one_error_line(err)
    assert "secret-host-name" not in out + err and not (tmp_path / "n").exists()


def test_a_malformed_checksums_file_or_readme_is_one_line_before_the_rebuild(tmp_path, capsys):
    src = write_folder_source(tmp_path / "src", identities=2, images_per_identity=1, size=48)
    card = card_folder(tmp_path, {**GOOD, "provenance": ["provenance/checksums.json"]})
    (card / "provenance").mkdir()
    (card / "provenance" / "checksums.json").write_text("[1, 2]")
    code, _, err = run_cli(["build", "--from-card", card, "--source-path", src, "--out", tmp_path / "n"], capsys)
    assert code == 2 and "is not a facegen checksums file" in one_error_line(err) and not (tmp_path / "n").exists()
    (card / "README.md").write_bytes(b"---\nlicense: mit\n---\n\xff\xfe not UTF-8\n")
    code, _, err = run_cli(["build", "--from-card", card, "--source-path", src, "--out", tmp_path / "n"], capsys)
    assert code == 2 and "is not UTF-8 text" in one_error_line(err)


BOMB = "".join([f"a0: &a0 [{','.join(['lol'] * 9)}]\n"]
               + [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10)])

MEASURED = """
import atexit, sys
from pathlib import Path
peak = Path(sys.argv[1])
atexit.register(lambda: peak.write_text(next(l for l in Path("/proc/self/status").read_text().splitlines()
                                             if l.startswith("VmHWM:")).split()[1]))
from conftest import cli
codes = [cli(*args.split("|")) for args in sys.argv[2:]]
print(codes)
"""


def test_alias_bomb_cards_are_one_line_in_bounded_memory(tmp_path):
    """A billion-laughs card (9**10 strings from 10 lines) as --from-card and as the parent card of the facegen
    source: each refused in one line, the child's peak memory that of an ordinary command (the issue measured
    2.9 GB and 1.5-2.0 GB)."""
    card = tmp_path / "card"
    card.mkdir()
    (card / "README.md").write_text(f"---\n{BOMB}facegen:\n  options: *a9\n---\n")
    parent = write_output_folder(tmp_path / "parent", identities=2, shard_size=2)
    readme = (parent / "README.md").read_text()
    (parent / "README.md").write_text(readme.replace("---\n", f"---\n{BOMB}", 1).replace("license: other",
                                                                                     "license: *a9", 1))
    peak = tmp_path / "peak"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", MEASURED, str(peak),
                           f"build|--from-card|{card}|--out|{tmp_path / 'new'}",
                           f"build|--source|facegen|--source-path|{parent}|--plugin|passthrough|--out|"
                           f"{tmp_path / 'child'}"],
                          capture_output=True, text=True, cwd=Path(__file__).parent, timeout=300)
    seconds = time.perf_counter() - started
    assert proc.stdout.strip().splitlines()[-1] == "[2, 2]", proc.stderr
    assert proc.stderr.count("the YAML front matter holds an alias (*a0, line 2)") == 2, proc.stderr
    rss = int(peak.read_text()) * 1024
    print(f"alias bombs: peak RSS of the child {rss / 1e6:.0f} MB, {seconds:.1f} s")
    assert rss < 600e6 and not (tmp_path / "new").exists() and not (tmp_path / "child").exists()


def test_a_parent_card_field_of_the_wrong_type_is_one_line(tmp_path, capsys):
    parent = write_output_folder(tmp_path / "parent", identities=2, shard_size=2)
    readme = (parent / "README.md").read_text()
    (parent / "README.md").write_text(readme.replace("pretty_name: ", "pretty_name:\n- a\n- b\nold_name: ", 1))
    code, _, err = run_cli(["build", "--source", "facegen", "--source-path", parent, "--plugin", "passthrough",
                            "--out", tmp_path / "child"], capsys)
    assert code == 2 and "has a list as `pretty_name`, which must be text" in one_error_line(err)


def test_a_label_past_int64_is_a_skipped_sample(tmp_path, capsys):
    from datasets import load_dataset

    from test_publish import _rewrite_shard

    parent = write_output_folder(tmp_path / "parent", identities=4, shard_size=2)
    _rewrite_shard(parent, 0, lambda name, data: str(2**70).encode() if name == "000000_001.cls" else data)
    assert cli("build", "--source", "facegen", "--source-path", parent, "--plugin", "passthrough", "--out",
               tmp_path / "child") == 0
    rows = list(load_dataset(str(tmp_path / "child"), split="train", streaming=True))
    assert len(rows) == 11 and max(r["json"]["parent_cls"] for r in rows) == 3
    run = json.loads((tmp_path / "child" / ".facegen" / "run.json").read_text())
    assert run["source"]["provenance"]["parent_unreadable"] == {"bad label": 1}


def test_models_are_pinned_to_the_card_and_checked_before_anything_is_generated():
    from facegen.api import ModelInfo
    from facegen.builders.hub.from_card import CardRecord, build_values, models_check

    sd, arc = "stable-diffusion-v1-5/stable-diffusion-v1-5", "FoivosPar/Arc2Face"
    record = CardRecord("org/x", {"source": "seeds", "plugin": "arc2face", "plugin_opts": {"steps": 2}},
                        models=[{"id": sd, "role": "VAE", "loaded": {"hub": sd, "commit": "c0ffee"}},
                                {"id": arc, "role": "UNet", "loaded": {"hub": arc, "commit": "beef"}}])
    values = build_values(record, {"plugin_opts": {"arc2face_revision": "mine"}})
    assert values["plugin_opts"] == {"steps": 2, "base_revision": "c0ffee", "arc2face_revision": "mine"}
    local = CardRecord("card", {}, models=[{"id": sd, "role": "VAE",
                                            "loaded": {"folder": "sd", "sha256": {"vae.bin": "a" * 64}}}])
    check = models_check(local)
    check([ModelInfo(sd, role="VAE", loaded={"folder": "sd", "sha256": {"vae.bin": "a" * 64}})])
    with pytest.raises(CheckFailed, match="stopped before generating anything: model .*: vae.bin has sha256 bbbbb"):
        check([ModelInfo(sd, role="VAE", loaded={"folder": "sd", "sha256": {"vae.bin": "b" * 64}})])


# ------------------------------------------------------------------------------------------ §5 the user's files


def test_report_writes_only_its_own_files(built, tmp_path, capsys):
    (built / "report").mkdir()
    (built / "report" / "consistency.png").write_bytes(b"the user's plot")
    before = snapshot(built)
    code, _, err = run_cli(["report", built], capsys)
    assert code == 2 and "report/consistency.png was not written by facegen" in one_error_line(err)
    assert snapshot(built) == before
    elsewhere = tmp_path / "reports"
    elsewhere.mkdir()
    (elsewhere / "report.json").write_text('{"mine": true}')
    code, _, err = run_cli(["report", built, "--out", elsewhere], capsys)
    assert code == 2 and "report.json was not written by facegen" in one_error_line(err)
    assert (elsewhere / "report.json").read_text() == '{"mine": true}'


class SameFace:
    """A recogniser that sees the same face in every image (cartoon faces through a real-face threshold)."""

    name, model, dim = "dlib", "same face", 8

    def identity(self):
        return {"name": self.name, "model": self.model}

    def crop(self, image_rgb):
        return image_rgb

    def embed_crops(self, crops):
        return np.ones((len(crops), self.dim), np.float32) / np.sqrt(self.dim)


def test_a_refused_curate_changes_nothing_anywhere(built, tmp_path, monkeypatch, capsys):
    from facegen.builders.quality import report

    monkeypatch.setattr(report, "make_recognizer", lambda *a, **k: SameFace())
    before = snapshot(built)
    new = tmp_path / "curated"
    code, _, err = run_cli(["curate", built, "--out", new], capsys)
    line = one_error_line(err)
    assert code == 2 and "curation would remove 5 of 6 identities (83%), more than --max-removed 0.5" in line
    assert snapshot(built) == before and not new.exists()
    code, stdout, err = run_cli(["curate", built, "--out", new, "--max-removed", "0.9"], capsys)
    assert code == 0, err
    assert "keeping 1 of 6 identities" in stdout and snapshot(built) == before  # OUT is never written to
    assert (new / ".facegen" / "parent-report" / "report.json").is_file()
    # other decisions in the same folder: refused before anything changes there
    curated = snapshot(new)
    code, _, err = run_cli(["curate", built, "--out", new, "--max-removed", "0.9", "--min-images", "3"], capsys)
    assert code == 2 and ("curation would remove all 6 identities" in err or "--overwrite" in err)
    assert snapshot(new) == curated


@pytest.mark.parametrize("content, said", [
    ("[1, 2]", "expected an object, got list"),
    ('{"removed": ["0"]}', "holds neither removed_identities nor removed_samples"),
    ('{"removed_identities": [1]}', "removed_identities[0]: expected an object, got int"),
    ('{"removed_identities": "0"}', "removed_identities: expected a list, got str"),
    ('{"removed_samples": [{"identity": "0"}]}', "removed_samples[0] has no 'key' string"),
    ("\xff\xfe", "is not valid JSON"),
])
def test_a_malformed_curation_file_is_one_line(tmp_path, capsys, content, said):
    parent = write_output_folder(tmp_path / "parent", identities=2, shard_size=2)
    curation = tmp_path / "curation.json"
    curation.write_bytes(content.encode("latin-1"))
    code, _, err = run_cli(["build", "--source", "facegen", "--source-path", parent, "--source-opt",
                            f"curation={curation}", "--plugin", "passthrough", "--out", tmp_path / "new"], capsys)
    line = one_error_line(err)
    assert code == 2 and "cannot read curation file" in line and said in line, line
    assert not (tmp_path / "new" / "data").exists()


def test_report_and_curate_on_a_full_disk_are_one_line(built, tmp_path, monkeypatch, capsys):
    """A folder that cannot take what report or curate writes (ENOSPC here; EROFS and a quota alike): one line,
    exit 2, and the dataset unchanged."""
    import errno

    from facegen.builders.quality import report

    monkeypatch.setattr(report, "make_recognizer", lambda *a, **k: SameFace())
    full = tmp_path / "full"
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):  # every file written under `full` finds the disk full
        if str(dst).startswith(str(full)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    before = snapshot(built)
    code, _, err = run_cli(["report", built, "--out", full / "reports"], capsys)
    line = one_error_line(err)
    assert code == 2 and f"cannot write the report in {full / 'reports'}: No space left on device" in line, line
    code, _, err = run_cli(["curate", built, "--out", full / "curated", "--max-removed", "0.9"], capsys)
    line = one_error_line(err)
    assert code == 2 and "cannot write the curation's records in" in line and "No space left" in line, line
    assert snapshot(built) == before


# ------------------------------------------------------------------------------------------ §8 messages


def test_a_missing_path_is_no_such_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    for command in (["report", "out/nope"], ["card", "out/nope"], ["publish", "out/nope", "--repo", "org/x"],
                    ["report", "nope"], ["curate", "out/nope", "--out", "x"]):
        code, _, err = run_cli(command, capsys)
        assert code == 2 and "no such folder" in one_error_line(err), (command, err)


def test_against_takes_a_plain_identity_folder(template, built, monkeypatch, capsys):
    from facegen.builders.quality import report

    class Pixels(SameFace):
        model, dim = "pixels", 6 * 6 * 3  # every eighth pixel of a 48x48 image

        def embed_crops(self, crops):  # the same image gives the same vector: an identity matches its own images
            vectors = np.stack([np.asarray(c, np.float32)[::8, ::8].ravel() - 128 for c in crops])
            return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    monkeypatch.setattr(report, "make_recognizer", lambda *a, **k: Pixels())
    evaluation = template / "evaluation"
    if not evaluation.exists():
        evaluation.mkdir()
        for identity in ("1", "4"):
            shutil.copytree(template / "src" / identity, evaluation / identity)
    code, _, err = run_cli(["report", built, "--against", evaluation, "--dedup", "0.9999"], capsys)
    assert code == 0, err
    against = json.loads((built / ".facegen" / "report.json").read_text())["against"]
    assert against["dataset"] == "evaluation" and against["identities"] == 2
    assert sorted(m[0] for m in against["matches"]) == ["1", "4"]


def test_counts_read_right():
    from facegen.builders.engine.finish import Summary
    from facegen.messages import count, skipped_line

    assert [count(1, "shard"), count(2, "identity"), count(1, "unit of work"), count(3, "unit of work")] == [
        "1 shard", "2 identities", "1 unit of work", "3 units of work"]
    lines = "\n".join(Summary(identities=1, images=1, shards=1, shards_written=1, images_written=1, seconds=1.0,
                              out="x").lines())
    assert "1 image in 1 shard written now" in lines and "shards" not in lines.split("\n", 2)[2]
    assert skipped_line(["corrupt image"]) == "skipped 1 image (corrupt image: 1)"
    assert skipped_line(["no face", "corrupt image", "no face"]) == ("skipped 3 images (corrupt image: 1, "
                                                                      "no face: 2)")


# ------------------------------------------------------------------------------------------ provenance bytes


def test_a_shift_estimate_is_the_same_bytes_on_every_save(tmp_path):
    from facegen.builders.quality.shift import ShiftEstimate

    estimate = ShiftEstimate(np.ones((3, 4), np.float32), np.zeros((3, 4)), np.ones((3, 4)), {"folder:/a": 2},
                             {"digiface:/b": 3}, [], {f"model_{i}": str(i) for i in range(12)},
                             {"seed": "0", "max_images": "8"}, 1)
    saved = set()
    for i in range(4):
        estimate.save(tmp_path / f"{i}.safetensors")
        saved.add((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(saved) == 1
    data = saved.pop()
    metadata = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    assert list(metadata) == sorted(metadata) and metadata["real_sources"] == "folder:/a (2 images)"
