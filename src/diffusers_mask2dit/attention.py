"""Exact Mask²DiT scene attention without an L×L mask or per-scene copies of the video keys/values.

Every mask variant is a union of *blocks* (see :func:`layout.attention_blocks`): for each query kind
(text, video) one block over the text keys and one over the video keys, each either a single attention
between two whole regions or one attention per scene between that scene's segments. Each block is run
with a fused kernel that also returns the log-sum-exp (LSE) of its scores; the two blocks of a query
region are merged through their LSEs. That is exactly softmax attention over the union of their keys.

The LSEs the kernels return carry no gradient, so the merge has its own backward: each block's kernel
backward is called with the *merged* output and LSE, which yields that block's exact share of dq, dk,
dv (the identity flash/ring attention rely on). Extra memory is O(L·H·D): the block outputs, one LSE per
query and the fp32 gradient accumulators.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .layout import (
    ALL_SCENES,
    DEFAULT_MASK_VARIANT,
    TEXT,
    VIDEO,
    SceneLayout,
    attention_blocks,
    build_dense_mask,
    check_mask_variant,
)

BACKENDS = ("auto", "flash", "sdpa", "dense")

# A group is one attention call: (q_start, q_end, k_start, k_end) in sequence positions.
Group = Tuple[int, int, int, int]


# --------------------------------------------------------------------------------------------------
# Block kernels. Each takes (B, H, Lq, D) query and (B, H, Lk, D) key/value slices and returns the output
# (B, H, Lq, D) and the fp32 LSE (B, H, Lq); `backward` takes the merged output/LSE of the same rows.
# --------------------------------------------------------------------------------------------------


class _MathKernel:
    """Plain matmul + softmax in fp32: any device, any dtype. Used where no fused kernel applies."""

    name = "math"

    @staticmethod
    def forward(q, k, v, scale):
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse.unsqueeze(-1))
        return torch.matmul(probs, v.float()).to(q.dtype), lse, None

    @staticmethod
    def backward(grad_out, q, k, v, out, lse, scale, aux):
        qf, kf, vf, gf = q.float(), k.float(), v.float(), grad_out.float()
        probs = torch.exp(torch.matmul(qf, kf.transpose(-1, -2)) * scale - lse.unsqueeze(-1))
        grad_v = torch.matmul(probs.transpose(-1, -2), gf)
        grad_probs = torch.matmul(gf, vf.transpose(-1, -2))
        delta = (gf * out.float()).sum(-1, keepdim=True)
        grad_scores = probs * (grad_probs - delta) * scale
        return torch.matmul(grad_scores, kf), torch.matmul(grad_scores.transpose(-1, -2), qf), grad_v


class _CpuFlashKernel:
    """PyTorch's CPU FlashAttention kernel (the one SDPA dispatches to on CPU)."""

    name = "cpu_flash"

    @staticmethod
    def forward(q, k, v, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return out, lse.float(), None

    @staticmethod
    def backward(grad_out, q, k, v, out, lse, scale, aux):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.contiguous(), q, k, v, out, lse, 0.0, False, scale=scale
        )


class _CudaFlashKernel:
    """PyTorch's CUDA FlashAttention kernel behind SDPA (fp16/bf16)."""

    name = "cuda_flash"

    @staticmethod
    def forward(q, k, v, scale):
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
        out, lse = res[0], res[1]
        # cum_seq_q, cum_seq_k, max_q, max_k, rng_state, unused: handed back unchanged to the backward.
        return out, lse, tuple(res[2:8])

    @staticmethod
    def backward(grad_out, q, k, v, out, lse, scale, aux):
        cum_q, cum_k, max_q, max_k, rng_state, unused = aux
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse.contiguous(), cum_q, cum_k, max_q, max_k, 0.0, False,
            rng_state, unused, scale=scale,
        )
        return grads[0], grads[1], grads[2]


