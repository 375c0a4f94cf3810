"""Every image in a shard decodes, and nothing changes silently (issue 10, §1 and §2).

Hostile fixtures are real files: a JPEG cut short (PIL opens it and `verify()` passes, the decode fails) and a PNG
whose IDAT stream ends early with every chunk CRC valid (PIL's `verify()` passes, the decode fails).
"""

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import cli, run_cli
from facegen.builders.engine.images import CheckedImage, ImageError, check_image, prepare_image
from facegen.testing.folder import draw_face, encode
from facegen.testing.sfhq import write_sfhq_source

# --------------------------------------------------------------------------------------------- hostile fixtures


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        chunks.append((kind, data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return chunks


def png_from_chunks(chunks) -> bytes:
    out = [b"\x89PNG\r\n\x1a\n"]
    for kind, body in chunks:
        out.append(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body)))
    return b"".join(out)


def png_with_short_idat(data: bytes, keep: float = 0.5) -> bytes:
    """The same PNG whose IDAT stream ends early (cut mid-stream), with every chunk CRC recomputed."""
    chunks = png_chunks(data)
    stream = b"".join(body for kind, body in chunks if kind == b"IDAT")
    rebuilt = [(k, b) for k, b in chunks if k not in (b"IDAT", b"IEND")]
    return png_from_chunks(rebuilt + [(b"IDAT", stream[: int(len(stream) * keep)]), (b"IEND", b"")])


def png_with_missing_rows(data: bytes, keep: float = 0.5) -> bytes:
    """The same PNG whose IDAT holds a complete zlib stream of only the first rows; every CRC recomputed."""
    chunks = png_chunks(data)
    pixels = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    rebuilt = [(k, b) for k, b in chunks if k not in (b"IDAT", b"IEND")]
    return png_from_chunks(rebuilt + [(b"IDAT", zlib.compress(pixels[: int(len(pixels) * keep)])),
                                      (b"IEND", b"")])


