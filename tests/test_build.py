"""facegen build end to end on real files: loadable output, bytes copied, bad input, recipes, resume rules."""

import io
import json
import tarfile

import datasets
import pytest
from PIL import Image

from conftest import build, facegen
from facegen.testing.folder import write_folder_source




def tar_members(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_passthrough_output_loads_with_declared_columns(tmp_path):
    src = write_folder_source(tmp_path / "src", identities=7, images_per_identity=3, corrupt=1)
    out = tmp_path / "out"
    build("--source", "folder", "--source-path", src, "--plugin", "passthrough", "--out", out, "--shard-samples", 7)
    # 21 listed images, at most 7 per shard: 3 shards of 7 (one is 6: the corrupt image is skipped)
    assert sorted(p.name for p in (out / "data" / "train").iterdir()) == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert sorted(p.name for p in (out / ".facegen" / "shards").glob("*.json")) == [
        "000000.json", "000001.json", "000002.json"]
    expected_columns = ["png", "cls", "json", "__key__", "__url__"]

    ds = datasets.load_dataset(str(out), split="train")
    assert ds.num_rows == 7 * 3 - 1  # one corrupt image skipped
    assert ds.column_names == expected_columns
    assert ds.features["cls"] == datasets.Value("int64")
    assert set(ds.features["json"]) == {"identity", "source", "source_ref", "width", "height", "image_index"}
    rows = {row["__key__"]: row for row in ds}
    first = rows["000000_000"]
    assert first["cls"] == 0
    assert first["json"] == {"identity": "0", "source": "folder", "source_ref": "0/0.png", "width": 112,
                             "height": 112, "image_index": 0}
    assert isinstance(first["png"], Image.Image) and first["png"].size == (112, 112)
    # shuffled across the whole dataset: the first shard is not the first identities
    assert [int(k[:6]) for k in ds["__key__"][:7]] != sorted(int(k[:6]) for k in ds["__key__"][:7])
    info = json.loads((out / "_info.json").read_text())["splits"]["train"]
    assert sorted(info["shard_lengths"]) == [6, 7, 7] and info["num_samples"] == 20

    streamed = list(datasets.load_dataset(str(out), split="train", streaming=True))
    assert len(streamed) == ds.num_rows
    assert list(streamed[0]) == expected_columns

    # the image bytes in the shards are the source file's bytes, untouched
    members = {}
    for tar in sorted((out / "data" / "train").iterdir()):
        members.update(tar_members(tar))
    assert members["000004_002.png"] == (src / "4" / "2.png").read_bytes()
    assert members["000004_002.cls"] == b"4"
    assert "000000_002.png" not in members  # the corrupt one

    skips = [json.loads(p.read_text()) for p in (out / ".facegen" / "shards").glob("*.json")]
    assert sum(s["skipped"].get("corrupt image", 0) for s in skips) == 1
    assert [f["ref"] for s in skips for f in s["failures"]] == ["0/2.png"]
    run = json.loads((out / ".facegen" / "run.json").read_text())
    assert run["totals"]["images"] == 20 and run["totals"]["skipped"] == {"corrupt image": 1}
    assert run["totals"]["identities"] == 7


def test_natural_order_and_labels(tmp_path):
    src = tmp_path / "src"
    for ident in ("10", "2", "1"):
        (src / ident).mkdir(parents=True)
        for k in (10, 2, 1):
            Image.new("RGB", (8, 8), (int(ident), k, 0)).save(src / ident / f"img{k}.png")
    out = tmp_path / "out"
    build("--source", "folder", "--source-path", src, "--plugin", "passthrough", "--out", out)
    rows = sorted(datasets.load_dataset(str(out), split="train"), key=lambda r: r["__key__"])
    assert [r["json"]["identity"] for r in rows] == ["1"] * 3 + ["2"] * 3 + ["10"] * 3
    assert [r["json"]["source_ref"] for r in rows][:3] == ["1/img1.png", "1/img2.png", "1/img10.png"]
    assert [r["cls"] for r in rows] == [0] * 3 + [1] * 3 + [2] * 3
    assert {(r["json"]["width"], r["json"]["height"]) for r in rows} == {(8, 8)}


def test_empty_identity_folders_are_left_out_and_unread_files_are_counted(tmp_path):
    src = write_folder_source(tmp_path / "src", identities=4, images_per_identity=2)
    for image in (src / "1").iterdir():
        image.unlink()  # identity 1: an empty folder
    (src / "3" / "sub").mkdir()
    (src / "3" / "sub" / "1.png").write_bytes((src / "3" / "0.png").read_bytes())  # nested: not read
    (src / "3" / "notes.txt").write_text("notes")
    (src / "3" / ".DS_Store").write_bytes(b"\0")
    (src / "stray.png").write_bytes((src / "0" / "0.png").read_bytes())
    out = tmp_path / "out"
    result = facegen("build", "--source", "folder", "--source-path", src, "--plugin", "passthrough", "--out", out,
                     check=True)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("folder:")]
    assert warnings == ["folder: not read: 1 identity folder(s) without an image, left out (e.g. 1); "
                        "1 images at the top level; 1 nested folders; 1 non-image files (only "
                        "PATH/<identity>/<image>.png|jpg|jpeg is read; nested folders are not)"]
    rows = sorted(datasets.load_dataset(str(out), split="train"), key=lambda r: r["__key__"])
    # the labels stay dense, in the folders' order
    assert [(r["cls"], r["json"]["identity"]) for r in rows] == [(0, "0")] * 2 + [(1, "2")] * 2 + [(2, "3")] * 2
    run = json.loads((out / ".facegen" / "run.json").read_text())
    assert run["totals"]["identities"] == 3
    assert run["source"]["provenance"] == {"identity_folders_without_images": 1, "ignored_entries": {
        "hidden files": 1, "images at the top level": 1, "nested folders": 1, "non-image files": 1}}


