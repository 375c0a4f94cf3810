"""`facegen export`: a dataset exported as RecordIO (insightface's layout, and DALI's shuffled flavour) and as image
folders, read back with readers written here from the formats' specifications (not facegen's own), and resumed
after an interruption and after a real kill -9.

The RecordIO reader below follows dmlc-core's ``recordio.cc`` and mxnet's ``recordio.py``; it reads the export
the way arcface_torch's ``MXFaceDataset`` does (record 0's ``[N+1, N+1+C]``, then each record ``1 .. N``'s class).
The image-folder check follows torchvision's ``ImageFolder`` (every sub-folder is a class, sorted by name).
"""

import io
import json
import os
import signal
import struct
import subprocess
import tarfile
import time
import zlib
from collections import Counter
from pathlib import Path

import pytest
from huggingface_hub import DatasetCard

from conftest import BIN, cli, facegen
from facegen.testing.folder import draw_face, encode, write_folder_source

MAGIC = 0xCED7230A
IMAGES = {"ada": 3, "bo": 1, "cy": 2, "di": 2}  # identity -> images


def png_with_magic_word(identity: int, n: int) -> bytes:
    """A PNG whose record payload holds RecordIO's magic word at an aligned offset (an ancillary chunk right after
    IHDR: IRHeader 24 + signature 8 + IHDR 25 + chunk header 8 = 65, so 3 bytes of padding reach 68)."""
    data = encode(draw_face(identity, n, size=24, noise=0))
    body = b"xyz" + struct.pack("<I", MAGIC) * 2 + b"!"
    chunk = struct.pack(">I", len(body)) + b"faCe" + body + struct.pack(">I", zlib.crc32(b"faCe" + body))
    return data[:33] + chunk + data[33:]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    src = root / "src"
    for i, (identity, count) in enumerate(IMAGES.items()):
        (src / identity).mkdir(parents=True)
        for n in range(count):
            data = png_with_magic_word(i, n) if (identity, n) == ("cy", 1) else encode(draw_face(i, n, size=24))
            (src / identity / f"{n}.png").write_bytes(data)
    assert cli("build", "--source", "folder", "--source-path", src, "--plugin", "passthrough", "--out",
               root / "ds", "--shard-samples", 3) == 0
    return root / "ds"


def published(folder: Path) -> list[tuple[int, str, str, bytes]]:
    """(cls, key, identity, image bytes) of every sample, read from the shards with tarfile, in label then key
    order."""
    members = {}
    for tar in sorted((folder / "data" / "train").glob("*.tar")):
        with tarfile.open(tar) as archive:
            members.update({m.name: archive.extractfile(m).read() for m in archive.getmembers()})
    keys = {name.split(".")[0] for name in members}
    rows = [(int(members[f"{k}.cls"]), k, json.loads(members[f"{k}.json"])["identity"], members[f"{k}.png"])
            for k in keys]
    return sorted(rows)


class RecordIO:
    """A RecordIO file as the format defines it: .idx lines key<TAB>offset; chunks of magic, lrec = cflag << 29 |
    length, payload, padding to 4; cflag 1/2/3 parts joined with the magic word; an IRHeader '<IfQQ' whose flag > 0
    counts float32 labels after it."""

    def __init__(self, folder: Path):
        self.index = {}
        for line in (folder / "train.idx").read_text().splitlines():
            key, offset = line.split("\t")
            self.index[int(key)] = int(offset)
        self.data = (folder / "train.rec").read_bytes()
        self.cflags = Counter()

    def read(self, key: int) -> tuple[int, tuple[float, ...], bytes]:
        position, parts = self.index[key], []
        while True:
            magic, lrec = struct.unpack_from("<II", self.data, position)
            assert magic == MAGIC
            cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
            self.cflags[cflag] += 1
            parts.append(self.data[position + 8:position + 8 + length])
            position += 8 + length + (-length % 4)
            if cflag in (0, 3):
                break
        payload = struct.pack("<I", MAGIC).join(parts)
        flag, label, _, _ = struct.unpack_from("<IfQQ", payload)
        labels = struct.unpack_from(f"<{flag}f", payload, 24) if flag else (label,)
        return flag, labels, payload[24 + 4 * flag:]


