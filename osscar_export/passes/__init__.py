"""The pipeline passes: capture, find_structures, calibrate, materialize (DESIGN.md §2)."""
