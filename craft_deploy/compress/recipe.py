"""Per-layer recipes: a treatment for each layer, read from and written to YAML (what `craft-deploy tune` finds and
`compress --recipe` applies).

A treatment is `float` or `+`-joined parts, at most one of each kind: a sparsity pattern N:M (`2:4`), and a bit width
wXaY or its short names `int8` (w8a8) and `wX` (wXa16: float activations, e.g. `w4`). A layer the recipe does not name
stays float. The recipe compiles to the ordinary method configs: one PruneConfig for the N:M layers and one
QuantConfig whose per-layer bit widths (`layer_quant`) cover the quantized layers, so the bundle it makes records
per-layer specs as any other does.

    recipe: craft-deploy per-layer
    version: 1
    prune_method: magnitude     # the N:M layers' score (magnitude, wanda, sparsegpt, ...)
    calib_method: mse           # activation ranges of the quantized layers
    placement: tensorrt         # where activation quantizers sit (ort-cpu: also residual adds, for ONNX Runtime)
    bn_recalibrate: true        # BatchNorm statistics re-estimated once, after everything
    calib_samples: 512
    seed: 0
    layers:
      blocks.0.0.conv_pw: int8
      blocks.1.0.conv_pwl: 2:4+int8
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from craft_deploy import CraftError
from craft_deploy.artifacts import atomic_write_bytes
from craft_deploy.compress.prune import PruneConfig
from craft_deploy.compress.quant import QuantConfig
from craft_deploy.config import CompressConfig, parse_quant
from craft_deploy.toolkit.calibrators import CALIBRATORS
from craft_deploy.toolkit.placement import PLACEMENTS

KIND = "craft-deploy per-layer"
VERSION = 1
TREATMENT_HELP = "float, or +-joined N:M (e.g. 2:4) and a bit width (int8 = w8a8, wX = wXa16 such as w4, or any wXaY)"


def _short(wxay: str) -> str:
    """w8a8 -> int8, wXa16 (float activations) -> wX, others as they are."""
    return "int8" if wxay == "w8a8" else wxay.removesuffix("a16")


def _long(token: str) -> str:
    return "w8a8" if token == "int8" else f"{token}a16" if re.fullmatch(r"w\d+", token) else token


@dataclass(frozen=True)
class Treatment:
    """One layer's treatment: an N:M pattern and/or weight and activation bits; neither is float."""

    nm: tuple[int, int] | None = None
    bits: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        parts = [f"{self.nm[0]}:{self.nm[1]}"] if self.nm else []
        if self.bits:
            wxay = f"w{self.bits[0]}a{self.bits[1]}"
            parts.append(_short(wxay))
        return "+".join(parts) or "float"


def parse_treatment(text: Any, where: str = "treatment") -> Treatment:
    """'2:4+int8' -> Treatment((2, 4), (8, 8)); a CraftError naming `where` for anything else."""
    token = str(text).strip().lower()
    if token == "float":
        return Treatment()
    nm = bits = None
    for part in token.split("+"):
        m = re.fullmatch(r"(\d+):(\d+)", part)
        if m and nm is None and 0 < int(m.group(1)) < int(m.group(2)):
            nm = (int(m.group(1)), int(m.group(2)))
        elif bits is None and re.fullmatch(r"w\d+(a\d+)?|int8", part):
            try:
                bits = parse_quant(_long(part))
            except CraftError as e:
                raise CraftError(f"{where} {text!r}: {e}") from None
        else:
            raise CraftError(f"{where} {text!r} is not a treatment; write {TREATMENT_HELP}")
    return Treatment(nm, bits)