def test_rec_export_reads_as_arcface_torch_reads_it(dataset, tmp_path):
    to = tmp_path / "rec"
    assert cli("export", dataset, "--format", "rec", "--to", to) == 0
    reference = published(dataset)
    rec = RecordIO(to)
    flag, labels, image = rec.read(0)  # MXFaceDataset: record 0, then range(1, label[0]), each record's class
    assert flag == 2 and image == b"" and labels == (len(reference) + 1, len(reference) + 1 + len(IMAGES))
    got = []
    for key in range(1, int(labels[0])):
        _, record_labels, image = rec.read(key)
        got.append((int(record_labels[0]), image))
    assert got == [(cls, data) for cls, _, _, data in reference]  # labels and bytes, in label order
    assert rec.cflags[1] == 1 and rec.cflags[3] == 1  # the record holding the magic word was cut and joined
    ranges = [rec.read(key)[1] for key in range(int(labels[0]), int(labels[1]))]  # identity records [start, end)
    assert [int(end - start) for start, end in ranges] == list(IMAGES.values())
    assert {got[k - 1][0] for start, end in ranges for k in range(int(start), int(end))} == {0, 1, 2, 3}
    assert (to / "property").read_text() == "4,24,24\n"
    card, source = DatasetCard.load(to / "README.md"), DatasetCard.load(dataset / "README.md")
    assert "This folder is an export of `ds` made with `facegen export`: MXNet RecordIO in insightface's" in card.text
    assert "`datasets` does not read these files" in card.text
    meta, source_meta = card.data.to_dict(), source.data.to_dict()
    assert "configs" not in meta and "dataset_info" not in meta  # nothing `datasets` would look for here
    assert {k: v for k, v in meta.items() if k != "tags"} == {k: v for k, v in source_meta.items()
                                                              if k not in ("configs", "dataset_info", "tags")}
    assert source.text.lstrip() in card.text  # the prose (licence section, citation) unchanged
    assert (to / "LICENSE").read_bytes() == (dataset / "LICENSE").read_bytes()
    assert sorted(p.name for p in to.iterdir()) == [".facegen-export.json", "LICENSE", "README.md", "property",
                                                    "train.idx", "train.rec"]
    assert cli("export", dataset, "--format", "rec", "--to", to) == 0  # done: nothing to do, same bytes
    assert RecordIO(to).data == rec.data


def test_shuffled_rec_export_is_header_less_and_seeded(dataset, tmp_path, capsys):
    for name in ("a", "b"):
        assert cli("export", dataset, "--format", "rec", "--shuffle", "--seed", 7, "--to", tmp_path / name) == 0
    assert (tmp_path / "a" / "train.rec").read_bytes() == (tmp_path / "b" / "train.rec").read_bytes()
    rec, reference = RecordIO(tmp_path / "a"), published(dataset)
    assert sorted(rec.index) == list(range(len(reference)))  # DALI's reader: every key an image, no header
    records = [rec.read(key) for key in range(len(reference))]
    assert all(flag == 0 for flag, _, _ in records)
    got = [(int(labels[0]), image) for _, labels, image in records]
    assert sorted(got) == sorted((cls, data) for cls, _, _, data in reference)
    assert got != [(cls, data) for cls, _, _, data in reference]  # shuffled
    code = cli("export", dataset, "--format", "imagefolder", "--shuffle", "--to", tmp_path / "c")
    assert code == 2 and "--shuffle" in capsys.readouterr().err


def test_imagefolder_export_loads_as_image_folder_does(dataset, tmp_path):
    to = tmp_path / "folders"
    assert cli("export", dataset, "--format", "imagefolder", "--to", to) == 0
    classes = sorted(entry.name for entry in os.scandir(to) if entry.is_dir())  # ImageFolder.find_classes
    assert classes == sorted(IMAGES)
    reference = published(dataset)
    for identity in classes:
        files = sorted(p for p in (to / identity).iterdir() if p.suffix == ".png")
        expected = [(key.split("_")[1], data) for _, key, ident, data in reference if ident == identity]
        assert [(p.stem, p.read_bytes()) for p in files] == expected
    assert not [p for p in to.rglob(".*") if p.name != ".facegen-export.json"]  # no temporaries left


def folder_dataset(root: Path, identities: dict[str, list[int | bytes]]) -> Path:
    """A passthrough build of a folder source: identity -> its images, each a size (a face drawn that size) or the
    file's bytes (an empty list: an empty folder)."""
    for i, (identity, images) in enumerate(identities.items()):
        (root / "src" / identity).mkdir(parents=True)
        for n, image in enumerate(images):
            data = image if isinstance(image, bytes) else encode(draw_face(i, n, size=image))
            (root / "src" / identity / f"{n}.png").write_bytes(data)
    assert cli("build", "--source", "folder", "--source-path", root / "src", "--plugin", "passthrough", "--out",
               root / "ds") == 0
    return root / "ds"


