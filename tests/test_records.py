"""The typed records under .facegen/ (facegen.layout.records): what a build writes reads back as the same record,
and a damaged, foreign or other-version record is refused as a whole (None, or one line), never half-read."""

import json

import pytest

from conftest import run_cli
from facegen.errors import UsageError
from facegen.layout import OutputFolder
from facegen.fileio import sha256_file
from facegen.layout.records import (
    BuildSignature,
    OwnFiles,
    PathOptionRecord,
    RecordError,
    RunRecord,
    SampleIndex,
    ShardStats,
    UnitStats,
    load_run,
    load_shard_stats,
    load_unit_stats,
)
from facegen.testing.folder import write_folder_source


def build_args(src, out, *extra):
    return ["build", "--source", "folder", "--source-path", str(src), "--plugin", "passthrough", "--out", str(out),
            "--shard-size", "2", "--shard-samples", "4", *map(str, extra)]


@pytest.fixture
def identity_level(monkeypatch):
    """passthrough run as an identity-level transform: units of work, then the assembly."""
    from facegen.plugins.passthrough import Passthrough

    monkeypatch.setattr(Passthrough, "per_image", False)


@pytest.fixture
def built(tmp_path, capsys, identity_level):
    src = write_folder_source(tmp_path / "src", identities=5, images_per_identity=2)
    out = tmp_path / "out"
    code, _, err = run_cli(build_args(src, out), capsys)
    assert code == 0, err
    return src, out


def test_every_record_a_build_writes_reads_back_as_written(built):
    _, out = built
    folder = OutputFolder(out)
    run = load_run(out)
    assert json.loads(folder.run_json.read_text()) == json.loads(run.to_json())
    assert run.layout.mode == "units" and run.layout.units == 3 and run.plan.shards == 3
    assert BuildSignature.read(folder.config_json).identities == 5
    shards, units = load_shard_stats(out), load_unit_stats(out)
    assert [s.shard for s in shards] == [0, 1, 2] and [u.unit for u in units] == [0, 1, 2]
    assert all(s.units_xxh3_128 == run.layout.units_xxh3_128 for s in shards)
    for i in range(3):
        unit_index = SampleIndex.read(folder.unit(i).index)
        shard_index = SampleIndex.read(folder.shard(i).index)
        assert unit_index.image_modes is not None and shard_index.image_modes is None  # units feed the assembly
        assert sum(units[i].images_per_identity.values()) == len(unit_index)
    assert sum(len(SampleIndex.read(folder.shard(j).index)) for j in range(3)) == run.totals.images == 10
    # the card's own files (surfaces' record, on engine's Record: "schema" first like every record)
    assert next(iter(json.loads(folder.own_files_record.read_text()))) == "schema"
    assert OwnFiles.read(folder.own_files_record).wrote("README.md", sha256_file(out / "README.md"))


def test_an_own_files_record_of_another_version_owns_nothing_and_a_provenance_path_is_checked(built):
    _, out = built
    path = OutputFolder(out).own_files_record
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "schema": "facegen-own-files-0"}))
    assert OwnFiles.read(path) == OwnFiles()  # nothing in OUT is taken for facegen's own
    # where the card copies a plugin's provenance file is read from run.json: provenance/NAME only
    assert PathOptionRecord(provenance_file="provenance/shift.safetensors").provenance_file
    for bad in ("../../outside.txt", "provenance/identities.txt", "provenance/.hidden", "provenance/a/b"):
        with pytest.raises(RecordError):
            PathOptionRecord(provenance_file=bad)


@pytest.mark.parametrize("change", ["other schema", "unknown field", "wrong type", "missing field", "not json"])
def test_a_foreign_or_damaged_record_is_refused_whole(built, change):
    _, out = built
    path = OutputFolder(out).shard(0).stats
    data = json.loads(path.read_text())
    if change == "other schema":
        data["schema"] = "facegen-shard-stats-0"
    elif change == "unknown field":
        data["shard_of_another_tool"] = 1
    elif change == "wrong type":
        data["images"] = "4"
    elif change == "missing field":
        del data["tar_xxh3_128"]
    path.write_text("{" if change == "not json" else json.dumps(data))
    assert ShardStats.read(path) is None
    with pytest.raises(RecordError):
        ShardStats.parse(path)
    with pytest.raises(UsageError, match="delete it and rerun the build"):
        load_shard_stats(out)
    assert UnitStats.read(path) is None  # a shard's stats are not a unit's


def test_a_run_json_of_another_version_is_one_line(built, capsys):
    _, out = built
    path = OutputFolder(out).run_json
    data = json.loads(path.read_text())
    data["schema"] = "facegen-run-0"
    path.write_text(json.dumps(data))
    assert RunRecord.read(path) is None
    with pytest.raises(UsageError, match="schema 'facegen-run-0', expected 'facegen-run-1'"):
        load_run(out)
    code, _, err = run_cli(["card", out], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err


def test_a_damaged_sample_index_of_a_unit_is_redone_to_the_same_shards(built, capsys):
    src, out = built
    folder = OutputFolder(out)
    before = {p.name: p.read_bytes() for p in folder.shard_tars()}
    folder.unit(1).index.write_text('{"schema": "facegen-sample-index-2", "keys": 3}')
    code, stdout, err = run_cli(build_args(src, out), capsys)
    assert code == 0, err
    assert "units of work 3 (1 written now)" in stdout and "1 unit failed its check" in stdout
    assert SampleIndex.read(folder.unit(1).index) is not None
    assert {p.name: p.read_bytes() for p in folder.shard_tars()} == before
