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

Full-size random-weight face models, for speed measurements (``benchmarks/gpu_check.py``): the post-processing
of a generated image costs what it costs with the published models.

- ``write_arcface_r100(path, seed=0) -> Path``: insightface's IResNet-100 (``arcface_torch`` ``iresnet100``: stem
  3x3/64 + BN + PReLU; 3, 13, 30, 3 ``IBasicBlock`` s of 64, 128, 256, 512 channels, each BN, conv, BN, PReLU,
  strided conv, BN, with a 1x1 strided conv + BN shortcut where the shape changes; BN, flatten, 25088 -> 512 FC,
  BN) with random weights and ``arcface.onnx``'s I/O: about 12.1 G multiply-adds per 112x112 face, 65 M
  parameters (~261 MB file), as the published R100.
- ``write_scrfd_10g(path, seed=0) -> Path``: SCRFD-10G-KPS's network (mmdet ``ResNetV1e`` backbone with a deep
  stem, BasicBlock stages (3, 4, 2, 3) of (56, 88, 88, 224) channels; PAFPN to 56 channels on strides 8/16/32;
  one shared head of three 3x3/80 convs with score, box and keypoint convs for 2 anchors) with random weights,
  about 10 G multiply-adds at 640x480 (13.3 G at 640x640), the published model's count. A random detector reports
  random boxes or none, so its nine outputs are the stand-in's above plus 1e-6 x the network's: every image costs
  the network's full arithmetic and still yields the stand-in's one centred face, so alignment and the R100 run on
  every output as they would on real faces.
- ``write_full_size_face_models(model_dir, seed=0) -> Path``: both, in the same places as the tiny ones.
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
    nodes, inits, outputs = _scrfd_standin_graph()
    return _save_scrfd(path, "scrfd_standin", nodes, inits, outputs)


def _save_scrfd(path, graph_name: str, nodes: list, inits: list, outputs: list[str]) -> Path:
    """SCRFD-10G-KPS's interface around ``nodes``: input ``input.1`` (1, 3, H, W); ``outputs`` are its nine
    outputs, scores (A, 1), boxes (A, 4) and keypoints (A, 10) for strides 8, 16 and 32, in that order."""
    from onnx import TensorProto, helper

    values = []
    for name, width_ in zip(outputs, [1] * 3 + [4] * 3 + [10] * 3):
        values.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["?", width_]))
    graph = helper.make_graph(
        nodes, graph_name,
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])],
        values, initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="facegen.testing")
    model.ir_version = IR_VERSION
    return _save(model, path)


def _scrfd_standin_graph() -> tuple[list, list, list[str]]:
    """(nodes, initializers, the nine output names) of the stand-in."""
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

    return nodes, inits, scores + boxes + keypoints


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


