"""The plugin contract is `facegen/api.py`, whole (issue 17 §2).

Proof: a plugin package written here, outside `facegen/` (a module and a `dist-info` with `entry_points.txt` on a
temporary `sys.path`), that imports nothing of facegen but `facegen.api`. Its source has a download file and a local
path option; its transform has a quality field and a provenance file. `facegen download`, `facegen build`, the card,
`facegen publish --dry-run` and `facegen build --from-card` work with it through what it declares, with no name of
it known anywhere in facegen.
"""

import ast
import hashlib
import io
import json
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from datasets import load_dataset
from PIL import Image

from conftest import run_cli
from test_digiface_download import FixtureServer

PLUGIN_MODULE = '''
"""Tiles: a downloadable source of flat-colour tiles, and a transform that tints them."""

import io
import json
import os
import zipfile

from datasets import Value
from PIL import Image, ImageStat

from facegen.api import (DownloadFile, Face, IdentityResult, LicenseInfo, Option, Skip, Source, SourceImage,
                         Transform, UsageError)


class TileSource(Source):
    name = "tiles"
    description = "Flat-colour tiles, one folder of tiles.zip per identity"
    license = LicenseInfo("cc-by-4.0", link="https://example.org/tiles/LICENSE", text="Tiles, CC BY 4.0.",
                          commercial_use=True)
    download_url = "https://example.invalid/tiles/"
    download_files = [DownloadFile("tiles.zip", {size}, "{sha256}")]
    options = {{
        "exclude": Option(None, "a text file of identities to leave out, one per line", path=True,
                          placeholder="exclusion list"),
    }}
    columns = {{"json.n": "the tile's number within its identity"}}

    def __init__(self, path, **options):
        super().__init__(path, **options)
        excluded = set()
        if self.opts["exclude"]:
            with open(self.opts["exclude"], encoding="utf-8") as f:
                excluded = {{line.strip() for line in f if line.strip()}}
        with zipfile.ZipFile(os.path.join(self.path, "tiles.zip")) as archive:
            self.tiles = {{name: archive.read(name) for name in archive.namelist() if name.endswith(".png")}}
        self._ids = sorted({{name.split("/")[0] for name in self.tiles}} - excluded)

    def identities(self):
        return self._ids

    def load(self, identity_id):
        names = sorted(n for n in self.tiles if n.startswith(identity_id + "/"))
        return [SourceImage(ref=name, data=self.tiles[name], ext="png", meta={{"n": i}})
                for i, name in enumerate(names)]

    def json_features(self):
        return {{"n": Value("int32")}}


class TintTransform(Transform):
    name = "tint"
    description = "Multiplies each channel by the gains of a JSON file"
    synthetic = True
    quality_fields = ("brightness",)
    options = {{"gains": Option(None, "JSON file {{\\"r\\": …, \\"g\\": …, \\"b\\": …}} of channel gains",
                               provenance_file="tint.json")}}
    columns = {{"json.brightness": "mean pixel value of the tinted tile, 0 … 1"}}

    def __init__(self, **options):
        super().__init__(**options)
        if not self.opts["gains"]:
            raise UsageError("transform 'tint': option gains is required")
        with open(self.opts["gains"], encoding="utf-8") as f:
            gains = json.load(f)
        self.gains = [float(gains[c]) for c in "rgb"]

    def json_features(self, source):
        return {{**source.json_features(), "brightness": Value("float32")}}

    def __call__(self, batch):
        for identity in batch:
            result = IdentityResult(identity)
            for image in identity.images:
                try:
                    tile = Image.open(io.BytesIO(image.data)).convert("RGB")
                except OSError as exc:
                    result.skipped.append(Skip(image.ref, "unreadable tile", str(exc)))
                    continue
                channels = [c.point(lambda v, g=g: min(255, int(v * g))) for c, g in zip(tile.split(), self.gains)]
                tinted = Image.merge("RGB", channels)
                brightness = sum(ImageStat.Stat(tinted).mean) / (3 * 255)
                result.faces.append(Face(image=tinted, ref=image.ref, meta={{**image.meta, "brightness": brightness}}))
            yield result
'''

ENTRY_POINTS = """
[facegen.sources]
tiles = fg_tiles:TileSource

[facegen.transforms]
tint = fg_tiles:TintTransform
"""


