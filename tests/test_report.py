"""`facegen report` and `facegen curate` on real faces with real models, and their plumbing with tiny ones.

The real-face tests use photos shipped in PyPI packages (insightface's t1.jpg and Tom_Hanks_54745.png,
scikit-image's astronaut), aligned by dlib's real detector and landmarks, augmented into identities with one
planted near-duplicate identity and one planted outlier image, and dlib's real recogniser (weights from PyPI).
"""

import io
import json
import re
import tarfile

import numpy as np
import pytest
from datasets import load_dataset
from PIL import Image

from facegen.builders.quality.curate import decide, near_duplicate_groups
from facegen.errors import UsageError
from facegen.layout.records import Curation, QualityReport, RecordError, ReportSettings
from facegen.published import PublishedDataset
from facegen.testing.output import write_output_folder
from conftest import build, facegen, run_cli

IMAGES = 6


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """(dataset folder, planted flaws, source folder): 9 real identities + 1 planted duplicate, 3 per shard."""
    from facegen.testing.real_faces import write_real_identities

    root = tmp_path_factory.mktemp("real")
    planted = write_real_identities(root / "src", images_per_identity=IMAGES)
    build("--source", "folder", "--source-path", root / "src", "--plugin", "passthrough", "--out", root / "out",
          "--shard-size", 3)
    return root / "out", planted, root / "src"


def tar_members(folder):
    found = {}
    for path in sorted((folder / "data" / "train").glob("*.tar")):
        with tarfile.open(path) as tar:
            found.update({m.name: tar.extractfile(m).read() for m in tar if m.isfile()})
    return found


@pytest.mark.slow
def test_report_finds_exactly_the_planted_duplicate_and_outlier(real, capsys):
    out, planted, _ = real
    code, stdout, err = run_cli(["report", out], capsys)
    assert code == 0, err
    assert "sample/s]" in err  # the progress bar shows the rate
    report = json.loads((out / ".facegen" / "report.json").read_text())
    total = len(planted.identities) * IMAGES - 1 + 1  # the duplicate has one image fewer, t1-2 one more
    assert report["dataset"]["samples"] == report["dataset"]["embedded"] == total
    assert [sorted(p[:2]) for p in report["near_duplicate_identities"]] == [sorted(planted.duplicate)]
    assert report["near_duplicate_identities"][0][2] >= 0.95
    assert [(o["identity"], o["source_ref"]) for o in report["outliers"]] == [
        (planted.outlier_identity, f"{planted.outlier_identity}/{planted.outlier_file}")]
    assert report["image_modes"] == {"RGB": total} and report["image_sizes"] == {"112x112": total}
    rows = {r["identity"]: r for r in report["identities"]}
    assert rows[planted.duplicate[1]]["nearest"] == planted.duplicate[0]
    # the plots are PNG files, and the card embeds exactly those with relative links
    assert report["plots"] == ["report/consistency.png", "report/separability.png", "report/worst-identities.png"]
    readme = (out / "README.md").read_text()
    quality = readme.split("## Quality", 1)[1].split("\n## ", 1)[0]
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", quality)
    assert linked == report["plots"]
    for path in linked:
        with Image.open(out / path) as image:
            assert image.format == "PNG" and image.width > 200
    assert f"`{planted.outlier_identity}/{planted.outlier_file}`" in quality
    # `facegen card` keeps the section; publish uploads the plots
    assert run_cli(["card", out], capsys)[0] == 0
    assert "## Quality" in (out / "README.md").read_text()
    from facegen.builders.hub.publish import files_to_upload

    uploaded = {f.path for f in files_to_upload(out)}
    assert set(report["plots"]) <= uploaded
    assert not any(p.startswith(".facegen") for p in uploaded)


