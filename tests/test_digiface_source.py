"""Source `digiface` on fixture parts in the published layouts: zips read in place, folders, bad input."""

import multiprocessing
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from facegen import messages
from facegen.errors import UsageError
from facegen.plugins.digiface import DigiFaceSource, classify_member
from facegen.records import SourceImage, Skip
from facegen.testing.digiface import part_name, truncate_file, write_digiface_part

P72_A = "subjects_0-1999_72_imgs"
P72_B = "subjects_2000-3999_72_imgs"
P5_A = "subjects_100000-133332_5_imgs"


def tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def member_bytes(zip_path, name):
    with zipfile.ZipFile(zip_path) as archive:
        return archive.read(name)


@pytest.fixture
def three_parts(tmp_path):
    """Two 72-image-style zips (one with a macOS wrapper folder inside) and a 5-image part as a wrapper folder."""
    src = tmp_path / "digiface"
    write_digiface_part(src, ids=[0, 1, 10, 2], images_per_identity=12, name=P72_A, macosx=True, dot_files=True)
    write_digiface_part(src, ids=[2000, 2001], images_per_identity=3, name=P72_B, wrapper=True,
                        compression=zipfile.ZIP_STORED)
    write_digiface_part(src, ids=[100000, 100001], images_per_identity=2, name=P5_A, form="folder", wrapper=True,
                        dot_files=True)
    return src


def test_zip_parts_read_in_place_in_numeric_and_natural_order(three_parts):
    before = tree(three_parts)
    with messages.captured() as said:
        source = DigiFaceSource(three_parts)
    assert source.identities() == ["0", "1", "2", "10", "2000", "2001", "100000", "100001"]
    assert source.warnings == [] and said == []  # __MACOSX/, .DS_Store and dot files are silent

    items = source.load("10")
    assert [i.meta["image_index"] for i in items] == list(range(12))  # 2 before 10, not "10" before "2"
    assert [i.ref for i in items[:3]] == [f"{P72_A}.zip:10/0.png", f"{P72_A}.zip:10/1.png", f"{P72_A}.zip:10/2.png"]
    assert items[11].data == member_bytes(three_parts / f"{P72_A}.zip", "10/11.png")
    assert all(i.ext == "png" and i.meta["part"] == P72_A for i in items)

    stored = source.load("2001")  # a zip holding a wrapper folder, members stored uncompressed
    assert stored[2].ref == f"{P72_B}.zip:{P72_B}/2001/2.png"
    assert stored[2].data == member_bytes(three_parts / f"{P72_B}.zip", f"{P72_B}/2001/2.png")
    assert stored[2].meta == {"part": P72_B, "image_index": 2}

    folder = source.load("100001")
    assert [i.ref for i in folder] == [f"{P5_A}/100001/0.png", f"{P5_A}/100001/1.png"]
    assert folder[1].data == (three_parts / P5_A / "100001" / "1.png").read_bytes()
    assert folder[0].meta == {"part": P5_A, "image_index": 0}
    assert tree(three_parts) == before  # nothing extracted or written next to the parts
    source.close()


def test_loading_uses_the_index_built_once_and_one_handle_per_zip(three_parts, monkeypatch):
    source = DigiFaceSource(three_parts)

    def no_rescan(*args, **kwargs):
        raise AssertionError("the zip's central directory was read again")

    monkeypatch.setattr(zipfile, "ZipFile", no_rescan)
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    for identity in source.identities():
        assert all(isinstance(i, SourceImage) for i in source.load(identity))
    for identity in source.identities():
        source.load(identity)
    assert sorted(map(os.path.basename, opened)) == [f"{P72_A}.zip", f"{P72_B}.zip"]
    source.close()


