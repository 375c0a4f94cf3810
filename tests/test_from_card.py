"""`facegen build --from-card`: a build rebuilt from its own card is byte-identical; a difference is one line."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import cli, facegen, run_cli
from facegen.testing.folder import write_folder_source

PUBLISHED = ("README.md", "LICENSE", "preview.jpg", "data", "provenance")


def clone(out: Path, to: Path) -> Path:
    """What a stranger has: the published files only (no .facegen/, no local inputs)."""
    to.mkdir()
    for name in PUBLISHED:
        if (out / name).is_dir():
            shutil.copytree(out / name, to / name)
        elif (out / name).is_file():
            shutil.copy(out / name, to / name)
    return to


def error_line(err: str) -> str:
    """The one error line (the build's progress bar also writes to stderr)."""
    lines = [line for line in err.splitlines() if "facegen: error" in line]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


def shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "data" / "train").glob("*.tar"))}


@pytest.fixture
def published(tmp_path):
    """A passthrough build with an identity list (a rebuild input that travels under provenance/). 8 samples with
    --shard-samples 8 would be one shard: --shards-multiple-of 2 makes it two, so a rebuild that lost either
    layout option would not be byte-identical."""
    src = write_folder_source(tmp_path / "src", identities=6, images_per_identity=2, size=48)
    ids = tmp_path / "ids.txt"
    ids.write_text("0\n2\n3\n5\n")
    out = tmp_path / "out"
    assert cli("build", "--source", "folder", "--source-path", src, "--plugin", "passthrough", "--identities-file",
               ids, "--shard-size", 2, "--shard-samples", 8, "--shards-multiple-of", 2, "--seed", 3, "--out", out) == 0
    assert len(shards(out)) == 2
    ids.unlink()  # the original list is gone: the rebuild must use the published copy
    return src, out, clone(out, tmp_path / "clone")


def test_the_card_carries_the_options_and_the_identity_list(published):
    src, out, card = published
    meta = yaml.safe_load((card / "README.md").read_text().split("---\n", 2)[1])
    record = meta["facegen"]
    assert record["options"]["source_path"] == "<folder source folder>"
    assert record["options"]["identities_file"] == "provenance/identities.txt"
    assert record["options"]["seed"] == 3 and record["options"]["shard_size"] == 2
    # the published layout (sizes and shuffle) is rebuilt from these
    assert record["options"]["shard_samples"] == 8 and record["options"]["shards_multiple_of"] == 2
    assert record["provenance"] == ["provenance/identities.txt", "provenance/checksums.json"]
    assert (card / "provenance" / "identities.txt").read_text() == "0\n2\n3\n5\n"
    text = (card / "README.md").read_text()
    assert "facegen build --from-card ORG/NAME --source-path '<folder source folder>' --out NEW" in text
    assert "A CPU build rebuilt this way is byte-identical." in text


def test_a_build_rebuilt_from_its_card_is_byte_identical(published, tmp_path, capsys):
    src, out, card = published
    code, stdout, err = run_cli(["build", "--from-card", card, "--source-path", src, "--out", tmp_path / "new"],
                                capsys)
    assert code == 0, err
    assert shards(tmp_path / "new") == shards(out)
    assert "all 2 shards are byte-identical to the card's" in stdout
    # the card's README.md works as well, and so does the build folder itself (its .facegen/run.json)
    code, stdout, err = run_cli(["build", "--from-card", card / "README.md", "--source-path", src, "--out",
                                 tmp_path / "new2"], capsys)
    assert code == 0 and shards(tmp_path / "new2") == shards(out)
    code, stdout, err = run_cli(["build", "--from-card", out, "--out", tmp_path / "new3"], capsys)
    assert code == 0 and "byte-identical" in stdout and shards(tmp_path / "new3") == shards(out)


def _shard_holding(out: Path, identity: str, number: int) -> str:
    """The published shard holding an identity's image ``number`` (shards are shuffled: read the sample index)."""
    for path in sorted((out / ".facegen" / "shards" / "index").glob("*.json")):
        index = json.loads(path.read_text())
        for key, ident in zip(index["keys"], index["identities"]):
            if ident == identity and key.endswith(f"_{number:03d}"):
                return index["tar"]
    raise AssertionError(f"no sample {identity}/{number} in {out}")