def _kernel_for(tensor: torch.Tensor, backend: str):
    if backend == "sdpa" or backend == "flash":
        if tensor.device.type == "cpu":
            return _CpuFlashKernel
        if tensor.device.type == "cuda" and tensor.dtype in (torch.float16, torch.bfloat16) and tensor.shape[-1] <= 256:
            return _CudaFlashKernel
    return _MathKernel


# --------------------------------------------------------------------------------------------------
# Varlen FlashAttention (CUDA): one call per block, all scenes and batch items packed as sequences.
# --------------------------------------------------------------------------------------------------


def _flash_attn_package():
    try:
        from flash_attn import flash_attn_interface  # type: ignore

        return flash_attn_interface
    except Exception:  # not installed, or built for another torch
        return None


def flash_varlen_available(device: Optional[torch.device] = None) -> bool:
    """Whether the ``"flash"`` backend can run: a CUDA device with sm80+ and a varlen FlashAttention."""
    if not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return False
    return _flash_attn_package() is not None or hasattr(torch.ops.aten, "_flash_attention_forward")


def _call_with_supported_kwargs(fn: Callable, *args, **kwargs):
    """flash-attn renamed its private arguments across releases; pass only those this release takes."""
    import inspect

    params = inspect.signature(fn).parameters
    return fn(*args, **{k: v for k, v in kwargs.items() if k in params})


