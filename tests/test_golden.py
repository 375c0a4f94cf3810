"""Golden outputs: a build of each recipe gives the same bytes as recorded (issue 17, point 9).

For each of seven builds (folder, digiface, sfhq, disco, the digi2real arc2face recipe with the demo's tiny
models, e4e project mode and the sfhq-truncation recipe), ``tests/golden/outputs.json`` records the sha256 of every
file of the output folder outside ``.facegen/`` (which is not published): the shards under ``data/train/`` (and
every member inside them), ``_info.json``, ``provenance/``, ``LICENSE``, ``preview.jpg`` and ``README.md``, plus
the number of samples. The card is hashed after masking the only rows that differ from run to run or machine to
machine (``CARD_MASKS``: the facegen version and git revision row, the build date and Python version row, the
measured build time); the masked cards are kept in ``tests/golden/cards/`` so that a failure shows a diff.

Everything is compared exactly on every machine, except the generative builds (arc2face, e4e-project,
sfhq-truncation: tiny random-weight models running float math in torch on the CPU, one thread): another torch
version or CPU instruction set may round differently and change a pixel, so their comparison is skipped, saying
why, when the running torch version or ``torch.backends.cpu.get_cpu_capability()`` differs from the recorded one.

Regenerate after a change that alters outputs on purpose::

    FACEGEN_REGENERATE_GOLDEN=1 pytest tests/test_golden.py

Rule: the commit that regenerates the golden files names the issue that changed the outputs and the files that
changed (``git diff --stat tests/golden`` lists them). A refactoring never regenerates them.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import cli

GOLDEN = Path(__file__).parent / "golden"
OUTPUTS = GOLDEN / "outputs.json"
CARDS = GOLDEN / "cards"
REGENERATE = os.environ.get("FACEGEN_REGENERATE_GOLDEN") == "1"

# The card rows that legitimately change between runs (found by building twice, in two folders, and diffing).
CARD_MASKS = [
    (re.compile(r"^\| facegen \| \d+\.\d+\.\d+\S*( \(git `[0-9a-f]{40}`\))? \|$", re.M),
     "| facegen | <facegen version and git revision masked> |"),
    (re.compile(r"^\| built \| \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00, Python \d+\.\d+\.\d+\S* \|$", re.M),
     "| built | <build date and Python version masked> |"),
    (re.compile(r"^\| build time \(sum over shards\) \| \d+\.\d s \|$", re.M),
     "| build time (sum over shards) | <measured seconds masked> |"),
]

GENERATIVE = {"arc2face", "e4e-project", "sfhq-truncation"}  # torch float math on the CPU


def masked_card(text: str) -> str:
    for pattern, replacement in CARD_MASKS:
        text = pattern.sub(replacement, text)
    return text


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def environment() -> dict[str, str]:
    import numpy
    import PIL
    import torch

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "pillow": PIL.__version__, "numpy": numpy.__version__}


def published_files(out: Path) -> list[str]:
    """Every file of OUT outside `.facegen/` (facegen's own records, never published), relative to OUT."""
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                  if p.is_file() and p.relative_to(out).parts[0] != ".facegen")


