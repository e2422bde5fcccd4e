"""Loading time of one demo fine-tuning epoch (6000 Fashion-MNIST images resized to 64 px, batch 32): the per-image
resize the training loader uses vs one resize per batch (a `__getitems__`), measured side by side in rounds.

    python benchmarks/data_loading.py --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from craft_deploy.data.datasets import ArrayImageDataset
from craft_deploy.data.fashion_mnist import load_fashion_mnist


class BatchResized(ArrayImageDataset):
    """The same images, resized one batch at a time."""

    def __getitems__(self, idx: list[int]) -> list[tuple[torch.Tensor, int]]:
        x = torch.from_numpy(np.ascontiguousarray(self.images[idx])).float().div_(255.0)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", antialias=True)
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        return list(zip(x.unbind(0), (int(v) for v in self.labels[idx])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    images, labels = load_fashion_mnist("train")
    variants = {
        "per image (used)": ArrayImageDataset(images[: args.images], labels[: args.images], 64, [0.5] * 3, [0.5] * 3),
        "per batch": BatchResized(images[: args.images], labels[: args.images], 64, [0.5] * 3, [0.5] * 3),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    batches = {}
    for _ in range(args.rounds):  # round-robin: this VM's speed drifts by minutes
        for name, ds in variants.items():
            t0 = time.perf_counter()
            batches[name] = list(DataLoader(ds, batch_size=32))
            times[name].append(time.perf_counter() - t0)
    a, b = batches.values()
    same = all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    for name, ts in times.items():
        print(f"{name:18} median {statistics.median(ts):.2f} s per epoch of {args.images} images ({ts})")
    print(f"identical batches: {same}")


if __name__ == "__main__":
    main()
