"""The house: registries a third party extends, every method's restore on load, exit codes, self-validating bundles."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_compress import METHOD_EXAMPLES

from conftest import tiny_model_and_calib
from craft_deploy import EXIT_INTERRUPTED, EXIT_REGRESSION, EXIT_VERIFICATION, CraftError
from craft_deploy.cli.main import main
from craft_deploy.compress import METHODS, PruneConfig, QuantConfig
from craft_deploy.compress.prune import PRUNE_SCORES, PruneScore, register_prune_score
from craft_deploy.models import load_bundle, save_bundle
from craft_deploy.models.bundle import make_manifest
from craft_deploy.toolkit.calibrators import CALIBRATORS, Calibrator, register_calibrator
from craft_deploy.toolkit.config_base import Config
from craft_deploy.toolkit.registry import apply_method, manifest_entry


def _cli(args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


# --- registries a third party extends -------------------------------------------------------------------------------


def test_a_calibrator_and_a_pruning_score_added_from_outside_work_through_the_cli(tiny_bundle, tmp_path):
    @register_calibrator("halfmax")
    class HalfMax(Calibrator):
        """Half the observed range (clips on purpose, so its effect is visible)."""

        histogram = False
        weight_method = "minmax"  # as min-max pairs, so that every layer sees the same inputs in both runs

        def range(self, obs, bits):
            return min(obs.lo, 0.0) / 2, max(obs.hi, 0.0) / 2

    @register_prune_score("largest")
    class Largest(PruneScore):
        """Prunes the largest weights: the opposite of magnitude, so the result is easy to check."""

        def score(self, magnitude, input_norms):
            return -magnitude

    try:
        assert CALIBRATORS["halfmax"] is HalfMax and PRUNE_SCORES["largest"] is Largest
        help_text = _cli(["compress", "--help"]).output
        assert "halfmax" in help_text and "largest" in help_text
        outs = {}
        for calib in ("minmax", "halfmax"):
            outs[calib] = tmp_path / calib
            res = _cli(["compress", tiny_bundle, "--quant", "w8a8", "--calib-method", calib, "--calib-samples", 32,
                        "--out", outs[calib]])  # fmt: skip
            assert res.exit_code == 0, res.output
        ranges = {
            c: json.loads((o / "compress.json").read_text())["methods"][0]["activation_ranges"] for c, o in outs.items()
        }
        assert json.loads((outs["halfmax"] / "compress.json").read_text())["methods"][0]["calibration"] == "halfmax"
        for name, (lo, hi) in ranges["minmax"].items():
            assert ranges["halfmax"][name][1] == pytest.approx(hi / 2, rel=1e-3, abs=1e-5)

        res = _cli(["compress", tiny_bundle, "--sparsity", "0.5", "--prune-method", "largest", "--out", tmp_path / "p"])
        assert res.exit_code == 0, res.output
        dense, pruned = load_bundle(tiny_bundle).model, load_bundle(tmp_path / "p").model
        layer = json.loads((tmp_path / "p" / "compress.json").read_text())["methods"][0]["layers"]
        name = next(iter(layer))
        w0, w1 = dense.get_submodule(name).weight, pruned.get_submodule(name).weight
        assert w0[w1 == 0].abs().min() >= w0[w1 != 0].abs().max()  # every pruned weight was larger than every kept
    finally:
        del CALIBRATORS["halfmax"], PRUNE_SCORES["largest"]
    assert "halfmax" not in _cli(["compress", "--help"]).output


def test_an_export_target_registered_from_outside_is_a_format_with_staging_verification_and_record(
    tiny_bundle, tmp_path
):
    import numpy as np

    from craft_deploy.export.targets import TARGETS, register_target
    from craft_deploy.export.targets.base import record
    from craft_deploy.runtimes.tolerance import compare_outputs

    verdict = {"passed": True}

    @register_target("npz-logits", artifact="logits.npz", feeds="npz", help="npz-logits (PyTorch's logits, a test)")
    def export_npz(job):
        path = job.stage / "logits.npz"
        np.savez(path, logits=job.ref)
        got = np.load(path)["logits"]
        check = {**compare_outputs(job.ref, got), **verdict}
        return record(job, path, verification={"npz": check})

    try:
        assert "npz-logits (PyTorch's logits, a test)" in " ".join(_cli(["export", "--help"]).output.split())
        res = _cli(["export", tiny_bundle, "--format", "npz-logits", "--verify-samples", 8, "--out", tmp_path / "e"])
        assert res.exit_code == 0, res.output
        rec = json.loads((tmp_path / "e" / "export.json").read_text())
        assert rec["format"] == "npz-logits" and rec["file"] == "logits.npz" and rec["verification"]["npz"]["passed"]
        assert np.load(tmp_path / "e" / "logits.npz")["logits"].shape[0] == 8
        verdict["passed"] = False  # the shared wrapper refuses a target's failed verification: exit 4, nothing written
        res = _cli(["export", tiny_bundle, "--format", "npz-logits", "--verify-samples", 8, "--out", tmp_path / "f"])
        assert res.exit_code == EXIT_VERIFICATION and not (tmp_path / "f").exists(), res.output
    finally:
        del TARGETS["npz-logits"]
    res = _cli(["export", tiny_bundle, "--format", "npz-logits", "--out", tmp_path / "g"])
    assert res.exit_code == 2 and "npz-logits" in res.output


def test_a_placement_and_a_weight_rounding_registered_from_outside_work_through_compress_and_export(
    tiny_bundle, tmp_path
):
    """A placement is one registration that both `compress --placement` and `export --target` take; a weight rounding
    is one function that `compress --weight-rounding` calls with the calibration loop."""
    import onnx

    from craft_deploy.compress.quant import WEIGHT_ROUNDINGS, register_weight_rounding
    from craft_deploy.toolkit.placement import PLACEMENTS, Placement, register_placement
    from craft_deploy.toolkit.qmodules import quantized_layers

    register_placement(
        Placement("pool-only", "pool-only (the pooled head's input and output too, a test)",
                  tensors=lambda model, quantized: {"global_pool": ["input", "output"]})
    )  # fmt: skip
    calls = []

    @register_weight_rounding("zero-first")
    def zero_first(model, calib):
        calls.append(calib)
        next(iter(quantized_layers(model).values())).parametrizations.weight.original.zero_()

    try:
        compress_help = " ".join(_cli(["compress", "--help"]).output.split())
        assert "pool-only" in compress_help and "zero-first" in compress_help
        assert "pool-only (the pooled head" in " ".join(_cli(["export", "--help"]).output.split())
        res = _cli(["compress", tiny_bundle, "--quant", "w8a8", "--placement", "pool-only", "--weight-rounding",
                    "zero-first", "--calib-samples", 32, "--out", tmp_path / "c"])  # fmt: skip
        assert res.exit_code == 0, res.output
        assert len(calls) == 1 and callable(calls[0])
        bundle = load_bundle(tmp_path / "c")
        entry = bundle.manifest["methods"][0]["state"]
        assert entry["placement"] == "pool-only" and set(entry["tensors"]) == {"global_pool"}
        first = next(iter(quantized_layers(bundle.model).values()))
        assert first.weight.abs().max() == 0  # the rounding ran on the layer and the bundle kept what it did
        res = _cli(["export", tmp_path / "c", "--target", "pool-only", "--verify-samples", 16, "--out", tmp_path / "e"])
        assert res.exit_code == 0, res.output
        graph = onnx.load(tmp_path / "e" / "model.onnx").graph
        producer = {o: n for n in graph.node for o in n.output}
        pool = next(n for n in graph.node if n.op_type == "GlobalAveragePool")
        assert producer[pool.input[0]].op_type == "DequantizeLinear"  # the pool reads a quantized tensor
        after = {pool.output[0]}  # and what it writes (through the flatten) is quantized
        after |= {o for n in graph.node if set(n.input) & after and n.op_type == "Flatten" for o in n.output}
        assert any(n.op_type == "QuantizeLinear" and n.input[0] in after for n in graph.node)
    finally:
        del PLACEMENTS["pool-only"], WEIGHT_ROUNDINGS["zero-first"]
    res = _cli(["export", tmp_path / "c", "--target", "pool-only", "--out", tmp_path / "f"])
    assert res.exit_code == 2 and "pool-only" in res.output and not (tmp_path / "f").exists()


def test_a_method_registered_from_outside_brings_its_options_its_from_flags_and_its_recipe_token(tiny_bundle, tmp_path):
    """One registration, no other edit: the method is an option of `compress`, a config of `from_flags` and a study
    recipe token."""
    from dataclasses import dataclass

    from craft_deploy.compress import from_flags
    from craft_deploy.study.recipes import parse_recipe
    from craft_deploy.toolkit.flags import Flag, Token
    from craft_deploy.toolkit.layers import select_layers
    from craft_deploy.toolkit.registry import Method, MethodConfig, register_method

    @dataclass(frozen=True)
    class ScaleConfig(MethodConfig):
        factor: float | None = None

        flags = (
            Flag(
                "scale-weights",
                "Multiply every selected weight by F (a test method).",
                field="factor",
                kind=float,
                tokens=(
                    Token(
                        "scaleF",
                        pattern=r"scale(\d+(\.\d+)?)",
                        value=lambda m, t: float(m.group(1)),
                        word=lambda v: f"scale{v:g}",
                        position=5,
                    ),
                ),  # fmt: skip
                example="2",
                what="a scale",
            ),
        )
        trigger = ("scale_weights",)
        verb = "scales"

    @register_method("scale", ScaleConfig)
    class Scale(Method):
        def apply(self, model, cfg, calib):
            layers, _ = select_layers(model, cfg.include, cfg.exclude)
            with torch.no_grad():
                for mod in layers.values():
                    mod.weight.mul_(cfg.factor)
            return {"layers": list(layers), "state": {}, "summary": f"scaled {len(layers)} layers by {cfg.factor:g}"}

    try:
        assert "--scale-weights" in _cli(["compress", "--help"]).output
        assert from_flags(scale_weights=2.0).methods == (ScaleConfig(factor=2.0),)
        assert [type(m) for m in from_flags(scale_weights=2.0, quant="w8a8").methods] == [QuantConfig, ScaleConfig]
        (recipe,) = parse_recipe("w8a8+scale2")
        assert recipe.name == "scale2+w8a8+mse" and recipe.kwargs == {
            "scale_weights": 2.0,
            "quant": "w8a8",
            "calib_method": "mse",
        }
        assert [type(m) for m in from_flags(**recipe.kwargs).methods] == [QuantConfig, ScaleConfig]
        res = _cli(["compress", tiny_bundle, "--scale-weights", "2", "--calib-samples", 8, "--out", tmp_path / "s"])
        assert res.exit_code == 0, res.output
        assert "scaled" in res.output
        rec = json.loads((tmp_path / "s" / "compress.json").read_text())
        assert rec["methods"][0]["method"] == "scale"
        dense, scaled = load_bundle(tiny_bundle).model, load_bundle(tmp_path / "s").model
        name = rec["methods"][0]["layers"][0]
        assert torch.equal(scaled.get_submodule(name).weight, 2 * dense.get_submodule(name).weight)
    finally:
        del METHODS["scale"]
    assert "--scale-weights" not in _cli(["compress", "--help"]).output
    with pytest.raises(CraftError, match="unknown token 'scale2'"):
        parse_recipe("w8a8+scale2")


def test_plugins_load_from_the_environment_in_a_real_process(tmp_path):
    (tmp_path / "my_calibrators.py").write_text(
        textwrap.dedent(
            """
            from craft_deploy.toolkit.calibrators import Calibrator, register_calibrator

            @register_calibrator("p99-plugin")
            class P99(Calibrator):
                def range(self, obs, bits):
                    return 0.0, obs.hi * 0.99
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "CRAFT_DEPLOY_PLUGINS": "my_calibrators"}
    cmd = [sys.executable, "-m", "craft_deploy.cli.main", "compress", "--help"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "p99-plugin" in res.stdout, res.stderr
    env["CRAFT_DEPLOY_PLUGINS"] = "no_such_plugin_module"
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "no_such_plugin_module" in res.stderr and "Traceback" not in res.stderr


# --- every registered method restores on load -----------------------------------------------------------------------

ROUND_TRIPS = [
    ("test_efficientnet", [METHOD_EXAMPLES[name] for name in METHODS]),  # every method, in registry order
    (
        "test_efficientnet",
        [
            PruneConfig(ratio=0.5, score="wanda"),
            # groups of 8 do not divide the stem's 27 weights per channel, the depthwise 9, the SE expansion's 12
            QuantConfig(
                w_bits=4, a_bits=16, w_granularity="group", group_size=8, exclude=("conv_stem", "*conv_dw", "*se.*")
            ),
        ],
    ),
    ("test_vit", [PruneConfig(n=2, m=4), QuantConfig(w_bits=6, a_bits=6, quant_attention=True, calib_method="mse")]),
    ("test_resnet", [QuantConfig(w_bits=7, a_bits=8, placement="ort-cpu")]),
]


@pytest.mark.parametrize("name", list(METHODS))
def test_every_registered_method_round_trips_through_a_bundle(name, tmp_path):
    _round_trip("test_efficientnet", [METHOD_EXAMPLES[name]], tmp_path)


@pytest.mark.parametrize("arch, configs", ROUND_TRIPS)
def test_method_chains_round_trip_through_a_bundle(arch, configs, tmp_path):
    _round_trip(arch, configs, tmp_path)


def _round_trip(arch, configs, tmp_path):
    model, calib, data = tiny_model_and_calib(arch)
    manifest = make_manifest(arch, 10, [3, 32, 32], [0.5] * 3, [0.5] * 3)
    for cfg in configs:
        manifest["methods"].append(manifest_entry(cfg, apply_method(model, cfg, calib)))
    with torch.no_grad():
        ref = model.eval()(data)
    save_bundle(model, tmp_path / "b", json.loads(json.dumps(manifest)))
    loaded = load_bundle(tmp_path / "b")
    with torch.no_grad():
        assert torch.equal(loaded.model(data), ref)
    assert [e["method"] for e in loaded.manifest["methods"]] == [m["method"] for m in manifest["methods"]]


def test_configs_round_trip_through_json_and_refuse_wrong_types():
    for cfg in [*METHOD_EXAMPLES.values(), QuantConfig(include=("blocks.*",), calib_method="mse")]:
        assert type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(Exception, match=r"QuantConfig.w_bits must be int, got '8'"):
        QuantConfig.from_dict({"w_bits": "8"})
    with pytest.raises(Exception, match=r"PruneConfig.ratio must be float \| None, got True"):
        PruneConfig.from_dict({"ratio": True})
    assert issubclass(QuantConfig, Config)


def test_importing_the_config_imports_no_stage():
    code = "import sys, craft_deploy.config; print(sorted(m for m in sys.modules if m.startswith('craft_deploy')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    # the configs stand on the toolkit's config base alone: no stage, no torch-level module of the toolkit
    expected = ["craft_deploy", "craft_deploy.config", "craft_deploy.toolkit", "craft_deploy.toolkit.config_base"]
    assert out.strip() == str(expected)


# --- exit codes ------------------------------------------------------------------------------------------------------


def test_exit_code_0_on_success():
    assert _cli(["info"]).exit_code == 0


@pytest.mark.parametrize(
    "args",
    [
        ["compress", "{bundle}", "--quant", "w8a8", "--calib-method", "nope"],  # click's own refusal
        ["compress", "{bundle}", "--quant", "w9a8"],  # a value our config refuses
        ["compress", "{bundle}", "--sparsity", "4:2"],
        ["finetune", "--optimizer", "lion"],
        ["export", "{missing}"],  # a bundle that is not there
        ["bench", "{missing}/model.onnx"],
    ],
)
def test_exit_code_2_on_bad_usage_or_input(args, tiny_bundle, tmp_path):
    filled = [a.format(bundle=tiny_bundle, missing=tmp_path / "none") for a in args]
    res = _cli([*filled, "--out", tmp_path / "out"])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()


def test_exit_code_3_when_the_regression_gate_fails():
    assert EXIT_REGRESSION == 3  # tests/test_gate.py runs real failing gates through the CLI against this constant


def test_exit_code_4_when_an_export_fails_its_verification(tiny_w8a8, tmp_path):
    res = _cli(["export", tiny_w8a8, "--verify-samples", 16, "--atol", "1e-9", "--out", tmp_path / "x"])
    assert res.exit_code == EXIT_VERIFICATION == 4, res.output
    assert "disagrees with PyTorch" in res.output and not (tmp_path / "x").exists()


def test_exit_code_130_when_interrupted(tiny_bundle, tmp_path, monkeypatch):
    import craft_deploy.compress

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(craft_deploy.compress, "run", interrupted)
    res = _cli(["compress", tiny_bundle, "--quant", "w8a8", "--out", tmp_path / "o"])
    assert res.exit_code == EXIT_INTERRUPTED == 130 and "interrupted" in res.output


def test_help_documents_the_exit_codes():
    out = _cli(["--help"]).output
    assert all(f"{code} " in out for code in ("0", "2", "3", "4", "130"))


# --- bundles validate themselves -------------------------------------------------------------------------------------


def _edit_manifest(fn):
    def edit(bundle):
        m = json.loads((bundle / "manifest.json").read_text())
        fn(m)
        (bundle / "manifest.json").write_text(json.dumps(m))

    return edit


def _edit_weights(fn):
    def edit(bundle):
        state = load_file(str(bundle / "model.safetensors"))
        fn(state)
        save_file(state, str(bundle / "model.safetensors"))

    return edit


def _quant_state(m):
    return next(e for e in m["methods"] if e["method"] == "quantize")["state"]


def _first_layer(m):
    return _quant_state(m)["layers"][next(iter(_quant_state(m)["layers"]))]


def _rename_first_layer(m):
    layers = _quant_state(m)["layers"]
    first = next(iter(layers))
    layers["no.such.layer"] = layers.pop(first)


def _drop_first_tensor(state):
    del state[next(iter(state))]


def _truncate(bundle):
    path = bundle / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


TAMPERED = {
    "manifest not JSON": lambda b: (b / "manifest.json").write_text("{not json"),
    "manifest missing": lambda b: (b / "manifest.json").unlink(),
    "manifest is a list": lambda b: (b / "manifest.json").write_text("[]"),
    "unknown schema": (_edit_manifest(lambda m: m.update(schema="craft-deploy/bundle/v9")), "schema"),
    "num_classes a string": (_edit_manifest(lambda m: m.update(num_classes="10")), "num_classes"),
    "num_classes huge": (_edit_manifest(lambda m: m.update(num_classes=10**12)), "num_classes"),
    "num_classes zero": (_edit_manifest(lambda m: m.update(num_classes=0)), "num_classes"),
    "num_classes changed": (_edit_manifest(lambda m: m.update(num_classes=11, class_names=None)), "wrong shape"),
    "input_size huge": (_edit_manifest(lambda m: m.update(input_size=[3, 10**6, 10**6])), "input_size"),
    "input_size short": (_edit_manifest(lambda m: m.update(input_size=[3, 32])), "input_size"),
    "std zero": (_edit_manifest(lambda m: m.update(std=[0.5, 0.0, 0.5])), "std"),
    "mean wrong length": (_edit_manifest(lambda m: m.update(mean=[0.5])), "mean"),
    "mean NaN": (_edit_manifest(lambda m: m.update(mean=[float("nan")] * 3)), "mean"),
    "class_names wrong length": (_edit_manifest(lambda m: m.update(class_names=["a"])), "class_names"),
    "unknown architecture": (_edit_manifest(lambda m: m.update(architecture="resnet_nope")), "resnet_nope"),
    "architecture not a string": (_edit_manifest(lambda m: m.update(architecture=123)), "architecture"),
    "other architecture": (_edit_manifest(lambda m: m.update(architecture="test_resnet")), "has no module"),
    "methods not a list": (_edit_manifest(lambda m: m.update(methods={"quantize": {}})), "methods"),
    "unknown method": (_edit_manifest(lambda m: m["methods"][0].update(method="distill")), "distill"),
    "method config wrong type": (_edit_manifest(lambda m: m["methods"][0]["config"].update(w_bits="8")), "w_bits"),
    "method config out of range": (_edit_manifest(lambda m: m["methods"][0]["config"].update(w_bits=99)), "bits"),
    "state layer not in model": (_edit_manifest(_rename_first_layer), "no.such.layer"),
    "state bits out of range": (_edit_manifest(lambda m: _first_layer(m).update(w_bits=99)), "w_bits"),
    "state group size absurd": (
        _edit_manifest(lambda m: _first_layer(m).update(w_granularity="group", group_size=7)),
        "group size 7",
    ),
    "state names a BatchNorm": (
        _edit_manifest(lambda m: _quant_state(m)["layers"].update({"bn1": _first_layer(m)})),
        "not a Linear or Conv2d",
    ),
    "weights missing": lambda b: (b / "model.safetensors").unlink(),
    "weights truncated": (_truncate, "corrupt or truncated"),
    "weights lack a tensor": (_edit_weights(_drop_first_tensor), "missing"),
    "weights carry an extra tensor": (_edit_weights(lambda s: s.update(extra=torch.zeros(3))), "unexpected"),
    "weights resized": (_edit_weights(lambda s: s.update({k: torch.zeros(1) for k in list(s)[:1]})), "wrong shape"),
}


@pytest.mark.parametrize("damage", list(TAMPERED))
def test_a_tampered_bundle_is_a_one_line_error_with_exit_2(damage, tiny_w8a8, tmp_path):
    edit = TAMPERED[damage]
    edit, expected = edit if isinstance(edit, tuple) else (edit, "")
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_w8a8, bundle)
    edit(bundle)
    res = _cli(["export", bundle, "--out", tmp_path / "out"])
    assert res.exit_code == 2, res.output
    message = res.output.strip()
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in res.output, res.output
    assert expected in message, message
    assert not (tmp_path / "out").exists()


