"""Arc2Face's face recogniser (ArcFace R100 trained on WebFace42M, ``arcface.onnx``), batched on ONNX Runtime.

API summary
-----------
- ``ARC2FACE_REPO_ID``, ``ARC2FACE_REVISION``: the Hub repo holding ``arcface.onnx`` (and Arc2Face's UNet and
  encoder), pinned to a commit.
- ``resolve_arcface(model_dir=None, repo_id=ARC2FACE_REPO_ID, revision=ARC2FACE_REVISION) -> str``: path of
  ``arcface.onnx``. With ``model_dir`` only that folder is searched: ``DIR/arcface.onnx``,
  ``DIR/arc2face/arcface.onnx`` (the transform's ``model_dir`` layout, ``facegen.generators.arc2face``) or
  ``DIR/antelopev2/arcface.onnx`` (Arc2Face's README layout); without it the pinned file comes from the Hub
  cache or the Hub. Missing/offline -> :class:`MissingModelError` (one line; a ``UsageError`` so the CLI exits 2).
- ``ArcFaceEmbedder(onnx_path, providers=None, batch_size=64)``; ``.embed(images_rgb_112) -> (N, 512) float32``
  RAW embeddings (not unit length) for aligned RGB uint8 crops of shape (N, 112, 112, 3).
  ``.embed_unit(...)`` = ``normalize(embed(...))``.

Preprocessing (checked against insightface 2.1 ``ArcFaceONNX.get_feat``): insightface is handed BGR crops and
calls ``cv2.dnn.blobFromImages(imgs, 1/127.5, (112, 112), (127.5,)*3, swapRB=True)``, so the network itself sees
**RGB**, NCHW, ``(x - 127.5) / 127.5``. We take RGB arrays and build that same blob with numpy (no channel swap
needed). Graphs exported from MXNet carry their own normalisation (a ``Sub``/``_minus`` and ``Mul``/``_mul``
node among the first eight); for those insightface feeds raw pixels (mean 0, std 1), and so do we.
``tests/test_arcface.py`` checks bit-equality with ``ArcFaceONNX.get_feat`` on the tiny test model.

Arc2Face's README normalises the raw embedding (``emb / ||emb||``) before projecting it;
:func:`facegen.generators.embeddings.normalize` does that.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from facegen.errors import RemoteError, UsageError, server_failed
from facegen.generators.embeddings import normalize

ARC2FACE_REPO_ID = "FoivosPar/Arc2Face"
# A commit of the Hub repo that holds arcface.onnx (the one third-party code pins for arcface.onnx).
ARC2FACE_REVISION = "da2f1e9aa3954dad093213acfc9ae75a68da6ffd"
ARCFACE_FILENAME = "arcface.onnx"
EMBEDDING_SIZE = 512
INPUT_SIZE = 112


class MissingModelError(UsageError):
    """A model file is not where it should be and cannot be downloaded: one line saying how to provide it."""


def resolve_arcface(model_dir: str | os.PathLike | None = None, repo_id: str = ARC2FACE_REPO_ID,
                    revision: str = ARC2FACE_REVISION, pass_model_dir: str = "pass `--model-dir DIR`") -> str:
    """Path of ``arcface.onnx``: from ``model_dir`` (offline clusters) or the pinned Hub revision.
    ``pass_model_dir`` says how the command at hand is given a model folder, for the offline hint."""
    if model_dir is not None:
        model_dir = Path(model_dir).expanduser()
        candidates = [Path(ARCFACE_FILENAME), Path("arc2face") / ARCFACE_FILENAME,
                      Path("antelopev2") / ARCFACE_FILENAME]
        for candidate in candidates:
            if (model_dir / candidate).is_file():
                return str(model_dir / candidate)
        raise MissingModelError(
            f"{ARCFACE_FILENAME} not found in {model_dir} (looked for {', '.join(map(str, candidates))}); "
            f"download it with `hf download {repo_id} {ARCFACE_FILENAME} --revision {revision} "
            f"--local-dir {model_dir / 'arc2face'}`"
        )
    from huggingface_hub import HfApi, hf_hub_download

    try:
        return hf_hub_download(repo_id, ARCFACE_FILENAME, revision=revision, local_files_only=True)
    except Exception:
        pass  # not in the cache
    try:
        # one request first: without a network hf_hub_download retries 5 times with backoff (about 25 s), logging
        # each retry; the probe fails at once, and a reachable Hub still gets hf_hub_download's retries
        HfApi().model_info(repo_id, revision=revision)
        return hf_hub_download(repo_id, ARCFACE_FILENAME, revision=revision)
    except Exception as exc:  # offline, unreachable, missing revision: the user provides the file
        reason = type(exc).__name__
        if server_failed(exc):
            raise RemoteError(f"cannot get {ARCFACE_FILENAME} from the Hub repo {repo_id}@{revision[:12]}: the Hub "
                              f"answered {exc.response.status_code}; rerun later, or {pass_model_dir}") from None
        raise MissingModelError(
            f"cannot get {ARCFACE_FILENAME} from the Hub repo {repo_id}@{revision[:12]} ({reason}); on an offline "
            f"machine download it elsewhere with `hf download {repo_id} {ARCFACE_FILENAME} --revision {revision} "
            f"--local-dir DIR`, copy DIR over and {pass_model_dir}"
        ) from None


def _graph_normalises_itself(onnx_path: str) -> bool:
    """insightface's test for MXNet exports: Sub and Mul among the first 8 nodes mean 'feed raw pixels'."""
    import onnx

    graph = onnx.load(onnx_path, load_external_data=False).graph
    names = [node.name for node in graph.node[:8]]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return has_sub and has_mul


