"""The op table: one rule per op, looked up by overload then packet, rules written against the API."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch

from osscar_export.passes import analysis, dims
from osscar_export.passes.rules import FAMILIES, OP_RULES, RuleTable, build_table, rule_for
from osscar_export.passes.rules import elementwise, linear_conv, reductions

aten = torch.ops.aten


def test_registering_an_op_twice_names_the_op_and_both_rules():
    table = RuleTable()
    table.register([aten.relu, aten.gelu], elementwise.identity)
    with pytest.raises(ValueError, match=r"aten\.gelu has two rules: .*elementwise\.identity and .*elementwise\.add_sub"):
        table.register([aten.gelu], elementwise.add_sub)


def test_the_real_table_has_each_op_once():
    listed = [op for family in FAMILIES for ops, _ in family.RULES for op in ops]
    assert len(build_table().ops()) == len(listed) == len(set(listed)) == len(OP_RULES.ops())
    assert rule_for(aten.native_dropout.default) is elementwise.native_dropout
    assert rule_for(aten.mul_.Tensor) is elementwise.elementwise


def test_lookup_prefers_the_exact_overload():
    assert rule_for(aten.max.other) is elementwise.elementwise
    assert rule_for(aten.max.dim) is reductions.reduction
    assert rule_for(aten.linear.default) is linear_conv.linear
    assert rule_for(aten.linalg_cholesky.default) is None  # not in the table: the analysis blocks its dims


def _source(module) -> str:
    return inspect.getsource(module)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_rules_use_only_the_helper_api(family):
    """Rules never reach into the analysis' dim tables or union-find."""
    src = _source(family)
    for internal in ("a.dims", "a.space", ".space.", ".tags", ".candidates", "DimSpace"):
        assert internal not in src, (family.__name__, internal)


def test_the_analysis_does_not_import_the_rules():
    """analysis.py and dims.py get the table passed in: no import cycle with rules/."""
    for module in (analysis, dims):
        tree = ast.parse(_source(module))
        imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        assert not [m for m in imported if m.startswith(("osscar_export.passes.rules", "osscar_export.passes.structures"))]
