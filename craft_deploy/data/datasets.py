"""The datasets craft-deploy knows, each split into fixed, seeded train/val/test subsets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from craft_deploy import CraftError

# The CrAFT paper's seven downstream tasks, as torchvision datasets: name -> (class, train kwargs, test kwargs).
_TORCHVISION = {
    "cifar10": ("CIFAR10", {"train": True}, {"train": False}),
    "cifar100": ("CIFAR100", {"train": True}, {"train": False}),
    "flowers102": ("Flowers102", {"split": "train"}, {"split": "test"}),
    "oxford-pets": ("OxfordIIITPet", {"split": "trainval"}, {"split": "test"}),
    "stanford-cars": ("StanfordCars", {"split": "train"}, {"split": "test"}),
    "fgvc-aircraft": ("FGVCAircraft", {"split": "trainval"}, {"split": "test"}),
    "food101": ("Food101", {"split": "train"}, {"split": "test"}),
}
DATASETS = ["fashion-mnist", "digits", *_TORCHVISION, "imagefolder:PATH"]


class ArrayImageDataset(Dataset):
    """Images held in memory as uint8 (N, H, W) or (N, H, W, 3), resized and normalised on access."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, img_size: int, mean: list[float], std: list[float]):
        self.images, self.labels = images, labels
        self.img_size = img_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(np.ascontiguousarray(self.images[i])).float().div_(255.0)
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x[None], size=(self.img_size, self.img_size), mode="bilinear", antialias=True)[0]
        x = x.expand(3, -1, -1)  # grayscale -> 3 channels
        return (x - self.mean) / self.std, int(self.labels[i])


