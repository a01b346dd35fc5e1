"""The prune passes: capture, find_structures, calibrate, solve, materialize (docs/design.md, "Passes")."""