@pytest.mark.slow
def test_curate_removes_exactly_the_planted_flaws(real, tmp_path, capsys):
    out, planted, _ = real
    new = tmp_path / "curated"
    code, stdout, err = run_cli(["curate", out, "--out", new], capsys)
    assert code == 0, err
    report = json.loads((new / ".facegen" / "parent-report" / "report.json").read_text())  # OUT is not written to
    assert report["embedding"]["reused"] is True  # the first report's embeddings, thresholds applied again
    original, duplicate = planted.duplicate  # the duplicate has fewer images: the original is kept
    rows = list(load_dataset(str(new), split="train", streaming=True))
    kept = [i for i in planted.identities if i != duplicate]
    assert sorted({r["json"]["identity"] for r in rows}) == sorted(kept)
    assert len(rows) == len(kept) * IMAGES
    assert sorted({r["cls"] for r in rows}) == list(range(len(kept)))
    assert not any(r["json"]["parent_source_ref"].endswith(planted.outlier_file) and
                   r["json"]["identity"] == planted.outlier_identity for r in rows)
    parent, child = tar_members(out), tar_members(new)
    for r in rows:  # bytes as they were
        assert child[f"{r['__key__']}.png"] == parent[r["json"]["source_ref"].rpartition("#")[2] + ".png"]
    curation = json.loads((new / ".facegen" / "curation.json").read_text())
    assert [(x["identity"], x["reason"]) for x in curation["removed_identities"]] == [(duplicate, "near-duplicate")]
    assert [(x["identity"], x["reason"]) for x in curation["removed_samples"]] == [
        (planted.outlier_identity, "outlier")]
    readme = (new / "README.md").read_text()
    section = readme.split("## Curation", 1)[1].split("\n## ", 1)[0]
    assert f"`{duplicate}`" in section and "near-duplicate" in section and "outlier" in section
    assert "@misc{out," in readme  # cites OUT
    # nothing publishable names a local path: OUT is a placeholder, the curation file a provenance file, and the
    # licence table names the parent dataset (its folder's name), not the `facegen` plugin
    assert "--source-path '<facegen source folder>'" in readme and "curation=provenance/curation.json" in readme
    assert json.loads((new / "provenance" / "curation.json").read_text()) == curation
    assert "| `out (facegen dataset)` |" in readme.split("## Licence", 1)[1]
    no_local_paths(new, out.parent, tmp_path)
    # rerunning the same command resumes (nothing to do); other decisions in the same folder are refused
    assert run_cli(["curate", out, "--out", new], capsys)[0] == 0
    code, _, err = run_cli(["curate", out, "--out", new, "--min-similarity", "0.5"], capsys)
    assert code == 2 and "--overwrite" in err


@pytest.mark.slow
def test_against_lists_the_identities_another_dataset_holds(real, tmp_path, capsys):
    out, planted, src = real
    ids = tmp_path / "ids.txt"
    ids.write_text("t1-0\nt1-4\n")
    evaluation = tmp_path / "evaluation"
    build("--source", "folder", "--source-path", src, "--identities-file", ids, "--plugin", "passthrough",
          "--out", evaluation)
    code, _, err = run_cli(["report", out, "--against", evaluation], capsys)
    assert code == 0, err
    report = json.loads((out / ".facegen" / "report.json").read_text())
    assert sorted(m[0] for m in report["against"]["matches"]) == ["t1-0", "t1-4"]
    assert all(m[0] == m[1] for m in report["against"]["matches"])
    assert "identity leakage" in (out / "README.md").read_text()


@pytest.mark.slow
def test_against_a_verification_bin_finds_the_planted_leak(real, tmp_path, capsys):
    """A training set of 3 real identities; a benchmark `.bin` (insightface's pickle of (bins, issame)) whose pairs
    show people absent from it, one undecodable image, and one image of t1-1 (the planted leak): only t1-1 is
    listed, with that benchmark image as its nearest."""
    import pickle

    _, _, src = real
    ids = tmp_path / "ids.txt"
    ids.write_text("t1-0\nt1-1\nt1-3\n")
    train = tmp_path / "train"
    build("--source", "folder", "--source-path", src, "--identities-file", ids, "--plugin", "passthrough",
          "--out", train)
    absent = [(src / name / "00.png").read_bytes() for name in ("astronaut", "t1-5", "hanks", "t1-2")]
    leak = (src / "t1-1" / "03.png").read_bytes()
    bins = [absent[0], absent[1], absent[2], leak, absent[3], b"not an image"]
    lfw = tmp_path / "lfw.bin"
    lfw.write_bytes(pickle.dumps((bins, [False, False, False])))
    proc = facegen("report", train, "--against", lfw)
    assert proc.returncode == 0, proc.stderr
    against = json.loads((train / ".facegen" / "report.json").read_text())["against"]
    assert (against["kind"], against["pairs"], against["images"], against["embedded"]) == \
        ("verification images", 3, 6, 5)
    assert [m[:2] for m in against["matches"]] == [["t1-1", "pair-000001/right"]]
    assert against["matches"][0][2] >= against["threshold"] == 0.925
    assert "identities matching an image of lfw.bin (cosine >= 0.925): 1" in proc.stdout
    card = (train / "README.md").read_text()
    assert "matches an image of the benchmark `lfw.bin` (both sides of its 3 pairs" in card
    hostile = tmp_path / "hostile.bin"
    hostile.write_bytes(b"\x80\x04cposix\nsystem\n\x94.")
    proc = facegen("report", train, "--against", hostile)
    assert proc.returncode == 2 and "--against hostile.bin is not a verification pickle" in proc.stderr


