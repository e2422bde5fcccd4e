"""What an exported model carries about its bundle (input size, mean/std, classes, data, compression), so consumers
need no flags.
"""

from __future__ import annotations

import json
from typing import Any

import onnx
from onnx import helper

from craft_deploy.toolkit.registry import method_state

META_KEY = "craft_deploy"


def export_metadata(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a consumer needs (input size, mean/std, classes, data, compression) from a bundle's manifest."""
    keep = (
        "architecture",
        "num_classes",
        "input_size",
        "mean",
        "std",
        "class_names",
        "dataset",
        "data",
    )
    meta = {k: manifest.get(k) for k in keep}
    meta["quantization"] = method_state(manifest, "quantize")
    meta["sparsity"] = method_state(manifest, "prune")
    stages = manifest.get("stages") or []
    meta["producer_git_sha"] = stages[-1].get("git_sha") if stages else None
    if meta.get("quantization"):
        meta["quantization"] = {k: v for k, v in meta["quantization"].items() if k != "layers"}
    if meta.get("sparsity"):
        meta["sparsity"] = {"pattern": meta["sparsity"]["pattern"], "layers": len(meta["sparsity"]["layers"])}
    return meta


def set_metadata(proto: onnx.ModelProto, meta: dict[str, Any]) -> None:
    """Store `meta` (see export_metadata) in the model's metadata_props."""
    helper.set_model_props(proto, {META_KEY: json.dumps(meta)})


def read_metadata(proto_or_path: onnx.ModelProto | str) -> dict[str, Any] | None:
    """The craft-deploy metadata of an ONNX model, or None if it has none."""
    proto = proto_or_path
    if not isinstance(proto, onnx.ModelProto):
        proto = onnx.load(str(proto_or_path), load_external_data=False)
    for prop in proto.metadata_props:
        if prop.key == META_KEY:
            return json.loads(prop.value)
    return None
