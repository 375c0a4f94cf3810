"""Cross-check with mxnet 1.9.1 itself, where an interpreter that has it is named (never a dependency of facegen):

    FACEGEN_MXNET_PYTHON=.venv-mxnet/bin/python pytest tests/test_recordio_mxnet.py

(the venv as tests/fixtures/recordio/make_fixtures.py describes it). mxnet reads a face-layout file written by
facegen's writer, records cut at the magic word included, the way arcface_torch's MXFaceDataset reads it; facegen's
`rec` source must see the same images with the same classes. Skipped when FACEGEN_MXNET_PYTHON is not set.
"""

import hashlib
import json
import os
import subprocess

import pytest

from facegen.plugins.rec import RecSource
from facegen.plugins.recordio import MAGIC_BYTES
from facegen.testing.recordio import face_jpeg, write_face_rec

MXNET_PYTHON = os.environ.get("FACEGEN_MXNET_PYTHON")

# arcface_torch's MXFaceDataset (recognition/arcface_torch/dataset.py), minus torch: record 0, then each image
# record's class and image bytes.
MXFACE_DATASET = """
import hashlib, json, numbers, sys
import numpy as np
np.bool = np.bool_
import mxnet as mx
root = sys.argv[1]
imgrec = mx.recordio.MXIndexedRecordIO(root + "/train.idx", root + "/train.rec", "r")
header, _ = mx.recordio.unpack(imgrec.read_idx(0))
imgidx = list(range(1, int(header.label[0]))) if header.flag > 0 else list(imgrec.keys)
out = []
for idx in imgidx:
    header, img = mx.recordio.unpack(imgrec.read_idx(idx))
    label = header.label
    if not isinstance(label, numbers.Number):
        label = label[0]
    out.append([int(idx), int(label), hashlib.sha256(img).hexdigest()])
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(not MXNET_PYTHON, reason="FACEGEN_MXNET_PYTHON names no interpreter with mxnet 1.9.1")
def test_mxnet_reads_facegen_s_writer_as_facegen_s_reader_does(tmp_path):
    def image(identity, n):  # every third image carries the magic word at an aligned offset: cut into chunks
        data = face_jpeg(identity, n)
        if (identity + n) % 3 == 0:
            pad = -(32 + 6) % 4  # payload offset of a comment's text: IRHeader + 2 labels + SOI + COM header
            comment = b"x" * pad + MAGIC_BYTES * 2 + b"z"
            data = data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:]
        return data

    folder = write_face_rec(tmp_path / "rec", identities=5, images_per_identity=4, image=image)
    result = subprocess.run([MXNET_PYTHON, "-c", MXFACE_DATASET, str(folder)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    mxnet_view = sorted(map(tuple, json.loads(result.stdout)))
    source = RecSource(folder)
    facegen_view = sorted((item.meta["record"], int(identity), hashlib.sha256(item.data).hexdigest())
                          for identity in source.identities() for item in source.load(identity))
    assert facegen_view == mxnet_view and len(mxnet_view) == 20
    assert sum(image(i, n).count(MAGIC_BYTES) == 2 for i in range(5) for n in range(4)) >= 6


@pytest.mark.slow
@pytest.mark.skipif(not MXNET_PYTHON, reason="FACEGEN_MXNET_PYTHON names no interpreter with mxnet 1.9.1")
@pytest.mark.parametrize("shuffle", [False, True], ids=["face-layout", "shuffled"])
def test_mxnet_reads_facegen_export_as_arcface_torch_and_dali_do(tmp_path, shuffle):
    """`facegen export --format rec` (and its header-less `--shuffle` flavour, read through the index's keys as
    DALI's reader does): mxnet sees every published sample once, with its class and its exact bytes."""
    import tarfile

    from conftest import build, facegen
    from facegen.testing.folder import write_folder_source

    src = write_folder_source(tmp_path / "src", identities=4, images_per_identity=3, size=16)
    build("--source", "folder", "--source-path", src, "--plugin", "passthrough", "--out", tmp_path / "ds")
    facegen("export", tmp_path / "ds", "--format", "rec", *(["--shuffle"] if shuffle else []), "--to",
            tmp_path / "rec", check=True)
    published = []
    for tar in sorted((tmp_path / "ds" / "data" / "train").glob("*.tar")):
        with tarfile.open(tar) as archive:
            members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
        published += [(int(members[name]), hashlib.sha256(members[name[:-3] + "png"]).hexdigest())
                      for name in members if name.endswith(".cls")]
    result = subprocess.run([MXNET_PYTHON, "-c", MXFACE_DATASET, str(tmp_path / "rec")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted((label, digest) for _, label, digest in json.loads(result.stdout)) == sorted(published)
    assert len(published) == 12