def tar_members(path: Path) -> dict[str, str]:
    with tarfile.open(path) as tar:
        return {m.name: sha256(tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()}


def record(out: Path) -> dict:
    """What the golden file holds for one build."""
    files, members = {}, {}
    for name in published_files(out):
        data = (out / name).read_bytes()
        if name == "README.md":
            data = masked_card(data.decode()).encode()
        files[name] = sha256(data)
        if name.endswith(".tar"):
            members[name] = tar_members(out / name)
    samples = sum(len({member.split(".", 1)[0] for member in shard}) for shard in members.values())
    return {"samples": samples, "files": files, "shard_members": members}


# ----------------------------------------------------------------------------------------------------------------
# The builds: fixtures in the published layouts, built as a user would type it, with sizes cut down (2-3 shards,
# at least one skipped sample where the fixture can make one).
# ----------------------------------------------------------------------------------------------------------------


def facegen(*args) -> None:
    """An in-process `facegen ...` with sys.argv as the console script would see it (the card shows the command)."""
    argv = sys.argv
    sys.argv = ["facegen", *map(str, args)]
    try:
        code = cli(*args)
    finally:
        sys.argv = argv
    assert code == 0, f"facegen {' '.join(map(str, args))} exited {code}"


def build_folder(ws: Path) -> Path:
    from facegen.testing.folder import write_folder_source

    src = write_folder_source(ws / "folder", identities=6, images_per_identity=3, corrupt=1)
    facegen("build", "--source", "folder", "--source-path", src, "--plugin", "passthrough", "--out", ws / "out-folder",
            "--shard-samples", 7)
    return ws / "out-folder"


def build_digiface(ws: Path) -> Path:
    from facegen.testing.digiface import write_digiface_part

    src = ws / "digiface"
    write_digiface_part(src, ids=[0, 1, 2], images_per_identity=4, name="subjects_0-1999_72_imgs", bad_crc=1,
                        corrupt_png=1, unsafe_members=True, macosx=True, dot_files=True)
    write_digiface_part(src, ids=[2000, 2001], images_per_identity=3, name="subjects_2000-3999_72_imgs", wrapper=True)
    write_digiface_part(src, ids=[100000, 100001], images_per_identity=2, name="subjects_100000-133332_5_imgs")
    facegen("build", "--recipe", "digiface", "--source-path", src, "--out", ws / "out-digiface", "--shard-samples", 8)
    return ws / "out-digiface"


def build_sfhq(ws: Path) -> Path:
    from facegen.testing.sfhq import write_sfhq_source

    src = write_sfhq_source(ws / "sfhq", parts=(1, 4), images_per_part=5, size=64, missing_landmarks=1,
                            corrupt_images=1, feature_dims={"CLIP_ViTL_14@336": 8, "CLIP_ResNet50x64": 4})
    facegen("build", "--recipe", "sfhq", "--source-path", src, "--out", ws / "out-sfhq", "--shard-samples", 4)
    return ws / "out-sfhq"


def build_disco(ws: Path) -> Path:
    from facegen.testing.disco import write_disco_source

    src = write_disco_source(ws / "disco", identities=3, augmentations=4, reference_images=False, nan_embedding=1,
                             sample_without_image=1, image_without_sample=1)
    facegen("build", "--recipe", "disco", "--source-path", src, "--out", ws / "out-disco", "--shard-samples", 5)
    return ws / "out-disco"


def build_arc2face(ws: Path) -> Path:
    """The digi2real recipe's four commands as its header gives them, with the demo's tiny models and sizes
    (facegen.builders.demo)."""
    from facegen.testing.arc2face import write_tiny_arc2face
    from facegen.testing.digiface import write_digiface_part
    from facegen.testing.folder import write_folder_source

    src = ws / "digiface"
    write_digiface_part(src, ids=range(6), images_per_identity=5, corrupt_png=6)
    real = write_folder_source(ws / "real", identities=3, images_per_identity=2, size=256, start=1000)
    models = write_tiny_arc2face(ws / "models")
    os.chdir(ws)  # the recipe names digi2real/ids.txt and digi2real/delta.safetensors relative to where it runs
    facegen("embed", "--source", "digiface", "--source-path", src, "--source-opt", "max_images=5",
            "--model-dir", models, "--out", "digi2real/prototypes.npz")
    facegen("select-identities", "--prototypes", "digi2real/prototypes.npz", "--count", 4,
            "--out", "digi2real/ids.txt")
    facegen("estimate-shift", "--real", f"folder:{real}", "--synthetic", f"digiface:{src}:max_images=5",
            "--model-dir", models, "--max-images", 8, "--device", "cpu", "--out", "digi2real/delta.safetensors")
    # the estimate names its inputs' absolute paths (in the temporary folder): the build publishes it with them
    # replaced by placeholders, its metadata in one order, and the card names that copy's sha256
    facegen("build", "--recipe", "digi2real", "--source-path", src, "--out", ws / "out-arc2face",
            "--plugin-opt", f"model_dir={models}", "--plugin-opt", "latents=2", "--plugin-opt", "images_per_latent=2",
            "--plugin-opt", "steps=4", "--shard-samples", 6)
    return ws / "out-arc2face"


def e4e_checkpoint(workspace: Path) -> Path:
    """The tiny e4e checkpoint both e4e builds use, written once per workspace."""
    from facegen.testing.stylegan import write_checkpoints

    path = workspace / "e4e" / "e4e_tiny.pt"
    if not path.is_file():
        write_checkpoints(path.parent, size=32, seed=0)
    return path


def build_e4e_project(ws: Path) -> Path:
    from facegen.testing.folder import write_folder_source

    src = write_folder_source(ws / "e4e-folder", identities=3, images_per_identity=2, corrupt=1)
    facegen("build", "--source", "folder", "--source-path", src, "--plugin", "e4e",
            "--plugin-opt", f"checkpoint={e4e_checkpoint(ws.parent)}", "--plugin-opt", "mode=project",
            "--plugin-opt", "input_framing=arcface", "--plugin-opt", "align=arcface", "--out", ws / "out-e4e-project",
            "--shard-samples", 2)
    return ws / "out-e4e-project"


def build_sfhq_truncation(ws: Path) -> Path:
    facegen("build", "--recipe", "sfhq-truncation", "--source-opt", "count=5",
            "--plugin-opt", f"checkpoint={e4e_checkpoint(ws.parent)}", "--out", ws / "out-sfhq-truncation",
            "--shard-samples", 2)
    return ws / "out-sfhq-truncation"


BUILDERS = {"folder": build_folder, "digiface": build_digiface, "sfhq": build_sfhq, "disco": build_disco,
            "arc2face": build_arc2face, "e4e-project": build_e4e_project, "sfhq-truncation": build_sfhq_truncation}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, one_torch_thread):
    """One folder for the module's builds. One torch thread is not only faster: with two, a few arc2face pixels
    and cosines round differently (measured), so the recorded bytes hold for one thread."""
    return tmp_path_factory.mktemp("golden")


