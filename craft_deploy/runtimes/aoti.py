"""Loading an AOTInductor package (`model.pt2`), as export verifies it and bench runs it."""

from __future__ import annotations

from pathlib import Path

import torch


def load_package(path: Path):
    """The compiled model of a package, callable on tensors of the device and dtype it was compiled for."""
    return torch._inductor.aoti_load_package(str(path))
