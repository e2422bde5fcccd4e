"""The bundle manifest's schema: every field's type and range, checked on load before anything is built from it.

A manifest read from disk is untrusted: a wrong type or an absurd value (a billion classes, a 10^6-pixel input) must
stop here with a one-line CraftError naming the field, never reach torch as a traceback or a huge allocation.
"""

from __future__ import annotations

import math
from typing import Any

from craft_deploy import CraftError
from craft_deploy.toolkit.registry import registered_methods

BUNDLE_SCHEMA = "craft-deploy/bundle/v2"
LEGACY_SCHEMAS = ("craft-deploy/bundle/v1",)  # v1 kept quantization/sparsity at the top level instead of `methods`
MAX_CLASSES = 100_000
MAX_SIDE = 4096  # pixels per input side
MAX_CHANNELS = 16


def _fail(path: str, what: str, got: Any) -> None:
    raise CraftError(f"bundle manifest: {path} must be {what}, got {str(repr(got))[:80]}")


def _int(m: dict, key: str, lo: int, hi: int) -> int:
    v = m[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        _fail(key, f"an integer in {lo}..{hi}", v)
    return v


def _floats(m: dict, key: str, n: int, positive: bool) -> None:
    v = m[key]
    ok = isinstance(v, list) and len(v) == n
    ok = ok and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
    if not ok or (positive and any(x <= 0 for x in v)):
        _fail(key, f"a list of {n} finite{' positive' if positive else ''} numbers (one per input channel)", v)


def _optional_str(m: dict, key: str) -> None:
    v = m.get(key)
    if v is not None and not isinstance(v, str):
        _fail(key, "a string or null", v)


def upgrade(manifest: dict[str, Any]) -> dict[str, Any]:
    """A v1 manifest as v2: its top-level quantization/sparsity become `methods` entries (their configs unknown)."""
    if manifest.get("schema") not in LEGACY_SCHEMAS:
        return manifest
    m = {k: v for k, v in manifest.items() if k not in ("quantization", "sparsity")}
    m["schema"] = BUNDLE_SCHEMA
    m["methods"] = [
        {"method": name, "config": None, "state": manifest[key]}
        for key, name in (("sparsity", "prune"), ("quantization", "quantize"))
        if manifest.get(key)
    ]
    return m


def validate_manifest(manifest: Any) -> dict[str, Any]:
    """Check every field a bundle manifest holds; returns it (upgraded from v1), or raises a CraftError."""
    if not isinstance(manifest, dict):
        raise CraftError(f"bundle manifest must be a JSON object, got {type(manifest).__name__}")
    schema = manifest.get("schema")
    if schema != BUNDLE_SCHEMA and schema not in LEGACY_SCHEMAS:
        raise CraftError(f"bundle manifest has schema {schema!r}; this craft-deploy reads {BUNDLE_SCHEMA!r}")
    m = upgrade(manifest)
    for key in ("architecture", "num_classes", "input_size", "mean", "std"):
        if key not in m:
            raise CraftError(f"bundle manifest lacks {key!r}")
    arch = m["architecture"]
    if not isinstance(arch, str) or not 0 < len(arch) <= 200:
        _fail("architecture", "a timm model name", arch)
    num_classes = _int(m, "num_classes", 1, MAX_CLASSES)
    size = m["input_size"]
    if (
        not isinstance(size, list)
        or len(size) != 3
        or any(isinstance(v, bool) or not isinstance(v, int) for v in size)
        or not 1 <= size[0] <= MAX_CHANNELS
        or not all(8 <= v <= MAX_SIDE for v in size[1:])
    ):
        _fail("input_size", f"[channels 1..{MAX_CHANNELS}, height, width] with sides in 8..{MAX_SIDE}", size)
    _floats(m, "mean", size[0], positive=False)
    _floats(m, "std", size[0], positive=True)
    names = m.get("class_names")
    if names is not None and (
        not isinstance(names, list) or len(names) != num_classes or not all(isinstance(n, str) for n in names)
    ):
        _fail("class_names", f"null or a list of {num_classes} strings (num_classes)", names)
    _optional_str(m, "dataset")
    if not isinstance(m.get("stages", []), list) or not all(isinstance(s, dict) for s in m.get("stages", [])):
        _fail("stages", "a list of objects", m.get("stages"))
    if m.get("data") is not None and not isinstance(m["data"], dict):
        _fail("data", "an object or null", m["data"])
    m.setdefault("methods", [])
    _validate_methods(m["methods"])
    return m


def _validate_methods(methods: Any) -> None:
    METHODS = registered_methods()

    if not isinstance(methods, list):
        _fail("methods", "a list of {method, config, state} objects", methods)
    for i, entry in enumerate(methods):
        where = f"methods[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"method", "config", "state"}:
            _fail(where, "an object with exactly method, config and state", entry)
        if entry["method"] not in METHODS:
            _fail(f"{where}.method", f"one of {', '.join(METHODS)}", entry["method"])
        if not isinstance(entry["state"], dict):
            _fail(f"{where}.state", "an object", entry["state"])
        if entry["config"] is not None:
            if not isinstance(entry["config"], dict):
                _fail(f"{where}.config", "an object or null", entry["config"])
            try:
                METHODS[entry["method"]].config_cls.from_dict(entry["config"])
            except CraftError as e:
                raise CraftError(f"bundle manifest: {where}.config is invalid: {e}") from None
