"""Stand-ins for the held-out corpus' architectures, built in code: the layer graphs of public Caffe models
the dev zoo lacks, with weights drawn to look trained (each layer's singular values decay as a power law, at a
He-like scale), not the real ones.

    python tools/proxies.py DIR [--large]    # writes DIR/<name>.prototxt and DIR/<name>.caffemodel for each
                                             # (--large: OpenPose and CaffeNet, not in the bench)

Issue 11's "Where we stand" found the tool slower than the original, or heavy, on MTCNN's three stages, a
CIFAR-10 net, a license-plate character classifier, a waifu2x-style image net and an SSD-like 260 x 260
face-mask detector; UltraFace-style detectors (depthwise-separable, three heads) are in its users' list, and
so are embedders (SphereFace-20), classifiers of the common families (SqueezeNet 1.1, ResNet-18, GoogLeNet),
super-resolution beyond the zoo's (FSRCNN) and the detector of OpenCV's own samples (MobileNet-SSD). The
bench (tools/bench.py) compresses each of these at every T and holds them to the same never-slower rule as
the zoo: what they test is the layer types and shapes (PReLU, LeakyReLU, Deconvolution, depthwise 3x3,
12 x 12 inputs, Permute/Flatten/Concat heads, BatchNorm+Scale, residual Eltwise sums, fire modules, a strided
Deconvolution, LRN, inception Concats, PriorBox + DetectionOutput behind depthwise-separable pairs), not the
accuracy of real weights.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from caffe_compress import io  # noqa: E402
from caffe_compress.net import Layer, Net  # noqa: E402

DECAY = 1.6  # singular value i (from 1) is i ** -DECAY of the first: trained layers are far from full rank


class _Builder:
    """A Net built layer by layer, with seeded weights."""

    def __init__(self, name: str, inputs: dict[str, tuple[int, ...]], seed: int = 0) -> None:
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.layers = [Layer(n, "Input", (), (n,), {"input_param": {"shape": [{"dim": list(s)}]}})
                       for n, s in inputs.items()]

    def add(self, name: str, kind: str, bottoms, top: str, params=None, blobs=()) -> str:
        bottoms = (bottoms,) if isinstance(bottoms, str) else tuple(bottoms)
        self.layers.append(Layer(name, kind, bottoms, (top,), params or {}, tuple(blobs)))
        return top

    def weights(self, shape: tuple[int, ...]) -> np.ndarray:
        """A (T, ...) weight whose (T, rest) matrix has power-law singular values, at a He-like scale."""
        rows, cols = shape[0], int(np.prod(shape[1:]))
        m = min(rows, cols)
        u, _ = np.linalg.qr(self.rng.standard_normal((rows, m)))
        v, _ = np.linalg.qr(self.rng.standard_normal((cols, m)))
        w = (u * np.arange(1, m + 1) ** -DECAY) @ v.T
        w *= np.sqrt(2.0 / cols) / max(float(np.sqrt(np.mean(w * w))), 1e-30)
        return w.reshape(shape).astype(np.float32)

    def bias(self, n: int) -> np.ndarray:
        return (self.rng.standard_normal(n) * 0.05).astype(np.float32)

    def conv(self, name: str, bottom: str, cin: int, cout: int, k: int, *, stride: int = 1, pad: int = 0,
             group: int = 1, bias: bool = True, deconv: bool = False) -> str:
        shape = (cin, cout // group, k, k) if deconv else (cout, cin // group, k, k)
        w = self.weights(shape) if group == 1 else \
            (self.rng.standard_normal(shape) * np.sqrt(2.0 / (k * k))).astype(np.float32)
        params = {"num_output": cout, "kernel_h": k, "kernel_w": k, "stride": [stride], "pad": [pad],
                  "group": group, **({} if bias else {"bias_term": False})}
        return self.add(name, "Deconvolution" if deconv else "Convolution", bottom, name,
                        {"convolution_param": params}, (w, self.bias(cout)) if bias else (w,))

    def ip(self, name: str, bottom: str, cin: int, cout: int) -> str:
        return self.add(name, "InnerProduct", bottom, name, {"inner_product_param": {"num_output": cout}},
                        (self.weights((cout, cin)), self.bias(cout)))

    def act(self, name: str, top: str, kind: str = "ReLU", *, channels: int = 0, slope: float = 0.0) -> str:
        if kind == "PReLU":
            return self.add(name, "PReLU", top, top, blobs=(np.full(channels, 0.25, np.float32),))
        return self.add(name, "ReLU", top, top, {"relu_param": {"negative_slope": slope}} if slope else {})

    def bn(self, name: str, top: str, c: int) -> str:
        r = self.rng
        self.add(name, "BatchNorm", top, top, {"batch_norm_param": {"use_global_stats": True}},
                 ((r.standard_normal(c) * 0.1).astype(np.float32), r.uniform(0.5, 1.5, c).astype(np.float32),
                  np.ones(1, np.float32)))
        return self.add(f"{name}_scale", "Scale", top, top, {"scale_param": {"bias_term": True}},
                        (r.uniform(0.8, 1.2, c).astype(np.float32), (r.standard_normal(c) * 0.1).astype(np.float32)))

    def pool(self, name: str, bottom: str, k: int, s: int, mode: str = "MAX") -> str:
        return self.add(name, "Pooling", bottom, name,
                        {"pooling_param": {"pool": mode, "kernel_size": k, "stride": s}})

    def softmax(self, name: str, bottom: str, axis: int = 1) -> str:
        return self.add(name, "Softmax", bottom, name, {"softmax_param": {"axis": axis}})

    def flat_head(self, name: str, bottom: str, cin: int, cout: int, k: int = 3) -> str:
        """A k x k prediction head, channels last and flattened (SSD style)."""
        self.conv(name, bottom, cin, cout, k, pad=k // 2)
        self.add(f"{name}_perm", "Permute", name, f"{name}_perm", {"permute_param": {"order": [0, 2, 3, 1]}})
        return self.add(f"{name}_flat", "Flatten", f"{name}_perm", f"{name}_flat", {"flatten_param": {"axis": 1}})

    def concat(self, name: str, bottoms, axis: int = 1) -> str:
        return self.add(name, "Concat", bottoms, name, {"concat_param": {"axis": axis}})

    def net(self) -> Net:
        return Net(self.name, tuple(self.layers)).check()


def mtcnn_pnet() -> Net:
    b = _Builder("PNet", {"data": (1, 3, 12, 12)})
    x = b.act("prelu1", b.conv("conv1", "data", 3, 10, 3), "PReLU", channels=10)
    x = b.pool("pool1", x, 2, 2)
    x = b.act("prelu2", b.conv("conv2", x, 10, 16, 3), "PReLU", channels=16)
    x = b.act("prelu3", b.conv("conv3", x, 16, 32, 3), "PReLU", channels=32)
    b.softmax("prob1", b.conv("conv4-1", x, 32, 2, 1))
    b.conv("conv4-2", x, 32, 4, 1)
    return b.net()


def mtcnn_rnet() -> Net:
    b = _Builder("RNet", {"data": (1, 3, 24, 24)})
    x = b.pool("pool1", b.act("prelu1", b.conv("conv1", "data", 3, 28, 3), "PReLU", channels=28), 3, 2)
    x = b.pool("pool2", b.act("prelu2", b.conv("conv2", x, 28, 48, 3), "PReLU", channels=48), 3, 2)
    x = b.act("prelu3", b.conv("conv3", x, 48, 64, 2), "PReLU", channels=64)
    x = b.act("prelu4", b.ip("conv4", x, 576, 128), "PReLU", channels=128)
    b.softmax("prob1", b.ip("conv5-1", x, 128, 2))
    b.ip("conv5-2", x, 128, 4)
    return b.net()


def mtcnn_onet() -> Net:
    b = _Builder("ONet", {"data": (1, 3, 48, 48)})
    x = b.pool("pool1", b.act("prelu1", b.conv("conv1", "data", 3, 32, 3), "PReLU", channels=32), 3, 2)
    x = b.pool("pool2", b.act("prelu2", b.conv("conv2", x, 32, 64, 3), "PReLU", channels=64), 3, 2)
    x = b.pool("pool3", b.act("prelu3", b.conv("conv3", x, 64, 64, 3), "PReLU", channels=64), 2, 2)
    x = b.act("prelu4", b.conv("conv4", x, 64, 128, 2), "PReLU", channels=128)
    x = b.act("prelu5", b.ip("conv5", x, 1152, 256), "PReLU", channels=256)
    b.softmax("prob1", b.ip("conv6-1", x, 256, 2))
    b.ip("conv6-2", x, 256, 4)
    b.ip("conv6-3", x, 256, 10)
    return b.net()


def cifar10_quick() -> Net:
    b = _Builder("CIFAR10_quick", {"data": (1, 3, 32, 32)})
    x = b.act("relu1", b.pool("pool1", b.conv("conv1", "data", 3, 32, 5, pad=2), 3, 2))
    x = b.pool("pool2", b.act("relu2", b.conv("conv2", x, 32, 32, 5, pad=2)), 3, 2, "AVE")
    x = b.pool("pool3", b.act("relu3", b.conv("conv3", x, 32, 64, 5, pad=2)), 3, 2, "AVE")
    b.softmax("prob", b.ip("ip2", b.ip("ip1", x, 1024, 64), 64, 10))
    return b.net()


def plate_chars() -> Net:
    b = _Builder("plate_chars", {"data": (1, 1, 40, 20)})
    x = b.pool("pool1", b.conv("conv1", "data", 1, 20, 5), 2, 2)
    x = b.pool("pool2", b.conv("conv2", x, 20, 50, 5), 2, 2)
    x = b.act("relu1", b.ip("ip1", x, 50 * 7 * 2, 500))
    b.softmax("prob", b.ip("ip2", x, 500, 65))
    return b.net()


def waifu2x_vgg7(side: int = 142) -> Net:
    b = _Builder("vgg_7", {"input": (1, 3, side, side)})
    chans, x = [3, 32, 32, 64, 64, 128, 128, 3], "input"
    for i in range(7):
        x = b.conv(f"conv{i + 1}", x, chans[i], chans[i + 1], 3)
        if i < 6:
            b.act(f"relu{i + 1}", x, slope=0.1)
    return b.net()


def waifu2x_upconv7(side: int = 142) -> Net:
    b = _Builder("upconv_7", {"input": (1, 3, side, side)})
    chans, x = [3, 16, 32, 64, 128, 128, 256], "input"
    for i in range(6):
        x = b.act(f"relu{i + 1}", b.conv(f"conv{i + 1}", x, chans[i], chans[i + 1], 3), slope=0.1)
    b.conv("conv7", x, 256, 3, 4, stride=2, pad=3, deconv=True)
    return b.net()


def facemask_ssd260() -> Net:
    b = _Builder("facemask", {"data": (1, 3, 260, 260)})
    chans, x, heads = [3, 32, 64, 64, 64, 128, 128, 64, 64], "data", []
    for i in range(8):
        x = b.conv(f"conv2d_{i}", x, chans[i], chans[i + 1], 3, pad=1)
        b.bn(f"bn_{i}", x, chans[i + 1])
        b.act(f"relu_{i}", x)
        if i >= 3:
            heads.append((x, chans[i + 1]))
        if i < 7:
            x = b.pool(f"pool_{i}", x, 2, 2)
    locs = [b.flat_head(f"loc_{j}", h, c, 16) for j, (h, c) in enumerate(heads)]
    scores = [b.flat_head(f"cls_{j}", h, c, 8) for j, (h, c) in enumerate(heads)]
    b.concat("loc_branch_concat", locs)
    b.add("cls_branch_sigmoid", "Sigmoid", b.concat("cls_concat", scores), "cls_branch_concat")
    return b.net()


def ultraface_slim() -> Net:
    b = _Builder("ultraface_slim", {"input": (1, 3, 240, 320)})
    x = b.conv("conv0", "input", 3, 16, 3, stride=2, pad=1, bias=False)
    b.bn("conv0_bn", x, 16)
    b.act("conv0_relu", x)
    heads = []
    spec = [(16, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 1),
            (128, 128, 1), (128, 256, 2), (256, 256, 1)]
    for i, (cin, cout, stride) in enumerate(spec):
        x = b.conv(f"dw{i}", x, cin, cin, 3, stride=stride, pad=1, group=cin, bias=False)
        b.bn(f"dw{i}_bn", x, cin)
        b.act(f"dw{i}_relu", x)
        x = b.conv(f"pw{i}", x, cin, cout, 1, bias=False)
        b.bn(f"pw{i}_bn", x, cout)
        b.act(f"pw{i}_relu", x)
        if i in (4, 7, 9):
            heads.append((x, cout))
    scores = b.concat("cls_cat", [b.flat_head(f"cls{j}", h, c, 6) for j, (h, c) in enumerate(heads)])
    b.concat("boxes", [b.flat_head(f"reg{j}", h, c, 12) for j, (h, c) in enumerate(heads)])
    b.add("cls_reshape", "Reshape", scores, "cls_reshape", {"reshape_param": {"shape": {"dim": [0, -1, 2]}}})
    b.softmax("scores", "cls_reshape", axis=2)
    return b.net()


def squeezenet11() -> Net:
    """SqueezeNet 1.1: fire modules (a 1x1 squeeze, then 1x1 and 3x3 expands joined by Concat), a 1x1
    classifier and global average pooling."""
    b = _Builder("squeezenet1_1", {"data": (1, 3, 227, 227)})
    x = b.pool("pool1", b.act("relu_conv1", b.conv("conv1", "data", 3, 64, 3, stride=2)), 3, 2)

    def fire(i: int, x: str, cin: int, squeeze: int, expand: int) -> str:
        s = b.act(f"fire{i}_relu_squeeze1x1", b.conv(f"fire{i}_squeeze1x1", x, cin, squeeze, 1))
        e1 = b.act(f"fire{i}_relu_expand1x1", b.conv(f"fire{i}_expand1x1", s, squeeze, expand, 1))
        e3 = b.act(f"fire{i}_relu_expand3x3", b.conv(f"fire{i}_expand3x3", s, squeeze, expand, 3, pad=1))
        return b.concat(f"fire{i}_concat", [e1, e3])

    x = fire(3, fire(2, x, 64, 16, 64), 128, 16, 64)
    x = fire(5, fire(4, b.pool("pool3", x, 3, 2), 128, 32, 128), 256, 32, 128)
    x = b.pool("pool5", x, 3, 2)
    for i, (cin, squeeze, expand) in enumerate([(256, 48, 192), (384, 48, 192), (384, 64, 256), (512, 64, 256)]):
        x = fire(6 + i, x, cin, squeeze, expand)
    x = b.act("relu_conv10", b.conv("conv10", x, 512, 1000, 1))
    x = b.add("pool10", "Pooling", x, "pool10", {"pooling_param": {"pool": "AVE", "global_pooling": True}})
    b.softmax("prob", x)
    return b.net()


def resnet18() -> Net:
    """ResNet-18: 3x3 convolutions without bias, each followed by BatchNorm + Scale, residual Eltwise sums,
    1x1 strided projections, a global average pool and a 1000-way InnerProduct."""
    b = _Builder("ResNet-18", {"data": (1, 3, 224, 224)})
    x = b.conv("conv1", "data", 3, 64, 7, stride=2, pad=3, bias=False)
    b.bn("bn_conv1", x, 64)
    x = b.pool("pool1", b.act("conv1_relu", x), 3, 2)
    cin = 64
    for stage, (c, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)]):
        for block in range(2):
            s, n = stride if block == 0 else 1, f"res{stage + 2}{'ab'[block]}"
            y = b.conv(f"{n}_branch2a", x, cin, c, 3, stride=s, pad=1, bias=False)
            b.bn(f"bn{n}_branch2a", y, c)
            y = b.conv(f"{n}_branch2b", b.act(f"{n}_branch2a_relu", y), c, c, 3, pad=1, bias=False)
            b.bn(f"bn{n}_branch2b", y, c)
            shortcut = x
            if s != 1 or cin != c:
                shortcut = b.conv(f"{n}_branch1", x, cin, c, 1, stride=s, bias=False)
                b.bn(f"bn{n}_branch1", shortcut, c)
            x = b.act(f"{n}_relu", b.add(n, "Eltwise", [shortcut, y], n))
            cin = c
    x = b.add("pool5", "Pooling", x, "pool5", {"pooling_param": {"pool": "AVE", "global_pooling": True}})
    b.softmax("prob", b.ip("fc1000", x, 512, 1000))
    return b.net()


def sphereface20() -> Net:
    """SphereFace-20, a face embedder: strided 3x3 convolutions with PReLU, residual units without
    BatchNorm, and a 512-d InnerProduct feature as the output."""
    b = _Builder("SpherefaceNet-20", {"data": (1, 3, 112, 96)})
    x, cin = "data", 3
    for stage, (c, units) in enumerate([(64, 1), (128, 2), (256, 4), (512, 1)]):
        x = b.act(f"relu{stage + 1}_1", b.conv(f"conv{stage + 1}_1", x, cin, c, 3, stride=2, pad=1), "PReLU",
                  channels=c)
        for u in range(units):
            n1, n2 = f"conv{stage + 1}_{2 * u + 2}", f"conv{stage + 1}_{2 * u + 3}"
            y = b.act(f"relu{stage + 1}_{2 * u + 2}", b.conv(n1, x, c, c, 3, pad=1), "PReLU", channels=c)
            y = b.act(f"relu{stage + 1}_{2 * u + 3}", b.conv(n2, y, c, c, 3, pad=1), "PReLU", channels=c)
            x = b.add(f"res{stage + 1}_{2 * u + 3}", "Eltwise", [x, y], f"res{stage + 1}_{2 * u + 3}")
        cin = c
    b.ip("fc5", x, 512 * 7 * 6, 512)
    return b.net()


def fsrcnn(side: int = 96) -> Net:
    """FSRCNN (x3): a 5x5 feature layer, a 1x1 shrink, four 3x3 mapping layers, a 1x1 expand (PReLU after
    each) and a 9x9 stride-3 Deconvolution; Y in [0, 1]."""
    b = _Builder("FSRCNN", {"data": (1, 1, side, side)})
    x = b.act("prelu1", b.conv("conv1", "data", 1, 56, 5, pad=2), "PReLU", channels=56)
    x = b.act("prelu2", b.conv("conv2", x, 56, 12, 1), "PReLU", channels=12)
    for i in range(4):
        x = b.act(f"prelu{3 + i}", b.conv(f"conv{3 + i}", x, 12, 12, 3, pad=1), "PReLU", channels=12)
    x = b.act("prelu7", b.conv("conv7", x, 12, 56, 1), "PReLU", channels=56)
    b.conv("conv8", x, 56, 1, 9, stride=3, pad=4, deconv=True)
    return b.net()


def _prior_box(b: _Builder, feature: str, min_size: float, max_size: float, ratios) -> str:
    p = {"min_size": [min_size], "aspect_ratio": [float(a) for a in ratios], "flip": True, "clip": False,
         "variance": [0.1, 0.1, 0.2, 0.2], "offset": 0.5, **({"max_size": [max_size]} if max_size else {})}
    return b.add(f"{feature}_mbox_priorbox", "PriorBox", [feature, "data"], f"{feature}_mbox_priorbox",
                 {"prior_box_param": p})


def mobilenet_ssd() -> Net:
    """MobileNet-SSD (300 x 300, 21 classes): MobileNet v1's depthwise 3x3 + pointwise 1x1 pairs (BatchNorm
    folded into biases), four extra 1x1/3x3 stride-2 pairs, 1x1 box and class heads on six maps, PriorBox,
    Reshape + Softmax + Flatten, and a DetectionOutput."""
    b = _Builder("MobileNet-SSD", {"data": (1, 3, 300, 300)})
    x = b.act("conv0/relu", b.conv("conv0", "data", 3, 32, 3, stride=2, pad=1))
    spec = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)] + \
        [(512, 512, 1)] * 5 + [(512, 1024, 2), (1024, 1024, 1)]
    maps = []
    for i, (cin, cout, stride) in enumerate(spec, 1):
        x = b.act(f"conv{i}/dw/relu", b.conv(f"conv{i}/dw", x, cin, cin, 3, stride=stride, pad=1, group=cin))
        x = b.act(f"conv{i}/relu", b.conv(f"conv{i}", x, cin, cout, 1))
        if i in (11, 13):
            maps.append((x, cout))
    cin = 1024
    for i, (mid, cout) in enumerate([(256, 512), (128, 256), (128, 256), (64, 128)], 14):
        x = b.act(f"conv{i}_1/relu", b.conv(f"conv{i}_1", x, cin, mid, 1))
        x = b.act(f"conv{i}_2/relu", b.conv(f"conv{i}_2", x, mid, cout, 3, stride=2, pad=1))
        maps.append((x, cout))
        cin = cout
    sizes = [(60.0, 0.0, (2,)), (105.0, 150.0, (2, 3)), (150.0, 195.0, (2, 3)), (195.0, 240.0, (2, 3)),
             (240.0, 285.0, (2, 3)), (285.0, 300.0, (2, 3))]
    heads: dict[str, list[str]] = {"loc": [], "conf": []}
    priors = []
    for (feature, c), (low, high, ratios) in zip(maps, sizes):
        boxes = 1 + bool(high) + 2 * len(ratios)
        for kind, per_box in (("loc", 4), ("conf", 21)):
            heads[kind].append(b.flat_head(f"{feature}_mbox_{kind}", feature, c, boxes * per_box, k=1))
        priors.append(_prior_box(b, feature, low, high, ratios))
    b.concat("mbox_loc", heads["loc"])
    b.add("mbox_conf_reshape", "Reshape", b.concat("mbox_conf", heads["conf"]), "mbox_conf_reshape",
          {"reshape_param": {"shape": {"dim": [0, -1, 21]}}})
    b.add("mbox_conf_flatten", "Flatten", b.softmax("mbox_conf_softmax", "mbox_conf_reshape", axis=2),
          "mbox_conf_flatten", {"flatten_param": {"axis": 1}})
    b.concat("mbox_priorbox", priors, axis=2)
    b.add("detection_out", "DetectionOutput", ["mbox_loc", "mbox_conf_flatten", "mbox_priorbox"], "detection_out",
          {"detection_output_param": {"num_classes": 21, "share_location": True, "background_label_id": 0,
                                      "nms_param": {"nms_threshold": 0.45, "top_k": 100}, "code_type": "CENTER_SIZE",
                                      "keep_top_k": 100, "confidence_threshold": 0.25}})
    return b.net()


def _lrn(b: _Builder, name: str, bottom: str) -> str:
    return b.add(name, "LRN", bottom, name, {"lrn_param": {"local_size": 5, "alpha": 1e-4, "beta": 0.75}})


def googlenet() -> Net:
    """GoogLeNet (BVLC): LRN, nine inception modules (1x1, 1x1 -> 3x3, 1x1 -> 5x5, 3x3 max pool -> 1x1,
    joined by Concat), a 7x7 average pool, Dropout and a 1000-way InnerProduct."""
    b = _Builder("GoogleNet", {"data": (1, 3, 224, 224)})
    x = b.act("conv1/relu_7x7", b.conv("conv1/7x7_s2", "data", 3, 64, 7, stride=2, pad=3))
    x = _lrn(b, "pool1/norm1", b.pool("pool1/3x3_s2", x, 3, 2))
    x = b.act("conv2/relu_3x3_reduce", b.conv("conv2/3x3_reduce", x, 64, 64, 1))
    x = b.act("conv2/relu_3x3", b.conv("conv2/3x3", x, 64, 192, 3, pad=1))
    x = b.pool("pool2/3x3_s2", _lrn(b, "conv2/norm2", x), 3, 2)

    def inception(name: str, x: str, cin: int, c1, c3r, c3, c5r, c5, proj) -> tuple[str, int]:
        def unit(suffix: str, bottom: str, cin: int, cout: int, k: int) -> str:
            return b.act(f"{name}/relu_{suffix}", b.conv(f"{name}/{suffix}", bottom, cin, cout, k, pad=k // 2))

        pool = b.add(f"{name}/pool", "Pooling", x, f"{name}/pool",
                     {"pooling_param": {"pool": "MAX", "kernel_size": 3, "stride": 1, "pad": 1}})
        branches = [unit("1x1", x, cin, c1, 1), unit("3x3", unit("3x3_reduce", x, cin, c3r, 1), c3r, c3, 3),
                    unit("5x5", unit("5x5_reduce", x, cin, c5r, 1), c5r, c5, 5), unit("pool_proj", pool, cin, proj, 1)]
        return b.concat(f"{name}/output", branches), c1 + c3 + c5 + proj

    c = 192
    for name, cfg in [("3a", (64, 96, 128, 16, 32, 32)), ("3b", (128, 128, 192, 32, 96, 64)), ("pool3", None),
                      ("4a", (192, 96, 208, 16, 48, 64)), ("4b", (160, 112, 224, 24, 64, 64)),
                      ("4c", (128, 128, 256, 24, 64, 64)), ("4d", (112, 144, 288, 32, 64, 64)),
                      ("4e", (256, 160, 320, 32, 128, 128)), ("pool4", None), ("5a", (256, 160, 320, 32, 128, 128)),
                      ("5b", (384, 192, 384, 48, 128, 128))]:
        if cfg is None:
            x = b.pool(f"{name}/3x3_s2", x, 3, 2)
        else:
            x, c = inception(f"inception_{name}", x, c, *cfg)
    x = b.add("pool5/7x7_s1", "Pooling", x, "pool5/7x7_s1",
              {"pooling_param": {"pool": "AVE", "kernel_size": 7, "stride": 1}})
    x = b.add("pool5/drop_7x7_s1", "Dropout", x, x, {"dropout_param": {"dropout_ratio": 0.4}})
    b.softmax("prob", b.ip("loss3/classifier", x, c, 1000))
    return b.net()


def openpose() -> Net:
    """OpenPose (COCO, 368 x 368): VGG-19's first ten 3x3 convolutions, two CPM layers, then six stages of two
    branches (part affinity fields 38, heatmaps 19: 3x3 then 7x7 convolutions of 128 outputs) joined by Concat
    -- 209 MB, whose 7x7 layers' 1,024 sampled patches take 7x their weights (too slow for the bench: LARGE)."""
    b = _Builder("OpenPose - BODY_25", {"image": (1, 3, 368, 368)})
    x, cin = "image", 3
    for s, (c, n) in enumerate([(64, 2), (128, 2), (256, 4), (512, 2)], 1):
        for i in range(1, n + 1):
            x = b.act(f"relu{s}_{i}", b.conv(f"conv{s}_{i}", x, cin, c, 3, pad=1))
            cin = c
        if s < 4:
            x = b.pool(f"pool{s}_stage1", x, 2, 2)
    x = b.act("relu4_3_CPM", b.conv("conv4_3_CPM", x, 512, 256, 3, pad=1))
    feat = b.act("relu4_4_CPM", b.conv("conv4_4_CPM", x, 256, 128, 3, pad=1))
    prev = feat
    for st in range(1, 7):
        outs = []
        for br, nout in ((1, 38), (2, 19)):
            y, c = (feat, 128) if st == 1 else (prev, 185)
            k, reps, wide = (3, 3, 512) if st == 1 else (7, 5, 128)
            for i in range(1, reps + 1):
                y = b.act(f"Mrelu{i}_stage{st}_L{br}", b.conv(f"Mconv{i}_stage{st}_L{br}", y, c, 128, k, pad=k // 2))
                c = 128
            y = b.act(f"Mrelu{reps + 1}_stage{st}_L{br}", b.conv(f"Mconv{reps + 1}_stage{st}_L{br}", y, 128, wide, 1))
            outs.append(b.conv(f"Mconv{reps + 2}_stage{st}_L{br}", y, wide, nout, 1))
        prev = b.concat(f"concat_stage{st + 1}" if st < 6 else "net_output",
                        [outs[1], outs[0]] if st == 6 else [outs[0], outs[1], feat])
    return b.net()


def caffenet() -> Net:
    """CaffeNet (227 x 227): 11x11 stride-4, grouped (2) 5x5 and 3x3 convolutions, LRN, fc6 9216 -> 4096, fc7
    4096 -> 4096 -- 244 MB (LARGE). Its random weights on 0..255 probes saturate the softmax: the gains measured
    there are ~1e-80, the case of the search's second pass on conservative gains."""
    b = _Builder("CaffeNet", {"data": (1, 3, 227, 227)})
    x = b.act("relu1", b.conv("conv1", "data", 3, 96, 11, stride=4))
    x = _lrn(b, "norm1", b.pool("pool1", x, 3, 2))
    x = b.act("relu2", b.conv("conv2", x, 96, 256, 5, pad=2, group=2))
    x = _lrn(b, "norm2", b.pool("pool2", x, 3, 2))
    x = b.act("relu3", b.conv("conv3", x, 256, 384, 3, pad=1))
    x = b.act("relu4", b.conv("conv4", x, 384, 384, 3, pad=1, group=2))
    x = b.pool("pool5", b.act("relu5", b.conv("conv5", x, 384, 256, 3, pad=1, group=2)), 3, 2)
    x = b.act("relu7", b.ip("fc7", b.act("relu6", b.ip("fc6", x, 9216, 4096)), 4096, 4096))
    b.softmax("prob", b.ip("fc8", x, 4096, 1000))
    return b.net()


PROXIES: dict[str, Callable[[], Net]] = {
    "mtcnn-pnet": mtcnn_pnet, "mtcnn-rnet": mtcnn_rnet, "mtcnn-onet": mtcnn_onet,
    "cifar10-quick": cifar10_quick, "plate-chars": plate_chars, "waifu2x-vgg7": waifu2x_vgg7,
    "waifu2x-upconv7": waifu2x_upconv7, "facemask-ssd260": facemask_ssd260, "ultraface-slim": ultraface_slim,
    "squeezenet1.1": squeezenet11, "resnet18": resnet18, "sphereface20": sphereface20, "fsrcnn": fsrcnn,
    "mobilenet-ssd": mobilenet_ssd, "googlenet": googlenet,
}
# Big ones for ad hoc measurements of memory and of the search (not in the bench: 20-110 s a run).
LARGE: dict[str, Callable[[], Net]] = {"openpose": openpose, "caffenet": caffenet}


def write_all(directory: Path, names=None, *, large: bool = False) -> dict[str, tuple[Path, Path]]:
    """Write each proxy (or those named; ``large``: the LARGE ones instead) as DIR/<name>.prototxt +
    .caffemodel: {name: (deploy, weights)}."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, build in (LARGE if large else PROXIES).items():
        if names and name not in names:
            continue
        deploy, weights = directory / f"{name}.prototxt", directory / f"{name}.caffemodel"
        io.write_files(build(), deploy, weights)
        out[name] = (deploy, weights)
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    large = "--large" in args
    if len(args) != 1 + large or args[0] == "--large":
        sys.exit("usage: python tools/proxies.py DIR [--large]")
    for name, (deploy, _) in write_all(Path(args[0]), large=large).items():
        print(deploy)