def test_a_changed_source_file_is_one_line(published, tmp_path, capsys):
    src, out, card = published
    image = sorted((src / "2").iterdir())[0]
    changed = _shard_holding(out, "2", 0)
    with Image.open(image) as im:
        pixels = im.convert("RGB")
    pixels.putpixel((0, 0), (1, 2, 3))
    pixels.save(image)
    code, stdout, err = run_cli(["build", "--from-card", card, "--source-path", src, "--out", tmp_path / "new"],
                                capsys)
    assert code == 1
    assert error_line(err).startswith(f"facegen: error: rebuild differs from {card}: 1 of 2 shards differs from the card "
                                      f"({changed} first): the source files differ")


def test_another_source_is_one_line_naming_the_plan(published, tmp_path, capsys):
    src, out, card = published
    other = write_folder_source(tmp_path / "other", identities=7, images_per_identity=1, size=48)
    (card / "provenance" / "identities.txt").unlink()  # a card without its identity list: the whole source
    readme = card / "README.md"
    readme.write_text(readme.read_text().replace("    identities_file: provenance/identities.txt\n", ""))
    code, stdout, err = run_cli(["build", "--from-card", card, "--source-path", other, "--out", tmp_path / "n"],
                                capsys)
    assert code == 1 and "the source's identities differ: the plan has 7 identities" in error_line(err)


def test_what_the_card_cannot_give_is_asked_for_in_one_line(published, tmp_path, capsys):
    src, out, card = published
    code, _, err = run_cli(["build", "--from-card", card, "--out", tmp_path / "new"], capsys)
    assert code == 2 and err == ("facegen: error: the card's build read <folder source folder>: pass --source-path "
                                 "with your copy\n")
    code, _, err = run_cli(["build", "--from-card", tmp_path / "nothing-here", "--out", tmp_path / "n"], capsys)
    assert code == 2 and "no such folder or file" in err
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "README.md").write_text("---\nlicense: mit\n---\n# not ours\n")
    code, _, err = run_cli(["build", "--from-card", tmp_path / "plain", "--source-path", src, "--out",
                            tmp_path / "n"], capsys)
    assert code == 2 and "not the card of a facegen build" in err


@pytest.mark.slow
def test_an_arc2face_cpu_build_rebuilt_from_its_card(tmp_path, tiny_arc2face):
    """Tiny models, a shift Δ (with local paths in its metadata) and an identity list: the clone rebuilds
    byte-identically; a model folder with other weights is named in one line."""
    import torch
    from safetensors.torch import save_file

    from facegen.testing.arc2face import TEXT_HIDDEN, write_tiny_arc2face

    models = tiny_arc2face
    shift = tmp_path / "delta.safetensors"
    save_file({"delta": torch.linspace(-0.1, 0.1, TEXT_HIDDEN)}, str(shift),
              metadata={"real_sources": f"folder:{tmp_path}/real"})
    ids = tmp_path / "ids.txt"
    ids.write_text("0\n2\n")
    out = tmp_path / "out"
    proc = _arc2face_build(tmp_path, models, out, "--plugin-opt", f"shift={shift}", "--identities-file", ids)
    assert proc.returncode == 0, proc.stderr
    card = clone(out, tmp_path / "clone")
    meta = yaml.safe_load((card / "README.md").read_text().split("---\n", 2)[1])
    assert meta["facegen"]["options"]["plugin_opts"]["shift"] == "provenance/shift.safetensors"
    assert str(tmp_path).encode() not in (card / "provenance" / "shift.safetensors").read_bytes()
    assert "Test models: these images are noise." in (card / "README.md").read_text()

    proc = facegen("build", "--from-card", card, "--source-path", tmp_path / "src", "--plugin-opt",
                   f"model_dir={models}", "--out", tmp_path / "new", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "byte-identical" in proc.stdout and shards(tmp_path / "new") == shards(out)

    other = write_tiny_arc2face(tmp_path / "other-models", seed=1)
    proc = facegen("build", "--from-card", card, "--source-path", tmp_path / "src", "--plugin-opt",
                   f"model_dir={other}", "--out", tmp_path / "new2", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1
    assert ("model stable-diffusion-v1-5/stable-diffusion-v1-5: vae/diffusion_pytorch_model.safetensors has "
            "sha256") in error_line(proc.stderr)


def _arc2face_build(tmp_path, models: Path, out: Path, *extra):
    src = tmp_path / "src"
    if not src.exists():
        write_folder_source(src, identities=3, images_per_identity=2)
    args = ["build", "--source", "folder", "--source-path", src, "--plugin", "arc2face", "--out", out,
            "--shard-size", 2]
    for opt in (f"model_dir={models}", "steps=2", "latents=1", "images_per_latent=2", "batch_size=2"):
        args += ["--plugin-opt", opt]
    return facegen(*args, *extra, env={"HF_HUB_OFFLINE": "1"})
