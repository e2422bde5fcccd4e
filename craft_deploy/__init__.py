"""craft-deploy: compression-aware fine-tuning, one-shot compression, export and benchmarking of timm models."""

__version__ = "0.1.0"


EXIT_OK = 0
EXIT_BAD_INPUT = 2  # a flag value, a bundle or a file we refuse (click's own usage errors exit 2 too)
EXIT_REGRESSION = 3  # the bench regression gate failed
EXIT_VERIFICATION = 4  # an artifact failed its verification (export or engine disagrees with PyTorch)
EXIT_INTERRUPTED = 130


class CraftError(Exception):
    """An error caused by the user's input; the CLI prints its message and exits 2 without a traceback."""

    exit_code = EXIT_BAD_INPUT


class VerificationError(CraftError):
    """A produced artifact disagrees with its reference (PyTorch); the CLI exits 4 and nothing is written."""

    exit_code = EXIT_VERIFICATION