def test_threads_share_the_handle_and_a_forked_child_opens_its_own(three_parts):
    source = DigiFaceSource(three_parts)
    expected = {i: [x.data for x in source.load(i)] for i in source.identities()}
    with ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(lambda i: (i, [x.data for x in source.load(i)]), source.identities() * 5))
    assert all(data == expected[i] for i, data in loaded)

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()

    def child():
        data = [x.data for x in source.load("10")]
        queue.put((source._fd_pid == os.getpid(), data))

    parent_fd = source._fd(0)
    process = ctx.Process(target=child)
    process.start()
    reopened, child_data = queue.get(timeout=60)
    process.join(60)
    assert process.exitcode == 0
    assert reopened and child_data == expected["10"]
    assert source._fd(0) == parent_fd  # the parent's handle is untouched by the child's
    source.close()


def test_mixed_zip_extracted_and_wrapper_folders_prefer_the_zip(tmp_path):
    src = tmp_path / "mix"
    write_digiface_part(src, ids=[0, 1, 2], images_per_identity=3, name=P72_A)
    write_digiface_part(src, ids=[2, 3], images_per_identity=2, form="folder")  # extracted next to the zip
    write_digiface_part(src, ids=[2000], images_per_identity=2, name=P72_B, form="folder", wrapper=True)
    with messages.captured() as said:
        source = DigiFaceSource(src)
    assert source.identities() == ["0", "1", "2", "3", "2000"]
    assert [i.ref for i in source.load("2")] == [f"{P72_A}.zip:2/{k}.png" for k in range(3)]  # the zip's copy
    assert [i.ref for i in source.load("3")] == ["3/0.png", "3/1.png"]
    assert source.load("3")[0].meta["part"] == P72_A  # an extracted folder knows its part from the id range
    assert [i.ref for i in source.load("2000")] == [f"{P72_B}/2000/0.png", f"{P72_B}/2000/1.png"]
    (line,) = source.warnings
    assert f"1 identity of {src} also in {P72_A}.zip; using the latter (e.g. 2)" in line
    assert said == [messages.Message(messages.WARNING, line)]


def test_a_single_zip_file_is_a_valid_source_path(tmp_path):
    path = write_digiface_part(tmp_path, ids=[5, 6], images_per_identity=2, name=P72_A)
    source = DigiFaceSource(path)
    assert source.identities() == ["5", "6"]
    assert source.load("6")[1].ref == f"{P72_A}.zip:6/1.png"


def test_bad_crc_member_is_a_skip_and_corrupt_png_is_left_to_the_transform(tmp_path):
    path = write_digiface_part(tmp_path / "src", ids=[0, 1, 2], images_per_identity=3, name=P72_A, bad_crc=2,
                               corrupt_png=1)
    source = DigiFaceSource(path.parent)
    first = source.load("0")
    assert isinstance(first[0], Skip)
    assert first[0].ref == f"{P72_A}.zip:0/0.png" and first[0].reason == "corrupt zip member"
    assert "CRC mismatch" in first[0].detail
    assert isinstance(first[1], SourceImage)
    assert isinstance(first[2], SourceImage)  # a truncated PNG is a valid member: passthrough's check skips it
    assert first[2].data == member_bytes(path, "0/2.png")
    assert isinstance(source.load("1")[0], Skip)
    assert all(isinstance(i, SourceImage) for i in source.load("2"))


def test_truncated_zip_is_a_usage_error_naming_the_file(tmp_path):
    path = write_digiface_part(tmp_path / "src", ids=[0, 1], images_per_identity=3, name=P72_A)
    truncate_file(path, 0.6)
    with pytest.raises(UsageError) as info:
        DigiFaceSource(path.parent)
    message = str(info.value)
    assert str(path) in message and "truncated" in message and "\n" not in message


def test_not_a_zip_at_all_is_a_usage_error(tmp_path):
    (tmp_path / f"{P72_A}.zip").write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(UsageError, match=f"{P72_A}.zip is not a readable zip"):
        DigiFaceSource(tmp_path)


