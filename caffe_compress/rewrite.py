"""Graph rewrite: replace layers by their factored versions. Never mutates its input.

* InnerProduct (N x K) at rank r -> IP(K->r, no bias) + IP(r->N, original bias).
* Convolution at CP rank R -> 1x1 (S->R) + kh x 1 depthwise + 1 x kw depthwise
  + 1x1 (R->T, original bias); a grouped convolution is factored per group and
  keeps its grouping in the two 1x1 layers.
* 1x1 Convolution at rank r -> two 1x1 convolutions (SVD), grouping kept.
* Convolution by Tucker-2 -> 1x1 (S->R) + kh x kw (R->R, the original geometry) + 1x1 (R->T).
* Convolution by spatial SVD -> kh x 1 (S->R, vertical geometry) + 1 x kw (R->T, horizontal geometry).

New layers are named ``<name>_cp1..3`` / ``<name>_svd1`` / ``<name>_tk1..2`` / ``<name>_sp1``; the last one keeps
the original layer's *name and top*, so in-place layers, consumers, and
applications that ask OpenCV for an output by layer name
(``net.forward("fc8")``) keep working.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np

from .decompose import ConvFactors, LinearFactors, SpatialFactors, TuckerFactors
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
        blobs=(factors.first.astype(np.float32, copy=False),),
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
        blobs=(factors.second.astype(np.float32, copy=False),) + ((layer.blobs[1],) if geo.bias_term else ()),
    )
    return first, second


def _conv_params(**fields) -> dict:
    return {"convolution_param": {k: v for k, v in fields.items() if v is not None}}


def _vertical_geometry(geo, *, group: int | None) -> dict:
    """convolution_param fields of a kh x 1 layer carrying the original vertical stride, pad and dilation."""
    (kh, _), (sh, _), (ph, _), (dh, _) = geo.kernel, geo.stride, geo.pad, geo.dilation
    return dict(kernel_h=kh, kernel_w=1,
                stride_h=sh if sh != 1 else None, stride_w=1 if sh != 1 else None,
                pad_h=ph if ph else None, pad_w=0 if ph else None,
                dilation=[dh, 1] if dh != 1 else None, group=group)


def _horizontal_geometry(geo, *, group: int | None) -> dict:
    """convolution_param fields of a 1 x kw layer carrying the original horizontal stride, pad and dilation."""
    (_, kw), (_, sw), (_, pw), (_, dw) = geo.kernel, geo.stride, geo.pad, geo.dilation
    return dict(kernel_h=1, kernel_w=kw,
                stride_h=1 if sw != 1 else None, stride_w=sw if sw != 1 else None,
                pad_h=0 if pw else None, pad_w=pw if pw else None,
                dilation=[1, dw] if dw != 1 else None, group=group)


def _full_geometry(geo) -> dict:
    """convolution_param fields of the original kernel geometry (kernel, stride, pad, dilation)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geo.kernel, geo.stride, geo.pad, geo.dilation
    return dict(kernel_h=kh, kernel_w=kw,
                stride_h=sh if (sh, sw) != (1, 1) else None, stride_w=sw if (sh, sw) != (1, 1) else None,
                pad_h=ph if (ph, pw) != (0, 0) else None, pad_w=pw if (ph, pw) != (0, 0) else None,
                dilation=[dh, dw] if (dh, dw) != (1, 1) else None)


def _one_rank(layer: Layer, ranks: set) -> None:
    if len(ranks) != 1:
        raise ValueError(f"layer '{layer.name}': groups must share one rank, got {sorted(ranks)}")


def _last_layer(layer: Layer, bottom: str, geo, weight: np.ndarray, group: int | None) -> Layer:
    """The final 1x1 (or 1 x kw) layer: the original name, top and bias."""
    return Layer(
        layer.name, "Convolution", (bottom,), layer.tops,
        _conv_params(num_output=geo.num_output, bias_term=geo.bias_term, kernel_size=[1], group=group),
        (weight,) + ((layer.blobs[1],) if geo.bias_term else ()),
    )


