"""osscar-export: one-shot structured pruning of PyTorch models to a latency budget.

The public API, in pipeline order::

    import osscar_export as ox
    plan = ox.find_structures(model, example_inputs)
    result = ox.prune(model, calibration, keep_fraction=0.5, plan=plan)   # OSSCAR, sequential
    small = ox.materialize(model, plan, result.masks, result.weights, result.shifts)   # == result.model
    ox.export_onnx(small, example_inputs, "model.onnx")
"""

from osscar_export.export import export_onnx, export_tensorrt, save_program
from osscar_export.passes.capture import capture
from osscar_export.passes.materialize import apply_masks, materialize
from osscar_export.passes.structures import find_structures
from osscar_export.plan import StructureGroup, StructurePlan
from osscar_export.prune import prune

__version__ = "0.1.0"

__all__ = [
    "StructureGroup",
    "StructurePlan",
    "apply_masks",
    "capture",
    "export_onnx",
    "export_tensorrt",
    "find_structures",
    "materialize",
    "prune",
    "save_program",
]