def test_imagefolder_export_loads_with_datasets(dataset, tmp_path):
    """The card beside the export declares its images (not the shards' ``data/train/*.tar``): `load_dataset` on the
    folder gets every image with its folder's name as label; also a single identity named like a split, which
    datasets' own inference would take for a "test" split without labels."""
    import datasets

    def loaded(train) -> list[tuple[str, bytes]]:
        names = train.features["label"].names
        return sorted((names[row["label"]], row["image"]["bytes"] or Path(row["image"]["path"]).read_bytes())
                      for row in train.cast_column("image", datasets.Image(decode=False)))

    to = tmp_path / "folders"
    assert cli("export", dataset, "--format", "imagefolder", "--to", to) == 0
    expected = sorted((identity, data) for _, _, identity, data in published(dataset))
    for got in (datasets.load_dataset(str(to)), datasets.load_dataset("imagefolder", data_dir=str(to))):
        assert list(got) == ["train"] and loaded(got["train"]) == expected
    card = DatasetCard.load(to / "README.md")
    assert card.data.to_dict()["license"] == DatasetCard.load(dataset / "README.md").data.to_dict()["license"]
    assert "dataset_info" not in card.data.to_dict()

    lone = folder_dataset(tmp_path / "lone", {"test": [24, 24]})
    assert cli("export", lone, "--format", "imagefolder", "--to", tmp_path / "lone-if") == 0
    got = datasets.load_dataset(str(tmp_path / "lone-if"))
    assert list(got) == ["train"] and loaded(got["train"]) == [("test", data) for *_, data in published(lone)]


def test_export_of_a_dataset_whose_card_yaml_is_broken_is_one_line(dataset, tmp_path):
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    (copy / "README.md").write_text("---\nlicense: [unclosed\n---\n# The prose\n", encoding="utf-8")
    result = facegen("export", copy, "--format", "imagefolder", "--to", tmp_path / "if")
    # a card is input (facegen.card_yaml): its licence cannot be copied from YAML that does not parse
    assert result.returncode == 2 and "does not parse" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "if" / "README.md").exists()


def test_rec_export_warns_about_mixed_sizes(tmp_path):
    ds = folder_dataset(tmp_path, {"ada": [24, 24], "bo": [32], "cy": [24, 40]})
    result = facegen("export", ds, "--format", "rec", "--to", tmp_path / "rec")
    assert result.returncode == 0
    assert (tmp_path / "rec" / "property").read_text() == "3,24,24\n"  # the most common size
    warning = [line for line in result.stderr.splitlines() if "24x24" in line]
    assert len(warning) == 1 and "2 of 5 exported images are not 24x24" in warning[0] and "112x112" in warning[0]
    uniform = facegen("export", folder_dataset(tmp_path / "u", {"ada": [24], "bo": [24]}), "--format", "rec",
                      "--to", tmp_path / "u-rec")
    assert uniform.returncode == 0 and "exported images are not" not in uniform.stderr


def test_rec_export_numbers_classes_without_gaps(tmp_path):
    """A label with no image (an empty identity folder; an identity whose only image was skipped by the build) is
    not a class of the export: record 0, the identity records, property, the labels and the summary agree."""
    broken = b"\x89PNG\r\n\x1a\nbroken"
    ds = folder_dataset(tmp_path, {"ada": [24, 24], "bo": [], "cy": [broken], "di": [24, 24, 24]})
    reference = published(ds)
    result = facegen("export", ds, "--format", "rec", "--to", tmp_path / "rec")
    assert result.returncode == 0 and "5 images of 2 identities; skipped 0" in result.stdout
    rec = RecordIO(tmp_path / "rec")
    _, (first, end), _ = rec.read(0)
    assert (first, end) == (len(reference) + 1, len(reference) + 1 + 2)
    labels = [int(rec.read(key)[1][0]) for key in range(1, int(first))]
    assert labels == [0, 0, 1, 1, 1]
    assert [tuple(map(int, rec.read(key)[1])) for key in range(int(first), int(end))] == [(1, 3), (3, 6)]
    assert (tmp_path / "rec" / "property").read_text() == "2,24,24\n"

    assert cli("export", ds, "--format", "rec", "--shuffle", "--to", tmp_path / "shuffled") == 0
    shuffled = RecordIO(tmp_path / "shuffled")
    assert sorted(int(shuffled.read(key)[1][0]) for key in shuffled.index) == [0, 0, 1, 1, 1]
    assert (tmp_path / "shuffled" / "property").read_text() == "2,24,24\n"


