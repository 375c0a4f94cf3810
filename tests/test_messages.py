"""Messages a person can act on: readable skip reasons and where they are all listed, what a resumed build did,
Ctrl-C, a build that wrote nothing, --strict on a folder with skips, offline download, a wrong --source-path."""

import json
import os
import signal
import subprocess
import time

import datasets
import pytest

from conftest import BIN, run_cli
from facegen.builders.engine import writer
from facegen.testing.folder import write_folder_source


def build_args(src, out, *extra):
    return ["build", "--source", "folder", "--source-path", str(src), "--plugin", "passthrough", "--out", str(out),
            "--shard-size", "2", *map(str, extra)]


def error_lines(err):
    return [line for line in err.split("\n") if "facegen: error: " in line]


def test_skip_reasons_are_readable_and_all_listed(tmp_path, capsys, monkeypatch):
    src = write_folder_source(tmp_path / "src", identities=4, images_per_identity=2)
    for victim in ("0/0.png", "0/1.png", "3/1.png"):
        (src / victim).write_bytes(b"not an image at all")  # PIL: "cannot identify image file <_io.BytesIO …>"
    monkeypatch.setattr(writer, "MAX_FAILURES_LISTED", 1)  # the stats keep a few; the list keeps them all
    out = tmp_path / "out"
    code, stdout, err = run_cli(build_args(src, out, "--shard-samples", 3), capsys)  # 8 samples: 3 shards
    assert code == 0, err
    listed = out / ".facegen" / "skipped.jsonl"
    assert f"skipped 3 (corrupt image: 3); every skipped file is listed in {listed}" in stdout
    rows = [json.loads(line) for line in listed.read_text().splitlines()]
    # the samples are shuffled across the shards: each is listed once, by the shard it was planned in, in shard order
    assert sorted((r["ref"], r["reason"]) for r in rows) == [
        ("0/0.png", "corrupt image"), ("0/1.png", "corrupt image"), ("3/1.png", "corrupt image")]
    assert [r["shard"] for r in rows] == sorted(r["shard"] for r in rows)
    assert all(r["detail"] == "not a PNG or JPEG image (unrecognised bytes)" for r in rows)  # the image check's
    stats_files = sorted((out / ".facegen" / "shards").glob("*.json"))
    assert len(stats_files) == 3
    for path in stats_files:
        stats = json.loads(path.read_text())
        mine = [r for r in rows if r["shard"] == stats["shard"]]
        assert sum(stats["skipped"].values()) == len(mine) and len(stats["failures"]) == min(1, len(mine))
        assert [f["ref"] for f in stats["failures"]] == [r["ref"] for r in mine][:1]
        assert "object at 0x" not in path.read_text(), path
    for path in (listed, out / "README.md"):
        assert "object at 0x" not in path.read_text(), path


def test_a_skip_never_shows_an_object_repr():
    """Whatever a plugin puts in a Skip (an exception's text naming the object it was given) reads without memory
    addresses, which differ on every run and mean nothing in the card."""
    from facegen.records import Skip

    skip = Skip("0/0.png", "decode failed: <PIL.PngImagePlugin.PngImageFile object at 0x7f3a2c>",
                "cannot identify image file <_io.BytesIO object at 0x7f0badc0ffee>")
    assert (skip.reason, skip.detail) == ("decode failed:", "cannot identify image file")
    assert Skip("x", "corrupt image", "truncated").detail == "truncated"


def test_build_where_every_sample_is_skipped_is_not_done(tmp_path, capsys):
    src = write_folder_source(tmp_path / "src", identities=2, images_per_identity=2)
    for path in src.rglob("*.png"):
        path.write_bytes(path.read_bytes()[:40])
    (src / "1" / "1.png").write_bytes(b"GIF89a")
    out = tmp_path / "out"
    for _ in range(2):  # the rerun says the same
        code, stdout, err = run_cli(build_args(src, out), capsys)
        assert code == 2 and "done" not in stdout and "Traceback" not in err
        (line,) = error_lines(err)
        assert "no image was written to" in line and "all 4 samples were skipped (corrupt image: 4)" in line
        assert str(out / ".facegen" / "skipped.jsonl") in line
    assert not (out / "README.md").exists()  # no card for an empty dataset


def test_resumed_build_says_what_was_kept_and_what_was_done(tmp_path, capsys):
    src = write_folder_source(tmp_path / "src", identities=6, images_per_identity=2)
    out = tmp_path / "out"
    args = build_args(src, out, "--shard-samples", 4)  # 12 samples: 3 shards of 4
    code, stdout, err = run_cli(args, capsys)
    assert code == 0 and "12 images in 3 shards written now in" in stdout
    assert "shard 2: 4 images" in err and "images=" not in err  # the progress bar's count is the shard's
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0 and "nothing to do: all 3 shards (12 images) were already complete and kept" in stdout
    assert "0 images in" not in stdout
    (out / ".facegen" / "shards" / "000001.json").unlink()
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0
    assert "4 images in 1 shard written now in" in stdout and "8 images in 2 shards kept from an earlier run" in stdout


