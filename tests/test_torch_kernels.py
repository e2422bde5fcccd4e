"""Real INT8 / FP8 / 2:4 kernels for a bundle's Linear layers (bench --backend pytorch --kernels)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from craft_deploy import CraftError, VerificationError
from craft_deploy.bench import run as bench
from craft_deploy.bench.torch_kernels import (
    TORCH_KERNELS,
    Fp8DynamicLinear,
    Int8DynamicLinear,
    int8_gemm_is_exact,
    kernel_model,
    strip_quantizers,
)
from craft_deploy.compress import from_flags
from craft_deploy.compress import run as compress
from craft_deploy.config import BenchConfig
from craft_deploy.models import load_bundle

BENCH = dict(backend="pytorch", batch_sizes=(2,), iters=2, min_seconds=0.0, eval_subset=64)


@pytest.fixture(scope="module")
def vit_w8a8(tiny_vit_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels") / "vit-w8a8"
    compress(from_flags(quant="w8a8", calib_samples=64), tiny_vit_bundle, out)
    return out


def _linear(k=64, n=48, seed=0) -> tuple[nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g))
        lin.bias.copy_(torch.randn(n, generator=g))
    return lin, torch.randn(3, 5, k, generator=g)  # 15 rows: under _int_mm's 17-row minimum, so padded


def test_int8_kernel_equals_a_hand_computation():
    # CPU-dependent by nature: where this CPU's int8 GEMM saturates (oneDNN without VNNI), the kernel is refused by
    # name instead of computing another model; where it is exact (VNNI, AMX, CUDA), it equals the hand computation
    if not int8_gemm_is_exact():
        ok, why = TORCH_KERNELS["int8"].availability("cpu")
        assert not ok and "saturates pairs of 8-bit products" in why
        with pytest.raises(CraftError, match="--kernels int8: this CPU's int8 GEMM"):
            kernel_model(_linear()[0], "int8", "fp32", "cpu")
        return
    lin, x = _linear()
    w = lin.weight.double()
    sw = w.abs().amax(1, keepdim=True) / 127
    wq = torch.round(w / sw).clamp(-127, 127)
    rows = x.reshape(-1, 64).double()
    sx = rows.abs().amax(1, keepdim=True) / 127
    xq = torch.round(rows / sx).clamp(-127, 127)
    ref = (xq @ wq.T) * sx * sw.T + lin.bias.double()
    got = Int8DynamicLinear(lin)(x)
    assert got.shape == (3, 5, 48)
    torch.testing.assert_close(got.reshape(-1, 48).double(), ref, rtol=1e-5, atol=1e-4)


def test_fp8_kernel_equals_a_hand_computation():
    lin, x = _linear()
    w = lin.weight.float()
    sw = w.abs().amax(1, keepdim=True) / 448
    wq = (w / sw).to(torch.float8_e4m3fn).double()
    rows = x.reshape(-1, 64).float()
    sx = rows.abs().amax(1, keepdim=True) / 448
    xq = (rows / sx).to(torch.float8_e4m3fn).double()
    ref = (xq @ wq.T) * sx.double() * sw.double().T + lin.bias.double()
    got = Fp8DynamicLinear(lin)(x).reshape(-1, 48).double()
    # _scaled_mm writes bf16 before the bias is added: one bf16 rounding of the product
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_strip_quantizers_gives_back_the_dense_model(tiny_vit_bundle, vit_w8a8):
    dense, quant = load_bundle(tiny_vit_bundle).model.eval(), load_bundle(vit_w8a8).model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (quant(x) - dense(x)).abs().max() > 1e-4  # the fake-quant changes the logits
        # calibration moved each integer layer's bias onto its int32 grid (compress.bias_bound), by at most half a
        # unit of input scale x weight scale: the only difference left once the quantizers are gone
        units = {
            name: float(mod.input_quantizer.scale) * mod.parametrizations.weight[0].scale
            for name, mod in quant.named_modules()
            if hasattr(mod, "input_quantizer") and hasattr(mod, "parametrizations") and mod.bias is not None
        }
        removed = strip_quantizers(quant)
        assert removed > 0 and strip_quantizers(quant) == 0 and units
        for name, unit in units.items():
            bias, twin = quant.get_submodule(name).bias, dense.get_submodule(name).bias
            assert ((bias - twin).abs() <= unit / 2 * (1 + 1e-3)).all(), name
            twin.copy_(bias)
        torch.testing.assert_close(quant(x), dense(x), rtol=1e-5, atol=1e-5)


# the CPU kernel the next tests run: int8 where this CPU's int8 GEMM is exact, else fp8 (int8 is refused there)
CPU_KERNEL = "int8" if int8_gemm_is_exact() else "fp8"
CPU_MODULE = Int8DynamicLinear if CPU_KERNEL == "int8" else Fp8DynamicLinear


@pytest.mark.parametrize("kernel", ["int8", "fp8"])
def test_bench_with_cpu_kernels_is_checked_against_the_fake_quant_bundle(kernel, vit_w8a8, tmp_path):
    if kernel == "int8" and not int8_gemm_is_exact():  # CPU-dependent by nature: refused by name there
        with pytest.raises(CraftError, match="--kernels int8: this CPU's int8 GEMM .* saturates"):
            bench(BenchConfig(kernels=kernel, **BENCH), vit_w8a8, tmp_path / "b")
        assert not (tmp_path / "b").exists()
        return
    rec = bench(BenchConfig(kernels=kernel, **BENCH), vit_w8a8, tmp_path / "b")
    model = next(iter(rec["models"].values()))
    info, check = model["backend_info"], model["verification"]
    assert info["kernel"] == kernel and info["quantizers_stripped"] > 0
    linears = {n for n, m in load_bundle(vit_w8a8).model.named_modules() if isinstance(m, nn.Linear)}
    assert set(info["converted"]) == linears - {"head"} and info["skipped"] == {"head": "excluded"}
    assert check["passed"] and check["top1_agreement"] >= 0.95 and check["samples"] == 64
    plain = bench(BenchConfig(**BENCH), vit_w8a8, tmp_path / "p")["results"][0]
    assert abs(rec["results"][0]["top1"] - plain["top1"]) <= 5.0


def test_kernels_that_disagree_with_the_bundle_fail_verification(vit_w8a8, tmp_path, monkeypatch):
    monkeypatch.setattr(CPU_MODULE, "forward", lambda self, x: torch.zeros(*x.shape[:-1], self.out_features))
    with pytest.raises(VerificationError, match="disagrees with the bundle in fp32 PyTorch"):
        bench(BenchConfig(kernels=CPU_KERNEL, **BENCH), vit_w8a8, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_kernel_options_refuse_what_cannot_work(vit_w8a8, tiny_bundle, tmp_path):
    with pytest.raises(CraftError, match="apply to --backend pytorch only"):
        BenchConfig(kernels="int8")
    with pytest.raises(CraftError, match="--precision must be fp32, bf16 or fp16, got 'int4'"):
        BenchConfig(backend="pytorch", precision="int4")
    model = load_bundle(vit_w8a8).model
    with pytest.raises(CraftError, match="unknown --kernels 'int4'; registered: int8, fp8, sparse24"):
        kernel_model(model, "int4", "fp32", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(CraftError, match="sparse24: 2:4 semi-structured kernels run on CUDA GPUs only"):
            kernel_model(model, "sparse24", "bf16", "cpu")
    with pytest.raises(CraftError, match="--precision bf16: this bundle is fake-quantized"):
        kernel_model(model, None, "bf16", "cpu")
    cnn = load_bundle(tiny_bundle).model  # test_efficientnet: its only Linear is the head
    with pytest.raises(CraftError, match="no Linear layer of this model can take it"):
        kernel_model(cnn, CPU_KERNEL, "fp32", "cpu")


def test_every_registered_kernel_says_what_it_does():
    assert set(TORCH_KERNELS) >= {"int8", "fp8", "sparse24"}
    assert all(cls.help for cls in TORCH_KERNELS.values())


@pytest.mark.gpu
@pytest.mark.parametrize("kernel, precision", [("int8", "bf16"), ("fp8", "bf16"), ("sparse24", "bf16"), (None, "bf16")])
def test_gpu_kernels_agree_with_the_bundle(kernel, precision, tiny_vit_bundle, tmp_path):
    pruned = tmp_path / "vit-24-w8a8"
    compress(from_flags(sparsity="2:4", quant="w8a8", calib_samples=64), tiny_vit_bundle, pruned)
    source = pruned if kernel else tiny_vit_bundle  # a fake-quant bundle runs in fp32 only (next test)
    rec = bench(BenchConfig(kernels=kernel, precision=precision, **BENCH), source, tmp_path / "b")
    model = next(iter(rec["models"].values()))
    assert model["backend_info"]["device"] == "cuda" and model["verification"]["passed"]
    if kernel:
        assert len(model["backend_info"]["converted"]) == 4 * len(load_bundle(pruned).model.blocks)


@pytest.mark.gpu
def test_sparse24_refuses_weights_that_are_not_2_4(vit_w8a8):
    with pytest.raises(CraftError, match="no Linear layer of this model can take it.*not 2:4 sparse"):
        kernel_model(load_bundle(vit_w8a8).model, "sparse24", "bf16", "cuda")
