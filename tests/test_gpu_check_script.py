"""benchmarks/gpu_check.py is run once per lent GPU: check on CPU, with tiny models, that every section runs and
writes the json the GPU issue asks for, so a device call is never spent on a broken script."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_runs_every_section_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    # --budget 2000 (the default is 330): the sections' work is fixed and the budget only cuts them off; the
    # end-to-end build's subprocess gets its share (300 s, for ~10 s of work) as its timeout, so a loaded CPU
    # never cuts a section short
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu",
                           "--rounds", "1", "--budget", "2000", "--out", str(out)], capture_output=True, text=True,
                          timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"device", "date", "versions", "arc2face", "e2e_build", "e4e"} <= set(report)
    arc = report["arc2face"]
    for key in ("ceiling_images_per_s", "transform_images_per_s", "reference_images_per_s",
                "projected_digi2real20k_gpu_hours", "settings"):
        assert key in arc, key
    assert arc["unet_flops_per_image_step"] > 0 and arc["ceiling_images_per_s"] > 0
    assert [row["images_per_batch"] for row in arc["memory"]["rows"]][:2] == [1, 8]  # no memory read on a CPU
    assert arc["compile"]["images_per_s_speedup"] > 0 and arc["compile"]["unet_compile_seconds"] > 0
    assert arc["postprocess"]["faces_found"] == arc["postprocess"]["images"]
    assert set(report["targets"]) == {"transform_fraction_of_ceiling", "transform_vs_reference",
                                      "compile_images_per_s_speedup"}
    assert report["e2e_build"]["loaded"] and report["e2e_build"]["rows"] == 12  # 3 identities x 2 x 2
    assert report["e4e"]["project_batch1_images_per_s"] > 0
    assert "errors" not in report