@dataclass(frozen=True)
class LayerRecipe:
    """A treatment per layer and the settings every layer shares."""

    layers: dict[str, Treatment] = field(default_factory=dict)
    prune_method: str = "magnitude"
    calib_method: str = "mse"
    placement: str = "tensorrt"
    bn_recalibrate: bool = True
    calib_samples: int = 512
    seed: int = 0

    def to_yaml(self, comment: str = "") -> str:
        body = {
            "recipe": KIND,
            "version": VERSION,
            "prune_method": self.prune_method,
            "calib_method": self.calib_method,
            "placement": self.placement,
            "bn_recalibrate": self.bn_recalibrate,
            "calib_samples": self.calib_samples,
            "seed": self.seed,
            "layers": {name: t.name for name, t in self.layers.items()},
        }
        head = "".join(f"# {line}\n" for line in comment.splitlines())
        return head + yaml.safe_dump(body, sort_keys=False)

    def write(self, path: Path, comment: str = "") -> None:
        atomic_write_bytes(path, self.to_yaml(comment).encode())

    def compress_config(self, eval_subset: int | None = None, data_root: str | None = None) -> CompressConfig:
        """The method configs that apply this recipe: one prune over the N:M layers, one quantize over the rest."""
        pruned = [n for n, t in self.layers.items() if t.nm]
        quantized = {n: t.bits for n, t in self.layers.items() if t.bits}
        patterns = {t.nm for t in self.layers.values() if t.nm}
        if len(patterns) > 1:
            got = ", ".join(f"{n}:{m}" for n, m in sorted(patterns))
            raise CraftError(f"a recipe takes one N:M pattern for all its pruned layers, got {got}")
        methods: list[Any] = []
        if pruned:
            n, m = patterns.pop()
            methods.append(PruneConfig(n=n, m=m, score=self.prune_method, include=tuple(pruned),
                                       bn_recalibrate=self.bn_recalibrate and not quantized))  # fmt: skip
        if quantized:
            base = Counter(quantized.values()).most_common(1)[0][0]
            per_layer = tuple(f"{n}=w{w}a{a}" for n, (w, a) in quantized.items() if (w, a) != base)
            methods.append(QuantConfig(w_bits=base[0], a_bits=base[1], calib_method=self.calib_method,
                                       include=tuple(quantized), layer_quant=per_layer, placement=self.placement,
                                       bn_recalibrate=self.bn_recalibrate))  # fmt: skip
        if not methods:
            raise CraftError("the recipe leaves every layer float: nothing to compress")
        return CompressConfig(methods=tuple(methods), calib_samples=self.calib_samples, eval_subset=eval_subset,
                              data_root=data_root, seed=self.seed)  # fmt: skip


def read_recipe(path: str | Path) -> LayerRecipe:
    """A recipe file; anything that is not one is a CraftError naming the file and the bad entry."""
    path = Path(path)
    try:
        body = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise CraftError(f"--recipe {path}: no such file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CraftError(f"--recipe {path} is not readable YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(body, dict) or body.get("recipe") != KIND:
        raise CraftError(f"--recipe {path} is not a per-layer recipe (it needs 'recipe: {KIND}', as tune.yaml has)")
    if body.get("version") != VERSION:
        raise CraftError(
            f"--recipe {path}: version {body.get('version')!r} is not one this craft-deploy reads ({VERSION})"
        )
    known = {
        "recipe",
        "version",
        "prune_method",
        "calib_method",
        "placement",
        "bn_recalibrate",
        "calib_samples",
        "seed",
        "layers",
    }
    unknown = sorted(set(body) - known)
    if unknown:
        raise CraftError(f"--recipe {path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    layers = body.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise CraftError(f"--recipe {path}: 'layers' must map layer names to treatments ({TREATMENT_HELP})")
    treatments = {str(n): parse_treatment(t, f"--recipe {path}: layer {n}:") for n, t in layers.items()}
    settings = ("prune_method", "calib_method", "placement", "bn_recalibrate", "calib_samples", "seed")
    kw = {k: body[k] for k in settings if k in body}
    for key, kind in (("bn_recalibrate", bool), ("calib_samples", int), ("seed", int), ("prune_method", str),
                      ("calib_method", str), ("placement", str)):  # fmt: skip
        if key in kw and (not isinstance(kw[key], kind) or (kind is int and isinstance(kw[key], bool))):
            raise CraftError(f"--recipe {path}: {key} must be {kind.__name__}, got {kw[key]!r}")
    if kw.get("calib_method", "mse") not in CALIBRATORS:
        raise CraftError(f"--recipe {path}: calib_method {kw['calib_method']!r} is not one of {', '.join(CALIBRATORS)}")
    if kw.get("placement", "tensorrt") not in PLACEMENTS:
        raise CraftError(f"--recipe {path}: placement {kw['placement']!r} is not one of {', '.join(PLACEMENTS)}")
    return LayerRecipe(layers=treatments, **kw)