def test_unsafe_members_are_never_used_and_are_reported(tmp_path):
    src = tmp_path / "deep" / "src"
    write_digiface_part(src, ids=[7, 8], images_per_identity=2, name=P72_A, unsafe_members=True,
                        wrapper=True)
    before = tree(tmp_path)
    with messages.captured() as said:
        source = DigiFaceSource(src)
    assert source.identities() == ["7", "8"]
    refs = [i.ref for identity in source.identities() for i in source.load(identity)]
    assert refs == [f"{P72_A}.zip:{P72_A}/{i}/{k}.png" for i in (7, 8) for k in (0, 1)]
    assert tree(tmp_path) == before  # nothing written anywhere, in particular not ../escape or /7
    assert not (tmp_path / "deep" / "escape").exists()
    (line,) = source.warnings
    assert "3 entries (unsafe path)" in line and "'../escape/0.png'" in line and "'/7/99.png'" in line
    assert f"{P72_A}.zip" in line
    assert said == [messages.Message(messages.WARNING, line)]
    assert source.provenance()["ignored_entries"]["unsafe path"] == 3


def test_non_numeric_folders_are_reported_not_fatal(tmp_path):
    src = tmp_path / "src"
    write_digiface_part(src, ids=[0, 1], images_per_identity=2, name=P72_A, non_numeric_folder=True)
    write_digiface_part(src, ids=[2, 3], images_per_identity=2, form="folder", non_numeric_folder=True)
    (src / "misc").mkdir()
    (src / "misc" / "readme.txt").write_text("x")
    source = DigiFaceSource(src)
    assert source.identities() == ["0", "1", "2", "3"]
    assert any("(non-numeric folder name), e.g. 'notes/0.png'" in w and f"{P72_A}.zip" in w for w in source.warnings)
    assert any("(folder without identity folders)" in w and "'misc/'" in w and "'notes/'" in w
               for w in source.warnings)


def test_a_folder_without_digiface_data_is_a_usage_error(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "a.png").write_bytes(b"x")
    with pytest.raises(UsageError, match="no DigiFace images in"):
        DigiFaceSource(tmp_path)


def test_part_selection_and_image_counts(three_parts):
    assert DigiFaceSource(three_parts, parts="72").identities() == ["0", "1", "2", "10", "2000", "2001"]
    assert DigiFaceSource(three_parts, parts="5").identities() == ["100000", "100001"]
    assert DigiFaceSource(three_parts, parts=f"{P72_B}.zip,{P5_A}").identities() == ["2000", "2001", "100000",
                                                                                      "100001"]
    assert DigiFaceSource(three_parts, parts=[P72_A]).identities() == ["0", "1", "2", "10"]  # YAML list
    assert DigiFaceSource(three_parts, min_images="3").identities() == ["0", "1", "2", "10", "2000", "2001"]
    capped = DigiFaceSource(three_parts, max_images="5")
    assert [i.meta["image_index"] for i in capped.load("1")] == [0, 1, 2, 3, 4]
    assert len(capped.load("100000")) == 2

    with pytest.raises(UsageError, match="part 'subjects_4000-5999_72_imgs' is not in .*found here"):
        DigiFaceSource(three_parts, parts="subjects_4000-5999_72_imgs")
    with pytest.raises(UsageError, match="part 'P9' is not in .*published parts: subjects_0-1999_72_imgs"):
        DigiFaceSource(three_parts, parts="P9")
    with pytest.raises(UsageError, match="option 'parts'"):
        DigiFaceSource(three_parts, parts="72,5")
    with pytest.raises(UsageError, match="option 'max_images'"):
        DigiFaceSource(three_parts, max_images="-1")
    with pytest.raises(UsageError, match="no identity .* is left"):
        DigiFaceSource(three_parts, parts="5", min_images="3")