@dataclass
class Splits:
    """Train/val/test datasets of one task, with what is needed to record where the numbers came from."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    class_names: list[str] | None
    info: dict[str, Any] = field(default_factory=dict)


def _seeded_perm(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


def _subset(ds: Dataset, idx: np.ndarray, limit: int | None) -> Subset:
    if limit is not None:
        idx = idx[:limit]
    return Subset(ds, idx.tolist())


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise CraftError(f"{name} must be a positive number of images, got {value}")


def _pil_transform(img_size: int, mean: list[float], std: list[float]) -> Callable:
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Lambda(lambda im: im.convert("RGB")),
            T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def _official(name: str, root: Path | None, img_size: int, mean, std, download: bool):
    """(train dataset, test dataset, class names) for the datasets with an official train/test split."""
    if name == "fashion-mnist":
        from craft_deploy.data.fashion_mnist import CLASSES, load_fashion_mnist

        xtr, ytr = load_fashion_mnist("train", root, download)
        xte, yte = load_fashion_mnist("test", root, download)
        return (
            ArrayImageDataset(xtr, ytr, img_size, mean, std),
            ArrayImageDataset(xte, yte, img_size, mean, std),
            CLASSES,
        )
    if name in _TORCHVISION:
        import torchvision.datasets as tvd

        if root is None:
            raise CraftError(f"--data {name} needs --data-root DIR (where it is, or where to download it)")
        cls_name, train_kw, test_kw = _TORCHVISION[name]
        cls = getattr(tvd, cls_name)
        tf = _pil_transform(img_size, mean, std)
        try:
            train = cls(str(root), transform=tf, download=download, **train_kw)
            test = cls(str(root), transform=tf, download=download, **test_kw)
        except Exception as e:
            raise CraftError(
                f"{name} could not be loaded from {root} ({type(e).__name__}: {str(e)[:200]}); put torchvision's "
                f"{cls_name} layout there, or run where the internet is reachable to download it"
            ) from e
        classes = getattr(train, "classes", None)
        return train, test, list(classes) if classes else None
    raise KeyError(name)


def load_splits(
    name: str,
    img_size: int,
    mean: list[float],
    std: list[float],
    root: str | Path | None = None,
    train_subset: int | None = None,
    eval_subset: int | None = None,
    seed: int = 0,
    download: bool = True,
) -> Splits:
    """Load dataset `name` with fixed, seeded splits: val is carved from the training split, never from test.

    `train_subset` keeps the first N of a seeded permutation of the training images; `eval_subset` does the same for
    val and test. The same seed always gives the same images.
    """
    _check_limit("--train-subset", train_subset)
    _check_limit("--eval-subset", eval_subset)
    root = Path(root) if root is not None else None
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
        full = ArrayImageDataset(images, d.target.astype(np.int64), img_size, mean, std)
        perm = _seeded_perm(len(full), seed)
        n_test = n_val = len(full) // 5
        test_idx, val_idx, train_idx = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
        train_ds = val_ds = test_ds = full
        classes = [str(i) for i in range(10)]
    elif name.startswith("imagefolder:"):
        train_ds, val_ds, test_ds, train_idx, val_idx, test_idx, classes = _imagefolder(
            Path(name.split(":", 1)[1]), img_size, mean, std, seed
        )
    elif name == "fashion-mnist" or name in _TORCHVISION:
        train_ds, test_ds, classes = _official(name, root, img_size, mean, std, download)
        perm = _seeded_perm(len(train_ds), seed)
        n_val = min(5000, len(train_ds) // 10)
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        test_idx = _seeded_perm(len(test_ds), seed + 1)
        val_ds = train_ds
    else:
        raise CraftError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    num_classes = len(classes) if classes else int(max(int(_label(train_ds, i)) for i in train_idx[:1000])) + 1
    splits = Splits(
        train=_subset(train_ds, train_idx, train_subset),
        val=_subset(val_ds, val_idx, eval_subset),
        test=_subset(test_ds, test_idx, eval_subset),
        num_classes=num_classes,
        class_names=classes,
    )
    splits.info = {
        "dataset": name,
        "root": str(root) if root else None,
        "seed": seed,
        "img_size": img_size,
        "train": len(splits.train),
        "val": len(splits.val),
        "test": len(splits.test),
        "train_available": len(train_idx),
    }
    return splits


def _label(ds: Dataset, i: int) -> int:
    return ds.labels[i] if hasattr(ds, "labels") else ds[i][1]


def _imagefolder(path: Path, img_size: int, mean, std, seed: int):
    from torchvision.datasets import ImageFolder

    if not path.is_dir():
        raise CraftError(f"imagefolder:{path}: no such directory (expected class sub-folders of images)")
    tf = _pil_transform(img_size, mean, std)
    try:
        if (path / "train").is_dir() and ((path / "test").is_dir() or (path / "val").is_dir()):
            train = ImageFolder(str(path / "train"), transform=tf)
            test = ImageFolder(str(path / ("test" if (path / "test").is_dir() else "val")), transform=tf)
            perm = _seeded_perm(len(train), seed)
            n_val = max(1, len(train) // 10)
            return (
                train,
                train,
                test,
                perm[n_val:],
                perm[:n_val],
                _seeded_perm(len(test), seed + 1),
                list(train.classes),
            )
        full = ImageFolder(str(path), transform=tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise CraftError(f"imagefolder:{path}: {e}") from e
    perm = _seeded_perm(len(full), seed)
    n = max(1, len(full) // 10)
    return full, full, full, perm[2 * n :], perm[n : 2 * n], perm[:n], list(full.classes)


def calibration_subset(train: Dataset, n: int, seed: int = 0) -> Subset:
    """`n` images drawn (seeded) from the training split only, for calibration and statistics."""
    if n <= 0:
        raise CraftError(f"--calib-samples must be positive, got {n}")
    if n > len(train):
        raise CraftError(f"--calib-samples {n} is larger than the training split ({len(train)} images)")
    idx = _seeded_perm(len(train), seed + 7)[:n]
    return Subset(train, idx.tolist())


def splits_for_manifest(
    manifest: dict[str, Any],
    data_root: str | Path | None = None,
    eval_subset: int | None = None,
    dataset: str | None = None,
) -> Splits:
    """The splits a model bundle (or an exported model's metadata) was fine-tuned on: same data, seed, input size."""
    data = manifest.get("data") or {}
    name = dataset or manifest.get("dataset")
    if not name:
        raise CraftError("the model does not record its dataset; pass --data NAME")
    return load_splits(
        name,
        int(manifest["input_size"][-1]),
        manifest["mean"],
        manifest["std"],
        data_root or data.get("root"),
        eval_subset=eval_subset,
        seed=int(data.get("seed", 0)),
    )