class _VarlenKernel:
    """Grouped attention over packed ``(T, H, D)`` sequences (flash-attn package, else PyTorch's own)."""

    name = "varlen"

    @staticmethod
    def _pack(x, start, end):
        # (B, H, L, D) slice -> (B * (end - start), H, D)
        part = x[:, :, start:end].transpose(1, 2)
        return part.reshape(-1, x.shape[1], x.shape[3])

    @staticmethod
    def _cu_seqlens(lengths: Sequence[int], batch: int, device) -> Tuple[torch.Tensor, int]:
        seq = list(lengths) * batch
        cu = torch.tensor([0] + seq, device=device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return cu, max(seq)

    @classmethod
    def run_groups_forward(cls, q, k, v, q_region, k_region, groups, scale):
        batch, heads, _, dim = q.shape
        q_packed = cls._pack(q, *q_region)
        k_packed = cls._pack(k, *k_region)
        v_packed = cls._pack(v, *k_region)
        cu_q, max_q = cls._cu_seqlens([g[1] - g[0] for g in groups], batch, q.device)
        cu_k, max_k = cls._cu_seqlens([g[3] - g[2] for g in groups], batch, q.device)
        fa = _flash_attn_package()
        if fa is not None:
            res = _call_with_supported_kwargs(
                fa._flash_attn_varlen_forward, q_packed, k_packed, v_packed, cu_q, cu_k, max_q, max_k,
                dropout_p=0.0, softmax_scale=scale, causal=False, window_size=(-1, -1), window_size_left=-1,
                window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False,
            )
            out, lse, aux = res[0], res[1], res[-1]
        else:
            res = torch.ops.aten._flash_attention_forward(
                q_packed, k_packed, v_packed, cu_q, cu_k, max_q, max_k, 0.0, False, False, scale=scale
            )
            out, lse, aux = res[0], res[1], (res[2], res[3])
        length = q_region[1] - q_region[0]
        out = out.view(batch, length, heads, dim).transpose(1, 2)
        lse = cls._lse_to_bhl(lse, batch, heads, length)
        meta = (q_packed, k_packed, v_packed, cu_q, cu_k, max_q, max_k, aux)
        return out, lse, meta

    @staticmethod
    def _lse_to_bhl(lse, batch, heads, length):
        # FlashAttention-2 varlen returns (H, T); some builds return (T, H).
        if lse.shape[0] == heads and lse.shape[-1] >= batch * length:
            lse = lse[:, : batch * length].reshape(heads, batch, length).permute(1, 0, 2)
        else:
            lse = lse.reshape(batch, length, heads).permute(0, 2, 1)
        return lse.float()

    @classmethod
    def run_groups_backward(cls, grad_out, out, lse, q_region, meta, scale):
        q_packed, k_packed, v_packed, cu_q, cu_k, max_q, max_k, aux = meta
        batch, heads, length, dim = out.shape
        do_packed = cls._pack(grad_out, 0, length).contiguous()
        out_packed = cls._pack(out, 0, length).contiguous()
        lse_packed = lse.permute(1, 0, 2).reshape(heads, batch * length).contiguous()
        fa = _flash_attn_package()
        if fa is not None:
            dq, dk, dv = torch.empty_like(q_packed), torch.empty_like(k_packed), torch.empty_like(v_packed)
            _call_with_supported_kwargs(
                fa._flash_attn_varlen_backward, do_packed, q_packed, k_packed, v_packed, out_packed, lse_packed,
                dq, dk, dv, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=scale, causal=False,
                window_size=(-1, -1), window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
                deterministic=False, rng_state=aux,
            )
        else:
            seed, offset = aux
            dq, dk, dv = torch.ops.aten._flash_attention_backward(
                do_packed, q_packed, k_packed, v_packed, out_packed, lse_packed, cu_q, cu_k, max_q, max_k,
                0.0, False, seed, offset, scale=scale,
            )[:3]
        return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# The grouped plan and its autograd function.
# --------------------------------------------------------------------------------------------------


def _plan(layout: SceneLayout, variant: str) -> Dict[str, List[Tuple[Tuple[int, int], List[Group]]]]:
    """For each query kind: its key blocks as ``(key_region, groups)``."""
    plan: Dict[str, List[Tuple[Tuple[int, int], List[Group]]]] = {TEXT: [], VIDEO: []}
    for q_kind, k_kind, rule in attention_blocks(layout, variant):
        if rule == ALL_SCENES:
            groups = [(*layout.region(q_kind), *layout.region(k_kind))]
        else:
            groups = [(*qs, *ks) for qs, ks in zip(layout.segments(q_kind), layout.segments(k_kind))]
        plan[q_kind].append((layout.region(k_kind), groups))
    return plan


def _merge(parts: List[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge attention outputs over disjoint key sets through their LSEs. Returns (out fp32, lse)."""
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)
    out = sum(torch.exp(p_lse - lse).unsqueeze(-1) * p_out.float() for p_out, p_lse in parts)
    return out, lse


class _GroupedSceneAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, plan, backend, scale):
        out = torch.empty_like(query)
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        saved_meta: Dict[Any, Any] = {}
        for q_kind, blocks in plan.items():
            parts = []
            for block_index, (k_region, groups) in enumerate(blocks):
                q_region = (groups[0][0], groups[-1][1])
                if backend == "flash":
                    o, l, meta = _VarlenKernel.run_groups_forward(query, key, value, q_region, k_region, groups, scale)
                    saved_meta[(q_kind, block_index)] = meta
                else:
                    kernel = _kernel_for(query, backend)
                    outs, lses = [], []
                    for gi, (q0, q1, k0, k1) in enumerate(groups):
                        o_g, l_g, aux = kernel.forward(query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1], scale)
                        outs.append(o_g)
                        lses.append(l_g)
                        saved_meta[(q_kind, block_index, gi)] = aux
                    o, l = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
                parts.append((o, l))
            merged_out, merged_lse = _merge(parts)
            out[:, :, q_region[0] : q_region[1]] = merged_out.to(out.dtype)
            lse[:, :, q_region[0] : q_region[1]] = merged_lse
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.plan, ctx.backend, ctx.scale, ctx.meta = plan, backend, scale, saved_meta
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        grad_q = torch.zeros_like(query, dtype=torch.float32)
        grad_k = torch.zeros_like(key, dtype=torch.float32)
        grad_v = torch.zeros_like(value, dtype=torch.float32)
        grad_out = grad_out.to(query.dtype)
        for q_kind, blocks in ctx.plan.items():
            for block_index, (k_region, groups) in enumerate(blocks):
                q_region = (groups[0][0], groups[-1][1])
                if ctx.backend == "flash":
                    q0, q1 = q_region
                    dq, dk, dv = _VarlenKernel.run_groups_backward(
                        grad_out[:, :, q0:q1], out[:, :, q0:q1], lse[:, :, q0:q1], q_region,
                        ctx.meta[(q_kind, block_index)], ctx.scale,
                    )
                    b, h, _, d = query.shape
                    grad_q[:, :, q0:q1] += dq.view(b, q1 - q0, h, d).transpose(1, 2)
                    k0, k1 = k_region
                    grad_k[:, :, k0:k1] += dk.view(b, k1 - k0, h, d).transpose(1, 2)
                    grad_v[:, :, k0:k1] += dv.view(b, k1 - k0, h, d).transpose(1, 2)
                    continue
                kernel = _kernel_for(query, ctx.backend)
                for gi, (q0, q1, k0, k1) in enumerate(groups):
                    dq, dk, dv = kernel.backward(
                        grad_out[:, :, q0:q1], query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1],
                        out[:, :, q0:q1], lse[:, :, q0:q1].contiguous(), ctx.scale, ctx.meta[(q_kind, block_index, gi)],
                    )
                    grad_q[:, :, q0:q1] += dq
                    grad_k[:, :, k0:k1] += dk
                    grad_v[:, :, k0:k1] += dv
        return grad_q.to(query.dtype), grad_k.to(key.dtype), grad_v.to(value.dtype), None, None, None


# --------------------------------------------------------------------------------------------------
# Public entry point.
# --------------------------------------------------------------------------------------------------


def resolve_backend(backend: str, query: torch.Tensor) -> str:
    """Map ``backend`` (``"auto"``, ``"flash"``, ``"sdpa"``, ``"dense"``) to the one that will run."""
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {list(BACKENDS)}, got {backend!r}.")
    if backend == "auto":
        if (
            query.is_cuda
            and query.dtype in (torch.float16, torch.bfloat16)
            and query.shape[-1] <= 256
            and flash_varlen_available(query.device)
        ):
            return "flash"
        return "sdpa"
    if backend == "flash":
        if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                "`backend='flash'` needs fp16/bf16 tensors on a CUDA device; use 'sdpa' (any device) or 'auto'."
            )
        if not flash_varlen_available(query.device):
            raise ValueError("`backend='flash'` needs an sm80+ GPU and a varlen FlashAttention (flash-attn or PyTorch).")
    return backend


def scene_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: SceneLayout,
    mask: str = DEFAULT_MASK_VARIANT,
    backend: str = "auto",
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Mask²DiT attention over one multi-scene sequence.

    Args:
        query, key, value: ``(B, H, L, D)`` with ``L == layout.total`` in order ``[text_1..n ; video_1..n]``.
        layout: token counts per scene.
        mask: ``"v1"``, ``"v2"`` (default), ``"v3"`` or ``"full"`` (METHOD.md's table).
        backend: ``"flash"`` (varlen FlashAttention, CUDA), ``"sdpa"`` (fused SDPA kernels per group, any
            device), ``"dense"`` (SDPA with the L×L boolean mask: the reference) or ``"auto"``.
        scale: softmax scale, default ``1/sqrt(D)``.

    Returns:
        ``(B, H, L, D)``, the same dtype as ``query``.
    """
    variant = check_mask_variant(mask, "mask")
    if query.dim() != 4 or key.shape != query.shape or value.shape[:3] != query.shape[:3]:
        raise ValueError(
            f"`query`, `key`, `value` must be (B, H, L, D) with equal B, H, L; got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}."
        )
    if not isinstance(layout, SceneLayout):
        raise ValueError(f"`layout` must be a SceneLayout, got {type(layout).__name__}.")
    layout.check_sequence_length(query.shape[2], "attention sequence")
    backend = resolve_backend(backend, query)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale

    # One scene, or no mask: every variant is plain attention.
    if variant == "full" or layout.num_scenes == 1:
        return F.scaled_dot_product_attention(query, key, value, scale=scale)
    if backend == "dense":
        mask_tensor = build_dense_mask(layout, variant).to(query.device)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask_tensor, scale=scale)
    return _GroupedSceneAttention.apply(query, key, value, _plan(layout, variant), backend, scale)