class _ConvNet:
    """Nodes and random initializers of a convolutional ONNX graph, with a running count of multiply-adds
    (convolutions and the FC layer, at the spatial size the caller tracks)."""

    def __init__(self, seed: int, prefix: str):
        self.rng = np.random.default_rng(seed)
        self.prefix = prefix
        self.nodes: list = []
        self.inits: list = []
        self.macs = 0

    def _name(self, kind: str) -> str:
        # never "Sub…"/"Mul…" first: insightface would take an R100 for an MXNet graph normalising its own input
        return f"{self.prefix}{kind}_{len(self.nodes)}"

    def init(self, array: np.ndarray, dtype=np.float32) -> str:
        from onnx import numpy_helper

        name = f"{self.prefix}w{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=dtype), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        from onnx import helper

        name = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int, size: int, relu: bool = True,
             gain: float = 1.0, bias: bool = True) -> str:
        """A k x k convolution (BN folded into its bias, as exported inference graphs hold it) on a ``size`` x
        ``size`` input; He-initialised, times ``gain``."""
        w = self.rng.normal(0, gain * np.sqrt(2.0 / (cin * k * k)), (cout, cin, k, k))
        inputs = [x, self.init(w)] + ([self.init(np.zeros(cout))] if bias else [])
        out = self.node("Conv", inputs, kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4)
        self.macs += (size // stride) ** 2 * cout * cin * k * k
        return self.node("Relu", [out]) if relu else out

    def batch_norm(self, x: str, channels: int, scale: float = 1.0) -> str:
        gamma = scale * (1 + 0.05 * self.rng.standard_normal(channels))
        beta = 0.05 * self.rng.standard_normal(channels)
        return self.node("BatchNormalization", [x, self.init(gamma), self.init(beta), self.init(np.zeros(channels)),
                                                self.init(np.ones(channels))], epsilon=1e-5)

    def prelu(self, x: str, channels: int) -> str:
        return self.node("PRelu", [x, self.init(np.full((channels, 1, 1), 0.25))])


def write_arcface_r100(path: str | os.PathLike, seed: int = 0) -> Path:
    """insightface's IResNet-100 with random weights and arcface.onnx's I/O (see the module docstring)."""
    from onnx import TensorProto, helper

    net = _ConvNet(seed, "r100_")
    size = 112
    x = net.prelu(net.batch_norm(net.conv("input.1", 3, 64, 3, 1, size, relu=False, bias=False), 64), 64)
    inplanes = 64
    for blocks, planes in zip((3, 13, 30, 3), (64, 128, 256, 512)):
        for b in range(blocks):
            stride = 2 if b == 0 else 1
            y = net.batch_norm(x, inplanes)
            y = net.conv(y, inplanes, planes, 3, 1, size, relu=False, bias=False)
            y = net.prelu(net.batch_norm(y, planes), planes)
            y = net.conv(y, planes, planes, 3, stride, size, relu=False, bias=False)
            y = net.batch_norm(y, planes, scale=0.2)  # small residual branches keep 49 blocks' activations finite
            shortcut = x
            if stride != 1 or inplanes != planes:
                shortcut = net.batch_norm(net.conv(x, inplanes, planes, 1, stride, size, relu=False, bias=False),
                                          planes)
            x = net.node("Add", [y, shortcut])
            inplanes, size = planes, size // stride
    x = net.node("Flatten", [net.batch_norm(x, 512)])
    fc = net.rng.normal(0, np.sqrt(1.0 / (512 * size * size)), (512 * size * size, 512))
    x = net.node("Gemm", [x, net.init(fc), net.init(np.zeros(512))])
    net.macs += fc.size
    embedding = net.batch_norm(x, 512)
    graph = helper.make_graph(
        net.nodes, "iresnet100",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
        [helper.make_tensor_value_info(embedding, TensorProto.FLOAT, ["None", 512])],
        initializer=net.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="facegen.testing", doc_string=f"multiply-adds per face: {net.macs}")
    model.ir_version = IR_VERSION
    return _save(model, path)


def _scrfd_10g_network(net: _ConvNet, size: int) -> tuple[list[str], list[str], list[str]]:
    """SCRFD-10G-KPS's backbone, neck and head on ``input.1`` (multiply-adds counted at ``size`` x ``size``):
    per stride 8, 16, 32 the score (sigmoid), box and keypoint maps as (A, 1), (A, 4), (A, 10) rows."""
    # deep stem (3x3 convs to 28, 28, 56 channels, the first strided) and a 2x2 pool: stride 4
    x = net.conv("input.1", 3, 28, 3, 2, size)
    size //= 2
    x = net.conv(net.conv(x, 28, 28, 3, 1, size), 28, 56, 3, 1, size)
    x = net.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    size //= 2
    inplanes, levels = 56, []
    for stage, (blocks, planes) in enumerate(zip((3, 4, 2, 3), (56, 88, 88, 224))):
        for b in range(blocks):
            stride = 2 if b == 0 and stage > 0 else 1
            y = net.conv(x, inplanes, planes, 3, stride, size)
            y = net.conv(y, planes, planes, 3, 1, size // stride, relu=False, gain=0.3)
            shortcut = x
            if stride != 1 or inplanes != planes:  # ResNetV1e's avg_down shortcut: 2x2 average pool, 1x1 conv
                if stride != 1:
                    shortcut = net.node("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
                shortcut = net.conv(shortcut, inplanes, planes, 1, 1, size // stride, relu=False)
            x = net.node("Relu", [net.node("Add", [y, shortcut])])
            inplanes, size = planes, size // stride
        levels.append((x, inplanes, size))
    # PAFPN on the last three stages (strides 8, 16, 32), 56 channels
    laterals = [net.conv(x, c, 56, 1, 1, s, relu=False) for x, c, s in levels[1:]]
    sizes = [s for _, _, s in levels[1:]]
    scales = net.init(np.array([1, 1, 2, 2]))
    for i in (2, 1):
        up = net.node("Resize", [laterals[i], "", scales], mode="nearest")
        laterals[i - 1] = net.node("Add", [laterals[i - 1], up])
    inter = [net.conv(x, 56, 56, 3, 1, s, relu=False) for x, s in zip(laterals, sizes)]
    for i in (0, 1):
        inter[i + 1] = net.node("Add", [inter[i + 1], net.conv(inter[i], 56, 56, 3, 2, sizes[i], relu=False)])
    outs = [inter[0]] + [net.conv(inter[i], 56, 56, 3, 1, sizes[i], relu=False) for i in (1, 2)]
    # one head shared by the three strides: three 3x3/80 convs, then score (2 anchors), box (2x4), keypoints (2x10)
    tower = [(net.rng.normal(0, np.sqrt(2.0 / (cin * 9)), (80, cin, 3, 3)), np.zeros(80)) for cin in (56, 80, 80)]
    tower = [(net.init(w), net.init(b)) for w, b in tower]
    heads = {kind: (net.init(net.rng.normal(0, 0.01, (2 * width, 80, 3, 3))), net.init(np.zeros(2 * width)), width)
             for kind, width in (("score", 1), ("bbox", 4), ("kps", 10))}
    shape_of = {width: net.init(np.array([-1, width]), np.int64) for width in (1, 4, 10)}
    maps: dict[str, list[str]] = {"score": [], "bbox": [], "kps": []}
    for x, s in zip(outs, sizes):
        cin = 56
        for w, b in tower:
            x = net.node("Relu", [net.node("Conv", [x, w, b], kernel_shape=[3, 3], pads=[1, 1, 1, 1])])
            net.macs += s * s * 80 * cin * 9
            cin = 80
        for kind, (w, b, width) in heads.items():
            y = net.node("Conv", [x, w, b], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
            net.macs += s * s * 2 * width * 80 * 9
            if kind == "score":
                y = net.node("Sigmoid", [y])
            # (1, 2*width, h, w) -> (h*w*2, width): anchors of a cell next to each other, as SCRFD's outputs
            y = net.node("Reshape", [net.node("Transpose", [y], perm=[0, 2, 3, 1]), shape_of[width]])
            maps[kind].append(y)
    return maps["score"], maps["bbox"], maps["kps"]


def write_scrfd_10g(path: str | os.PathLike, seed: int = 0) -> Path:
    """SCRFD-10G-KPS's network with random weights, answering as the stand-in (see the module docstring)."""
    nodes, inits, standin_outputs = _scrfd_standin_graph()
    net = _ConvNet(seed, "scrfd10g_")
    scores, boxes, keypoints = _scrfd_10g_network(net, 640)
    tiny = net.init(np.array([1e-6]))
    outputs = []
    for standin, network in zip(standin_outputs, scores + boxes + keypoints):
        outputs.append(net.node("Add", [standin, net.node("Mul", [network, tiny])]))
    return _save_scrfd(path, "scrfd_10g_random", nodes + net.nodes, inits + net.inits, outputs)


def write_full_size_face_models(model_dir: str | os.PathLike, seed: int = 0) -> Path:
    """``model_dir/arc2face/arcface.onnx`` (IResNet-100) and ``model_dir/antelopev2/scrfd_10g_bnkps.onnx``
    (SCRFD-10G-KPS), random weights; returns ``model_dir``."""
    model_dir = Path(model_dir)
    write_arcface_r100(model_dir / "arc2face" / "arcface.onnx", seed=seed)
    write_scrfd_10g(model_dir / "antelopev2" / "scrfd_10g_bnkps.onnx", seed=seed + 1)
    from facegen.generators.weights import write_test_model_marker

    write_test_model_marker(model_dir, "ArcFace R100 recogniser / SCRFD-10G detector (full-size, random weights)")
    return model_dir