def test_format_conversion_to_jpg(tmp_path, folder_source):
    out = tmp_path / "out"
    build("--source", "folder", "--source-path", folder_source, "--plugin", "passthrough", "--out", out,
          "--format", "jpg", "--limit-identities", "2")
    ds = datasets.load_dataset(str(out), split="train")
    assert ds.column_names[0] == "jpg" and ds.num_rows == 6
    names = [n for n, _ in tar_members(out / "data" / "train" / "train-000000.tar")]
    assert "000000_000.jpg" in names
    data = dict(tar_members(out / "data" / "train" / "train-000000.tar"))["000000_000.jpg"]
    assert Image.open(io.BytesIO(data)).format == "JPEG"


def test_identities_file_and_limit(tmp_path, folder_source):
    ids = tmp_path / "ids.txt"
    ids.write_text("7\n3\n# a comment\n11\n")
    out = tmp_path / "out"
    build("--source", "folder", "--source-path", folder_source, "--plugin", "passthrough", "--out", out,
          "--identities-file", ids, "--limit-identities", "2")
    ds = datasets.load_dataset(str(out), split="train")
    assert sorted({r["identity"] for r in ds["json"]}) == ["3", "7"]  # source order 3, 7 (11 cut by the limit)
    assert sorted(set(ds["cls"])) == [0, 1]


def test_recipe_file_with_cli_override(tmp_path, folder_source):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("source: folder\nplugin: passthrough\nshard_size: 2\nformat: jpg\nlimit_identities: 5\n")
    out = tmp_path / "out"
    build("--recipe", recipe, "--source-path", folder_source, "--out", out, "--format", "png", "--shard-samples", 5)
    assert len(list((out / "data" / "train").glob("*.tar"))) == 3  # 15 samples, at most 5 per shard
    assert datasets.load_dataset(str(out), split="train").column_names[0] == "png"
    run = json.loads((out / ".facegen" / "run.json").read_text())
    assert run["options"]["shard_size"] == 2 and run["options"]["format"] == "png"