# --- one config layer ------------------------------------------------------------------------------------------------


def test_cli_defaults_are_the_configs_defaults_never_a_second_copy():
    import dataclasses

    from craft_deploy.cli.main import _FieldDefault
    from craft_deploy.config import AnalyzeConfig, BenchConfig, CompressConfig, ExportConfig, FinetuneConfig

    configs = {
        "finetune": [FinetuneConfig],
        "compress": [CompressConfig, PruneConfig, QuantConfig],
        "export": [ExportConfig],
        "bench": [BenchConfig],
        "analyze": [AnalyzeConfig],
    }
    renamed = {"prune_method": "score", "weight_granularity": "w_granularity"}
    checked = 0
    for command, classes in configs.items():
        for param in main.commands[command].params:
            field_name = renamed.get(param.name, param.name)
            owner = next((c for c in classes if field_name in {f.name for f in dataclasses.fields(c)}), None)
            if owner is None:
                continue
            default = next(f.default for f in dataclasses.fields(owner) if f.name == field_name)
            if isinstance(default, tuple) or default is None:
                continue  # a list flag (e.g. "1,16") or no default at all
            assert isinstance(param.default, _FieldDefault), f"{command} --{param.name} repeats a default"
            assert param.default.resolve() == default, (command, param.name)
            checked += 1
    assert checked >= 40


def test_compress_config_holds_the_method_configs_themselves():
    from craft_deploy.compress import from_flags

    cfg = from_flags(sparsity="2:4", prune_method="sparsegpt", quant="w6a16", group_size=32, calib_samples=64)
    assert cfg.methods == (
        PruneConfig(n=2, m=4, score="sparsegpt"),
        QuantConfig(w_bits=6, a_bits=16, w_granularity="group", group_size=32),
    )
    assert cfg.to_dict()["methods"][0] == {"method": "prune", "config": cfg.methods[0].to_dict()}
    assert type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
