"""Plugin discovery through entry points, including a separate third-party distribution."""

import sys
import textwrap

import datasets
import pytest

from conftest import facegen, facegen_process

THIRD_PARTY_MODULE = '''
from datasets import Value
from PIL import Image
from facegen.api import Face, IdentityResult, Option, Source, SourceImage, Transform


class ColourSource(Source):
    name = "colours"
    description = "Flat colour squares, one identity per colour"
    options = {"count": Option(3, "how many identities", int)}

    def identities(self):
        return [f"c{i}" for i in range(self.opts["count"])]

    def load(self, identity_id):
        return [SourceImage(ref=f"{identity_id}/{k}", data=b"", ext="png", meta={"shade": k}) for k in range(2)]

    def json_features(self):
        return {"shade": Value("int32")}


class PaintTransform(Transform):
    name = "paint"
    description = "Paints each source image as a 16x16 square"

    def json_features(self, source):
        return {"shade": Value("int32"), "painted": Value("bool")}

    def __call__(self, batch):
        for identity in batch:
            value = (identity.cls * 50) % 256
            faces = [Face(image=Image.new("RGB", (16, 16), (value, img.meta["shade"], 0)), ref=img.ref,
                          meta={**img.meta, "painted": True}) for img in identity.images]
            yield IdentityResult(identity, faces)
'''

BROKEN_MODULE = "raise ImportError('this plugin needs a package that is not installed')\n"


def make_third_party(root):
    """A tiny third-party distribution: a module plus a dist-info with entry points, to put on sys.path."""
    (root / "fg_colours.py").write_text(THIRD_PARTY_MODULE)
    (root / "fg_broken.py").write_text(BROKEN_MODULE)
    info = root / "fg_colours-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fg-colours\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""
        [facegen.sources]
        colours = fg_colours:ColourSource

        [facegen.transforms]
        paint = fg_colours:PaintTransform
        broken = fg_broken:Nothing
    """))
    return {"PYTHONPATH": str(root)}


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """The third-party distribution on this process's sys.path (entry points are read from sys.path at each
    discovery); its modules are forgotten afterwards."""
    monkeypatch.syspath_prepend(make_third_party(tmp_path)["PYTHONPATH"])
    yield
    for name in ("fg_colours", "fg_broken"):
        sys.modules.pop(name, None)


def test_plugins_lists_builtin_and_third_party(tmp_path):
    """The installed console script in a real process (its entry point, PYTHONPATH at start-up)."""
    env = make_third_party(tmp_path)
    proc = facegen_process("plugins", env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    by_name = {line.split()[0]: line for line in lines[1:]}
    assert by_name["folder"].split()[1:3] == ["source", "facegen"]
    assert by_name["passthrough"].split()[1:3] == ["transform", "facegen"]
    assert by_name["colours"].split()[1:3] == ["source", "fg-colours"]
    assert "Flat colour squares" in by_name["colours"]
    assert by_name["paint"].split()[1:3] == ["transform", "fg-colours"]
    # the broken plugin is reported by name with its error; the others still work
    assert "FAILED TO LOAD" in by_name["broken"] and "not installed" in by_name["broken"]


def test_third_party_plugins_build_a_loadable_dataset(tmp_path, third_party):
    out = tmp_path / "out"
    (tmp_path / "colours").mkdir()  # an --out inside --source-path is refused
    proc = facegen("build", "--source", "colours", "--source-path", tmp_path / "colours", "--source-opt", "count=4",
                   "--plugin", "paint", "--out", out)
    assert proc.returncode == 0, proc.stderr
    ds = datasets.load_dataset(str(out), split="train").sort("__key__")  # published shuffled
    assert ds.num_rows == 8
    assert sorted(ds.column_names) == ["__key__", "__url__", "cls", "json", "png"]
    # samples are shuffled across the shards: the second image of identity c1 is found by its key
    [row] = [r for r in ds if r["__key__"] == "000001_001"]
    assert row["cls"] == 1 and row["json"]["identity"] == "c1" and row["json"]["painted"] is True
    assert row["json"]["shade"] == 1
    assert row["png"].getpixel((0, 0)) == (50, 1, 0)


def test_unknown_plugin_is_one_line_exit_2(tmp_path, folder_source):
    proc = facegen("build", "--source", "folder", "--source-path", folder_source, "--plugin", "nope",
                   "--out", tmp_path / "o")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "unknown transform plugin 'nope'" in proc.stderr and "passthrough" in proc.stderr


def test_broken_plugin_named_with_its_error(tmp_path, folder_source, third_party):
    proc = facegen("build", "--source", "folder", "--source-path", folder_source, "--plugin", "broken",
                   "--out", tmp_path / "o")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "'broken'" in proc.stderr and "not installed" in proc.stderr