def test_arcface_recognizer_plumbing_with_tiny_random_weights(tmp_path, capsys, tiny_face_models):
    """Random weights: only the path is checked (112x112 crops embedded as they are, a corrupt image counted)."""
    models = tiny_face_models
    out = write_output_folder(tmp_path / "out", identities=4, images_per_identity=3, shard_size=2)
    with tarfile.open(out / "data" / "train" / "train-000001.tar", "a") as tar:  # a sample that does not decode
        for name, data in (("000003_009.png", b"\x89PNG broken"), ("000003_009.cls", b"3"),
                           ("000003_009.json", b'{"identity": "id0003"}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    code, _, err = run_cli(["report", out, "--recognizer", "arcface", "--model-dir", models], capsys)
    assert code == 0, err
    report = json.loads((out / ".facegen" / "report.json").read_text())
    assert report["settings"]["dedup"] == 0.6 and report["settings"]["min_similarity"] == 0.3
    assert report["dataset"]["samples"] == 13 and report["dataset"]["embedded"] == 12
    assert list(report["skipped"]) == ["corrupt image (UnidentifiedImageError)"]
    assert np.isfinite([r["consistency_mean"] for r in report["identities"]]).all()
    code, _, err = run_cli(["report", out, "--dedup", "2"], capsys)
    assert code == 2 and "between -1 and 1" in err and err.count("\n") == 1


def test_curation_decisions_follow_the_rules(tmp_path):
    """Groups are connected components; a group keeps the identity with most images, ties to the first."""
    out = write_output_folder(tmp_path / "out", identities=6, images_per_identity=3, shard_size=3)
    dataset = PublishedDataset(out)
    a, b, c, d, e, f = dataset.identities
    pairs = [[b, c, 0.97], [a, b, 0.96], [d, e, 0.99]]  # a-b-c is one group through b
    assert near_duplicate_groups(pairs, {x: i for i, x in enumerate(dataset.identities)}) == [[a, b, c], [d, e]]
    by_id = dataset.by_identity
    report = QualityReport(
        facegen_version="0", created="2026-01-01T00:00:00+00:00", fingerprint=dataset.fingerprint(),
        settings=ReportSettings("dlib", "dlib", 0.95, 0.9, {}), embedding={}, dataset={}, summary={}, image_modes={},
        image_sizes={}, skipped={}, skipped_samples=[], identities=[], plots=[], seconds=0.0,
        near_duplicate_identities=pairs,
        outliers=[{"identity": f, "key": by_id[f][0].key, "cosine": 0.5},
                  {"identity": b, "key": by_id[b][0].key, "cosine": 0.4},  # b goes anyway
                  {"identity": a, "key": by_id[a][1].key, "cosine": 0.3}])
    curation = decide(dataset, report, min_images=3)
    removed = {r["identity"]: r["reason"] for r in curation.removed_identities}
    # ties (3 images each): a and d, the first of their groups, stay; but a lost an outlier and has 2 left
    assert removed == {b: "near-duplicate", c: "near-duplicate", e: "near-duplicate", a: "too few images",
                       f: "too few images"}
    assert curation.removed_samples == []
    curation = decide(dataset, report, min_images=1)
    assert {r["identity"] for r in curation.removed_identities} == {b, c, e}
    assert [s["key"] for s in curation.removed_samples] == [by_id[f][0].key, by_id[a][1].key]
    assert curation.report_created == report.created and curation.decisions()["min_images"] == 1
    # the file written is read back as the same record; a damaged or foreign one is one line
    assert Curation.from_dict(json.loads(curation.to_json())) == curation
    for bad in ([], {"removed_identities": [{"reason": "x"}]}, {"dedup": "high"}):
        with pytest.raises(RecordError):
            Curation.from_dict(bad)
    assert QualityReport.from_dict(json.loads(report.to_json())) == report
    assert QualityReport.read(tmp_path / "missing.json") is None


def test_dlib_recognizer_detects_faces_in_large_images_and_finds_none_in_a_flat_one():
    """Non-tight images go through dlib's real HOG detector (large ones on a downscaled copy)."""
    from skimage import data

    from facegen.generators.dlib_recognizer import DlibRecognizer

    astronaut = data.astronaut()  # 512 px, not a tight crop
    large = np.asarray(Image.fromarray(astronaut).resize((1024, 1024), Image.BICUBIC))
    flat = np.full((300, 300, 3), 128, np.uint8)
    small, big, none = DlibRecognizer().embed([astronaut, large, flat])
    assert none is None
    assert float(small @ big / np.linalg.norm(small) / np.linalg.norm(big)) > 0.99


# ------------------------------------------------------------------ Hub ids (against tests/hub_standin.py)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The Hub stand-in, with this process's huggingface_hub talking to it: its endpoint, an empty cache of the
    test's own, the stand-in's token, no saved login."""
    from hub_standin import HubStandIn
    from test_hub_roundtrip import TOKEN

    with HubStandIn(tokens=(TOKEN,)) as standin:
        standin.serve_this_process(monkeypatch, tmp_path / "hf-home", TOKEN)
        yield standin


def no_local_paths(folder, *private):
    from facegen.builders.hub.publish import files_to_upload

    for f in files_to_upload(folder):
        data = (folder / f.path).read_bytes()
        for path in private:
            assert str(path).encode() not in data, (f.path, str(path))


@pytest.mark.slow
def test_report_curate_and_the_facegen_source_take_a_hub_id(real, tmp_path, hub):
    """Publish the real-face dataset to the Hub stand-in as org/x, then: build from it with `--source facegen
    --source-path org/x`, `facegen report org/x --out DIR` (same findings as on the folder), `--against org/x`,
    and `facegen curate hf://datasets/org/x --out NEW`, whose card names no local path and cites org/x.

    org/x holds five of the module's identities (what is tested here is the Hub plumbing; the folder tests above
    find the flaws among all of them): the planted duplicate pair, the identity holding the outlier, and the two
    identities of the evaluation list."""
    _, planted, src = real
    identities = [*planted.duplicate, planted.outlier_identity, "t1-0", "t1-4"]
    ids = tmp_path / "subset.txt"
    ids.write_text("\n".join(identities) + "\n")
    out = tmp_path / "out"
    build("--source", "folder", "--source-path", src, "--identities-file", ids, "--plugin", "passthrough", "--out",
          out, "--shard-size", 3)
    proc = facegen("publish", out, "--repo", "org/x")
    assert proc.returncode == 0, proc.stderr[-3000:]

    # 1. the facegen source reads the Hub dataset
    child = tmp_path / "child"
    proc = facegen("build", "--source", "facegen", "--source-path", "org/x", "--plugin",
                   "passthrough", "--out", child)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parent = tar_members(out)
    rows = list(load_dataset(str(child), split="train", streaming=True))
    assert len(rows) == len([n for n in parent if n.endswith(".png")])
    for r in rows:
        ref = r["json"]["source_ref"]
        assert re.fullmatch(r"hf://datasets/org/x/data/train/train-\d{6}\.tar#\d{6}_\d{3}", ref), ref
        assert r["png"] is not None
    readme = (child / "README.md").read_text()
    assert "--source-path org/x" in readme and "| `org/x (facegen dataset)` |" in readme
    no_local_paths(child, tmp_path)

    # 2. the report of a Hub id goes to --out DIR (required) and finds what it finds on the folder
    code = facegen("report", "org/x")
    assert code.returncode == 2 and "--out DIR" in code.stderr and code.stderr.count("\n") == 1
    reports = tmp_path / "reports"
    proc = facegen("report", "org/x", "--out", reports)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((reports / "report.json").read_text())
    assert report["dataset_name"] == "org/x"
    assert [sorted(p[:2]) for p in report["near_duplicate_identities"]] == [sorted(planted.duplicate)]
    assert [o["identity"] for o in report["outliers"]] == [planted.outlier_identity]
    assert sorted(p.name for p in (reports / "report").glob("*.png")) == [
        "consistency.png", "separability.png", "worst-identities.png"]
    assert (reports / "report_embeddings.npz").is_file()
    rerun = facegen("report", "hf://datasets/org/x", "--out", reports, "--dedup", "0.99")
    assert rerun.returncode == 0 and "(reused)" in rerun.stdout, rerun.stderr[-3000:]

    # 3. --against a Hub id: the evaluation identities are found in org/x
    ids = tmp_path / "ids.txt"
    ids.write_text("t1-0\nt1-4\n")
    evaluation = tmp_path / "evaluation"
    build("--source", "folder", "--source-path", src, "--identities-file", ids, "--plugin", "passthrough",
          "--out", evaluation)
    proc = facegen("report", evaluation, "--against", "org/x")
    assert proc.returncode == 0, proc.stderr[-3000:]
    against = json.loads((evaluation / ".facegen" / "report.json").read_text())["against"]
    assert against["dataset"] == "org/x"
    assert sorted({m[0] for m in against["matches"]}) == ["t1-0", "t1-4"]

    # 4. curate a Hub id: the report is kept in NEW, the card cites org/x and names no local path
    new = tmp_path / "curated"
    proc = facegen("curate", "hf://datasets/org/x", "--out", new)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (new / ".facegen" / "parent-report" / "report.json").is_file()
    rows = list(load_dataset(str(new), split="train", streaming=True))
    kept = [i for i in identities if i != planted.duplicate[1]]
    assert sorted({r["json"]["identity"] for r in rows}) == sorted(kept) and len(rows) == len(kept) * IMAGES
    readme = (new / "README.md").read_text()
    assert "--source-path hf://datasets/org/x" in readme and "curation=provenance/curation.json" in readme
    assert "(facegen dataset)" in readme.split("## Licence", 1)[1] and "`facegen` |" not in readme
    assert (new / "provenance" / "curation.json").is_file()
    no_local_paths(new, tmp_path)


def test_missing_plot_package_names_the_readmes_install(monkeypatch):
    import sys

    from facegen.builders.quality.report import _pyplot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(UsageError) as info:
        _pyplot()
    assert 'pip install -e ".[report]"' in str(info.value)  # the README's install, from a checkout


def test_report_on_one_image_per_identity_plots_a_degenerate_range(tmp_path, capsys):
    """One image per identity: every sample's cosine to its prototype is 1 within an ulp; numpy cannot cut that
    range into bins, so the plot gets a small range of its own."""
    from facegen.testing.arcface import write_tiny_face_models

    models = write_tiny_face_models(tmp_path / "models")
    out = write_output_folder(tmp_path / "out", identities=2, images_per_identity=1, card=False)
    code, _, err = run_cli(["report", out, "--recognizer", "arcface", "--model-dir", models], capsys)
    assert code == 0, err
    report = json.loads((out / ".facegen" / "report.json").read_text())
    assert "report/consistency.png" in report["plots"]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels (its header, an empty image stream)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_against_a_verification_bin_does_not_decode_an_image_over_the_pixel_limit(tmp_path):
    """A .bin whose image declares 13000x13000 pixels (a 164 KB PNG inflates to 0.5 GB, referenced by every pair):
    counted as too large from its header, never decoded; a broken image is counted as corrupt."""
    import pickle
    import warnings

    from facegen.builders.quality.leakage import benchmark_leakage

    class Recognizer:
        def embed(self, images):
            return [np.ones(4, np.float32) / 2 for _ in images]

    small = io.BytesIO()
    Image.new("RGB", (8, 8)).save(small, "PNG")
    huge = png_header_only(13000, 13000)
    lfw = tmp_path / "lfw.bin"
    lfw.write_bytes(pickle.dumps(([small.getvalue(), huge, huge, b"not an image"], [True, False])))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even PIL's DecompressionBombWarning
        against = benchmark_leakage(["a"], np.ones((1, 4), np.float32) / 2, lfw, Recognizer(), 0.9,
                                    progress=False)
    assert against["embedded"] == 1
    assert against["skipped"] == {"corrupt image (UnidentifiedImageError)": 1, "image too large": 2}