@pytest.fixture
def built(workspace, monkeypatch):
    """Build by name, each in its own folder under one module-wide workspace (shared checkpoints, one thread)."""
    monkeypatch.chdir(workspace)  # and back afterwards: build_arc2face changes the working folder
    return lambda name: BUILDERS[name](workspace / name)


# ----------------------------------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------------------------------


def load_golden() -> dict:
    return json.loads(OUTPUTS.read_text()) if OUTPUTS.is_file() else {"builds": {}}


def regenerate(name: str, out: Path, got: dict) -> None:
    golden = load_golden()
    golden["builds"] = {key: value for key, value in golden["builds"].items() if key in BUILDERS}
    golden["builds"][name] = {"environment": environment(), **got}
    golden["builds"] = dict(sorted(golden["builds"].items(), key=lambda item: list(BUILDERS).index(item[0])))
    GOLDEN.mkdir(exist_ok=True)
    CARDS.mkdir(exist_ok=True)
    OUTPUTS.write_text(json.dumps(golden, indent=1, sort_keys=False) + "\n")
    (CARDS / f"{name}.md").write_text(masked_card((out / "README.md").read_text()))


def comparison_order(path: str) -> tuple[int, str]:
    """Shards first (the data itself), the card last (it repeats the shards' checksums and sizes)."""
    rank = 0 if path.startswith("data/") else 2 if path == "README.md" else 1
    return rank, path


