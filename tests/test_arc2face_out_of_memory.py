"""A CUDA out-of-memory error during Arc2Face generation stops the run with one line naming the images_per_batch
that fits, from the memory table measured on a GPU (facegen.generators.arc2face.MEMORY_TABLE); injected here as
torch.OutOfMemoryError on CPU."""

import pytest
import torch

from conftest import run_cli
from facegen.errors import UsageError
from facegen.generators import arc2face as a2f
from facegen.plugins import arc2face as plugin
from facegen.plugins.arc2face import Arc2FaceTransform
from facegen.plugins.folder import FolderSource
from facegen.records import Identity, SourceImage
from facegen.testing.arc2face import write_tiny_arc2face
from facegen.testing.folder import write_folder_source

GIB = 2**30
FAST = {"steps": "2", "latents": "2", "images_per_latent": "2"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_arc2face(tmp_path_factory.mktemp("tiny_arc2face"))


@pytest.fixture
def out_of_memory(monkeypatch):
    calls = []

    def generate(self, cond, seeds):
        calls.append(len(seeds))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(a2f.Arc2FaceGenerator, "generate", generate)
    return calls


def test_the_largest_measured_size_that_fits_is_named():
    above, estimated = a2f.memory_above_weights(512, "float16")
    assert not estimated and sorted(above) == [1, 8, 16, 40, 80, 160, 320, 640]
    for size, need in above.items():
        free = int((need / a2f.MEMORY_MARGIN + 0.001) * GIB)
        line = a2f.out_of_memory_message(1000, 512, "float16", "cuda:0", free)
        expected = max(n for n, gib in above.items() if gib <= a2f.MEMORY_MARGIN * free / GIB)
        assert expected == size and f"set images_per_batch={size}," in line
        assert "\n" not in line and a2f.MEMORY_MEASURED in line and "cuda:0" in line
    # a size at least as large as the one that failed is never named, whatever the table says
    line = a2f.out_of_memory_message(80, 512, "float16", "cuda:0", 100 * GIB)
    assert "set images_per_batch=40," in line


def test_nothing_fits_and_other_sizes_are_estimates():
    line = a2f.out_of_memory_message(40, 512, "float16", "cuda:0", GIB // 4)
    assert "even images_per_batch=1 needs 0.6 GiB" in line and "\n" not in line
    measured, _ = a2f.memory_above_weights(512, "float16")
    scaled, estimated = a2f.memory_above_weights(1024, "float32")
    assert estimated and scaled[160] == pytest.approx(measured[160] * 8)
    assert "estimated from the 512x512 float16 figures" in a2f.out_of_memory_message(
        160, 1024, "float32", "cuda:0", 40 * GIB)
    line = a2f.out_of_memory_message(320, 768, "float16", "cuda:0", 60 * GIB)  # 160 needs 45.8 GiB
    assert "set images_per_batch=160," in line and "measured on an NVIDIA H200" in line


def test_transform_stops_with_one_line_from_the_free_memory(tiny_dir, tmp_path, out_of_memory, monkeypatch):
    source = FolderSource(write_folder_source(tmp_path / "src", identities=2, images_per_identity=2))
    batch = [Identity(i, n, 100 + n, images=[x for x in source.load(i) if isinstance(x, SourceImage)])
             for n, i in enumerate(source.identities())]
    transform = Arc2FaceTransform(model_dir=str(tiny_dir), images_per_batch="40", **FAST)
    transform.setup("cpu")
    read = []
    monkeypatch.setattr(plugin, "free_device_memory", lambda device: read.append(device) or 2 * GIB)
    with pytest.raises(UsageError) as info:
        list(transform(batch))
    transform.close()
    message = str(info.value)
    # 128x128 float32 tiny models: the 512x512 float16 rows x (128/512)^2 x 2; 16 images need 0.5 GiB of the 1.8
    assert message == "transform 'arc2face': " + a2f.out_of_memory_message(40, 128, "float32", "cpu", 2 * GIB)
    assert "out of memory generating images_per_batch=40 at 128x128 float32" in message
    assert "set images_per_batch=16," in message and "\n" not in message
    assert out_of_memory == [8] and [d.type for d in read] == ["cpu"]  # one call, no silent retry


def test_build_exits_2_with_the_line(tiny_dir, tmp_path, out_of_memory, capsys):
    src = write_folder_source(tmp_path / "src", identities=2, images_per_identity=2)
    opts = [x for k, v in {**FAST, "model_dir": str(tiny_dir)}.items() for x in ("--plugin-opt", f"{k}={v}")]
    code, _, err = run_cli(["build", "--source", "folder", "--source-path", src, "--plugin", "arc2face", *opts,
                            "--plugin-opt", "images_per_batch=40", "--out", tmp_path / "out"], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if "facegen: error" in line]  # beside the progress bars
    assert len(lines) == 1 and "Traceback" not in err
    # on a CPU no free memory can be read: the next smaller size of the table is named
    assert lines[0].startswith("facegen: error: transform 'arc2face': out of memory generating images_per_batch=40")
    assert "set images_per_batch=16, the next size of the memory table" in lines[0]
    assert len(out_of_memory) == 1
