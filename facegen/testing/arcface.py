"""Tiny face models in the real file layouts, for tests and the offline demo (Hub and model zoo unreachable in CI).

API summary
-----------
- ``write_tiny_arcface(path, seed=0) -> Path``: a random-weight recogniser with ``arcface.onnx``'s I/O: input
  ``input.1`` of shape (N, 3, 112, 112) (dynamic batch), one output of shape (N, 512). Conv -> ReLU -> global
  average pool -> Gemm: the embedding depends on the image, but identities are meaningless.
- ``write_scrfd_standin(path) -> Path``: an ONNX graph with SCRFD-10G-KPS's exact interface (input ``input.1``
  (1, 3, H, W); nine outputs: scores (A, 1), box distances (A, 4), keypoint offsets (A, 10) for strides 8, 16 and
  32 with two anchors per cell), so insightface's ``SCRFD`` class loads and decodes it like
  ``scrfd_10g_bnkps.onnx``. It is NOT a detector (its weights are set by hand, not random and not trained): on any
  image that is not flat (pixel variance above ~1.3 grey levels squared) it reports exactly one face, centred,
  whose box spans 78% of the shorter side and whose five keypoints sit where the ArcFace template puts them in
  that box — the position an FFHQ-aligned 512x512 Arc2Face output puts a face; on a flat image it reports none.
  It assumes square images (SCRFD pads non-square ones, which moves the centre). Why a stand-in: a random-weight
  SCRFD finds random boxes or none, and the random-weight Arc2Face of the demo draws noise that no real detector
  would call a face, so the demo would write nothing; the stand-in lets the real loading, decoding, alignment and
  drop paths run. Tests with real detections use ``FaceAligner(detector="dlib")`` on real photos.
- ``write_tiny_face_models(model_dir) -> Path``: both, where the transform's ``model_dir`` holds them:
  ``model_dir/arc2face/arcface.onnx`` and ``model_dir/antelopev2/scrfd_10g_bnkps.onnx``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

STANDIN_FACE_FRACTION = 0.78  # face box side / shorter image side
STANDIN_MIN_VARIANCE = 1e-4  # of SCRFD's normalised input (x - 127.5) / 128: below it, "no face"
OPSET = 17
IR_VERSION = 8  # old enough for every onnxruntime the project supports


def _save(model, path: str | os.PathLike) -> Path:
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def write_tiny_arcface(path: str | os.PathLike, seed: int = 0, width: int = 16) -> Path:
    """A random-weight recogniser with arcface.onnx's inputs and outputs (~40 KB)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    conv_w = rng.normal(0, 0.2, (width, 3, 8, 8)).astype(np.float32)
    conv_b = rng.normal(0, 0.1, (width,)).astype(np.float32)
    fc_w = rng.normal(0, 1.0 / np.sqrt(width), (width, 512)).astype(np.float32)
    fc_b = rng.normal(0, 0.1, (512,)).astype(np.float32)
    nodes = [
        # Node names avoid "Sub"/"Mul" prefixes: insightface would take them for an MXNet graph that
        # normalises its own input.
        helper.make_node("Conv", ["input.1", "conv_w", "conv_b"], ["conv"], name="conv_0", strides=[4, 4]),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu_0"),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"], name="pool_0"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten_0"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["embedding"], name="fc_0"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["None", 512])],
        initializer=[numpy_helper.from_array(a, n) for a, n in
                     ((conv_w, "conv_w"), (conv_b, "conv_b"), (fc_w, "fc_w"), (fc_b, "fc_b"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="facegen.testing")
    model.ir_version = IR_VERSION
    return _save(model, path)


def write_scrfd_standin(path: str | os.PathLike) -> Path:
    """The SCRFD-shaped stand-in described in the module docstring."""
    from onnx import TensorProto, helper, numpy_helper

    from facegen.generators.alignment import ARCFACE_TEMPLATE

    nodes, inits = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32).reshape(-1), name))
        return name

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=f"{op.lower()}_{len(nodes)}", **attrs))
        return output

    inits.append(numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "hw_index"))
    inits.append(numpy_helper.from_array(np.array([3], dtype=np.int64), "anchor_axis"))

    # Image size (of SCRFD's input canvas) and the face placed in its centre.
    shape = node("Shape", ["input.1"], "shape")
    hw = node("Cast", [node("Gather", [shape, "hw_index"], "hw_int")], "hw", to=TensorProto.FLOAT)
    height = node("Slice", [hw, _i64(inits, "s0", 0), _i64(inits, "e1", 1)], "height")
    width = node("Slice", [hw, _i64(inits, "s1", 1), _i64(inits, "e2", 2)], "width")
    cx = node("Mul", [width, const("half", 0.5)], "cx")
    cy = node("Mul", [height, "half"], "cy")
    side = node("Mul", [node("Min", [height, width], "short_side"), const("fraction", STANDIN_FACE_FRACTION)],
                "side")
    half_side = node("Mul", [side, "half"], "half_side")

    # Whole-image variance gates the score: flat image -> no face.
    mean = node("ReduceMean", ["input.1"], "mean", keepdims=0)
    mean_sq = node("ReduceMean", [node("Mul", ["input.1", "input.1"], "x_sq")], "mean_sq", keepdims=0)
    variance = node("Sub", [mean_sq, node("Mul", [mean, mean], "mean_2")], "variance")
    gain = 1e5
    logit = node("Add", [node("Mul", [variance, const("gain", gain)], "gained"),
                         const("offset", -gain * STANDIN_MIN_VARIANCE)], "logit")
    face_score = node("Sigmoid", [logit], "face_score")

    scores, boxes, keypoints = [], [], []
    for stride in (8, 16, 32):
        tag = f"s{stride}"
        pooled = node("AveragePool", ["input.1"], f"pool_{tag}", kernel_shape=[stride, stride],
                      strides=[stride, stride])
        channel_mean = node("ReduceMean", [pooled], f"cmean_{tag}", axes=[1], keepdims=1)
        ones = node("Add", [node("Mul", [channel_mean, const(f"zero_{tag}", 0.0)], f"zeros_{tag}"),
                            const(f"one_{tag}", 1.0)], f"ones_{tag}")  # (1, 1, h, w)
        s = const(f"stride_{tag}", float(stride))
        # anchor centres: column j * stride, row i * stride (insightface's anchor_centers)
        px = node("Mul", [node("Sub", [node("CumSum", [ones, _i64(inits, f"ax3_{tag}", 3, scalar=True)],
                                            f"cum_x_{tag}"), f"one_{tag}"], f"j_{tag}"), s], f"px_{tag}")
        py = node("Mul", [node("Sub", [node("CumSum", [ones, _i64(inits, f"ax2_{tag}", 2, scalar=True)],
                                            f"cum_y_{tag}"), f"one_{tag}"], f"i_{tag}"), s], f"py_{tag}")

        def offset(target, centre, name):
            return node("Div", [node("Sub", [target, centre], f"{name}_d"), s], name)

        def neg_offset(target, centre, name):
            return node("Div", [node("Sub", [centre, target], f"{name}_d"), s], name)

        x0 = node("Sub", [cx, half_side], f"x0_{tag}")
        y0 = node("Sub", [cy, half_side], f"y0_{tag}")
        x1 = node("Add", [cx, half_side], f"x1_{tag}")
        y1 = node("Add", [cy, half_side], f"y1_{tag}")
        box_channels = [neg_offset(x0, px, f"l_{tag}"), neg_offset(y0, py, f"t_{tag}"),
                        offset(x1, px, f"r_{tag}"), offset(y1, py, f"b_{tag}")]
        kps_channels = []
        for k, (tx, ty) in enumerate(ARCFACE_TEMPLATE):
            kx = node("Add", [cx, node("Mul", [side, const(f"u{k}_{tag}", (tx - 56.0) / 112.0)], f"ku{k}_{tag}")],
                      f"kx{k}_{tag}")
            ky = node("Add", [cy, node("Mul", [side, const(f"v{k}_{tag}", (ty - 56.0) / 112.0)], f"kv{k}_{tag}")],
                      f"ky{k}_{tag}")
            kps_channels += [offset(kx, px, f"kdx{k}_{tag}"), offset(ky, py, f"kdy{k}_{tag}")]
        if stride == 32:
            score_map = node("Mul", [ones, face_score], f"score_{tag}")
        else:
            score_map = node("Mul", [ones, f"zero_{tag}"], f"score_{tag}")  # faces come from stride 32 only

        def per_anchor(channels, kind, width_):
            name = f"{kind}_{tag}"
            stacked = node("Concat", channels, f"{name}_cat", axis=1) if len(channels) > 1 else channels[0]
            nhwc = node("Transpose", [stacked], f"{name}_nhwc", perm=[0, 2, 3, 1])
            one_anchor = node("Unsqueeze", [nhwc, "anchor_axis"], f"{name}_a1")
            two_anchors = node("Concat", [one_anchor, one_anchor], f"{name}_a2", axis=3)
            return node("Reshape", [two_anchors, _i64(inits, f"{name}_shape", [-1, width_])], f"{kind}_{stride}")

        # Box distances and keypoint offsets must be finite even where the box does not cover the anchor.
        scores.append(per_anchor([score_map], "score", 1))
        boxes.append(per_anchor(box_channels, "bbox", 4))
        keypoints.append(per_anchor(kps_channels, "kps", 10))

    outputs = []
    for name, width_ in zip(scores + boxes + keypoints, [1] * 3 + [4] * 3 + [10] * 3):
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["?", width_]))
    graph = helper.make_graph(
        nodes, "scrfd_standin",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])],
        outputs, initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="facegen.testing")
    model.ir_version = IR_VERSION
    return _save(model, path)


def _i64(inits, name, value, scalar=False):
    from onnx import numpy_helper

    array = np.asarray(value, dtype=np.int64)
    inits.append(numpy_helper.from_array(array if scalar else array.reshape(-1), name))
    return name


def write_tiny_face_models(model_dir: str | os.PathLike, seed: int = 0) -> Path:
    """``model_dir/arc2face/arcface.onnx`` and ``model_dir/antelopev2/scrfd_10g_bnkps.onnx``; returns ``model_dir``."""
    model_dir = Path(model_dir)
    write_tiny_arcface(model_dir / "arc2face" / "arcface.onnx", seed=seed)
    write_scrfd_standin(model_dir / "antelopev2" / "scrfd_10g_bnkps.onnx")
    from facegen.generators.weights import write_test_model_marker

    write_test_model_marker(model_dir, "ArcFace recogniser / SCRFD detector")
    return model_dir
