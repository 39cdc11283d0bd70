"""The sharing-aware Conformer layer, written like torchaudio's ``models/conformer.py``.

Every module takes its weights as constructor arguments instead of creating them. Passing the
same ``nn.Parameter`` (or norm module) to several modules *is* the sharing: one tensor, used at
every place it serves, so ``model.parameters()`` yields it once, its gradient accumulates over
all uses, and ``torch.save`` stores it once. Which tensor goes where is decided by the storage
plan (:mod:`nas.plan`) in :mod:`nas.model.build`.

With untied, full-rank weights a layer computes exactly what ``torchaudio.models.Conformer``'s
``ConformerLayer`` computes (``convolution_first=False``, BatchNorm).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nas.config import CONV_STACKS, REL_POS_MAX_DISTANCE


class Linear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` given whole, or as low-rank factors ``W = U·V``.

    Args:
        weight: ``(out, in)``, or None when ``U`` and ``V`` are given.
        U: ``(out, r)``; V: ``(r, in)``. Either may be shared with other layers.
        bias: ``(out,)`` or None.
    Input ``(..., in)``; output ``(..., out)``.
    """

    def __init__(self, weight: nn.Parameter | None = None, U: nn.Parameter | None = None,
                 V: nn.Parameter | None = None, bias: nn.Parameter | None = None):
        super().__init__()
        if (weight is None) == (U is None or V is None):
            raise ValueError("give either weight, or both U and V")
        self.weight, self.U, self.V, self.bias = weight, U, V, bias

    def forward(self, x: Tensor, bias: bool = True) -> Tensor:
        b = self.bias if bias else None
        if self.weight is not None:
            return F.linear(x, self.weight, b)
        return F.linear(F.linear(x, self.V), self.U, b)


