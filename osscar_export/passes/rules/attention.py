"""Attention: scaled_dot_product_attention, einsum, and the grouped-query attention checks.

Heads are the batch dims shared by q, k and v; head_dim is pruned only as whole heads. With
grouped-query attention a KV head goes only together with all its query heads (kind
``kv_group``); query heads within a group stay. With multi-query attention (one KV head) the
query heads are the attention's only width: they are pruned alone (kind ``query_head``), the
shared key and value untouched (see docs/design.md, "Op rules").
"""

from __future__ import annotations

import torch
from torch import fx

from osscar_export.passes.rules.api import GraphAnalysis, Layout, Rule, bind, broadcast_batch, broadcast_into

aten = torch.ops.aten
GQA_QUERY = (
    "query heads sharing one of several KV heads: pruned only together with their KV head (kv_group), "
    "so query heads within a group stay"
)


def query_heads(a: GraphAnalysis, node: fx.Node, copies: list[Layout], kv: list[Layout]) -> None:
    """The query heads of each KV head (``copies``): prunable alone when there is one KV head
    (MQA: ``kv`` all size 1), else blocked, the KV heads (``kv``) flagged as ``kv_group``."""
    if all(a.size(x) == 1 for x in kv):
        for x in copies:
            a.flag(x, "query")
        return
    for x in copies:
        a.block(x, node, GQA_QUERY)
    for x in kv:
        a.flag(x, "kv")


def gqa_check(a: GraphAnalysis, node: fx.Node, kv_batch: list[Layout]) -> None:
    """K/V heads built by expanding a size-1 dim (repeat_kv) are copies for the query heads."""
    for lay in kv_batch:
        leaves = a.leaves(lay)
        copies = [x for x in leaves if a.has_flag(x, "broadcast")]
        if not copies or all(a.size(x) == 1 for x in copies):
            continue
        query_heads(a, node, copies, [x for x in leaves if x not in copies])


def sdpa(a: GraphAnalysis, node: fx.Node) -> None:
    """scaled_dot_product_attention: batch (head) dims of q, k, v, out are one index space."""
    b = bind(node)
    q, k, v, mask = b["query"], b["key"], b["value"], b["attn_mask"]
    qd, kd, vd = a.layout(q), a.layout(k), a.layout(v)
    qs, ks, vs = a.shape(q), a.shape(k), a.shape(v)
    qmatch, qms = qd[:-2], qs[:-2]
    if b.get("enable_gqa") and len(qs) >= 3 and qs[-3] != ks[-3]:
        parts = a.split(qd[-3], [ks[-3], qs[-3] // ks[-3]], node)
        if parts is None:
            a.block_everything(node, "enable_gqa head layout is not followed")
            return
        query_heads(a, node, [parts[1]], [kd[-3]])
        qmatch, qms = qmatch[:-1] + [parts[0]], qms[:-1] + (ks[-3],)
    else:
        gqa_check(a, node, kd[:-2])
        gqa_check(a, node, vd[:-2])
    broadcast_batch(a, node, qmatch, qms, kd[:-2], ks[:-2])
    broadcast_batch(a, node, qmatch, qms, vd[:-2], vs[:-2])
    for lay in qd[:-2]:
        a.flag(lay, "head")
    a.unify(kd[-2], vd[-2], node)
    a.unify(qd[-1], kd[-1], node)
    a.block(qd[-1], node, "head_dim of queries/keys: sets the attention scale; pruned only as whole heads")
    a.block(vd[-1], node, "head_dim of values: pruned only as whole heads")
    if a.is_tensor(mask):  # the mask broadcasts against the scores (..., L, S)
        broadcast_into(a, node, qd[:-1] + [kd[-2]], mask)
    a.set_layout(node, qd[:-1] + [vd[-1]])


def einsum(a: GraphAnalysis, node: fx.Node) -> None:
    """einsum: letters kept in the output pass through (batch/head dims between two activations);
    summed letters are contracted. No consumer is recorded: a contraction is blocked."""
    b = bind(node)
    operands = list(b["tensors"])
    lhs, _, rhs = b["equation"].replace(" ", "").partition("->")
    terms = lhs.split(",")
    if not rhs and "->" not in b["equation"]:
        rhs = "".join(sorted(c for c in set(lhs) if c.isalpha() and lhs.count(c) == 1))
    out_rank = len(a.shape(node))
    ell = max((len(a.shape(t)) - len(term.replace("...", "")) for t, term in zip(operands, terms)), default=0)
    ell_letters = [chr(0x3B1 + i) for i in range(max(ell, 0))]  # greek letters stand for "..."

    def letters(term: str, rank: int) -> list[str]:
        if "..." not in term:
            return list(term)
        pre, post = term.split("...")
        n = rank - len(pre) - len(post)
        return list(pre) + ell_letters[len(ell_letters) - n :] + list(post)

    seen: dict[str, Layout] = {}
    for t, term in zip(operands, terms):
        xs = a.shape(t)
        for ch, lay, size in zip(letters(term, len(xs)), a.layout(t), xs):
            if size == 1:
                continue
            if ch in seen:
                a.unify(seen[ch], lay, node)
            else:
                seen[ch] = lay
    out_letters = letters(rhs, out_rank)
    if len(operands) > 1:
        last = letters(terms[-1], len(a.shape(operands[-1])))
        others = {c for t, term in zip(operands[:-1], terms[:-1]) for c in letters(term, len(a.shape(t)))}
        for ch in last:
            if ch in out_letters and ch not in others and ch in seen:
                a.block(seen[ch], node, "free dim of an activation product (e.g. head_dim of values): pruned only with whole heads")
    for ch, lay in seen.items():
        if ch not in out_letters:
            a.block(lay, node, "summed over by einsum (no weight to re-fit)")
        elif len(operands) > 1 and all(ch in letters(term, len(a.shape(t))) for t, term in zip(operands, terms)):
            a.flag(lay, "head")
    a.set_layout(node, [seen.get(ch) if ch in seen else a.fresh(s) for ch, s in zip(out_letters, a.shape(node))])


RULES: list[tuple[list, Rule]] = [
    ([aten.scaled_dot_product_attention], sdpa),
    ([aten.einsum], einsum),
]
