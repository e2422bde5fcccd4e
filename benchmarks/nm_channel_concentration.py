"""How much an N:M mask acts like channel pruning: for every pruned layer of each compressed bundle, the fraction of
rows (output channels x kernel taps) in which each input channel is pruned, and the share of input channels pruned
almost everywhere (>= 90% of rows) or almost nowhere (<= 10%). Magnitude spreads a 2:4 mask over all channels; a score
that multiplies |W| by a per-input-channel factor shared by every row (Wanda's ||X_j||) tends to prune the same
channels in every row.

    craft-deploy compress runs/demo/adam --sparsity 2:4 --prune-method wanda --bn-recalibrate --calib-samples 512 \\
        --eval-subset 2000 --out runs/adam-24-wanda        # likewise magnitude, sparsegpt
    python benchmarks/nm_channel_concentration.py runs/adam-24-magnitude runs/adam-24-wanda runs/adam-24-sparsegpt
"""

from __future__ import annotations

import argparse

import torch

from craft_deploy.finetune.recovery import prunable_weight
from craft_deploy.models import load_bundle
from craft_deploy.toolkit.primitives import as_input_groups
from craft_deploy.toolkit.registry import method_state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+")
    args = ap.parse_args()
    print("| bundle | method | input channels | pruned in >= 90% of rows | pruned in <= 10% of rows |")
    print("|---|---|---|---|---|")
    for path in args.bundles:
        bundle = load_bundle(path)
        state = method_state(bundle.manifest, "prune")
        fractions = torch.cat(
            [
                (as_input_groups(prunable_weight(bundle.model.get_submodule(name))) == 0).float().mean(0)
                for name in state["layers"]
            ]
        )
        print(
            f"| {path} | {state['score']} | {len(fractions)} | {100 * (fractions >= 0.9).float().mean():.1f}% | "
            f"{100 * (fractions <= 0.1).float().mean():.1f}% |"
        )


if __name__ == "__main__":
    main()
