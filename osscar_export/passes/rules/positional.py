"""Ops that pick or move positions along a dim: indexing, padding, pooling, shuffles, gathers.

The dims whose positions move are blocked (a pruned index would land elsewhere); the other
dims pass through. Data-dependent picks (gather, scatter, nonzero) block every dim (see
docs/design.md, "Op rules").
"""

from __future__ import annotations

import torch
from torch import fx

from osscar_export.passes.rules.api import GraphAnalysis, Layout, Rule, bind, block_all, dims_list, norm_dim

aten = torch.ops.aten


def index_tensor(a: GraphAnalysis, node: fx.Node) -> None:
    """x[..., idx, ...]: indexed dims are replaced by the index shape; the others pass through."""
    b = bind(node)
    x, indices = b["self"], b["indices"]
    xd = a.layout(x)
    used = [i for i, t in enumerate(indices) if t is not None]
    out_shape = a.shape(node)
    if not used or used != list(range(used[0], used[-1] + 1)):
        a.block_everything(node, "advanced indexing with non-adjacent indices")
        return
    for i in used:
        a.block(xd[i], node, "indexed by a tensor")
    before, after = xd[: used[0]], xd[used[-1] + 1 :]
    n_new = len(out_shape) - len(before) - len(after)
    if n_new < 0:
        a.block_everything(node, "advanced indexing shape")
        return
    a.set_layout(node, before + a.fresh_dims(out_shape[len(before) : len(before) + n_new]) + after)


def index_select(a: GraphAnalysis, node: fx.Node) -> None:
    xd = a.layout(node.args[0])
    d = norm_dim(bind(node)["dim"], len(xd))
    a.block(xd[d], node, "indexed by index_select")
    out = list(xd)
    out[d] = a.fresh(a.shape(node)[d])
    a.set_layout(node, out)


def spatial(k: int) -> Rule:
    """Pooling / upsampling over the last k dims: those are new, the rest pass through."""

    def rule(a: GraphAnalysis, node: fx.Node) -> None:
        xd = a.layout(node.args[0])
        val = node.meta["val"]
        multi = isinstance(val, (tuple, list))
        out = xd[:-k] + a.fresh_dims(a.shape(node, 0 if multi else None)[-k:])
        a.set_layout(node, tuple(list(out) for _ in val) if multi else out)

    rule.__qualname__ = f"spatial({k})"  # named in duplicate-registration errors
    return rule


