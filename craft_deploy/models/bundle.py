"""Model bundles: a directory with `model.safetensors` and `manifest.json`; every stage reads and writes one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from craft_deploy import CraftError
from craft_deploy.artifacts import atomic_write_bytes, atomic_write_json, read_json
from craft_deploy.models.manifest import BUNDLE_SCHEMA, validate_manifest

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"


@dataclass
class Bundle:
    """A model with its manifest: architecture, classes, input size, normalisation and the stages applied."""

    model: nn.Module
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.manifest["input_size"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])


def make_manifest(
    architecture: str,
    num_classes: int,
    input_size: list[int],
    mean: list[float],
    std: list[float],
    class_names: list[str] | None = None,
    dataset: str | None = None,
) -> dict[str, Any]:
    """A fresh manifest for a model that no stage has touched yet."""
    return {
        "schema": BUNDLE_SCHEMA,
        "architecture": architecture,
        "num_classes": num_classes,
        "input_size": list(input_size),
        "mean": list(mean),
        "std": list(std),
        "class_names": class_names,
        "dataset": dataset,
        "stages": [],
        "methods": [],
    }


def save_bundle(model: nn.Module, path: str | Path, manifest: dict[str, Any]) -> Path:
    """Write `model`'s state dict and `manifest` into directory `path` (each file atomically)."""
    from safetensors.torch import save

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write_bytes(path / WEIGHTS, save(state, metadata={"schema": BUNDLE_SCHEMA}))
    atomic_write_json(path / MANIFEST, manifest)
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and validate a bundle's manifest (every field's type and range), with an error that says what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise CraftError(f"bundle {path} does not exist or is not a directory (expected {MANIFEST} + {WEIGHTS})")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CraftError(f"{path} is not a model bundle: {MANIFEST} is missing")
    try:
        return validate_manifest(read_json(mpath, "bundle manifest"))
    except CraftError as e:
        raise CraftError(f"{mpath}: {e}") from None


def _build(manifest: dict[str, Any]) -> nn.Module:
    """The architecture a manifest names, with every recorded method's structure restored (weights not loaded)."""
    from craft_deploy.models.factory import load_model
    from craft_deploy.toolkit.registry import restore_methods

    model = load_model(
        manifest["architecture"],
        num_classes=manifest["num_classes"],
        pretrained=False,
        img_size=manifest["input_size"][-1],
    )
    restore_methods(model, manifest)
    return model


def load_bundle(path: str | Path) -> Bundle:
    """Rebuild the model a bundle describes, replay every compression method's `restore`, check the weights' names and
    shapes against it, then load them; never unpickles.

    The names and shapes are checked against a model built on the meta device first, so a tampered bundle (another
    architecture, a resized head) is refused before any real memory is allocated for it.
    """
    import torch
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    manifest = read_manifest(path)
    wpath = path / WEIGHTS
    if not wpath.is_file():
        raise CraftError(f"bundle {path} has no {WEIGHTS}")
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in _build(manifest).state_dict().items()}
        with safe_open(str(wpath), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except CraftError as e:
        raise CraftError(f"bundle {path}: {e}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CraftError(f"bundle weights {wpath} are corrupt or truncated ({e})") from e
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    wrong = [f"{k} {shapes[k]} (expected {expected[k]})" for k in expected if k in shapes and shapes[k] != expected[k]]
    if missing or unexpected or wrong:
        details = "; ".join(
            f"{what}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
            for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if items
        )
        raise CraftError(
            f"bundle weights {wpath} do not match the {manifest['architecture']} its manifest describes ({details})"
        )
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise CraftError(f"bundle weights {wpath} are corrupt or truncated ({e})") from e
    model = _build(manifest)
    model.load_state_dict(state, strict=True)
    return Bundle(model=model.eval(), manifest=manifest)
