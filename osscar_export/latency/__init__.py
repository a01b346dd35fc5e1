"""Latency: robust timing of compiled models and the per-group latency table of a plan.

``timing`` measures one compiled model; ``table`` holds region times per group and width and the
end-to-end line ``T = base + scale * sum_g t_g(k_g)`` fitted to a few allocations timed whole;
``regions`` cuts each group's region out of the captured model; ``build`` times the regions and
the fit points (``measure_latency``). Names are imported from their modules, not from here: the
allocator imports ``table``, and ``build`` imports the allocator. See docs/design.md, "Latency".
"""
