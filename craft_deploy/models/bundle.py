"""Model bundles: a directory with `model.safetensors` and `manifest.json`; every stage reads and writes one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from craft_deploy import CraftError
from craft_deploy.artifacts import atomic_write_bytes, atomic_write_json, read_json

BUNDLE_SCHEMA = "craft-deploy/bundle/v1"
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
        "quantization": None,
        "sparsity": None,
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
    """Read and validate a bundle's manifest, with an error that says what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise CraftError(f"bundle {path} does not exist or is not a directory (expected {MANIFEST} + {WEIGHTS})")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CraftError(f"{path} is not a model bundle: {MANIFEST} is missing")
    manifest = read_json(mpath, "bundle manifest")
    if not isinstance(manifest, dict) or manifest.get("schema") != BUNDLE_SCHEMA:
        got = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        raise CraftError(f"{mpath} has schema {got!r}; this craft-deploy reads {BUNDLE_SCHEMA!r}")
    for key in ("architecture", "num_classes", "input_size", "mean", "std"):
        if key not in manifest:
            raise CraftError(f"bundle manifest {mpath} lacks {key!r}")
    return manifest


def load_bundle(path: str | Path) -> Bundle:
    """Rebuild the model a bundle describes (compression wrappers included) and load its weights; never unpickles."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from craft_deploy.models.factory import load_model

    path = Path(path)
    manifest = read_manifest(path)
    wpath = path / WEIGHTS
    if not wpath.is_file():
        raise CraftError(f"bundle {path} has no {WEIGHTS}")
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise CraftError(f"bundle weights {wpath} are corrupt or truncated ({e})") from e
    model = load_model(
        manifest["architecture"],
        num_classes=int(manifest["num_classes"]),
        pretrained=False,
        img_size=int(manifest["input_size"][-1]),
    )
    if manifest.get("quantization"):
        from craft_deploy.compress.qmodules import attach_quantizers

        quant = manifest["quantization"]
        attach_quantizers(model, quant["layers"], quant.get("matmuls"), quant.get("tensors"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CraftError(f"bundle weights {wpath} do not match its manifest: {str(e)[:400]}") from e
    return Bundle(model=model.eval(), manifest=manifest)
