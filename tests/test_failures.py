"""Every failure is one line and exit 2, and leaves what was written intact; the user's files stay the user's."""

import errno
import hashlib
import json
import os
import resource
import shutil
import subprocess

import datasets
import pytest

from conftest import BIN, run_cli
from facegen.builders.engine import writer
from facegen.testing.folder import write_folder_source


def build_args(src, out, *extra):
    """Shards of 4 samples: the 12 samples of `src` make 3 shards."""
    return ["build", "--source", "folder", "--source-path", str(src), "--plugin", "passthrough", "--out", str(out),
            "--shard-size", "2", "--shard-samples", "4", *map(str, extra)]


def snapshot(folder):
    """Every file's bytes (by relative path), to show a failure changed nothing."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(err):
    """One error line (a progress bar may precede it on stderr), no traceback."""
    return len([line for line in err.split("\n") if "facegen: error: " in line]) == 1 and "Traceback" not in err


@pytest.fixture
def src(tmp_path):
    return write_folder_source(tmp_path / "src", identities=6, images_per_identity=2)


@pytest.fixture
def finished(src, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(build_args(src, out), capsys)
    assert code == 0, err
    return out


def run_read_only(folder, args, tmp_path):
    """`facegen ARGS` in a subprocess that sees ``folder`` read-only: chmod for a user, a read-only bind mount in a
    private mount namespace for root (whom permissions do not stop)."""
    cmd = [str(BIN / "facegen"), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if os.geteuid() != 0:
        paths = [folder, *folder.rglob("*")]
        modes = {p: p.stat().st_mode for p in paths}
        for p in paths:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        finally:
            for p in reversed(paths):
                p.chmod(modes[p])
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--mount", "true"]).returncode != 0:
        pytest.skip("running as root without mount namespaces: cannot make a folder read-only")
    script = 'mount --bind -o ro "$1" "$1" && shift && exec "$@"'
    return subprocess.run(["unshare", "--mount", "sh", "-c", script, "sh", str(folder), *cmd], capture_output=True,
                          text=True, env=env, timeout=300)


def test_read_only_out_holding_a_finished_build(src, finished, tmp_path):
    before = snapshot(finished)
    for args in (build_args(src, finished), ["card", finished], build_args(src, finished, "--overwrite")):
        proc = run_read_only(finished, args, tmp_path)
        assert proc.returncode == 2 and one_line(proc.stderr), proc.stderr
        assert f"cannot write to {finished}" in proc.stderr
        assert "Read-only file system" in proc.stderr or "Permission denied" in proc.stderr
    assert snapshot(finished) == before


def test_full_disk_discards_the_partial_shard_and_the_rerun_resumes(src, tmp_path, capsys, monkeypatch):
    reference = tmp_path / "reference"
    assert run_cli(build_args(src, reference), capsys)[0] == 0
    out = tmp_path / "out"
    real_add = writer.UstarWriter.add_sample
    calls = []

    def fill_the_disk(self, key, fields):  # the 9th sample (shard 2) finds the disk full
        calls.append(key)
        if len(calls) == 9:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_add(self, key, fields)

    monkeypatch.setattr(writer.UstarWriter, "add_sample", fill_the_disk)
    code, stdout, err = run_cli(build_args(src, out), capsys)
    assert code == 2 and one_line(err), err
    assert "no space left on the device" in err and "the 4 images left need about" in err and "free)" in err
    assert "partial shard was discarded" in err and "rerun the same command to resume" in err
    assert "done" not in stdout
    train = out / "data" / "train"
    assert sorted(os.listdir(train)) == ["train-000000.tar", "train-000001.tar"]  # no hidden temporary left
    assert not [p for p in (out / ".facegen").rglob(".*") if p.name != "lock"]

    monkeypatch.setattr(writer.UstarWriter, "add_sample", real_add)
    code, stdout, err = run_cli(build_args(src, out), capsys)
    assert code == 0 and "(1 written now, 2 already complete)" in stdout, err
    assert snapshot(train) == snapshot(reference / "data" / "train")


def test_file_size_limit_in_a_real_process_then_resume(tmp_path, capsys):
    src = write_folder_source(tmp_path / "src", identities=4, images_per_identity=2)
    write_folder_source(src, identities=2, images_per_identity=2, start=4, size=448)  # 4 samples of ~400 KB
    out = tmp_path / "out"
    limit = 600_000  # the shuffled order puts two of the large samples in one shard at least

    def small_file_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes past it fail with EFBIG

    proc = subprocess.run([str(BIN / "facegen"), *build_args(src, out)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=small_file_limit, timeout=300)
    assert proc.returncode == 2 and one_line(proc.stderr), proc.stderr
    assert "file too large" in proc.stderr and "rerun the same command to resume" in proc.stderr
    # the shards written before the one that hit the limit are complete; nothing else is left (no temporary)
    kept = sorted(os.listdir(out / "data" / "train"))
    assert len(kept) < 3 and kept == [f"train-{j:06d}.tar" for j in range(len(kept))]
    assert sorted(p.name for p in (out / ".facegen" / "shards").glob("*.json")) == [f"{j:06d}.json"
                                                                                    for j in range(len(kept))]
    assert all(os.path.getsize(out / "data" / "train" / name) <= limit for name in kept)
    code, stdout, err = run_cli(build_args(src, out), capsys)
    assert code == 0 and f"({3 - len(kept)} written now, {len(kept)} already complete)" in stdout, err
    assert datasets.load_dataset(str(out), split="train").num_rows == 12


def test_symlink_loop_as_out(src, tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    code, _, err = run_cli(build_args(src, loop), capsys)
    assert code == 2 and one_line(err) and "is a symbolic link loop" in err, err
    code, _, err = run_cli(["card", loop], capsys)
    assert code == 2 and one_line(err) and "is a symbolic link loop" in err, err


def test_recipe_and_identities_file_that_are_not_utf8(src, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"source: folder\n# caf\xe9 (latin-1)\nplugin: passthrough\n")
    code, _, err = run_cli(["build", "--recipe", recipe, "--source-path", src, "--out", tmp_path / "o"], capsys)
    assert code == 2 and one_line(err) and "r.yaml is not UTF-8 text (byte 20)" in err, err
    ids = tmp_path / "ids.txt"
    ids.write_bytes(b"0\n1\n\xff\xfe2\n")
    code, _, err = run_cli(build_args(src, tmp_path / "o", "--identities-file", ids), capsys)
    assert code == 2 and one_line(err) and "ids.txt is not UTF-8 text" in err, err
    assert not (tmp_path / "o").exists()


def test_truncated_stats_file_and_run_json(src, finished, capsys):
    stats = finished / ".facegen" / "shards" / "000001.json"
    stats.write_bytes(stats.read_bytes()[:20])
    code, _, err = run_cli(["card", finished], capsys)
    assert code == 2 and one_line(err) and "000001.json is not valid JSON" in err, err
    # a damaged stats file fails the shard's check: the rerun writes that shard again, and says so
    code, stdout, err = run_cli(build_args(src, finished), capsys)
    assert code == 0 and "(1 written now, 2 already complete)" in stdout, err
    assert "1 shard failed its check (size or XXH3-128 against its stats) and was redone" in stdout
    assert json.loads(stats.read_text())["redone_because"] == "unreadable stats"

    run_json = finished / ".facegen" / "run.json"
    run_json.write_bytes(run_json.read_bytes()[:50])
    readme = (finished / "README.md").read_bytes()
    code, _, err = run_cli(["card", finished], capsys)
    assert code == 2 and one_line(err) and "run.json is not valid JSON" in err, err
    assert (finished / "README.md").read_bytes() == readme
    code, stdout, err = run_cli(build_args(src, finished), capsys)  # the rerun rewrites it
    assert code == 0 and "nothing to do" in stdout, err
    assert datasets.load_dataset(str(finished), split="train").num_rows == 12


def test_data_train_that_is_a_file(src, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "train").write_text("my notes\n")
    for extra in ((), ("--overwrite",)):
        code, _, err = run_cli(build_args(src, out, *extra), capsys)
        assert code == 2 and one_line(err) and "data/train is a file where facegen needs a folder" in err, err
    assert (out / "data" / "train").read_text() == "my notes\n"


def test_users_license_inside_a_finished_build(src, finished, capsys):
    (finished / "LICENSE").write_text("my own terms\n")
    code, _, err = run_cli(build_args(src, finished), capsys)
    assert code == 2 and one_line(err) and "LICENSE is not facegen's" in err, err
    code, _, err = run_cli(["card", finished], capsys)
    assert code == 2 and one_line(err) and "LICENSE was not written by facegen" in err, err
    assert (finished / "LICENSE").read_text() == "my own terms\n"


def test_out_inside_the_source_folder_is_refused(src, tmp_path, capsys):
    for out in (src / "out", src / "0" / "deeper", src):
        code, _, err = run_cli(build_args(src, out), capsys)
        assert code == 2 and one_line(err) and "is inside --source-path" in err, err
    assert not (src / "out").exists() and not (src / "0" / "deeper").exists()


def test_overwrite_keeps_the_users_files_and_replaces_only_facegens(src, finished, tmp_path, capsys):
    # facegen's own card files are replaced by --overwrite
    code, _, err = run_cli(build_args(src, finished, "--overwrite", "--seed", "1"), capsys)
    assert code == 0, err
    # a card the user edited is theirs now: --overwrite and `facegen card` refuse, naming it, and keep it
    (finished / "README.md").write_text((finished / "README.md").read_text() + "\nmy notes\n")
    user_preview = b"\xff\xd8 my own preview"
    (finished / "preview.jpg").write_bytes(user_preview)
    before = snapshot(finished)
    code, _, err = run_cli(build_args(src, finished, "--overwrite"), capsys)
    assert code == 2 and one_line(err) and "README.md, preview.jpg are not facegen's" in err, err
    code, _, err = run_cli(["card", finished], capsys)
    assert code == 2 and one_line(err) and "README.md" in err and "preview.jpg" in err, err
    assert snapshot(finished) == before

    # a user's own tar among the shards would be loaded as part of the dataset: refused too
    (finished / "README.md").unlink()
    (finished / "preview.jpg").unlink()
    (finished / "data" / "train" / "extra.tar").write_bytes(b"mine")
    code, _, err = run_cli(build_args(src, finished, "--overwrite"), capsys)
    assert code == 2 and "data/train/extra.tar is not facegen's" in err, err
    (finished / "data" / "train" / "extra.tar").unlink()

    # a folder of the user's with their README.md: refused without and with --overwrite, README kept
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("# my project\n")
    (project / "notes.txt").write_text("x\n")
    code, _, err = run_cli(build_args(src, project), capsys)
    assert code == 2 and one_line(err) and "README.md is yours" in err, err
    assert sorted(os.listdir(project)) == ["README.md", "notes.txt"]  # a refused build leaves no trace
    code, _, err = run_cli(build_args(src, project, "--overwrite"), capsys)
    assert code == 2 and one_line(err) and "README.md is not facegen's" in err, err
    assert (project / "README.md").read_text() == "# my project\n"
    (project / "README.md").rename(tmp_path / "README.md")
    code, _, err = run_cli(build_args(src, project, "--overwrite"), capsys)  # beside notes.txt, which is kept
    assert code == 0, err
    assert (project / "notes.txt").read_text() == "x\n"


@pytest.mark.parametrize("where", ["unit", "assembly"])
def test_full_disk_in_units_or_assembly_discards_the_partial_file_and_the_rerun_resumes(src, tmp_path, capsys,
                                                                                       monkeypatch, where):
    """An identity-level transform (passthrough run as one): a full disk while writing a unit of work, or while
    assembling the published shards from the units, is one line; the rerun resumes to the same shards."""
    from facegen.plugins.passthrough import Passthrough

    monkeypatch.setattr(Passthrough, "per_image", False)
    reference = tmp_path / "reference"
    assert run_cli(build_args(src, reference), capsys)[0] == 0  # 3 units of 2 identities, 3 shards of 4 samples
    out = tmp_path / "out"
    # a unit's samples are encoded and added; an assembled shard's are copied from the units
    owner, name = (writer.UstarWriter, "add_sample") if where == "unit" else (writer.TarWriter, "copy")
    real = getattr(owner, name)
    calls = []

    def fill_the_disk(self, *args):  # unit: the 9th sample (unit 2); assembly: the 6th copied (shard 1)
        calls.append(1)
        if len(calls) == (9 if where == "unit" else 6):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args)

    monkeypatch.setattr(owner, name, fill_the_disk)
    code, stdout, err = run_cli(build_args(src, out), capsys)
    assert code == 2 and one_line(err), err
    assert "no space left on the device" in err and "free)" in err and "rerun the same command to resume" in err
    if where == "unit":
        assert "the 2 identities (and the assembly of the shards) left need about" in err
        assert "the partial unit of work was discarded" in err
        assert sorted(p.name for p in (out / ".facegen" / "units").glob("*.tar")) == ["000000.tar", "000001.tar"]
        assert not (out / "data" / "train").exists() or not list((out / "data" / "train").iterdir())
    else:
        assert "the 8 images left need about" in err and "the partial shard was discarded" in err
        assert sorted(os.listdir(out / "data" / "train")) == ["train-000000.tar"]
    assert not [p for p in out.rglob(".*") if p != out / ".facegen"]  # no temporary left
    assert not (out / ".facegen" / "lock").exists()

    monkeypatch.setattr(owner, name, real)
    code, stdout, err = run_cli(build_args(src, out), capsys)
    assert code == 0, err
    if where == "unit":
        assert "units of work 3 (1 written now)" in stdout and "(3 written now, 0 already complete)" in stdout
    else:
        assert "units of work 3 (0 written now)" in stdout and "(2 written now, 1 already complete)" in stdout
    assert snapshot(out / "data" / "train") == snapshot(reference / "data" / "train")



def test_users_info_json_is_never_replaced(src, finished, capsys):
    """`_info.json` (timm's split info) is written by the build and recorded like the card's files: facegen's own is
    replaced by --overwrite, one the user edited stops the build in one line and is kept."""
    info = finished / "_info.json"
    code, _, err = run_cli(build_args(src, finished, "--overwrite", "--seed", 1), capsys)
    assert code == 0 and json.loads(info.read_text())["splits"]["train"]["num_samples"] == 12, err
    info.write_text('{"name": "mine"}\n')
    for extra in ((), ("--overwrite",)):
        code, _, err = run_cli(build_args(src, finished, "--seed", 1, *extra), capsys)
        assert code == 2 and one_line(err) and "_info.json is not facegen's" in err, err
    assert info.read_text() == '{"name": "mine"}\n'


def test_a_really_full_disk_is_one_line(tmp_path):
    """A real file system that fills up (a 1 MiB tmpfs in a private mount namespace): the buffered rest of the
    partial shard cannot be flushed either, and that second error must not replace the first with a traceback."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or \
            subprocess.run(["unshare", "--mount", "true"]).returncode != 0:
        pytest.skip("needs root and mount namespaces to mount a small tmpfs")
    src = write_folder_source(tmp_path / "big", identities=40, images_per_identity=5)
    out = tmp_path / "full"
    out.mkdir()
    cmd = [str(BIN / "facegen"), *map(str, build_args(src, out))]
    script = 'mount -t tmpfs -o size=1m tmpfs "$1" && shift && exec "$@"'
    proc = subprocess.run(["unshare", "--mount", "sh", "-c", script, "sh", str(out), *cmd], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 2 and one_line(proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr and "space" in proc.stderr
