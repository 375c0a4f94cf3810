"""The one tar reader (facegen.tarfiles): what tarfile lists, and crafted headers as a counted skip in bounded time
and memory."""

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from facegen.builders.engine.writer import UstarWriter
from facegen.published import PublishedDataset
from facegen.tarfiles import TarDamaged, block_members, list_members, payload_bytes
from facegen.testing.hostile import TAR_CASES, crafted_tar_bytes, ustar_header
from facegen.testing.output import write_output_folder

GOOD = ["999999_000.png", "999999_000.cls", "999999_000.json"]
PEAK_RSS_LIMIT = 1e9  # bytes; the imports of facegen.published and datasets alone take about 0.4 GB


def test_listing_matches_tarfile_for_ustar_pax_and_gnu_tars(tmp_path):
    for fmt in (tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        path = tmp_path / f"{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for name, data in (("000000_000.png", b"a" * 700), (f"{'d' * 120}/000000_000.json", b"{}"),
                               ("é/000001_000.cls", b"1")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            folder = tarfile.TarInfo("folder")
            folder.type = tarfile.DIRTYPE
            tar.addfile(folder)
        with tarfile.open(path) as tar:
            expected = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
        listing = list_members(path)
        assert (listing.members, listing.others, listing.error) == (expected, ["folder"], None)
    data = bytearray(path.read_bytes())
    data[148] ^= 1  # a damaged header checksum is an error, never a misread member
    path.write_bytes(bytes(data))
    listing = list_members(path)
    assert listing.members == [] and isinstance(listing.error, TarDamaged)
    assert list_members(tmp_path / "missing.tar").error.__class__ is FileNotFoundError


@pytest.mark.parametrize("case", TAR_CASES)
def test_a_crafted_header_ends_the_listing_after_the_whole_members(tmp_path, case):
    path = tmp_path / "crafted.tar"
    path.write_bytes(crafted_tar_bytes(case))
    listing = list_members(path)
    assert [m.name for m in listing.members] == GOOD and isinstance(listing.error, TarDamaged)
    expected = {"negative octal size": "negative size", "negative base-256 size": "negative size",
                "absurd base-256 size": "past the end", "size past the end": "past the end",
                "bad checksum": "bad header checksum", "pax size going back": "negative size",
                "huge pax record": "declares 2147483648 bytes"}[case]
    assert expected in str(listing.error)
    with pytest.raises(TarDamaged):
        block_members(path.read_bytes())


def test_block_members_and_payload_bytes_of_a_written_sample():
    buf = io.BytesIO()
    writer = UstarWriter(buf)
    offset, length = writer.add_sample("000001_002", {"png": b"x" * 700, "cls": b"7", "json": b"{}"})
    block = buf.getvalue()[offset:offset + length]
    members = block_members(block)
    assert [(m.name, m.size) for m in members] == [("000001_002.cls", 1), ("000001_002.json", 2),
                                                   ("000001_002.png", 700)]
    assert all(block[m.offset:m.offset + m.size] in (b"7", b"{}", b"x" * 700) for m in members)
    assert payload_bytes(block) == writer.payload == 703
    for size_field in (b"-0000000001\0", b"\xff" * 12, b"%011o\0" % 10**6):
        with pytest.raises(TarDamaged):
            payload_bytes(ustar_header("a.png", size_field) + bytes(512))


CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from facegen.published import PublishedDataset
from facegen.tarfiles import list_members

results = {}
for path in sorted(Path(sys.argv[1]).glob("*.tar")):
    started = time.perf_counter()
    listing = list_members(path)
    results[path.stem] = {"members": len(listing.members), "error": type(listing.error).__name__,
                          "seconds": time.perf_counter() - started}
started = time.perf_counter()
dataset = PublishedDataset(sys.argv[2])
try:  # this process's own peak: ru_maxrss keeps the parent's across exec (the whole test session's, on Linux)
    status = Path("/proc/self/status").read_text()
    peak = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024
except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"cases": results, "skipped": dict(dataset.skipped), "samples": len(dataset.samples),
                  "dataset_seconds": time.perf_counter() - started, "peak_rss": peak}))
"""


def test_crafted_shards_are_counted_skips_in_bounded_time_and_memory(tmp_path):
    """Each crafted shard (16 MB of good members before the crafted header: a reader that loops or reads to the
    end for each member would show it) is listed up to the damage; a facegen dataset holding them is read with
    one counted skip per shard. Read naively, three of them loop forever (issue 18)."""
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    dataset = write_output_folder(tmp_path / "dataset", identities=2, images_per_identity=2, shard_size=2)
    for number, case in enumerate(TAR_CASES, start=1):
        data = crafted_tar_bytes(case, key=f"{900000 + number:06d}_000", padding=16 << 20)
        (crafted / f"{case.replace(' ', '-')}.tar").write_bytes(data)
        (dataset / "data" / "train" / f"train-{number:06d}.tar").write_bytes(data)
    # a hang shows as a timeout: 60 s is over 10x what the child takes on a loaded 2-core machine
    proc = subprocess.run([sys.executable, "-c", CHILD, str(crafted), str(dataset)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    print(json.dumps(found, indent=1))
    assert set(found["cases"]) == {case.replace(" ", "-") for case in TAR_CASES}
    for case, result in found["cases"].items():
        assert (result["members"], result["error"]) == (4, "TarDamaged"), case  # the sample and the filler
        assert result["seconds"] < 1, case
    # every crafted shard: one unreadable shard, and the member listed last counted as a sample it may have cut
    # (here the filler); the good sample before the damage is kept
    assert found["skipped"] == {"unreadable shard": len(TAR_CASES), "truncated sample": len(TAR_CASES)}
    assert found["samples"] == 2 * 2 + len(TAR_CASES)
    assert found["peak_rss"] < PEAK_RSS_LIMIT, f"peak RSS {found['peak_rss'] / 1e6:.0f} MB"


def test_a_build_from_a_dataset_with_crafted_shards_counts_them(tmp_path):
    from conftest import build

    parent = write_output_folder(tmp_path / "parent", identities=2, images_per_identity=2, shard_size=2)
    (parent / "data" / "train" / "train-000001.tar").write_bytes(
        crafted_tar_bytes("negative octal size", key="000007_000"))
    build("--source", "facegen", "--source-path", parent, "--plugin", "passthrough", "--out", tmp_path / "child")
    run = json.loads((tmp_path / "child" / ".facegen" / "run.json").read_text())
    # the sample listed last before the damage may be cut (its next member's header is the damaged one): left out
    assert run["source"]["provenance"]["parent_unreadable"] == {"unreadable shard": 1, "truncated sample": 1}
    assert run["totals"]["images"] == 2 * 2
    assert PublishedDataset(tmp_path / "child").skipped == {}