def tiles_zip() -> bytes:
    """Four identities of three 16x16 tiles each."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(4):
            for n in range(3):
                png = io.BytesIO()
                Image.new("RGB", (16, 16), (40 * i + 10, 20 * n + 30, 90)).save(png, format="PNG")
                archive.writestr(f"t{i}/{n}.png", png.getvalue())
    return buffer.getvalue()


@pytest.fixture
def tiles_plugin(tmp_path, monkeypatch):
    """The plugin package, installed on a temporary sys.path only; returns the zip its download serves."""
    data = tiles_zip()
    root = tmp_path / "site"
    root.mkdir()
    source = PLUGIN_MODULE.format(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (root / "fg_tiles.py").write_text(source)
    info = root / "fg_tiles-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fg-tiles\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(root))
    yield data
    sys.modules.pop("fg_tiles", None)


def facegen_imports(source: str) -> set[str]:
    """The facegen modules a Python source imports (at any depth)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "facegen":
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "facegen")
    return found


def test_the_proof_plugin_imports_only_the_api():
    assert facegen_imports(PLUGIN_MODULE.format(size=0, sha256="0")) == {"facegen.api"}


def test_builtin_plugins_import_only_the_api_and_generators():
    # the facegen source reads facegen's own output folder: its format modules are layout and published
    # the sources that read published synthetic sets declare them from one table (published_sets.py)
    sets = "facegen.plugins.published_sets"
    own_format = {"facegen_source.py": {"facegen.layout", "facegen.layout.records", "facegen.published"},
                  "rec.py": {"facegen.plugins.recordio", sets}, "folder.py": {sets}, "lmdb_source.py": {sets}}
    for path in sorted((Path(__file__).parent.parent / "facegen" / "plugins").glob("*.py")):
        allowed = own_format.get(path.name, set())
        others = {m for m in facegen_imports(path.read_text())
                  if m != "facegen.api" and not m.startswith("facegen.generators") and m not in allowed}
        assert not others, f"{path.name} imports {sorted(others)}"


