"""osscar-export: one-shot structured pruning of PyTorch models to a latency budget."""

__version__ = "0.1.0"
