"""The op table: how each ATen op maps the dims of its inputs to the dims of its outputs.

One rule per op (overload packet, or a specific overload), grouped by family in this package's
modules; each module lists its ``(ops, rule)`` pairs in ``RULES`` and writes its rules against
the helper API of ``api.py``. A rule reads its inputs' layouts, unifies the dims the op couples,
records parameter roles (producer rows, consumer columns, followers) and integer constants that
depend on a width (view shapes, split sizes, conv ``groups``), and sets the output layouts. Dims
a rule cannot follow exactly are blocked with a reason; ops absent from the table block every
dim they touch (see docs/design.md, "Op rules").
"""

from __future__ import annotations

from typing import Any

import torch

from osscar_export.passes.rules import attention, elementwise, linear_conv, positional, reductions, shape
from osscar_export.passes.rules.api import Rule

FAMILIES = (elementwise, shape, reductions, linear_conv, attention, positional)  # each has RULES


class RuleTable:
    """Op -> rule. Registering an op twice is an error: a silent second entry would win unnoticed."""

    def __init__(self) -> None:
        self._rules: dict[Any, Rule] = {}

    def register(self, ops: list[Any], rule: Rule) -> None:
        for op in ops:
            old = self._rules.get(op)
            if old is not None:
                raise ValueError(f"{op} has two rules: {_rule_name(old)} and {_rule_name(rule)}; keep one")
            self._rules[op] = rule

    def get(self, target: Any) -> Rule | None:
        """The rule for ``target``: its exact overload first, then its overload packet."""
        rule = self._rules.get(target)
        if rule is None and isinstance(target, torch._ops.OpOverload):
            rule = self._rules.get(target.overloadpacket)
        return rule

    def ops(self) -> list[Any]:
        """Every registered op, once each."""
        return list(self._rules)


def _rule_name(rule: Rule) -> str:
    return f"{rule.__module__}.{rule.__qualname__}"


def build_table() -> RuleTable:
    """The table of every family's rules."""
    table = RuleTable()
    for family in FAMILIES:
        for ops, rule in family.RULES:
            table.register(ops, rule)
    return table


OP_RULES = build_table()


def rule_for(target: Any) -> Rule | None:
    """The rule for an FX node's target, or None when the op is not in the table."""
    return OP_RULES.get(target)
