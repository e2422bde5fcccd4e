import gzip

import numpy as np
import pytest

from craft_deploy import CraftError
from craft_deploy.data import calibration_subset, load_splits
from craft_deploy.data import fashion_mnist as fm

HALF = [0.5, 0.5, 0.5]


def test_digits_splits_are_seeded_and_disjoint():
    a = load_splits("digits", 16, HALF, HALF, seed=3)
    b = load_splits("digits", 16, HALF, HALF, seed=3)
    assert a.train.indices == b.train.indices and a.test.indices == b.test.indices
    sets = [set(a.train.indices), set(a.val.indices), set(a.test.indices)]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    c = load_splits("digits", 16, HALF, HALF, seed=4)
    assert c.train.indices != a.train.indices
    x, y = a.train[0]
    assert tuple(x.shape) == (3, 16, 16) and 0 <= y < 10 and a.num_classes == 10


def test_subsets_take_the_first_n_of_the_seeded_order():
    full = load_splits("digits", 8, HALF, HALF)
    sub = load_splits("digits", 8, HALF, HALF, train_subset=100, eval_subset=50)
    assert sub.train.indices == full.train.indices[:100]
    assert len(sub.val) == len(sub.test) == 50


@pytest.mark.skipif(
    not (fm.DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed (make data installs it)",
)
def test_fashion_mnist_from_debian_package():
    s = load_splits("fashion-mnist", 64, HALF, HALF, train_subset=500, eval_subset=200)
    assert s.num_classes == 10 and s.class_names[9] == "Ankle boot"
    assert s.info["train_available"] == 55000 and len(s.test) == 200
    x, y = s.test[0]
    assert tuple(x.shape) == (3, 64, 64)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert set(s.val.indices).isdisjoint(s.train.indices)


def test_missing_fashion_mnist_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "nothing-here")
    with pytest.raises(CraftError) as e:
        load_splits("fashion-mnist", 28, HALF, HALF, root=tmp_path / "root", download=False)
    msg = str(e.value)
    assert str(tmp_path / "nothing-here") in msg and "apt-get install dataset-fashion-mnist" in msg


def test_fashion_mnist_from_torchvision_layout(tmp_path, monkeypatch):
    """IDX files under ROOT/FashionMNIST/raw are read (here: small real-format files we write)."""
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "nothing-here")
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 20)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(
            b"\x00\x00\x08\x03" + np.array([n, 28, 28], ">u4").tobytes() + imgs.tobytes()
        )
        with gzip.open(raw / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(b"\x00\x00\x08\x01" + np.array([n], ">u4").tobytes() + labels.tobytes())
    s = load_splits("fashion-mnist", 28, HALF, HALF, root=tmp_path, download=False)
    assert s.info["train_available"] + len(s.val) == 40 and len(s.test) == 20
    (raw / "t10k-images-idx3-ubyte").write_bytes((raw / "t10k-images-idx3-ubyte").read_bytes()[:100])
    with pytest.raises(CraftError, match="truncated"):
        load_splits("fashion-mnist", 28, HALF, HALF, root=tmp_path, download=False)


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(CraftError, match="unknown dataset 'mnist-3d'.*fashion-mnist"):
        load_splits("mnist-3d", 32, HALF, HALF)


def test_torchvision_dataset_needs_a_root():
    with pytest.raises(CraftError, match="--data-root"):
        load_splits("cifar10", 32, HALF, HALF)


def test_imagefolder(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.fromarray(np.full((12, 12, 3), 25 * i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    s = load_splits(f"imagefolder:{tmp_path}", 16, HALF, HALF)
    assert s.class_names == ["cat", "dog"] and len(s.train) + len(s.val) + len(s.test) == 20
    assert tuple(s.train[0][0].shape) == (3, 16, 16)
    with pytest.raises(CraftError, match="no such directory"):
        load_splits(f"imagefolder:{tmp_path / 'nope'}", 16, HALF, HALF)


def test_calibration_subset_comes_from_train_and_is_checked():
    s = load_splits("digits", 8, HALF, HALF)
    cal = calibration_subset(s.train, 64)
    assert len(cal) == 64
    drawn = {s.train.indices[i] for i in cal.indices}  # positions in the underlying digits array
    assert drawn <= set(s.train.indices) and drawn.isdisjoint(s.val.indices) and drawn.isdisjoint(s.test.indices)
    with pytest.raises(CraftError, match="larger than the training split"):
        calibration_subset(s.train, len(s.train) + 1)
    with pytest.raises(CraftError, match="must be positive"):
        calibration_subset(s.train, 0)