def decompose_convolution(net: Net, layer: Layer, factors: Sequence[ConvFactors]) -> tuple[Layer, ...]:
    """Four layers (1x1, kh x 1 depthwise, 1 x kw depthwise, 1x1) from one CP per group."""
    geo = conv_geometry(layer)
    if len(factors) != geo.group:
        raise ValueError(f"layer '{layer.name}': {len(factors)} factor sets for {geo.group} groups")
    _one_rank(layer, {f.rank for f in factors})
    rank = factors[0].rank * geo.group
    names = _fresh_blob_names(net, f"{layer.name}_cp", 4)
    cat = lambda field: np.concatenate([getattr(f, field) for f in factors], axis=0)  # noqa: E731
    group = geo.group if geo.group > 1 else None
    first = Layer(
        names[0], "Convolution", layer.bottoms, (names[0],),
        _conv_params(num_output=rank, bias_term=False, kernel_size=[1], group=group), (cat("first"),),
    )
    vertical = Layer(
        names[1], "Convolution", (names[0],), (names[1],),
        _conv_params(num_output=rank, bias_term=False, **_vertical_geometry(geo, group=rank)),
        (cat("vertical"),),
    )
    horizontal = Layer(
        names[2], "Convolution", (names[1],), (names[2],),
        _conv_params(num_output=rank, bias_term=False, **_horizontal_geometry(geo, group=rank)),
        (cat("horizontal"),),
    )
    return first, vertical, horizontal, _last_layer(layer, names[2], geo, cat("last"), group)


def decompose_tucker(net: Net, layer: Layer, factors: Sequence[TuckerFactors]) -> tuple[Layer, ...]:
    """Three layers (1x1 S->R_in, kh x kw R_in->R_out with the original geometry, 1x1 R_out->T), per group."""
    geo = conv_geometry(layer)
    _one_rank(layer, {f.ranks for f in factors})
    g = len(factors)
    r_in, r_out = (r * g for r in factors[0].ranks)
    names = _fresh_blob_names(net, f"{layer.name}_tk", 2)
    group = g if g > 1 else None
    first = Layer(
        names[0], "Convolution", layer.bottoms, (names[0],),
        _conv_params(num_output=r_in, bias_term=False, kernel_size=[1], group=group),
        (np.concatenate([f.first for f in factors], axis=0),),
    )
    core = Layer(
        names[1], "Convolution", (names[0],), (names[1],),
        _conv_params(num_output=r_out, bias_term=False, group=group, **_full_geometry(geo)),
        (np.concatenate([f.core for f in factors], axis=0),),
    )
    return first, core, _last_layer(layer, names[1], geo, np.concatenate([f.last for f in factors], axis=0), group)


def decompose_spatial(net: Net, layer: Layer, factors: Sequence[SpatialFactors]) -> tuple[Layer, Layer]:
    """Two layers (kh x 1 S->R with the vertical geometry, 1 x kw R->T with the horizontal one), per group."""
    geo = conv_geometry(layer)
    _one_rank(layer, {f.rank for f in factors})
    rank = factors[0].rank * len(factors)
    (name,) = _fresh_blob_names(net, f"{layer.name}_sp", 1)
    group = len(factors) if len(factors) > 1 else None
    vertical = Layer(
        name, "Convolution", layer.bottoms, (name,),
        _conv_params(num_output=rank, bias_term=False, **_vertical_geometry(geo, group=group)),
        (np.concatenate([f.vertical for f in factors], axis=0),),
    )
    horizontal = Layer(
        layer.name, "Convolution", (name,), layer.tops,
        _conv_params(num_output=geo.num_output, bias_term=geo.bias_term,
                     **_horizontal_geometry(geo, group=group)),
        (np.concatenate([f.horizontal for f in factors], axis=0),) + ((layer.blobs[1],) if geo.bias_term else ()),
    )
    return vertical, horizontal


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
