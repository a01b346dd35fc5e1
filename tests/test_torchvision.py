"""Torchvision families prune, materialize and export end to end on random calibration data.

Their captured graphs mutate activations in place (``relu_``, ``add_``, ``hardswish_``), which
calibrate runs as captured (passes/calibrate.py); RegNet's grouped convs make structures that
own one channel in every conv group. The user-facing names (resnet18, mobilenet_v2,
mobilenet_v3_small) are built as the CLI builds them; ConvNeXt, RegNet and ViT are small
instances of the same torchvision classes, so the file stays CI-sized. Each model gets BN
statistics and a re-drawn head first: a random-init vision model outputs ~0, which would make
every comparison pass trivially.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.regnet import BlockParams, RegNet

import osscar_export as ox
from osscar_export.passes.calibrate import blocked_groups

SIZE = 32  # the smallest input every family runs on (ResNet and ConvNeXt downsample 32x)

FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    "regnet": lambda: RegNet(BlockParams.from_init_params(depth=4, w_0=16, w_a=8.0, w_m=2.0, group_width=8), num_classes=10),
    # layer_scale 1 (not 1e-6): otherwise each block's MLP, the part pruned, barely reaches the output
    "convnext": lambda: ConvNeXt([CNBlockConfig(32, 64, 2), CNBlockConfig(64, None, 2)], layer_scale=1.0, num_classes=10),
    "vit": lambda: torchvision.models.VisionTransformer(
        image_size=SIZE, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10
    ),
}


def calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """BN statistics from random images and a head re-drawn for unit-scale logits, in eval mode.

    The statistics are plain averages (``momentum=None``): three momentum updates leave them
    near their init, and the MobileNets then output the same logits for every input.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, *x.shape[1:], generator=gen))
    model.eval()
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.normal_(head.weight)
    with torch.no_grad():
        head.weight /= model(x).std()
    return model


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "name, mode",
    [("resnet18", "sequential"), ("mobilenet_v2", "dense"), ("mobilenet_v3_small", "sequential"),
     ("regnet", "sequential"), ("convnext", "sequential"), ("vit", "sequential")],
)
def test_family_prunes_materializes_and_exports_to_onnx(name: str, mode: str, tmp_path) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, SIZE, SIZE, generator=gen)
    model = calibrated(FAMILIES[name]().eval(), x)
    with torch.no_grad():
        dense = model(x)
    assert float(dense.std(0).mean()) > 0.1, "the output hardly depends on the input: the comparisons would be trivial"
    plan = ox.find_structures(model, (x,))
    blocked = dict(blocked_groups(plan, plan.program.module()))
    picked = [g for g in plan.groups if g.name not in blocked][:2]  # two groups keep the solves CI-sized
    calibration = [torch.randn(2, 3, SIZE, SIZE, generator=gen) for _ in range(4)]

    result = ox.prune(model, calibration, keep_fraction={g.name: 0.5 for g in picked}, mode=mode, plan=plan, progress=False)

    assert {g.name: int(result.masks[g.name].sum()) for g in picked} == {g.name: round(0.5 * g.count) for g in picked}
    assert n_params(result.model) < n_params(model)
    masked = ox.apply_masks(model, plan, result.masks, result.weights, result.shifts)
    with torch.no_grad():
        small, reference = result.model(x), masked(x)
    torch.testing.assert_close(small, reference, rtol=1e-4, atol=1e-4)
    # the re-fit compensates well (ConvNeXt's MLPs move the logits by ~3e-3), yet 10x the tolerance above
    assert float((small - dense).abs().max()) > 1e-3, "pruning half of two groups left the output unchanged"
    report = ox.export_onnx(result.model, (x,), tmp_path / f"{name}.onnx")
    assert report.path.exists() and report.max_abs_diff <= 1e-4
