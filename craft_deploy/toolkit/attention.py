"""Quantizers on a ViT's attention matmuls (Q K^T and softmax(.) V), for timm's `Attention` blocks.

The block's class is swapped for a subclass whose forward runs both matmuls through `QuantMatMul` modules (the
unfused path: explicit softmax), so quantizers sit on all four matmul inputs and the model still deep-copies, saves
and exports like any timm model.
"""

from __future__ import annotations

import torch
from torch import nn

from craft_deploy.toolkit.qmodules import ActQuantizer, TwinActQuantizer
from craft_deploy.toolkit.spec import MatMulQuantSpec

try:  # timm >= 1.0: the class behind vit_*, deit_*, eva-style blocks
    from timm.layers.attention import Attention
except ImportError:  # pragma: no cover - older timm
    from timm.models.vision_transformer import Attention


class QuantMatMul(nn.Module):
    """`a @ b` with both inputs fake-quantized."""

    def __init__(self, a_quantizer: nn.Module, b_quantizer: nn.Module):
        super().__init__()
        self.a_quantizer = a_quantizer
        self.b_quantizer = b_quantizer

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.a_quantizer(a) @ self.b_quantizer(b)


class QuantAttention(Attention):
    """timm's Attention with quantized Q K^T and softmax x V matmuls (attention masks are not supported)."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("quantized attention supports unmasked (image) attention only")
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.qk_matmul(q * self.scale, k.transpose(-2, -1)).softmax(dim=-1)
        x = self.av_matmul(self.attn_drop(attn), v)
        x = x.transpose(1, 2).reshape(b, n, -1)
        x = self.norm(x) if hasattr(self, "norm") else x
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """timm Attention blocks of `model` by name (empty for CNNs)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Attention)}


def quantize_attention(mod: nn.Module, spec: MatMulQuantSpec) -> None:
    """Give an Attention block quantized matmuls."""
    if not isinstance(mod, Attention):
        raise TypeError(f"expected a timm Attention block, got {type(mod).__name__}")
    bits, sym, fmt = spec.a_bits, spec.a_symmetric, spec.number_format
    mod.qk_matmul = QuantMatMul(ActQuantizer(bits, sym, fmt), ActQuantizer(bits, sym, fmt))
    probs = TwinActQuantizer(bits, "softmax") if spec.probs_twin else ActQuantizer(bits, sym, fmt)
    mod.av_matmul = QuantMatMul(probs, ActQuantizer(bits, sym, fmt))
    mod.__class__ = QuantAttention