def default_providers(device_id: int | None = None) -> list:
    """CUDA first when this onnxruntime build has it, CPU always last; ``device_id``: the GPU to use (a process of
    a run on many GPUs uses its own: its index on the machine)."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    providers: list = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    if device_id is not None and providers[0] == "CUDAExecutionProvider":
        providers[0] = ("CUDAExecutionProvider", {"device_id": device_id})
    return providers


def session_options(threads: int | None = None):
    """ONNX Runtime options for the face models: their thread pool does not spin once a run is done. The models run
    beside the generator and the run's other stages (post-processing on several threads, planning, writing): a
    pool that spins, waiting for work, holds cores that those need (issue 21 §1). ``threads``: intra-op threads."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return options


class ArcFaceEmbedder:
    """Batched ArcFace embeddings of aligned 112x112 RGB face crops."""

    def __init__(self, onnx_path: str | os.PathLike, providers: list | None = None, batch_size: int = 64,
                 threads: int | None = None):
        import onnxruntime

        self.onnx_path = os.fspath(onnx_path)
        self.session = onnxruntime.InferenceSession(self.onnx_path, sess_options=session_options(threads),
                                                    providers=providers or default_providers())
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.output_name = self.session.get_outputs()[0].name
        shape = model_input.shape  # e.g. ['None', 3, 112, 112]
        if list(shape[1:]) != [3, INPUT_SIZE, INPUT_SIZE]:
            raise ValueError(f"{self.onnx_path}: expected input (N, 3, 112, 112), found {shape}")
        # A graph exported with a fixed batch of 1 is run one image at a time.
        self.batch_size = 1 if shape[0] == 1 else batch_size
        if _graph_normalises_itself(self.onnx_path):
            self.input_mean, self.input_std = 0.0, 1.0
        else:
            self.input_mean, self.input_std = 127.5, 127.5

    def preprocess(self, images_rgb_112: np.ndarray) -> np.ndarray:
        """(N, 112, 112, 3) uint8 RGB -> (N, 3, 112, 112) float32 blob, exactly as insightface builds it."""
        images = np.asarray(images_rgb_112)
        if images.ndim != 4 or images.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(f"expected aligned crops of shape (N, 112, 112, 3), got {images.shape}")
        blob = (images.astype(np.float32) - np.float32(self.input_mean)) / np.float32(self.input_std)
        return np.ascontiguousarray(blob.transpose(0, 3, 1, 2))

    def embed(self, images_rgb_112: np.ndarray) -> np.ndarray:
        """Raw (not unit-length) embeddings, (N, 512) float32, in input order."""
        images = np.asarray(images_rgb_112)
        if len(images) == 0:
            return np.zeros((0, EMBEDDING_SIZE), dtype=np.float32)
        out = []
        for start in range(0, len(images), self.batch_size):
            blob = self.preprocess(images[start:start + self.batch_size])
            out.append(self.session.run([self.output_name], {self.input_name: blob})[0])
        return np.concatenate(out).astype(np.float32, copy=False).reshape(len(images), -1)

    def embed_unit(self, images_rgb_112: np.ndarray) -> np.ndarray:
        """Unit-length embeddings (what Arc2Face is conditioned on)."""
        return normalize(self.embed(images_rgb_112))
