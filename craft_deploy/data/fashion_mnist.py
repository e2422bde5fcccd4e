"""Fashion-MNIST from IDX files: Debian's `dataset-fashion-mnist`, torchvision's layout, or a download."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from craft_deploy import CraftError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array, checking its header against its size."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise CraftError(f"{path} could not be read ({e}); reinstall the dataset") from e
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise CraftError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise CraftError(f"{path} is truncated: header says {shape}, file holds {body.size} values")
    return body.reshape(shape).copy()


def _candidates(root: Path | None) -> list[Path]:
    dirs = []
    if root is not None:
        dirs += [root / "FashionMNIST" / "raw", root]
    dirs.append(DEBIAN_DIR)
    return dirs


def _find(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem + ".gz", stem):
            if (d / name).is_file():
                return d / name
    return None


def load_fashion_mnist(split: str, root: Path | None = None, download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of the official `split` ("train" or "test")."""
    dirs = _candidates(root)
    img_stem, lbl_stem = _FILES[split]
    img, lbl = _find(dirs, img_stem), _find(dirs, lbl_stem)
    if (img is None or lbl is None) and root is not None and download:
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(root), train=split == "train", download=True)
        except Exception as e:  # offline: fall through to the error below, which says what to do
            download_error = f" (download into {root} failed: {type(e).__name__})"
        else:
            download_error = ""
        img, lbl = _find(dirs, img_stem), _find(dirs, lbl_stem)
    else:
        download_error = ""
    if img is None or lbl is None:
        looked = ", ".join(str(d) for d in dirs)
        raise CraftError(
            f"Fashion-MNIST {split} files ({img_stem}[.gz], {lbl_stem}[.gz]) not found in: {looked}{download_error}. "
            "Install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass --data-root DIR "
            "where the internet is reachable to download them there"
        )
    images, labels = read_idx(img), read_idx(lbl)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise CraftError(f"{img} and {lbl} do not belong together: {images.shape} vs {labels.shape}")
    return images, labels.astype(np.int64)