def test_a_third_party_plugin_downloads_builds_publishes_and_rebuilds_from_its_card(tiles_plugin, tmp_path,
                                                                                    capsys, monkeypatch):
    # download: the source's declared file, verified by its declared size and sha256
    downloads = tmp_path / "downloads"
    with FixtureServer({"tiles.zip": tiles_plugin}) as server:
        code, out, err = run_cli(["download", "tiles", "--to", downloads, "--base-url", server.url,
                                  "--accept-license"], capsys)
    assert code == 0, err
    assert "tiles.zip: downloaded and verified (size and sha256)" in out
    assert (downloads / "tiles.zip").read_bytes() == tiles_plugin

    # build, with a local path option (the source's) and a provenance file (the transform's)
    inputs = tmp_path / "my-private-inputs"
    inputs.mkdir()
    exclude, gains = inputs / "leave-out.txt", inputs / "gains.json"
    exclude.write_text("t2\n")
    gains.write_text(json.dumps({"r": 1.5, "g": 0.5, "b": 1.0}))
    built = tmp_path / "built"
    code, _, err = run_cli(["build", "--source", "tiles", "--source-path", downloads, "--source-opt",
                            f"exclude={exclude}", "--plugin", "tint", "--plugin-opt", f"gains={gains}",
                            "--out", built, "--shard-samples", 4], capsys)
    assert code == 0, err
    rows = list(load_dataset(str(built), split="train"))
    assert len(rows) == 9 and {r["json"]["identity"] for r in rows} == {"t0", "t1", "t3"}
    assert all(0 < r["json"]["brightness"] < 1 for r in rows)

    # the card: the path option as its declared placeholder, the provenance file published and listed in the
    # `facegen:` record, the quality field summarised and described, the plugin's distribution named
    readme = (built / "README.md").read_text()
    # the command as it was run shows a path option as its declared placeholder too (issue 18 §3); nothing names
    # the local files
    ran = next(line for line in readme.splitlines() if line.startswith("facegen build --source tiles"))
    assert "'exclude=<exclusion list>'" in ran and "gains=provenance/tint.json" in ran
    assert str(inputs) not in readme and "leave-out" not in readme and "gains.json" not in readme
    record = yaml.safe_load(readme.split("---")[1])["facegen"]
    assert record["options"]["source_opts"] == {"exclude": "<exclusion list>"}
    assert record["options"]["plugin_opts"] == {"gains": "provenance/tint.json"}
    assert "provenance/tint.json" in record["provenance"]
    assert (built / "provenance" / "tint.json").read_bytes() == gains.read_bytes()
    assert "| rebuild inputs | [`provenance/tint.json`](provenance/tint.json) |" in readme
    assert "facegen build --from-card ORG/NAME --source-path '<tiles source folder>' --source-opt " \
           "'exclude=<exclusion list>' --out NEW" in readme
    brightness = [r["json"]["brightness"] for r in rows]
    [row] = [line for line in readme.splitlines() if line.startswith("| `brightness` |")]
    assert abs(float(row.split("|")[2]) - sum(brightness) / len(brightness)) < 1e-3 and row.endswith("| 9 |")
    assert ("| `json.brightness` | float32 | mean pixel value of the tinted tile, 0 … 1 (quality figure, "
            "summarised under Statistics) |") in readme
    assert "| `json.n` | int32 | the tile's number within its identity |" in readme
    assert "| transform | `tint` from `fg-tiles` 0.1 |" in readme
    assert "| source dataset | `tiles` | [cc-by-4.0](https://example.org/tiles/LICENSE) | yes |" in readme

    # publish's check accepts the declared provenance file (and nothing else under provenance/)
    code, out, err = run_cli(["publish", built, "--repo", "org/tiles", "--dry-run"], capsys)
    assert code == 0, err
    assert "provenance/tint.json" in out and "dry run: nothing was uploaded" in out
    (built / "provenance" / "notes.txt").write_text("mine")
    code, _, err = run_cli(["publish", built, "--repo", "org/tiles", "--dry-run"], capsys)
    assert code == 2 and "provenance/notes.txt was not written by facegen" in err  # the user must move it
    (built / "provenance" / "notes.txt").unlink()

    # --from-card from the card alone (as downloaded from the Hub: README.md and provenance/), the inputs gone
    card = tmp_path / "card"
    card.mkdir()
    shutil.copy(built / "README.md", card / "README.md")
    shutil.copytree(built / "provenance", card / "provenance")
    saved_exclude = exclude.read_text()
    shutil.rmtree(inputs)
    # a card's value for a path option is never used: the rebuild asks for the file again
    code, _, err = run_cli(["build", "--from-card", card / "README.md", "--source-path", downloads,
                            "--out", tmp_path / "refused"], capsys)
    assert code == 2
    assert "the card's build used a local file for exclude (<exclusion list>): pass --source-opt exclude=PATH" in err
    # ... and the provenance file's published copy, never a path read from the card
    mine = tmp_path / "mine.txt"
    mine.write_text(saved_exclude)
    rebuilt = tmp_path / "rebuilt"
    code, out, err = run_cli(["build", "--from-card", card / "README.md", "--source-path", downloads,
                              "--source-opt", f"exclude={mine}", "--out", rebuilt], capsys)
    assert code == 0, err
    assert "byte-identical to the card's" in out
    run = json.loads((rebuilt / ".facegen" / "run.json").read_text())
    assert run["options"]["plugin_opts"]["gains"] == str(card / "provenance" / "tint.json")
    assert (rebuilt / "provenance" / "tint.json").read_bytes() == (card / "provenance" / "tint.json").read_bytes()
    (card / "provenance" / "tint.json").unlink()
    monkeypatch.chdir(built)  # where the card's value, provenance/tint.json, would name a file
    code, _, err = run_cli(["build", "--from-card", card / "README.md", "--source-path", downloads,
                            "--source-opt", f"exclude={mine}", "--out", tmp_path / "refused2"], capsys)
    assert code == 2 and "pass --plugin-opt gains=PATH" in err


def test_a_provenance_file_is_a_plain_name_and_not_one_of_facegens_own():
    from facegen.api import Option

    assert Option(None, "x", provenance_file="delta.safetensors").path is True
    for bad in ("../x", "a/b", ".hidden", "identities.txt", "checksums.json", ""):
        if bad:
            with pytest.raises(ValueError):
                Option(None, "x", provenance_file=bad)


def test_two_plugins_publishing_the_same_provenance_file_are_refused(tmp_path):
    from facegen.api import Option, Source, Transform, UsageError, check_provenance_files

    class A(Source):
        name, needs_path = "a", False
        options = {"f": Option(None, "x", provenance_file="same.json")}

    class B(Transform):
        name = "b"
        options = {"g": Option(None, "y", provenance_file="same.json")}

    with pytest.raises(UsageError, match="source 'a' and transform 'b' both publish provenance/same.json"):
        check_provenance_files(A(), B())