def test_strict_rerun_of_a_build_with_skips_is_not_a_strict_build(tmp_path, capsys):
    src = write_folder_source(tmp_path / "src", identities=4, images_per_identity=2, corrupt=1)
    out = tmp_path / "out"
    assert run_cli(build_args(src, out), capsys)[0] == 0
    readme = (out / "README.md").read_bytes()
    code, stdout, err = run_cli(build_args(src, out, "--strict"), capsys)
    assert code == 2 and "done" not in stdout
    (line,) = error_lines(err)
    assert "bad sample 0/1.png: corrupt image (in shard 0, kept from an earlier run without --strict" in line
    assert json.loads((out / ".facegen" / "run.json").read_text())["options"]["strict"] is False
    assert (out / "README.md").read_bytes() == readme  # the card never claims --strict


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_interrupted_build_says_how_to_resume(tmp_path, capsys, sig, code, word):
    # 80 samples re-encoded to JPEG in 40 shards: the signal comes after the first shard, while ~0.25 s of shards
    # are left (with 4 shards of small PNGs it was 25 ms, which a loaded machine's scheduler could let pass)
    src = write_folder_source(tmp_path / "src", identities=40, images_per_identity=2, size=448, noise=0)
    out = tmp_path / "out"
    args = build_args(src, out, "--shard-samples", 2, "--format", "jpg")
    proc = subprocess.Popen([str(BIN / "facegen"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    first = out / "data" / "train" / "train-000000.tar"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGSTOP)  # mid-build for sure: the signal waits until it continues
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"facegen: {word}: complete units of work and shards are kept; rerun the same command to resume" in err
    assert "Traceback" not in err and "done" not in stdout
    assert not (out / ".facegen" / "lock").exists()  # released on the way out
    assert not [p for p in (out / "data" / "train").iterdir() if p.name.startswith(".")]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0 and "already complete" in stdout, err
    assert datasets.load_dataset(str(out), split="train").num_rows == 80


def test_offline_download_names_no_missing_part_file(tmp_path, capsys):
    to = tmp_path / "digiface"
    code, _, err = run_cli(["download", "digiface", "--to", to, "--parts", "subjects_0-1999_72_imgs",
                            "--base-url", "http://127.0.0.1:9/", "--accept-license", "--retries", "0"], capsys)
    assert code == 2  # no answer at all: the network must change
    (line,) = error_lines(err)
    assert "cannot reach 127.0.0.1:9" in line and "nothing was downloaded" in line and ".part" not in line
    assert list(to.iterdir()) == []


def test_source_path_at_one_identity_folder(tmp_path, capsys):
    src = write_folder_source(tmp_path / "src", identities=2, images_per_identity=2)
    code, _, err = run_cli(build_args(src / "0", tmp_path / "out"), capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert "the plan is empty: source 'folder' found no identities in" in line
    assert "holds images itself, but one sub-folder per identity is expected" in line


# --- identity-level transforms: units of work under .facegen/units, then the assembly of the published shards ---


@pytest.fixture
def identity_level(monkeypatch):
    """passthrough run as an identity-level transform (whole identities, units of --shard-size, then assembly)."""
    from facegen.plugins.passthrough import Passthrough

    monkeypatch.setattr(Passthrough, "per_image", False)


def test_units_list_their_skips_and_the_summary_counts_units(tmp_path, capsys, identity_level):
    src = write_folder_source(tmp_path / "src", identities=6, images_per_identity=2)
    for victim in ("0/1.png", "3/0.png", "5/1.png"):
        (src / victim).write_bytes(b"not an image at all")
    out = tmp_path / "out"
    args = build_args(src, out, "--shard-samples", 3)  # 3 units of 2 identities; 9 samples in 3 shards
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    listed = out / ".facegen" / "skipped.jsonl"
    assert f"skipped 3 (corrupt image: 3); every skipped file is listed in {listed}" in stdout
    assert "units of work 3 (3 written now); assembling the shards took" in stdout
    assert "9 images in 3 shards written now in" in stdout
    rows = [json.loads(line) for line in listed.read_text().splitlines()]
    assert [(r["unit"], r["identity"], r["ref"]) for r in rows] == [(0, "0", "0/1.png"), (1, "3", "3/0.png"),
                                                                   (2, "5", "5/1.png")]  # unit order
    assert sorted(p.name for p in (out / ".facegen" / "units" / "skipped").iterdir()) == [
        "000000.jsonl", "000001.jsonl", "000002.jsonl"]
    assert not (out / ".facegen" / "skipped").exists()  # an assembled shard copies samples and skips none

    # a damaged unit is redone to the same bytes: the shards made from it are kept, and the summary says both
    unit = out / ".facegen" / "units" / "000001.tar"
    unit.write_bytes(unit.read_bytes()[:1024])
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    assert "1 unit failed its check (size or XXH3-128 against its stats) and was redone" in stdout
    assert "units of work 3 (1 written now)" in stdout and "(0 written now, 3 already complete)" in stdout
    assert "1 unit of work written again in" in stdout and "all 3 shards (9 images) were already complete" in stdout
    assert [json.loads(line) for line in listed.read_text().splitlines()] == rows
    code, stdout, err = run_cli(args, capsys)
    assert code == 0 and "nothing to do: all 3 shards (9 images) were already complete and kept" in stdout


def test_strict_rerun_of_units_with_skips_is_not_a_strict_build(tmp_path, capsys, identity_level):
    src = write_folder_source(tmp_path / "src", identities=4, images_per_identity=2, corrupt=1)
    out = tmp_path / "out"
    assert run_cli(build_args(src, out), capsys)[0] == 0
    readme = (out / "README.md").read_bytes()
    code, stdout, err = run_cli(build_args(src, out, "--strict"), capsys)
    assert code == 2 and "done" not in stdout
    (line,) = error_lines(err)
    assert "bad sample 0/1.png: corrupt image (in unit of work 0, kept from an earlier run without --strict" in line
    assert (out / "README.md").read_bytes() == readme


def test_units_where_every_sample_is_skipped_is_not_done(tmp_path, capsys, identity_level):
    src = write_folder_source(tmp_path / "src", identities=3, images_per_identity=1)
    for path in src.rglob("*.png"):
        path.write_bytes(b"GIF89a")
    out = tmp_path / "out"
    for _ in range(2):  # the rerun says the same
        code, stdout, err = run_cli(build_args(src, out), capsys)
        assert code == 2 and "done" not in stdout and "Traceback" not in err
        (line,) = error_lines(err)
        assert "no image was written to" in line and "all 3 samples were skipped (corrupt image: 3)" in line
        assert str(out / ".facegen" / "skipped.jsonl") in line
    assert len((out / ".facegen" / "skipped.jsonl").read_text().splitlines()) == 3
    assert not (out / "README.md").exists() and not (out / "_info.json").exists()
    assert not list(out.glob("data/train/*.tar"))  # no shard: nothing to publish


def test_the_lock_is_held_through_the_assembly(tmp_path, capsys, identity_level, monkeypatch):
    from facegen.builders.engine.work import Assembly

    src = write_folder_source(tmp_path / "src", identities=4, images_per_identity=2)
    out = tmp_path / "out"
    seen = []
    real = Assembly.work

    def assemble(self):
        seen.append((out / ".facegen" / "lock").is_file() and self.lock is not None and self.lock.lost is None)
        return real(self)

    monkeypatch.setattr(Assembly, "work", assemble)
    code, _, err = run_cli(build_args(src, out), capsys)
    assert code == 0 and seen == [True], err
    assert not (out / ".facegen" / "lock").exists()  # released at the end


def test_overwrite_removes_the_units_of_an_earlier_build(tmp_path, capsys, identity_level):
    src = write_folder_source(tmp_path / "src", identities=6, images_per_identity=2)
    out = tmp_path / "out"
    assert run_cli(build_args(src, out), capsys)[0] == 0  # 3 units of 2 identities
    assert len(list((out / ".facegen" / "units").glob("*.tar"))) == 3
    code, _, err = run_cli(build_args(src, out, "--overwrite", "--shard-size", 3), capsys)  # the later one counts
    assert code == 0, err
    assert sorted(p.name for p in (out / ".facegen" / "units").glob("*.tar")) == ["000000.tar", "000001.tar"]
    assert datasets.load_dataset(str(out), split="train").num_rows == 12


# --- the reporter (facegen.messages): the one way library code speaks ---


def test_the_reporter_says_information_on_stdout_and_warnings_on_stderr_or_collects_them(capsys):
    import threading

    from facegen import messages
    from facegen.messages import INFO, WARNING, Message

    messages.info("wrote 3 shards")
    messages.warn("folder: 1 identity folder name is not UTF-8")
    assert capsys.readouterr() == ("wrote 3 shards\n", "folder: 1 identity folder name is not UTF-8\n")
    with messages.captured() as outer:
        messages.info("a")
        with messages.captured() as inner:
            thread = threading.Thread(target=messages.warn, args=("from a loader thread",))  # plugins load there
            thread.start()
            thread.join()
        messages.info("c")
    assert outer == [Message(INFO, "a"), Message(INFO, "c")] and inner == [Message(WARNING, "from a loader thread")]
    assert capsys.readouterr() == ("", "")


def test_library_code_speaks_only_through_the_reporter():
    """No print, logging, sys.stdout/sys.stderr or `echo` callbacks in facegen/, except in the command line (cli.py)
    and the reporter (messages.py); progress bars are tqdm's."""
    import ast
    from pathlib import Path

    import facegen

    root = Path(facegen.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.parent == root and path.name in ("cli.py", "messages.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            where = f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                found.append(f"{where} print()")
            elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "logging" for a in node.names) or (
                    isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "logging"):
                found.append(f"{where} logging")
            elif isinstance(node, ast.Attribute) and node.attr in ("stdout", "stderr") and \
                    isinstance(node.value, ast.Name) and node.value.id == "sys":
                found.append(f"{where} sys.{node.attr}")
            elif isinstance(node, ast.arg) and node.arg == "echo":
                found.append(f"{where} an echo parameter")
    assert found == []
