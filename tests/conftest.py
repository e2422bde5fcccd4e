"""Shared fixtures: tiny real timm models trained for real on scikit-learn's bundled digits."""

from __future__ import annotations

import pytest
import torch

from craft_deploy.config import ExportConfig, FinetuneConfig

TINY = dict(
    model="test_efficientnet",
    data="digits",
    pretrained=False,
    epochs=1,
    batch_size=32,
    img_size=32,
    threads=2,
    warmup_steps=5,
)


def cli_args(cfg: dict) -> list[str]:
    """`craft-deploy finetune` flags for a FinetuneConfig-style dict such as TINY."""
    args: list[str] = []
    for key, value in cfg.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            args += [flag, str(value)]
    return args


def tiny_model_and_calib(name: str = "test_efficientnet", images: int = 24):
    """A randomly initialised tiny timm model (eval mode), a CalibLoop over fixed random images, and the images."""
    from craft_deploy.models import load_model

    torch.manual_seed(0)
    model = load_model(name, num_classes=10, pretrained=False, img_size=32).eval()
    data = torch.randn(images, 3, 32, 32)

    def calib(m):
        with torch.no_grad():
            for chunk in data.split(8):
                m(chunk)

    return model, calib, data


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    try:
        import tensorrt  # noqa: F401

        has_trt = True
    except ImportError:
        has_trt = False
    for item in items:
        if item.get_closest_marker("gpu") and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch here"))
        if item.get_closest_marker("tensorrt") and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT (pip install 'craft-deploy[tensorrt]')"))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """test_efficientnet fine-tuned one epoch on digits at 32 px (a real bundle directory)."""
    from craft_deploy.finetune import run

    out = tmp_path_factory.mktemp("tiny") / "bundle"
    run(FinetuneConfig(**TINY), out)
    return out


@pytest.fixture(scope="session")
def tiny_w8a8(tiny_bundle, tmp_path_factory):
    from craft_deploy.compress import from_flags, run

    out = tmp_path_factory.mktemp("tiny") / "w8a8"
    run(from_flags(quant="w8a8", calib_samples=64), tiny_bundle, out)
    return out


@pytest.fixture(scope="session")
def tiny_w8a8_onnx(tiny_w8a8, tmp_path_factory):
    from craft_deploy.export import run

    out = tmp_path_factory.mktemp("tiny") / "w8a8-onnx"
    run(ExportConfig(verify_samples=32), tiny_w8a8, out)
    return out


@pytest.fixture(scope="session")
def tiny_vit_bundle(tmp_path_factory):
    """test_vit (LayerNorm, GELU, attention) fine-tuned one epoch on digits at 32 px."""
    from craft_deploy.finetune import run

    out = tmp_path_factory.mktemp("tiny") / "vit"
    run(FinetuneConfig(**{**TINY, "model": "test_vit"}), out)
    return out