class FeedForward(nn.Module):
    """LayerNorm → Linear(d, ffn) → SiLU → Dropout → Linear(ffn, d) → Dropout. ``(B, T, d)`` in and out."""

    def __init__(self, norm: nn.LayerNorm, inner: Linear, outer: Linear, dropout: float):
        super().__init__()
        self.norm, self.inner, self.outer = norm, inner, outer
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dropout(F.silu(self.inner(self.norm(x))))
        return self.dropout(self.outer(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q, k, v, out projections (``(B, T, d)`` in and out).

    Args:
        q, k, v, out: the projections. When ``qk_tied``, ``k`` holds the same weights as ``q``
            (only its bias differs), so the product is computed once.
        rel_bias: ``(n_heads, buckets)``, a learned bias added to each head's logits by the
            relative distance bucket of key and query (:func:`relative_buckets`); None: none.
        key_padding_mask (forward): ``(B, T)``, True at padded frames.
    """

    def __init__(self, norm: nn.LayerNorm, q: Linear, k: Linear, v: Linear, out: Linear,
                 n_heads: int, dropout: float, qk_tied: bool, rel_bias: Tensor | None = None):
        super().__init__()
        self.norm, self.q, self.k, self.v, self.out = norm, q, k, v, out
        self.n_heads, self.dropout_p, self.qk_tied = n_heads, dropout, qk_tied
        self.rel_bias = rel_bias
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        B, T, d = x.shape
        x = self.norm(x)
        if self.qk_tied:
            shared = self.q(x, bias=False)
            q = shared + self.q.bias if self.q.bias is not None else shared
            k = shared + self.k.bias if self.k.bias is not None else shared
        else:
            q, k = self.q(x), self.k(x)
        v = self.v(x)
        q, k, v = (t.view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        # With this additive mask torch 2.11's dynamo ONNX exporter fails to decompose the attention
        # (a view of its output); nas.onnx_export falls back to the TorchScript exporter, which
        # tests/model/test_rel_pos.py checks against PyTorch.
        if self.rel_bias is not None:  # an additive mask: the bias, and -inf at padded keys
            bias = self.rel_bias[:, relative_buckets(T, self.rel_bias.shape[1], x.device)][None]  # (1, H, T, T)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout_p if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, d)
        return self.dropout(self.out(y))


def relative_buckets(T: int, buckets: int, device: torch.device | None = None,
                     max_distance: int = REL_POS_MAX_DISTANCE) -> Tensor:
    """``(T, T)`` bucket of each (query, key) distance, as T5 buckets them bidirectionally: half the
    buckets for keys after the query; in each half, the first half exact distances, the rest
    log-spaced up to ``max_distance`` (farther shares the last). Written out rather than imported:
    the function lives in transformers' T5 model, a dependency this one formula does not justify."""
    pos = torch.arange(T, device=device)
    rel = pos[None, :] - pos[:, None]  # key - query
    half = buckets // 2
    exact = half // 2
    dist = rel.abs()
    far = exact + (torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                   * (half - exact)).long()
    return (rel > 0).long() * half + torch.where(dist < exact, dist, far.clamp(max=half - 1))


class Convolution(nn.Module):
    """LayerNorm → pointwise (d→2d) → GLU → depthwise conv → BatchNorm → SiLU → pointwise (d→d) → Dropout.

    ``padding_mask`` (forward): ``(B, T)``, True at padded frames, which are zeroed before the
    depthwise convolution (torchaudio's module does not; with no padding the two agree).

    Args:
        pw1: the first pointwise layer, ``(2d, d)``; or ``(d, d)`` when ``glu_tied``, where both
            GLU halves use its product and differ only by their biases (``pw1.bias``, ``gate_bias``).
        dw_weight: ``(d, kernel)`` depthwise kernel; dw_bias: ``(d,)``.
    Input and output ``(B, T, d)``.
    """

    def __init__(self, norm: nn.LayerNorm, pw1: Linear, dw_weight: nn.Parameter, dw_bias: nn.Parameter,
                 bn: nn.BatchNorm1d, pw2: Linear, dropout: float, gate_bias: nn.Parameter | None = None):
        super().__init__()
        self.norm, self.pw1, self.bn, self.pw2 = norm, pw1, bn, pw2
        self.dw_weight, self.dw_bias, self.gate_bias = dw_weight, dw_bias, gate_bias
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        x = self.norm(x)
        if self.gate_bias is not None:
            h = self.pw1(x, bias=False)
            x = (h + self.pw1.bias) * torch.sigmoid(h + self.gate_bias)
        else:
            x = F.glu(self.pw1(x), dim=-1)
        if padding_mask is not None:  # the depthwise kernel must not read padding: an utterance's output
            x = x.masked_fill(padding_mask[..., None], 0.0)  # is then the same alone or in a padded batch
        k = self.dw_weight.shape[-1]
        x = F.conv1d(x.transpose(1, 2), self.dw_weight.unsqueeze(1), self.dw_bias,
                     padding=(k - 1) // 2, groups=x.shape[-1])
        x = F.silu(self.bn(x)).transpose(1, 2)
        return self.dropout(self.pw2(x))


class ConformerLayer(nn.Module):
    """One virtual layer: ½·FFN, self-attention, convolution, ½·FFN, LayerNorm, with residuals.

    ``(B, T, d)`` in and out; ``key_padding_mask`` ``(B, T)`` is True at padded frames.
    """

    def __init__(self, ffn1: FeedForward, attn: SelfAttention, conv: Convolution, ffn2: FeedForward,
                 final_norm: nn.LayerNorm, dropout: float):
        super().__init__()
        self.ffn1, self.attn, self.conv, self.ffn2, self.final_norm = ffn1, attn, conv, ffn2, final_norm
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        x = x + 0.5 * self.ffn1(x)
        x = x + self.attn(x, key_padding_mask)
        x = x + self.conv(x, key_padding_mask)
        x = x + 0.5 * self.ffn2(x)
        return self.final_norm(x)


class Subsampling(nn.Module):
    """Subsampling in time and frequency by ``factor``: a stack of unpadded Conv2d with ReLU
    (``CONV_STACKS``: 4x is two 3x3 stride-2 convolutions), then a linear projection to ``d``.

    Input ``(B, T, n_mels)`` log-mels; output ``(B, T', d)``, with ``T' = ((T-1)//2-1)//2`` at 4x
    (:func:`nas.plan.subsampled_frames`), and the lengths ``(B,)`` mapped alike.
    """

    def __init__(self, n_mels: int, channels: int, d_model: int, factor: int = 4):
        super().__init__()
        self.stack = CONV_STACKS[factor]
        f = n_mels
        for i, (k, s) in enumerate(self.stack, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(1 if i == 1 else channels, channels, k, stride=s))
            f = (f - k) // s + 1
        self.proj = nn.Linear(channels * f, d_model)

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x = x.unsqueeze(1)
        for i, (k, s) in enumerate(self.stack, start=1):
            x = F.relu(getattr(self, f"conv{i}")(x))  # (B, C, T', F')
            lengths = torch.div(lengths - k, s, rounding_mode="floor") + 1
        B, C, T, Fq = x.shape
        return self.proj(x.permute(0, 2, 1, 3).reshape(B, T, C * Fq)), lengths