def pad(a: GraphAnalysis, node: fx.Node) -> None:
    xd = a.layout(node.args[0])
    pads = bind(node)["pad"]
    out = list(xd)
    shape = a.shape(node)
    for i in range(len(pads) // 2):
        d = len(xd) - 1 - i
        if pads[2 * i] == 0 and pads[2 * i + 1] == 0:
            continue
        a.block(xd[d], node, "padded")
        out[d] = a.fresh(shape[d])
    a.set_layout(node, out)


def along_dims(reason: str, key: str) -> Rule:
    """roll / flip: positions move along the given dims, which are blocked; others pass through."""

    def rule(a: GraphAnalysis, node: fx.Node) -> None:
        xd = a.layout(node.args[0])
        out = list(xd)
        for d in dims_list(bind(node)[key], len(xd)):
            a.block(xd[d], node, reason)
            out[d] = a.fresh(a.shape(node)[d])
        a.set_layout(node, out)

    rule.__qualname__ = f"along_dims({reason!r})"  # named in duplicate-registration errors
    return rule


def triangular(a: GraphAnalysis, node: fx.Node) -> None:
    xd = a.layout(node.args[0])
    for lay in xd[-2:]:
        a.block(lay, node, "triangular mask depends on positions")
    a.set_layout(node, xd)


def pixel_shuffle(a: GraphAnalysis, node: fx.Node) -> None:
    """(C·r², H, W) -> (C, H·r, W·r): channel c owns input channels c·r² ... (c+1)·r² - 1."""
    x = node.args[0]
    xd, xs = a.layout(x), a.shape(x)
    r = bind(node)["upscale_factor"]
    parts = a.split(xd[-3], [xs[-3] // (r * r), r, r], node)
    if parts is None:
        a.block_everything(node, "pixel_shuffle channel layout")
        return
    for p in parts[1:]:
        a.block(p, node, "sub-pixel position of pixel_shuffle")
    out: list[Layout] = xd[:-3] + [parts[0], ("P", (xd[-2], parts[1])), ("P", (xd[-1], parts[2]))]
    a.set_layout(node, out)


def pixel_unshuffle(a: GraphAnalysis, node: fx.Node) -> None:
    x = node.args[0]
    xd, xs = a.layout(x), a.shape(x)
    r = bind(node)["downscale_factor"]
    hs = a.split(xd[-2], [xs[-2] // r, r], node)
    ws = a.split(xd[-1], [xs[-1] // r, r], node)
    if hs is None or ws is None:
        a.block_everything(node, "pixel_unshuffle spatial layout")
        return
    a.block(hs[1], node, "sub-pixel position of pixel_unshuffle")
    a.block(ws[1], node, "sub-pixel position of pixel_unshuffle")
    a.set_layout(node, xd[:-3] + [("P", (xd[-3], hs[1], ws[1])), hs[0], ws[0]])


def channel_shuffle(a: GraphAnalysis, node: fx.Node) -> None:
    a.block_everything(node, "channel_shuffle interleaves channel groups")


DATA_DEPENDENT = {
    aten.gather: "gather picks data-dependent positions",
    aten.scatter: "scatter writes data-dependent positions",
    aten.scatter_add: "scatter writes data-dependent positions",
    aten.index_put: "index_put writes data-dependent positions",
    aten.index_put_: "index_put writes data-dependent positions",
    aten.diff: "diff mixes neighbouring positions",
    aten.repeat_interleave: "repeat_interleave layout is not followed",
    aten.grid_sampler: "grid sampling mixes positions",
    aten.unfold: "unfold layout is not followed",
    aten.im2col: "im2col layout is not followed",
    aten._local_scalar_dense: "data-dependent scalar",
    aten.item: "data-dependent scalar",
    aten.nonzero: "data-dependent shape",
}

RULES: list[tuple[list, Rule]] = [
    ([aten.index], index_tensor),
    ([aten.index_select], index_select),
    ([aten.max_pool1d, aten.avg_pool1d, aten.adaptive_avg_pool1d, aten.adaptive_max_pool1d, aten.upsample_nearest1d,
      aten.upsample_linear1d], spatial(1)),
    ([aten.max_pool2d, aten.max_pool2d_with_indices, aten.avg_pool2d, aten.adaptive_avg_pool2d,
      aten.adaptive_max_pool2d, aten.upsample_nearest2d, aten.upsample_bilinear2d, aten.upsample_bicubic2d,
      aten._upsample_nearest_exact2d, aten._upsample_bilinear2d_aa, aten.grid_sampler_2d], spatial(2)),
    ([aten.max_pool3d, aten.max_pool3d_with_indices, aten.avg_pool3d, aten.adaptive_avg_pool3d,
      aten.adaptive_max_pool3d, aten.upsample_nearest3d, aten.upsample_trilinear3d], spatial(3)),
    ([aten.constant_pad_nd, aten.pad, aten.reflection_pad1d, aten.reflection_pad2d, aten.replication_pad1d,
      aten.replication_pad2d, aten.reflection_pad3d, aten.replication_pad3d], pad),
    ([aten.roll], along_dims("rolled along this dim", "dims")),
    ([aten.flip], along_dims("flipped along this dim", "dims")),
    ([aten.tril, aten.triu], triangular),
    ([aten.pixel_shuffle], pixel_shuffle),
    ([aten.pixel_unshuffle], pixel_unshuffle),
    ([aten.channel_shuffle, aten.native_channel_shuffle], channel_shuffle),
    *(([op], block_all(why)) for op, why in DATA_DEPENDENT.items()),
]
