"""OpenVINO, imported on use: bench runs files in it and export verifies the IR it writes."""

from __future__ import annotations

from craft_deploy import CraftError


def import_openvino(what: str = "--backend openvino"):
    """The openvino module, or a CraftError naming `what` needs it and the extra that installs it."""
    try:
        import openvino
    except ImportError:
        raise CraftError(
            f"{what} needs OpenVINO, which is not installed: pip install 'craft-deploy[openvino]' (or pip install "
            "openvino)"
        ) from None
    return openvino