def first_difference(name: str, out: Path, expected: dict, got: dict) -> str | None:
    """What differs, or None when the build matches: the list of differing files, details of the first one (shards
    first), and the card's diff whenever the card differs."""
    missing = sorted(set(expected["files"]) - set(got["files"]))
    new = sorted(set(got["files"]) - set(expected["files"]))
    differing = [path for path in sorted(set(expected["files"]) & set(got["files"]), key=comparison_order)
                 if expected["files"][path] != got["files"][path]]
    lines = []
    if missing or new:
        lines.append(f"{name}: published files missing {missing}, new {new}")
    if differing:
        path = differing[0]
        lines += [f"{name}: {len(differing)} published files differ: {', '.join(differing)}", f"first: {path}",
                  f"  expected sha256 {expected['files'][path]}", f"  got      sha256 {got['files'][path]}"]
        if path.endswith(".tar"):
            lines += tar_difference(out / path, expected["shard_members"][path], got["shard_members"][path])
        elif path.endswith((".json", ".txt")) or path == "LICENSE":
            lines += ["  got:", *("    " + line for line in (out / path).read_text().splitlines()[:60])]
    if "README.md" in differing:
        expected_card = (CARDS / f"{name}.md").read_text().splitlines()
        got_card = masked_card((out / "README.md").read_text()).splitlines()
        lines += difflib.unified_diff(expected_card, got_card, f"expected (tests/golden/cards/{name}.md)",
                                      "got README.md (masked)", lineterm="")
    if expected["samples"] != got["samples"]:
        lines.insert(0, f"{name}: {got['samples']} samples, expected {expected['samples']}")
    return "\n".join(lines) or None


def tar_difference(path: Path, want: dict[str, str], have: dict[str, str]) -> list[str]:
    """Which members of a shard differ (the golden file keeps every member's sha256, in tar order)."""
    if list(want.items()) == list(have.items()):
        return ["  every member has the recorded bytes, in the recorded order: the tar headers differ"]
    if want == have:
        return ["  every member has the recorded bytes, in another order"]
    changed = [m for m in want if m in have and want[m] != have[m]]
    lines = [f"  member missing: {m}" for m in want if m not in have][:5]
    lines += [f"  member new: {m}" for m in have if m not in want][:5]
    lines += [f"  member differs: {m}" for m in changed[:5]]
    if changed:
        lines.append(f"  ({len(changed)} members differ)")
    text = [m for m in changed if m.endswith((".json", ".cls"))]
    if text:
        with tarfile.open(path) as tar:
            lines.append(f"  got {text[0]}: {tar.extractfile(text[0]).read().decode()[:2000]}")
    return lines


@pytest.mark.parametrize("name", list(BUILDERS))
def test_build_matches_golden_outputs(name, built):
    expected = load_golden()["builds"].get(name)
    if name in GENERATIVE and expected is not None and not REGENERATE:
        recorded, running = expected["environment"], environment()
        for key in ("torch", "cpu_capability"):
            if recorded[key] != running[key]:
                pytest.skip(f"{name} runs float math in torch on the CPU: recorded with {key} {recorded[key]}, "
                            f"running {running[key]}, whose rounding may differ; its bytes are not compared")
    out = built(name)
    got = record(out)
    if REGENERATE:
        regenerate(name, out, got)
        return
    assert expected is not None, f"{name}: no golden record; run FACEGEN_REGENERATE_GOLDEN=1 pytest {__file__}"
    message = first_difference(name, out, expected, got)
    if message:
        env = {key: (expected["environment"][key], value) for key, value in environment().items()
               if expected["environment"][key] != value}
        pytest.fail(message + (f"\n(recorded vs running versions: {env})" if env else ""), pytrace=False)


def test_masks_hide_only_the_rows_that_change_between_runs():
    card = ("| facegen | 0.1.0 (git `866ea4085c99428df76c9e9dfbd82592dc3f26c3`) |\n"
            "| built | 2026-12-04T15:11:28+00:00, Python 3.11.7 |\n"
            "| build time (sum over shards) | 12.3 s |\n"
            "| source | `folder` from `facegen` 0.1.0 |\n")
    assert masked_card(card) == ("| facegen | <facegen version and git revision masked> |\n"
                                 "| built | <build date and Python version masked> |\n"
                                 "| build time (sum over shards) | <measured seconds masked> |\n"
                                 "| source | `folder` from `facegen` 0.1.0 |\n")
    assert masked_card("| facegen | 0.1.0 |\n") == "| facegen | <facegen version and git revision masked> |\n"
    assert masked_card("| built | yesterday |\n") == "| built | yesterday |\n"  # another format shows in the diff
