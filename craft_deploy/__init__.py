"""craft-deploy: compression-aware fine-tuning, one-shot compression, export and benchmarking of timm models."""

__version__ = "0.1.0"


class CraftError(Exception):
    """An error caused by the user's input; the CLI prints its message and exits 1 without a traceback."""
