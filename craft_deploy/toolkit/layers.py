"""Which layers a compression method touches: Linear/Conv by default, minus head, stem and depthwise convs."""

from __future__ import annotations

import fnmatch

from torch import nn


def _head_and_stem(model: nn.Module) -> tuple[set[str], set[str]]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    head = cfg.get("classifier", "classifier")
    stem = cfg.get("first_conv", "")
    heads = {head} if isinstance(head, str) else set(head)
    stems = {stem} if isinstance(stem, str) else set(stem)
    # timm names a conv stem's module, or its `.proj` for patch embeddings; accept both spellings.
    stems |= {s.rsplit(".", 1)[0] for s in stems if s.endswith(".proj")} | {s + ".proj" for s in stems if s}
    return heads, stems


def select_layers(
    model: nn.Module,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    skip_stem: bool = True,
    skip_depthwise: bool = True,
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Pick Linear/Conv2d layers; returns (selected, {skipped name: reason}).

    The classifier head is always left alone. `include`/`exclude` are glob patterns over module names; an include
    list replaces the default choice of stem and depthwise layers.
    """
    heads, stems = _head_and_stem(model)
    selected: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        if name in heads:
            skipped[name] = "classifier head"
            continue
        if exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            skipped[name] = "excluded by --exclude"
            continue
        if include:
            if any(fnmatch.fnmatchcase(name, p) for p in include):
                selected[name] = mod
            else:
                skipped[name] = "not matched by --include"
            continue
        if skip_stem and name in stems:
            skipped[name] = "stem / patch embedding"
        elif skip_depthwise and isinstance(mod, nn.Conv2d) and mod.groups > 1:
            skipped[name] = "depthwise/grouped conv (sparse kernels do not accelerate it)"
        else:
            selected[name] = mod
    return selected, skipped


def model_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """timm's `blocks` (nested Sequentials, e.g. EfficientNet stages, flattened) by name, in forward order; empty
    for models without them."""
    found: dict[str, nn.Module] = {}

    def walk(prefix: str, mod: nn.Module) -> None:
        if isinstance(mod, nn.Sequential):
            for child_name, child in mod.named_children():
                walk(f"{prefix}.{child_name}", child)
        else:
            found[prefix] = mod

    if isinstance(getattr(model, "blocks", None), nn.Module):
        walk("blocks", model.blocks)
    return found


def block_groups(model: nn.Module, names: list[str]) -> list[list[str]]:
    """Selected layer names grouped by the model's blocks (timm's `blocks`, flattened), in forward order."""
    blocks = list(model_blocks(model))
    groups: dict[str, list[str]] = {}
    for name in names:
        key = next((b for b in blocks if name.startswith(b + ".")), name)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` of `model` is."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
