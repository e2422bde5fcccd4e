"""Split Fashion-MNIST by class into a source task and a downstream task, written as two ImageFolder trees of PNGs, so a
model trained from scratch on the source can be "pretrained" for the downstream one (`--data imagefolder:DIR`).

There is no pretrained ViT here (no model hub), and a ViT trained on the downstream task itself already knows it, which
leaves TuneComp nothing to fine-tune jointly. Pretraining on other classes restores the paper's setting in miniature:
the downstream classes are new to the model, only its features carry over.

    python benchmarks/transfer_split.py --source 0 1 3 5 8 --out runs/fm-source runs/fm-target

Default split: source T-shirt, trouser, dress, sandal, bag; downstream pullover, coat, shirt, sneaker, ankle boot (the
three hard-to-tell tops are all downstream, so it is not saturated).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from craft_deploy.data.fashion_mnist import CLASSES, load_fashion_mnist


def write_tree(out: Path, images: dict[str, np.ndarray], labels: dict[str, np.ndarray], classes: list[int]) -> int:
    """<out>/<split>/<NN-class name>/<index>.png for the images of `classes`; returns how many were written."""
    count = 0
    for split in ("train", "test"):
        for c in classes:
            folder = out / split / f"{c:02d}-{CLASSES[c].replace('/', '-').replace(' ', '-').lower()}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in np.flatnonzero(labels[split] == c):
                Image.fromarray(images[split][i]).save(folder / f"{i:05d}.png")
                count += 1
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", nargs="+", type=int, default=[0, 1, 3, 5, 8], help="class indices of the source task")
    ap.add_argument("--out", nargs=2, type=Path, default=[Path("runs/fm-source"), Path("runs/fm-target")],
                    metavar=("SOURCE_DIR", "TARGET_DIR"))  # fmt: skip
    args = ap.parse_args()
    bad = [c for c in args.source if not 0 <= c < len(CLASSES)]
    if bad or not 0 < len(set(args.source)) < len(CLASSES):
        ap.error(f"--source {args.source}: give 1 to 9 distinct class indices in 0..9")
    for d in args.out:
        if d.exists():
            ap.error(f"{d} exists; remove it or choose another --out")
    images, labels = {}, {}
    for split in ("train", "test"):
        images[split], labels[split] = load_fashion_mnist(split)
    source = sorted(set(args.source))
    target = [c for c in range(len(CLASSES)) if c not in source]
    for d, classes in zip(args.out, (source, target)):
        n = write_tree(d, images, labels, classes)
        print(f"{d}: {n} images of {', '.join(CLASSES[c] for c in classes)}")


if __name__ == "__main__":
    main()
