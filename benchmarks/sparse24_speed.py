"""GPU only: speed of a 2:4-pruned Linear as torch semi-structured sparse vs dense, and that outputs agree.

python benchmarks/sparse24_speed.py --sizes 4096x4096,8192x8192 --tokens 4096
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from craft_deploy.compress import PruneConfig
from craft_deploy.compress.prune import prune


def time_ms(fn, iters: int = 100) -> float:
    for _ in range(10):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4096x4096,8192x8192", help="out_features x in_features, comma-separated")
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU with semi-structured sparse support (Ampere or newer)")
    from torch.sparse import to_sparse_semi_structured

    rows = []
    for size in args.sizes.split(","):
        out_f, in_f = (int(v) for v in size.split("x"))
        lin = nn.Linear(in_f, out_f, bias=False).half().cuda().eval()
        holder = nn.Sequential(lin, nn.Linear(out_f, 2))
        holder.pretrained_cfg = {"classifier": "1", "first_conv": ""}
        prune(holder, PruneConfig(n=2, m=4), None)
        x = torch.randn(args.tokens, in_f, dtype=torch.half, device="cuda")
        with torch.no_grad():
            dense_ms = time_ms(lambda: lin(x))
            ref = lin(x)
            lin.weight = nn.Parameter(to_sparse_semi_structured(lin.weight))
            sparse_ms = time_ms(lambda: lin(x))
            err = (lin(x) - ref).abs().max().item()
        rows.append(
            {
                "shape": size,
                "tokens": args.tokens,
                "dense_ms": dense_ms,
                "sparse_ms": sparse_ms,
                "speedup": dense_ms / sparse_ms,
                "max_abs_diff": err,
                "gpu": torch.cuda.get_device_name(0),
            }
        )
        print(json.dumps(rows[-1]))


if __name__ == "__main__":
    main()