def test_rerun_resumes_and_other_command_is_refused(tmp_path, folder_source):
    out = tmp_path / "out"
    args = ["build", "--source", "folder", "--source-path", folder_source, "--plugin", "passthrough", "--out", out,
            "--shard-samples", "12", "--shard-size", "5"]
    assert facegen(*args).returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in (out / "data" / "train").iterdir()}
    again = facegen(*args)
    assert again.returncode == 0 and "0 written now, 3 already complete" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (out / "data" / "train").iterdir()} == before

    other = facegen(*args[:-1], "4")
    assert other.returncode == 2 and other.stderr.count("\n") == 1
    assert "different build" in other.stderr and "shard_size" in other.stderr
    replaced = facegen(*args[:-1], "4", "--overwrite")
    assert replaced.returncode == 0
    assert len(list((out / "data" / "train").glob("*.tar"))) == 3  # 36 samples, 12 per shard
    assert datasets.load_dataset(str(out), split="train").num_rows == 36


@pytest.mark.parametrize("args, message", [
    (["--source-path", "/nonexistent/x"], "does not exist"),
    (["--source-opt", "colour"], "expects key=value"),
    (["--source-opt", "colour=red"], "unknown option 'colour'"),
    (["--plugin-opt", "speed=3"], "unknown option 'speed'"),
    (["--source", "nosuch"], "unknown source plugin 'nosuch'"),
    (["--recipe", "nosuch"], "unknown recipe 'nosuch'"),
    (["--identities-file", "/nonexistent/ids.txt"], "cannot read identities file"),
    (["--shard-size", "0"], "--shard-size must be at least 1"),
    (["--bogus-flag"], "No such option"),
])
def test_user_mistakes_are_one_line_exit_2(tmp_path, folder_source, args, message):
    base = {"--source": "folder", "--source-path": str(folder_source), "--plugin": "passthrough",
            "--out": str(tmp_path / "o")}
    given = dict(zip(args[::2], args[1::2]))
    argv = [x for k, v in {**base, **given}.items() if k not in ("--bogus-flag", "--source-opt", "--plugin-opt")
            for x in (k, v)]
    argv += [a for a in args if a == "--bogus-flag"]
    for flag in ("--source-opt", "--plugin-opt"):
        if flag in given:
            argv += [flag, given[flag]]
    proc = facegen("build", *argv)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr


