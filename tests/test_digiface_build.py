"""`facegen build --recipe digiface` end to end on fixture zips: loadable dataset, bytes copied, card, bad input."""

import json
from collections import Counter
import tarfile
import zipfile

import datasets
import pytest
import yaml
from PIL import Image

from conftest import BIN, build, facegen
from facegen.testing.digiface import truncate_file, write_digiface_part

P72_A = "subjects_0-1999_72_imgs"
P72_B = "subjects_2000-3999_72_imgs"
P5_A = "subjects_100000-133332_5_imgs"




def front_matter(readme):
    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture
def digiface_dir(tmp_path):
    src = tmp_path / "digiface"
    write_digiface_part(src, ids=[0, 1, 2], images_per_identity=4, name=P72_A, bad_crc=1, corrupt_png=1,
                        unsafe_members=True, macosx=True, dot_files=True)
    write_digiface_part(src, ids=[2000, 2001], images_per_identity=4, name=P72_B, wrapper=True)
    write_digiface_part(src, ids=[100000, 100001, 100002], images_per_identity=2, name=P5_A)
    return src


def test_recipe_republishes_digiface_as_a_loadable_dataset(digiface_dir, tmp_path):
    out = tmp_path / "out"
    build("--recipe", "digiface", "--source-path", digiface_dir, "--out", out, "--shard-samples", 10)

    ds = datasets.load_dataset(str(out), split="train")
    assert ds.column_names == ["png", "cls", "json", "__key__", "__url__"]
    assert ds.features["json"] == {"identity": datasets.Value("string"), "source": datasets.Value("string"),
                                   "source_ref": datasets.Value("string"), "width": datasets.Value("int32"),
                                   "height": datasets.Value("int32"), "part": datasets.Value("string"),
                                   "image_index": datasets.Value("int32")}
    assert ds.num_rows == 3 * 4 + 2 * 4 + 3 * 2 - 2  # one CRC failure, one truncated PNG
    assert len(list((out / "data" / "train").glob("*.tar"))) == 3  # 26 listed images, at most 10 per shard
    ids = ["0", "1", "2", "2000", "2001", "100000", "100001", "100002"]
    assert sorted({(r["cls"], r["json"]["identity"]) for r in ds}) == list(enumerate(ids))
    rows = sorted(ds, key=lambda r: r["__key__"])  # published in a shuffled order
    row = rows[0]
    assert row["__key__"] == "000000_001"  # the image's position in its identity: 0/0.png was skipped
    assert row["json"] == {"identity": "0", "source": "digiface", "source_ref": f"{P72_A}.zip:0/1.png",
                           "width": 112, "height": 112, "part": P72_A, "image_index": 1}
    assert isinstance(row["png"], Image.Image) and row["png"].size == (112, 112)
    wrapped = [r["json"] for r in rows if r["json"]["identity"] == "2001"]
    assert [j["source_ref"] for j in wrapped] == [f"{P72_B}.zip:{P72_B}/2001/{k}.png" for k in range(4)]
    assert all(j["part"] == P72_B for j in wrapped)
    assert [r["json"]["part"] for r in rows if r["cls"] == 7] == [P5_A, P5_A]

    # image bytes are the zip members' bytes, copied
    members = {}
    for path in (out / "data" / "train").glob("*.tar"):
        with tarfile.open(path) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    with zipfile.ZipFile(digiface_dir / f"{P72_B}.zip") as archive:
        assert members["000004_003.png"] == archive.read(f"{P72_B}/2001/3.png")
    assert members["000004_003.cls"] == b"4"
    assert json.loads(members["000004_003.json"])["image_index"] == 3

    stats = [json.loads(p.read_text()) for p in (out / ".facegen" / "shards").glob("*.json")]
    assert sum((Counter(s["skipped"]) for s in stats), Counter()) == {"corrupt zip member": 1, "corrupt image": 1}
    assert {f["ref"] for s in stats for f in s["failures"]} == {f"{P72_A}.zip:0/0.png", f"{P72_A}.zip:0/3.png"}

    # the card carries the licence, the citation and the description; unsafe members are in the provenance
    meta = front_matter(out / "README.md")
    assert meta["license"] == "other"
    assert meta["license_name"] == "microsoft-research-use-of-data-agreement"
    readme = (out / "README.md").read_text()
    assert "@inproceedings{bae2023digiface1m" in readme and "1,219,995 images of 109,999 identities" in readme
    license_text = (out / "LICENSE").read_text()
    assert "Microsoft Research Use of Data Agreement" in license_text
    assert "https://github.com/microsoft/DigiFace1M/blob/main/LICENSE" in license_text
    assert "non-commercial research" in license_text.lower()
    run = json.loads((out / ".facegen" / "run.json").read_text())
    assert run["source"]["provenance"]["ignored_entries"]["unsafe path"] == 3
    assert any("unsafe path" in w for w in run["source"]["provenance"]["warnings"])


def test_part_and_image_options_reach_the_build(digiface_dir, tmp_path):
    out = tmp_path / "out"
    build("--recipe", "digiface", "--source-path", digiface_dir, "--out", out, "--source-opt", "parts=72",
          "--source-opt", "max_images=2")
    ds = datasets.load_dataset(str(out), split="train")
    assert sorted({r["json"]["identity"] for r in ds}, key=int) == ["0", "1", "2", "2000", "2001"]
    assert {r["json"]["image_index"] for r in ds} == {0, 1}
    assert ds.num_rows == 5 * 2 - 1  # identity 0's image 0 fails its CRC


@pytest.mark.slow
def test_truncated_zip_fails_the_build_with_one_line_naming_it(digiface_dir, tmp_path):
    truncate_file(digiface_dir / f"{P5_A}.zip", 0.5)
    out = tmp_path / "out"
    proc = facegen("build", "--recipe", "digiface", "--source-path", digiface_dir, "--out", out)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("facegen: error: ")
    assert f"{P5_A}.zip is not a readable zip" in errors[0] and "Traceback" not in proc.stderr
    assert not (out / "data").exists()


@pytest.mark.slow
def test_two_processes_read_the_zips_and_write_the_same_bytes(digiface_dir, tmp_path):
    import os
    import socket
    import subprocess

    args = ["build", "--recipe", "digiface", "--source-path", str(digiface_dir), "--shard-samples", "7"]
    one = tmp_path / "one"
    proc = facegen(*args, "--out", one)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("(unsafe path)") == 1

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port), "--no-python",
                           str(BIN / "facegen"), *args, "--out", str(two)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("(unsafe path)") == 1  # every process indexes the zips; only rank 0 tells
    assert proc.stdout.count("facegen build done") == 1  # one summary, from the main process
    shards = sorted(p.name for p in (one / "data" / "train").iterdir())
    assert shards == sorted(p.name for p in (two / "data" / "train").iterdir()) and len(shards) == 4
    for name in shards:
        assert (one / "data" / "train" / name).read_bytes() == (two / "data" / "train" / name).read_bytes()
    writers = {(stats["written_by"]["process"], stats["written_by"]["processes"])
               for stats in map(json.loads, (p.read_text() for p in (two / ".facegen" / "shards").glob("*.json")))}
    assert writers == {(0, 2), (1, 2)}
    assert datasets.load_dataset(str(two), split="train").num_rows == 24  # 26 listed, 2 skipped
