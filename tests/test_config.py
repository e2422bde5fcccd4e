import json

import pytest

from craft_deploy import CraftError
from craft_deploy.compress import from_flags
from craft_deploy.config import (
    AnalyzeConfig,
    BenchConfig,
    ExportConfig,
    FinetuneConfig,
    parse_batch_sizes,
    parse_quant,
    parse_sparsity,
)


@pytest.mark.parametrize(
    "cfg",
    [
        FinetuneConfig(optimizer="sam", rho=0.1, train_subset=100),
        from_flags(sparsity="2:4", quant="w8a8", include=("blocks.*",)),
        ExportConfig(verify_samples=8),
        ExportConfig(format="tensorrt", precision="fp16", batch_sizes=(1, 4, 8), sparse=True, timing_cache="t.bin"),
        BenchConfig(batch_sizes=(1, 8, 32)),
        AnalyzeConfig(lambda_batchnorm="batch"),
    ],
)
def test_config_round_trips_through_json(cfg):
    again = type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(CraftError, match="no field"):
        FinetuneConfig.from_dict({"optimiser": "adam"})


@pytest.mark.parametrize(
    "text, expected",
    [("2:4", ("nm", (2, 4))), ("16:32", ("nm", (16, 32))), ("0.5", ("unstructured", 0.5)), (None, None)],
)
def test_parse_sparsity(text, expected):
    assert parse_sparsity(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("4:2", "try --sparsity 2:4"),
        ("1.5", r"in \(0, 1\)"),
        ("0", r"in \(0, 1\)"),
        ("1.0", r"in \(0, 1\)"),
        ("2:2", "0 < N < M"),
        ("a:b", "N:M"),
        ("half", "neither"),
    ],
)
def test_parse_sparsity_errors_say_what_is_accepted(text, message):
    with pytest.raises(CraftError, match=message):
        parse_sparsity(text)


@pytest.mark.parametrize("text, expected", [("w8a8", (8, 8)), ("W6A6", (6, 6)), ("w4a16", (4, 16))])
def test_parse_quant(text, expected):
    assert parse_quant(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [("w9a3", "weight bits must be 2..8"), ("w8a9", "activation bits"), ("w4", "wXaY"), ("int8", "wXaY")],
)
def test_parse_quant_errors(text, message):
    with pytest.raises(CraftError, match=message):
        parse_quant(text)


@pytest.mark.parametrize("text", ["0", "1,0", "-1", "", "a"])
def test_batch_sizes_must_be_positive_integers(text):
    with pytest.raises(CraftError, match="batch"):
        parse_batch_sizes(text)


def test_finetune_rejects_negative_rho():
    with pytest.raises(CraftError, match="--rho must be positive"):
        FinetuneConfig(rho=-1)


def test_compress_needs_something_to_do():
    with pytest.raises(CraftError, match="nothing to do"):
        from_flags()


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"precision": "int4"}, "--precision 'int4' is not supported; choose one of auto, fp32, fp16, int8"),
        ({"target": "openvino"}, "choose one of tensorrt, ort-cpu"),
        ({"opset": 13}, "--opset must be >= 17"),
        ({"batch_sizes": (0,)}, "positive"),
        ({"workspace_gb": 0}, "--workspace-gb"),
    ],
)
def test_export_options_are_validated(kw, message):
    with pytest.raises(CraftError, match=message):
        ExportConfig(**kw)


def test_analyze_rejects_an_unknown_batchnorm_mode():
    with pytest.raises(CraftError, match="--lambda-batchnorm must be eval or batch"):
        AnalyzeConfig(lambda_batchnorm="train")