def test_zips_of_parts_left_out_are_not_indexed(three_parts, monkeypatch):
    import facegen.plugins.digiface as digiface

    indexed = []
    real_index_zip = digiface.index_zip
    monkeypatch.setattr(digiface, "index_zip", lambda path, label: indexed.append(label) or real_index_zip(path, label))
    assert DigiFaceSource(three_parts, parts="5").identities() == ["100000", "100001"]
    assert indexed == []
    assert DigiFaceSource(three_parts, parts=P72_B).identities() == ["2000", "2001"]
    assert indexed == [f"{P72_B}.zip"]
    indexed.clear()
    DigiFaceSource(three_parts, parts="72")
    assert indexed == [f"{P72_A}.zip", f"{P72_B}.zip"]


def test_member_names_are_classified_without_touching_the_disk():
    assert classify_member("17/3.png") == ("", "", "17", 3)
    assert classify_member("17/3.Png") == ("", "", "17", 3)
    assert classify_member("subjects_0-1999_72_imgs/17/03.PNG") == ("", "subjects_0-1999_72_imgs/", "17", 3)
    for name in ("../17/3.png", "/17/3.png", "17/../../3.png", "C:/17/3.png", "..\\17\\3.png"):
        assert classify_member(name)[0] == "unsafe path", name
    assert classify_member("__MACOSX/17/._3.png")[0] == "macOS metadata"
    assert classify_member("17/.DS_Store")[0] == "hidden file"
    assert classify_member("abc/3.png")[0] == "non-numeric folder name"
    assert classify_member("17/x.png")[0] == "non-numeric image name"
    assert classify_member("17/3.jpg")[0] == "not a PNG file"
    assert classify_member("a/b/17/3.png")[0] == "unexpected layout"
    assert classify_member("١٧/3.png")[0] == "non-numeric folder name"  # Arabic-Indic digits are not ids


def test_fixture_part_names_follow_the_published_scheme():
    assert part_name(0, 1999, 72) == P72_A
    assert part_name(100000, 133332, 5) == P5_A


def test_oversized_member_is_skipped_without_inflating_it(tmp_path):
    path = write_digiface_part(tmp_path / "src", ids=[0], images_per_identity=2, name=P72_A)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("0/2.png", bytes(65 << 20))  # 65 MiB of zeros: ~65 KB deflated, a small "zip bomb"
    source = DigiFaceSource(path)
    items = source.load("0")
    assert [type(i).__name__ for i in items] == ["SourceImage", "SourceImage", "Skip"]
    assert items[2].reason == "unsupported zip member" and "over the" in items[2].detail


def zipfile_members(path):
    with zipfile.ZipFile(path) as archive:
        return [(i.filename, i.header_offset, i.compress_size, i.file_size, i.compress_type, i.flag_bits, i.CRC,
                 i.external_attr) for i in archive.infolist()]


def test_central_directory_reader_agrees_with_zipfile(tmp_path):
    from facegen.plugins.digiface import read_central_directory

    # more than 65,535 members: the zip64 end record that every published part carries
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w", zipfile.ZIP_STORED) as archive:
        for i in range(66_000):
            archive.writestr(f"{i // 72}/{i % 72}.png", b"x")
        archive.writestr("ünïcode/0.png", b"y")
    members = read_central_directory(str(big))
    assert members is not None and len(members) == 66_001
    assert members == zipfile_members(big)

    # bytes before the zip (a self-extractor) and an archive comment
    plain = write_digiface_part(tmp_path / "plain", ids=[3, 4], images_per_identity=3, name=P72_A, wrapper=True)
    shifted = tmp_path / "shifted" / f"{P72_A}.zip"
    shifted.parent.mkdir()
    shifted.write_bytes(b"#!/bin/sh\nexit 0\n" + plain.read_bytes())
    with zipfile.ZipFile(shifted, "a") as archive:
        archive.comment = b"made by a test"
    assert read_central_directory(str(shifted)) == zipfile_members(shifted)
    source = DigiFaceSource(shifted)
    assert [i.data for i in source.load("4")] == [member_bytes(plain, f"{P72_A}/4/{k}.png") for k in range(3)]

    # not a zip: the reader declines and zipfile's verdict is used
    assert read_central_directory(str(truncate_file(plain, 0.5))) is None