def png_with_bad_filter_byte(data: bytes) -> bytes:
    """Complete length, valid CRCs, but one row's filter type is 9 (PNG knows 0-4)."""
    chunks = png_chunks(data)
    pixels = bytearray(zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT")))
    width = struct.unpack_from(">I", chunks[0][1])[0]
    pixels[(width * 3 + 1) * 5] = 9
    rebuilt = [(k, b) for k, b in chunks if k not in (b"IDAT", b"IEND")]
    return png_from_chunks(rebuilt + [(b"IDAT", zlib.compress(bytes(pixels))), (b"IEND", b"")])


def truncated_jpeg(data: bytes) -> bytes:
    return data[: len(data) * 3 // 5]


def exif_rotated_jpeg(image: Image.Image, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=92, exif=exif)
    return buf.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def decodes_with_pil(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:
        return False


def passes_pil_verify(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        return True
    except Exception:
        return False


GOOD_PNG = encode(draw_face(0, 0))
GOOD_JPEG = encode(draw_face(0, 1), "jpg")

# --------------------------------------------------------------------------------------------- the check itself


def test_the_hostile_fixtures_fool_pil_verify_but_not_a_decode():
    for bad in (png_with_short_idat(GOOD_PNG), truncated_jpeg(GOOD_JPEG), png_with_bad_filter_byte(GOOD_PNG)):
        assert passes_pil_verify(bad) and not decodes_with_pil(bad)


def test_pil_silently_blackens_missing_rows_and_the_full_check_refuses_them():
    bad = png_with_missing_rows(GOOD_PNG)
    assert decodes_with_pil(bad)  # PIL fills the missing half with black: a broken image that "decodes"
    with pytest.raises(ImageError, match="ends after"):
        check_image(bad, "full")


@pytest.mark.parametrize("make", [png_with_short_idat, png_with_bad_filter_byte, png_with_missing_rows])
def test_full_check_rejects_what_header_check_lets_through(make):
    bad = make(GOOD_PNG)
    assert check_image(bad, "header").format == "png"  # today's cheap check: passes
    with pytest.raises(ImageError) as info:
        check_image(bad, "full")
    assert info.value.reason == "corrupt image" and "0x" not in str(info.value)


def test_truncated_jpeg_is_rejected_with_a_readable_reason():
    with pytest.raises(ImageError, match="truncated"):
        check_image(truncated_jpeg(GOOD_JPEG), "full")
    with pytest.raises(ImageError) as info:
        check_image(b"not an image at all", "full")
    assert "BytesIO" not in str(info.value) and "0x" not in str(info.value)


@pytest.mark.parametrize("image", [
    Image.new("RGBA", (37, 51), (10, 20, 30, 40)),
    Image.new("L", (1, 1), 7),
    Image.new("P", (64, 3)),
    Image.fromarray(np.arange(65536, dtype=np.uint16).reshape(256, 256)),  # 16-bit greyscale
    draw_face(3, 2),
])
def test_fast_png_path_accepts_exactly_what_pil_decodes(image):
    data = png_bytes(image)
    checked = check_image(data, "full")
    assert isinstance(checked, CheckedImage) and bytes(checked) == data
    assert (checked.format, checked.mode, checked.size) == ("png", image.mode if image.mode != "I;16" else "I;16",
                                                            image.size)
    for keep in (0.9, 0.3):
        cut = png_with_short_idat(data, keep)  # a cut stream: refused exactly when PIL cannot decode it
        try:
            check_image(cut, "full")
            refused = False
        except ImageError:
            refused = True
        assert refused == (not decodes_with_pil(cut))
        with pytest.raises(ImageError):  # missing rows: always refused (PIL would blacken them)
            check_image(png_with_missing_rows(data, keep), "full")


def test_interlaced_png_is_decoded_in_full():
    buf = io.BytesIO()
    draw_face(1, 1).save(buf, format="PNG", interlace=True)
    assert check_image(buf.getvalue(), "full").size == (112, 112)
    cut = buf.getvalue()[: len(buf.getvalue()) - 3000]
    with pytest.raises(ImageError):
        check_image(cut, "full")


def test_jpeg_to_png_applies_the_exif_orientation_and_is_lossless():
    face = draw_face(2, 0).resize((112, 80))
    data = exif_rotated_jpeg(face, orientation=6)
    prepared = prepare_image(data, "png")
    assert prepared.changes == ["jpg -> png (lossless)", "EXIF orientation applied"]
    with Image.open(io.BytesIO(data)) as original:
        expected = np.asarray(ImageOps.exif_transpose(original).convert("RGB"))
    stored = np.asarray(Image.open(io.BytesIO(prepared.data)))
    assert stored.shape == (112, 80, 3) and np.array_equal(stored, expected)  # rotated, and no new loss


def test_a_png_never_becomes_a_jpeg_unless_asked():
    with pytest.raises(ImageError) as info:
        prepare_image(GOOD_PNG, "jpg")
    assert info.value.reason == "PNG image in a JPEG dataset" and "--format jpg" in str(info.value)
    assert prepare_image(GOOD_PNG, "jpg", lossy_allowed=True).changes == ["png -> jpg (lossy, --format jpg)"]
    rgba = png_bytes(Image.new("RGBA", (8, 8)))
    assert prepare_image(rgba, "jpg", lossy_allowed=True).changes == ["png -> jpg (lossy, --format jpg)",
                                                                      "mode RGBA -> RGB (JPEG)"]

# --------------------------------------------------------------------------------------------- builds


def folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def shard_members(out: Path) -> dict[str, bytes]:
    members = {}
    for tar_path in sorted((out / "data" / "train").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                members[m.name] = tar.extractfile(m).read()
    return members


def shard_stats(out: Path) -> dict:
    [path] = (out / ".facegen" / "shards").glob("*.json")
    return json.loads(path.read_text())


def every_image_decodes(out: Path, column: str) -> int:
    ds = datasets.load_dataset(str(out), split="train", download_mode="force_redownload")
    for row in ds:
        row[column].load()
    return ds.num_rows


@pytest.fixture
def hostile_png_folder(tmp_path):
    """Two identities of PNGs; one PNG's pixel stream ends early (all CRCs valid)."""
    files = {f"{i}/{k}.png": encode(draw_face(i, k)) for i in range(2) for k in range(3)}
    files["1/2.png"] = png_with_short_idat(files["1/2.png"])
    return folder(tmp_path / "png-src", files)


@pytest.fixture
def hostile_jpeg_folder(tmp_path):
    """Two identities of JPEGs; one is cut short, one is a PNG under a .jpg name."""
    files = {f"{i}/{k}.jpg": encode(draw_face(i, k), "jpg") for i in range(2) for k in range(3)}
    files["0/1.jpg"] = truncated_jpeg(files["0/1.jpg"])
    files["1/0.jpg"] = encode(draw_face(1, 0), "png")
    return folder(tmp_path / "jpg-src", files)


def passthrough(src, out, *extra):
    return ["build", "--source", "folder", "--source-path", src, "--plugin", "passthrough", "--out", out, *extra]


def test_undecodable_images_are_skipped_stop_strict_and_are_caught_by_publish(hostile_png_folder,
                                                                                hostile_jpeg_folder, tmp_path,
                                                                                capsys):
    for src, column, skipped in (
        (hostile_png_folder, "png", {"corrupt image": 1}),
        (hostile_jpeg_folder, "jpg", {"corrupt image": 1, "PNG image in a JPEG dataset": 1}),
    ):
        # default: every image decoded once; the broken one is a counted skip; the rest loads and decodes
        out = tmp_path / f"full-{column}"
        code, stdout, _ = run_cli(passthrough(src, out), capsys)
        assert code == 0
        stats = shard_stats(out)
        assert stats["skipped"] == skipped and stats["verify"] == "full"
        assert all("0x" not in f["detail"] for f in stats["failures"])
        assert every_image_decodes(out, column) == 6 - sum(skipped.values())
        run = json.loads((out / ".facegen" / "run.json").read_text())
        assert run["options"]["verify"] == "full" and run["image_column"] == column
        assert "every image was decoded once before it was written (`--verify full`)" in (out / "README.md").read_text()
        assert cli("publish", out, "--repo", "org/name", "--dry-run") == 0

        # --strict stops at the first bad one met (samples are read in the shuffled order), in one line
        code, _, stderr = run_cli(passthrough(src, tmp_path / f"strict-{column}", "--strict"), capsys)
        assert code == 2 and "Traceback" not in stderr
        assert any("bad sample " in line and reason in line for line in stderr.splitlines() for reason in skipped)

        # --verify header (today's cheap check) writes the broken image; publish's default check refuses it
        header = tmp_path / f"header-{column}"
        assert run_cli(passthrough(src, header, "--verify", "header"), capsys)[0] == 0
        assert shard_stats(header)["verify"] == "header"
        assert "`--verify header`" in (header / "README.md").read_text()
        assert json.loads((header / ".facegen" / "run.json").read_text())["options"]["verify"] == "header"
        code, _, stderr = run_cli(["publish", header, "--repo", "org/name", "--dry-run"], capsys)
        assert code == 1 and "1 image does not decode" in stderr and "truncated" in stderr
        assert "_info.json" not in stderr  # the shard's one problem, said once
        # and the skipped check is the user's explicit choice
        assert run_cli(["publish", header, "--repo", "org/name", "--dry-run", "--verify", "header"], capsys)[0] == 0

        # the check is part of the build's identity
        code, _, stderr = run_cli(passthrough(src, header), capsys)
        assert code == 2 and "differs in: verify" in stderr


def test_sfhq_truncated_jpeg_at_native_size_is_skipped(tmp_path, capsys):
    root = write_sfhq_source(tmp_path / "sfhq", images_per_part=4, size=96, corrupt_images=1, feature_dims={})
    out = tmp_path / "out"
    code, _, _ = run_cli(["build", "--source", "sfhq", "--source-path", root, "--source-opt", "extras=segmentation",
                          "--plugin", "passthrough", "--out", out, "--shard-size", "10"], capsys)
    assert code == 0
    stats = shard_stats(out)
    assert stats["skipped"] == {"corrupt image": 1} and stats["images"] == 3
    assert "truncated" in stats["failures"][0]["detail"]
    ds = datasets.load_dataset(str(out), split="train")
    for row in ds:
        row["jpg"].load()
        row["seg.png"].load()  # the segmentation extra was checked too (copied as bytes)


def test_an_image_extra_given_as_bytes_is_checked(tmp_path):
    from facegen.builders.engine.writer import SHARD, SampleFormat, TarWriter
    from facegen.layout import OutputFolder
    from facegen.records import Face, Identity, IdentityResult

    writer = TarWriter(OutputFolder(tmp_path), SHARD, 0, SampleFormat("png", "test"))
    ident = Identity("a", 0, 0)
    good = Face(image=GOOD_PNG, ext="png", ref="a/0", extras={"seg.png": png_bytes(Image.new("L", (8, 8)))})
    bad = Face(image=GOOD_PNG, ext="png", ref="a/1", extras={"seg.png": png_with_short_idat(GOOD_PNG)})
    result = IdentityResult(ident, faces=[good, bad])
    writer.write(result)
    writer.finish()
    stats = writer.commit()
    assert stats.images == 1 and stats.skipped == {"corrupt image": 1}
    assert stats.failures[0]["ref"] == "a/1"


def test_mixed_folder_keeps_pngs_converts_the_jpeg_losslessly_and_says_so(tmp_path, capsys):
    rotated = draw_face(0, 1).resize((112, 90))
    rgba = Image.new("RGBA", (64, 64), (200, 10, 10, 128))
    grey = Image.fromarray(np.random.default_rng(0).integers(0, 255, (51, 37), dtype=np.uint8))
    files = {
        "person_00/a.jpg": exif_rotated_jpeg(rotated, 6),  # first file of the first identity is a JPEG
        "person_00/b.png": encode(draw_face(0, 2)),
        "person_00/c.png": png_bytes(rgba),
        "person_01/a.png": png_bytes(grey),
        "person_01/b.png": encode(draw_face(1, 1)),
    }
    src = folder(tmp_path / "src", files)
    out = tmp_path / "out"
    assert run_cli(passthrough(src, out), capsys)[0] == 0
    members = shard_members(out)
    assert sorted(n for n in members if n.endswith((".png", ".jpg"))) == [
        "000000_000.png", "000000_001.png", "000000_002.png", "000001_000.png", "000001_001.png"]
    # every PNG is the user's file, byte for byte (modes and odd sizes kept)
    assert members["000000_001.png"] == files["person_00/b.png"]
    assert members["000000_002.png"] == files["person_00/c.png"]
    assert members["000001_000.png"] == files["person_01/a.png"]
    # the JPEG became a PNG, upright, with exactly the JPEG's decoded pixels
    with Image.open(io.BytesIO(files["person_00/a.jpg"])) as original:
        expected = np.asarray(ImageOps.exif_transpose(original).convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(members["000000_000.png"]))), expected)
    stats = shard_stats(out)
    assert stats["converted"] == {"jpg -> png (lossless)": 1, "EXIF orientation applied": 1}
    assert stats["image_modes"] == {"L": 1, "RGB": 3, "RGBA": 1}
    assert stats["image_sizes"] == {"112x112": 2, "90x112": 1, "64x64": 1, "37x51": 1}
    card = (out / "README.md").read_text()
    assert "| image modes | RGB: 3, L: 1, RGBA: 1 |" in card
    assert "112x112: 2" in card and "37x51: 1" in card
    assert "| images re-encoded or converted | 2 |" in card
    assert "| jpg -> png (lossless) | 1 |" in card and "| EXIF orientation applied | 1 |" in card
    assert every_image_decodes(out, "png") == 5


def test_format_png_on_jpegs_applies_orientation_and_counts_each(tmp_path, capsys):
    files = {f"{i}/{k}.jpg": exif_rotated_jpeg(draw_face(i, k).resize((112, 96)), 8) for i in range(2)
             for k in range(2)}
    src = folder(tmp_path / "src", files)
    copy = tmp_path / "copy"
    assert run_cli(passthrough(src, copy), capsys)[0] == 0  # all JPEG: the dataset is JPEG, bytes copied
    assert shard_members(copy)["000001_001.jpg"] == files["1/1.jpg"] and shard_stats(copy)["converted"] == {}
    out = tmp_path / "png"
    assert run_cli(passthrough(src, out, "--format", "png"), capsys)[0] == 0
    assert shard_stats(out)["converted"] == {"jpg -> png (lossless)": 4, "EXIF orientation applied": 4}
    assert Image.open(io.BytesIO(shard_members(out)["000000_000.png"])).size == (96, 112)


def test_an_image_checked_on_a_loading_thread_is_not_checked_again(monkeypatch):
    import facegen.builders.engine.images as images

    checked = check_image(GOOD_PNG, "full")
    monkeypatch.setattr(images, "_png_stream_ok", lambda *a: pytest.fail("checked twice"))
    monkeypatch.setattr(images.Image, "open", lambda *a: pytest.fail("checked twice"))
    prepared = prepare_image(checked, "png")
    assert prepared.data is checked and (prepared.mode, prepared.size) == ("RGB", (112, 112))


def test_a_resize_by_the_source_is_counted_in_the_card(tmp_path, capsys):
    root = write_sfhq_source(tmp_path / "sfhq", images_per_part=3, size=96, feature_dims={})
    out = tmp_path / "out"
    code, _, _ = run_cli(["build", "--source", "sfhq", "--source-path", root, "--source-opt", "extras=",
                          "--source-opt", "size=64", "--plugin", "passthrough", "--out", out], capsys)
    assert code == 0
    assert shard_stats(out)["converted"] == {"resized to 64 px wide (JPEG re-encoded)": 3}
    assert shard_stats(out)["image_sizes"] == {"64x64": 3}
    assert "| resized to 64 px wide (JPEG re-encoded) | 3 |" in (out / "README.md").read_text()


def test_a_huge_declared_size_is_refused_before_anything_is_allocated():
    chunks = png_chunks(GOOD_PNG)
    header = struct.pack(">II", 20_000, 20_000) + chunks[0][1][8:]  # 400 M pixels declared, 25 KB of data
    huge = png_from_chunks([(b"IHDR", header)] + chunks[1:])
    with pytest.raises(ImageError) as info:
        check_image(huge, "full")
    assert info.value.reason == "image too large" and "400000000 pixels" in str(info.value)
    header = struct.pack(">II", 8_000, 5_000) + chunks[0][1][8:]  # 40 M pixels: under PIL's limit, over ours
    with pytest.raises(ImageError) as info:
        check_image(png_from_chunks([(b"IHDR", header)] + chunks[1:]), "full")
    assert info.value.reason == "image too large" and "8000x5000" in str(info.value)


def test_identity_level_units_count_conversions_into_the_assembled_shards(tmp_path, capsys, monkeypatch):
    """An identity-level transform writes units, checked and converted by the writer; the published shards are
    assembled by copying samples, and their stats (hence the card) still count the conversions, modes and sizes."""
    from facegen import registry
    from facegen.api import Transform
    from facegen.records import Face, IdentityResult

    class CopyIdentities(Transform):  # identity-level: not per-image, does not ask for loading-thread checks
        name = "copy-identities"
        description = "whole identities, their images as given"

        def __call__(self, batch):
            for identity in batch:
                yield IdentityResult(identity, [Face(image=i.data, ext=i.ext, ref=i.ref) for i in identity.images])

    get_transform = registry.get_transform
    monkeypatch.setattr(registry, "get_transform",
                        lambda name: CopyIdentities if name == CopyIdentities.name else get_transform(name))
    rgba = Image.new("RGBA", (64, 64), (200, 10, 10, 128))
    files = {
        "p0/a.jpg": exif_rotated_jpeg(draw_face(0, 1).resize((112, 90)), 6),
        "p0/b.png": encode(draw_face(0, 2)),
        "p1/a.png": png_bytes(rgba),
        "p1/b.png": png_with_short_idat(encode(draw_face(1, 1))),  # checked by the unit's writer: a skip
        "p2/a.png": encode(draw_face(2, 0)),
        "p2/b.jpg": encode(draw_face(2, 1), "jpg"),
    }
    src = folder(tmp_path / "src", files)
    out = tmp_path / "out"
    code, stdout, _ = run_cli(["build", "--source", "folder", "--source-path", src, "--plugin", CopyIdentities.name,
                               "--out", out, "--shard-size", "1", "--shard-samples", "2"], capsys)
    assert code == 0 and "units of work 3" in stdout
    units = [json.loads(p.read_text()) for p in sorted((out / ".facegen" / "units").glob("*.json"))]
    shards = [json.loads(p.read_text()) for p in sorted((out / ".facegen" / "shards").glob("*.json"))]
    assert len(shards) == 3 and all(s.get("assembled_from_units") == 3 for s in shards)

    def total(stats, name):
        counts = {}
        for s in stats:
            for k, v in s[name].items():
                counts[k] = counts.get(k, 0) + v
        return counts

    for name in ("converted", "image_modes", "image_sizes"):
        assert total(shards, name) == total(units, name), name
    assert total(shards, "converted") == {"jpg -> png (lossless)": 2, "EXIF orientation applied": 1}
    assert total(shards, "image_modes") == {"RGB": 4, "RGBA": 1}
    assert total(shards, "image_sizes") == {"112x112": 3, "90x112": 1, "64x64": 1}
    assert {s["verify"] for s in shards} == {"full"} and sum(s["images"] for s in shards) == 5
    assert total(units, "skipped") == {"corrupt image": 1}
    card = (out / "README.md").read_text()
    assert "| images re-encoded or converted | 3 |" in card and "| jpg -> png (lossless) | 2 |" in card
    assert "| image modes | RGB: 4, RGBA: 1 |" in card
    assert "every image was decoded once before it was written (`--verify full`)" in card
    assert every_image_decodes(out, "png") == 5


def test_passthrough_checks_every_image_once_on_the_loading_threads(tmp_path, capsys, monkeypatch):
    """Per-image path (shards read their samples from the source in the shuffled order): every source image is
    decoded once, on a loading thread, never on the thread that writes the tar."""
    import threading

    import facegen.builders.engine.images as images

    real, calls = images.check_image, []

    def spy(data, level="full"):
        if not isinstance(data, CheckedImage):  # an actual check (a checked image passes straight through)
            calls.append((threading.current_thread() is threading.main_thread(), level))
        return real(data, level)

    monkeypatch.setattr(images, "check_image", spy)
    src = folder(tmp_path / "src", {f"{i}/{k}.png": encode(draw_face(i, k)) for i in range(3) for k in range(4)})
    assert run_cli(passthrough(src, tmp_path / "out", "--shard-samples", "5"), capsys)[0] == 0
    assert len(calls) == 12 and {level for _, level in calls} == {"full"}
    assert not any(on_main for on_main, _ in calls)