def test_export_refuses_a_folder_it_did_not_write_and_another_export(dataset, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert cli("export", dataset, "--format", "rec", "--to", tmp_path / "mine") == 2
    assert "not empty" in capsys.readouterr().err
    assert cli("export", dataset, "--format", "rec", "--to", tmp_path / "x") == 0
    assert cli("export", dataset, "--format", "imagefolder", "--to", tmp_path / "x") == 2
    assert "differs" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_interrupted_rec_export_resumes_from_its_checkpoint_byte_identical(dataset, tmp_path, monkeypatch):
    from facegen.builders import export as export_module
    from facegen.layout.records import ExportRecord

    assert cli("export", dataset, "--format", "rec", "--to", tmp_path / "whole") == 0
    monkeypatch.setattr(export_module, "CHECKPOINT_RECORDS", 2)
    real_write, calls = export_module.RecExport._write, []

    def interrupted(self, rec, idx, key, payload):
        calls.append(key)
        written = real_write(self, rec, idx, key, payload)
        if len(calls) == 6:  # record 0, images 1-4 (a checkpoint after 2 and after 4), image 5, then stopped
            raise KeyboardInterrupt
        return written

    monkeypatch.setattr(export_module.RecExport, "_write", interrupted)
    to = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        export_module.export(dataset, to, "rec", progress=False)
    record = ExportRecord.read(to / ".facegen-export.json")
    assert (record.position, record.written, record.complete) == (4, 4, False)
    assert not (to / "train.rec").exists() and (to / ".train.rec.partial").stat().st_size > record.rec_bytes
    monkeypatch.setattr(export_module.RecExport, "_write", real_write)
    summary = export_module.export(dataset, to, "rec", progress=False)
    assert summary.resumed_at == 4 and summary.written == len(published(dataset))
    for name in ("train.rec", "train.idx", "property"):
        assert (to / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert not list(to.glob(".*.partial"))


@pytest.mark.slow
def test_kill_9_mid_export_then_rerun_is_byte_identical(tmp_path):
    src = write_folder_source(tmp_path / "src", identities=40, images_per_identity=40, size=16, noise=0)
    ds = tmp_path / "ds"
    assert cli("build", "--source", "folder", "--source-path", src, "--plugin", "passthrough", "--out", ds) == 0
    command = [str(BIN / "facegen"), "export", str(ds), "--format", "rec", "--to"]
    subprocess.run([*command, str(tmp_path / "whole")], check=True, capture_output=True)
    to, partial = tmp_path / "killed", tmp_path / "killed" / ".train.rec.partial"
    for attempt in range(5):  # kill as soon as records are being written: before the end, mid-file
        proc = subprocess.Popen([*command, str(to)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not (partial.exists() and partial.stat().st_size > 4096):
            time.sleep(0.0005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        proc.wait()
        subprocess.run(["rm", "-rf", str(to)], check=True)
    else:
        pytest.fail("the export always finished before it could be killed")
    assert not (to / "train.rec").exists() and partial.exists()  # never a visible, incomplete train.rec
    subprocess.run([*command, str(to)], check=True, capture_output=True)
    for name in ("train.rec", "train.idx", "property", "README.md"):
        assert (to / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert not list(to.glob(".*.partial"))


def test_png_bytes_are_exported_as_png(dataset, tmp_path):
    """arcface_torch decodes with mx.image.imdecode (OpenCV), which reads PNG: the bytes are never re-encoded."""
    from PIL import Image

    to = tmp_path / "rec"
    assert cli("export", dataset, "--format", "rec", "--to", to) == 0
    image = RecordIO(to).read(1)[2]
    assert image[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(image)) as decoded:
        assert decoded.size == (24, 24)


def test_imagefolder_fallback_names_never_take_a_folder_already_named(tmp_path):
    """An identity named ``cls-000001`` (class 0) and one whose name is no safe folder name (a trailing space) with
    class 1: the latter's fallback ``cls-000001`` was the former's folder, and one identity's images were lost."""
    ds = folder_dataset(tmp_path, {"cls-000001": [24, 24], "zz ": [24, 24, 24]})
    to = tmp_path / "folders"
    assert cli("export", ds, "--format", "imagefolder", "--to", to) == 0
    folders = {entry.name: sorted(p.read_bytes() for p in Path(entry.path).glob("*.png"))
               for entry in os.scandir(to) if entry.is_dir()}
    expected = {}
    for _, _, identity, data in published(ds):
        expected.setdefault(identity, []).append(data)
    assert len(folders) == 2 and folders["cls-000001"] == sorted(expected["cls-000001"])
    assert sorted(folders.values()) == sorted(map(sorted, expected.values()))