def test_empty_source_and_missing_options(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = facegen("build", "--source", "folder", "--source-path", tmp_path / "empty", "--plugin",
                   "passthrough", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "plan is empty" in proc.stderr and proc.stderr.count("\n") == 1
    proc = facegen("build", "--source", "folder")
    assert proc.returncode == 2 and "missing --plugin, --out" in proc.stderr
    proc = facegen("build", "--source", "folder", "--plugin", "passthrough", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "missing --source-path" in proc.stderr


def test_strict_stops_at_a_corrupt_image_and_keeps_complete_shards(tmp_path):
    src = write_folder_source(tmp_path / "src", identities=6, images_per_identity=2)
    victim = src / "4" / "1.png"
    victim.write_bytes(victim.read_bytes()[:100])
    out = tmp_path / "out"
    proc = facegen("build", "--source", "folder", "--source-path", src, "--plugin", "passthrough", "--out", out,
                   "--shard-samples", "2", "--strict")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "4/1.png" in proc.stderr and "corrupt image" in proc.stderr
    # the shards before the bad one are complete and intact, the bad one is not there; nothing hidden is left
    names = sorted(p.name for p in (out / "data" / "train").iterdir())
    assert names == [f"train-{j:06d}.tar" for j in range(len(names))] and len(names) < 6
    for name in names:
        assert all(n.split("_")[0] != "000004" or not n.startswith("000004_001")
                   for n, _ in tar_members(out / "data" / "train" / name))
    # without --strict the same folder is a different command only in strictness: it resumes and skips
    proc = facegen("build", "--source", "folder", "--source-path", src, "--plugin", "passthrough", "--out", out,
                   "--shard-samples", "2")
    assert proc.returncode == 0 and "corrupt image: 1" in proc.stdout
    assert f"{len(names)} already complete" in proc.stdout
    assert datasets.load_dataset(str(out), split="train").num_rows == 11


def test_unreadable_file_is_skipped_and_counted(tmp_path):
    src = write_folder_source(tmp_path / "src", identities=3, images_per_identity=2)
    (src / "1" / "7.png").mkdir()  # listed like an image, but reading it fails (runs as root too, unlike chmod 0)
    out = tmp_path / "out"
    proc = facegen("build", "--source", "folder", "--source-path", src, "--plugin", "passthrough", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 (unreadable file: 1)" in proc.stdout
    stats = json.loads((out / ".facegen" / "shards" / "000000.json").read_text())  # 7 samples: one shard
    assert stats["failures"][0]["ref"] == "1/7.png" and stats["failures"][0]["reason"] == "unreadable file"
    assert datasets.load_dataset(str(out), split="train").num_rows == 6


def test_jpeg_folder_is_copied_byte_for_byte_and_cmyk_is_converted(tmp_path):
    src = write_folder_source(tmp_path / "src", identities=3, images_per_identity=2, fmt="jpg")
    cmyk = src / "1" / "5.jpg"
    Image.new("CMYK", (32, 32), (10, 200, 30, 0)).save(cmyk, format="JPEG")
    out = tmp_path / "out"
    build("--source", "folder", "--source-path", src, "--plugin", "passthrough", "--out", out)
    members = dict(tar_members(out / "data" / "train" / "train-000000.tar"))
    assert members["000000_001.jpg"] == (src / "0" / "1.jpg").read_bytes()  # stored JPEG, untouched
    ds = datasets.load_dataset(str(out), split="train")
    assert ds.column_names[0] == "jpg" and ds.num_rows == 7
    # to PNG, the CMYK JPEG (a mode PNG cannot hold) is converted instead of crashing the build
    out_png = tmp_path / "png"
    build("--source", "folder", "--source-path", src, "--plugin", "passthrough", "--out", out_png, "--format", "png")
    png = dict(tar_members(out_png / "data" / "train" / "train-000000.tar"))["000001_002.png"]
    assert Image.open(io.BytesIO(png)).mode == "RGB"
    assert datasets.load_dataset(str(out_png), split="train").num_rows == 7


def test_unencodable_extra_is_skipped_and_counted(tmp_path):
    from facegen.builders.engine.writer import SHARD, SampleFormat, TarWriter
    from facegen.layout import OutputFolder
    from facegen.records import Face, Identity, IdentityResult

    writer = TarWriter(OutputFolder(tmp_path), SHARD, 0, SampleFormat("png", "test"))
    good = Face(image=Image.new("RGB", (8, 8)), ref="a")
    bad = Face(image=Image.new("RGB", (8, 8)), ref="b", extras={"thing.weird": object()})
    writer.write(IdentityResult(Identity("x", 0, 1), [good, bad, good]))
    writer.finish()
    stats = writer.commit()
    assert stats.images == 2 and stats.skipped == {"unencodable sample": 1}
    assert [n for n, _ in tar_members(tmp_path / "data" / "train" / "train-000000.tar")][::3] == [
        "000000_000.cls", "000000_001.cls"]  # keys stay dense


def test_out_folder_of_the_user_is_protected(tmp_path, folder_source):
    args = ["build", "--source", "folder", "--source-path", folder_source, "--plugin", "passthrough",
            "--limit-identities", "2"]
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "README.md").write_text("# my project\n")
    (project / "LICENSE").write_text("MIT, my own\n")
    (project / "data" / "labels.csv").write_text("a,b\n")
    proc = facegen(*args, "--out", project)
    assert proc.returncode == 2 and "is not empty" in proc.stderr and proc.stderr.count("\n") == 1
    assert (project / "README.md").read_text() == "# my project\n"
    assert "README.md, LICENSE are yours" in proc.stderr
    # a README.md or LICENSE that is not facegen's is never written over, even with --overwrite: the card needs
    # those names
    proc = facegen(*args, "--out", project, "--overwrite")
    assert proc.returncode == 2 and "README.md, LICENSE are not facegen's" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert (project / "LICENSE").read_text() == "MIT, my own\n"
    assert (project / "README.md").read_text() == "# my project\n"
    (project / "LICENSE").unlink()
    (project / "README.md").unlink()
    # --overwrite writes the build beside the user's files and removes only what facegen writes
    assert facegen(*args, "--out", project, "--overwrite").returncode == 0
    assert facegen(*args, "--out", project, "--overwrite", "--seed", "3").returncode == 0
    assert (project / "data" / "labels.csv").read_text() == "a,b\n"
    assert "written by facegen" in (project / "LICENSE").read_text()

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for out, message in ((a_file, "is a file"), ("/proc/facegen-out", "cannot create --out")):
        proc = facegen(*args, "--out", out)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr

    out = tmp_path / "out"
    assert facegen(*args, "--out", out).returncode == 0
    (out / ".facegen" / "config.json").write_text("{bad")
    proc = facegen(*args, "--out", out)
    assert proc.returncode == 2 and "damaged" in proc.stderr and "Traceback" not in proc.stderr


def test_recipe_with_an_alias_or_broken_yaml_is_one_line(tmp_path, folder_source):
    bomb = tmp_path / "bomb.yaml"  # a recipe handed around like a card: aliases refused before they expand
    bomb.write_text("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 10)))
    broken = tmp_path / "broken.yaml"
    broken.write_text("source: [folder\n")
    for recipe, expected in ((bomb, "holds an alias (*a0, line 2)"), (broken, "the recipe does not parse")):
        proc = facegen("build", "--recipe", recipe, "--source-path", folder_source, "--out", tmp_path / "o")
        assert proc.returncode == 2 and expected in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_recipe_values_are_typed_like_the_cli(tmp_path, folder_source):
    recipe = tmp_path / "r.yaml"
    recipe.write_text('source: folder\nplugin: passthrough\nshard_size: "5"\nstrict: "no"\nlimit_identities: 6\n')
    victim = folder_source / "1" / "0.png"
    victim.write_bytes(victim.read_bytes()[:50])
    out = tmp_path / "out"
    build("--recipe", recipe, "--source-path", folder_source, "--out", out,  # "no" is not strict: skips
          "--shard-samples", 9)
    assert len(list((out / "data" / "train").glob("*.tar"))) == 2  # 18 samples, at most 9 per shard
    assert json.loads((out / ".facegen" / "run.json").read_text())["options"]["shard_size"] == 5
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: folder\nplugin: passthrough\nshard_size: ten\n")
    proc = facegen("build", "--recipe", bad, "--source-path", folder_source, "--out", tmp_path / "o2")
    assert proc.returncode == 2 and "bad value 'ten' for shard_size" in proc.stderr and "Traceback" not in proc.stderr
    strict = tmp_path / "strict.yaml"
    strict.write_text("source: folder\nplugin: passthrough\nstrict: true\n")
    proc = facegen("build", "--recipe", strict, "--source-path", folder_source, "--out", tmp_path / "o3")
    assert proc.returncode == 2 and "1/0.png" in proc.stderr
    proc = facegen("build", "--recipe", strict, "--source-path", folder_source, "--out", tmp_path / "o3",
                   "--no-strict")
    assert proc.returncode == 0 and "corrupt image: 1" in proc.stdout
