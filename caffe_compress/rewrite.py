"""Graph rewrite: replace layers by their factored versions. Never mutates its input.

* InnerProduct (N x K) at rank r -> IP(K->r, no bias) + IP(r->N, original bias).
* Convolution at CP rank R -> 1x1 (S->R) + kh x 1 depthwise + 1 x kw depthwise
  + 1x1 (R->T, original bias); a grouped convolution is factored per group and
  keeps its grouping in the two 1x1 layers.
* 1x1 Convolution at rank r -> two 1x1 convolutions (SVD), grouping kept.

New layers are named ``<name>_cp1..3`` / ``<name>_svd1``; the last one keeps
the original layer's *name and top*, so in-place layers, consumers, and
applications that ask OpenCV for an output by layer name
(``net.forward("fc8")``) keep working.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np

from .decompose import ConvFactors, LinearFactors
from .net import Layer, Net, conv_geometry, inner_product_geometry

log = logging.getLogger(__name__)


def inner_product_matrix(layer: Layer) -> np.ndarray:
    """The (N, K) weight of an InnerProduct layer, whatever its ``transpose`` flag (Caffe semantics)."""
    geo = inner_product_geometry(layer)
    w = layer.blobs[0]
    return w.T if geo.transpose else w


def conv_group_kernels(layer: Layer) -> list[np.ndarray]:
    """The per-group (T/g, S/g, kh, kw) kernels of a convolution."""
    geo = conv_geometry(layer)
    w = layer.blobs[0]
    per = w.shape[0] // geo.group
    return [w[g * per : (g + 1) * per] for g in range(geo.group)]


def _fresh_blob_names(net: Net, base: str, count: int) -> list[str]:
    taken = {t for layer in net.layers for t in (*layer.tops, *layer.bottoms)}
    taken |= {layer.name for layer in net.layers}
    names = []
    for i in range(1, count + 1):
        name = f"{base}{i}"
        while name in taken:
            name += "_"
        names.append(name)
        taken.add(name)
    return names


def decompose_inner_product(net: Net, layer: Layer, factors: LinearFactors) -> tuple[Layer, Layer]:
    """Two InnerProduct layers computing ``factors.second @ factors.first`` plus the original bias."""
    geo = inner_product_geometry(layer)
    if geo.transpose:
        log.warning("layer '%s': OpenCV 4.x ignores 'transpose: true' and reads the weight as N x K; "
                    "the factored layers follow Caffe's semantics (y = x W), so OpenCV's outputs will change",
                    layer.name)
    rank = factors.rank
    first_name, _ = _fresh_blob_names(net, f"{layer.name}_svd", 2)
    second_name = layer.name
    second_axis = geo.axis if geo.axis >= 0 else -1  # the rank axis is always last
    first_params = {"num_output": rank, "bias_term": False}
    if geo.axis != 1:
        first_params["axis"] = geo.axis
    first = Layer(
        name=first_name,
        type="InnerProduct",
        bottoms=layer.bottoms,
        tops=(first_name,),
        params={"inner_product_param": first_params},
        blobs=(factors.first.astype(np.float32),),
    )
    second_params = {"num_output": geo.num_output, "bias_term": geo.bias_term}
    if second_axis != 1:
        second_params["axis"] = second_axis
    second = Layer(
        name=second_name,
        type="InnerProduct",
        bottoms=(first_name,),
        tops=layer.tops,
        params={"inner_product_param": second_params},
        blobs=(factors.second.astype(np.float32),) + ((layer.blobs[1],) if geo.bias_term else ()),
    )
    return first, second


def _conv_params(**fields) -> dict:
    return {"convolution_param": {k: v for k, v in fields.items() if v is not None}}


def decompose_convolution(net: Net, layer: Layer, factors: Sequence[ConvFactors]) -> tuple[Layer, ...]:
    """Four layers (1x1, kh x 1 depthwise, 1 x kw depthwise, 1x1) from one CP per group."""
    geo = conv_geometry(layer)
    if len(factors) != geo.group:
        raise ValueError(f"layer '{layer.name}': {len(factors)} factor sets for {geo.group} groups")
    ranks = {f.rank for f in factors}
    if len(ranks) != 1:
        raise ValueError(f"layer '{layer.name}': groups must share one rank, got {sorted(ranks)}")
    rank = factors[0].rank * geo.group
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geo.kernel, geo.stride, geo.pad, geo.dilation
    names = _fresh_blob_names(net, f"{layer.name}_cp", 4)
    first_w = np.concatenate([f.first for f in factors], axis=0)
    vertical_w = np.concatenate([f.vertical for f in factors], axis=0)
    horizontal_w = np.concatenate([f.horizontal for f in factors], axis=0)
    last_w = np.concatenate([f.last for f in factors], axis=0)
    group = geo.group if geo.group > 1 else None
    first = Layer(
        names[0], "Convolution", layer.bottoms, (names[0],),
        _conv_params(num_output=rank, bias_term=False, kernel_size=[1], group=group),
        (first_w,),
    )
    vertical = Layer(
        names[1], "Convolution", (names[0],), (names[1],),
        _conv_params(
            num_output=rank, bias_term=False, kernel_h=kh, kernel_w=1,
            stride_h=sh if sh != 1 else None, stride_w=1 if sh != 1 else None,
            pad_h=ph if ph else None, pad_w=0 if ph else None,
            dilation=[dh, 1] if dh != 1 else None, group=rank,
        ),
        (vertical_w,),
    )
    horizontal = Layer(
        names[2], "Convolution", (names[1],), (names[2],),
        _conv_params(
            num_output=rank, bias_term=False, kernel_h=1, kernel_w=kw,
            stride_h=1 if sw != 1 else None, stride_w=sw if sw != 1 else None,
            pad_h=0 if pw else None, pad_w=pw if pw else None,
            dilation=[1, dw] if dw != 1 else None, group=rank,
        ),
        (horizontal_w,),
    )
    last = Layer(
        layer.name, "Convolution", (names[2],), layer.tops,
        _conv_params(num_output=geo.num_output, bias_term=geo.bias_term, kernel_size=[1], group=group),
        (last_w,) + ((layer.blobs[1],) if geo.bias_term else ()),
    )
    return first, vertical, horizontal, last


def decompose_pointwise(net: Net, layer: Layer, factors: Sequence[LinearFactors]) -> tuple[Layer, Layer]:
    """Two 1x1 convolutions from one SVD per group; stride and pad go to the first."""
    geo = conv_geometry(layer)
    rank = factors[0].rank * geo.group
    names = _fresh_blob_names(net, f"{layer.name}_svd", 2)
    first_w = np.concatenate([f.first for f in factors], axis=0)[:, :, None, None]
    last_w = np.concatenate([f.second for f in factors], axis=0)[:, :, None, None]
    group = geo.group if geo.group > 1 else None
    (sh, sw), (ph, pw) = geo.stride, geo.pad
    first = Layer(
        names[0], "Convolution", layer.bottoms, (names[0],),
        _conv_params(
            num_output=rank, bias_term=False, kernel_size=[1], group=group,
            stride_h=sh if (sh, sw) != (1, 1) else None, stride_w=sw if (sh, sw) != (1, 1) else None,
            pad_h=ph if (ph, pw) != (0, 0) else None, pad_w=pw if (ph, pw) != (0, 0) else None,
        ),
        (first_w.astype(np.float32),),
    )
    second = Layer(
        layer.name, "Convolution", (names[0],), layer.tops,
        _conv_params(num_output=geo.num_output, bias_term=geo.bias_term, kernel_size=[1], group=group),
        (last_w.astype(np.float32),) + ((layer.blobs[1],) if geo.bias_term else ()),
    )
    return first, second


def replace_layers(net: Net, replacements: Mapping[str, Sequence[Layer]]) -> Net:
    """A new Net with each named layer swapped for its replacement sequence; checked."""
    missing = set(replacements) - {layer.name for layer in net.layers}
    if missing:
        raise KeyError(f"no such layers: {sorted(missing)}")
    layers: list[Layer] = []
    for layer in net.layers:
        layers.extend(replacements.get(layer.name, (layer,)))
    return replace(net, layers=tuple(layers)).check()
