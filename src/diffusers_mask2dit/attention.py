"""Exact Mask²DiT scene attention without an L×L mask or per-scene copies of the video keys/values.

Every mask variant is a union of *blocks* (see :func:`layout.attention_blocks`): for each query kind
(text, video) one block over the text keys and one over the video keys, each either a single attention
between two whole regions or one attention per scene between that scene's segments. Each block is run
with a fused kernel that also returns the log-sum-exp (LSE) of its scores; the two blocks of a query
region are merged through their LSEs. That is exactly softmax attention over the union of their keys.

The LSEs the kernels return carry no gradient, so the merge has its own backward: each block's kernel
backward is called with the *merged* output and LSE, which yields that block's exact share of dq, dk,
dv (the identity flash/ring attention rely on). Extra memory is O(L·H·D): one block's output at a time,
one LSE per query, and fp32 merge temporaries for a bounded chunk of rows.

Backends live in a registry, as in diffusers' attention dispatcher: each :class:`AttentionBackend` has a
name, the constraints it needs (device, dtype, head size, a runtime availability check such as an
installed package) and either a *block kernel* (the protocol below, run through the LSE merge) or a
plain differentiable function. ``"auto"`` picks the highest-priority backend whose constraints hold.
Adding a backend is one :func:`register_attention_backend` call. What a caller chooses (mask variant,
backend) is validated once, by :class:`SceneAttentionOptions`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

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

# A group is one attention call: (q_start, q_end, k_start, k_end) in sequence positions.
Group = Tuple[int, int, int, int]


# --------------------------------------------------------------------------------------------------
# Per-call kernels. Each takes (B, H, Lq, D) query and (B, H, Lk, D) key/value slices and returns the output
# (B, H, Lq, D) and the fp32 LSE (B, H, Lq); `backward` takes the merged output/LSE of the same rows.
# --------------------------------------------------------------------------------------------------


# fp32 score elements the math kernel materialises at once (256 Mi elements = 1 GiB).
_MATH_SCORES_BUDGET = 1 << 28


class _MathKernel:
    """Plain matmul + softmax in fp32: any device, any dtype. Used where no fused kernel applies (fp32 on
    CUDA, other accelerators). Query rows go in chunks so the fp32 scores never exceed
    ``_MATH_SCORES_BUDGET`` elements, whatever the sequence length."""

    name = "math"

    @staticmethod
    def _row_chunks(q: torch.Tensor, k: torch.Tensor):
        rows = q.shape[-2]
        per_row = max(1, q[..., 0, 0].numel() * k.shape[-2])
        step = max(1, _MATH_SCORES_BUDGET // per_row)
        return [(start, min(start + step, rows)) for start in range(0, rows, step)]

    @staticmethod
    def forward(q, k, v, scale):
        kf, vf = k.float(), v.float()
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        for r0, r1 in _MathKernel._row_chunks(q, k):
            scores = torch.matmul(q[..., r0:r1, :].float(), kf.transpose(-1, -2)) * scale
            lse[..., r0:r1] = torch.logsumexp(scores, dim=-1)
            probs = torch.exp(scores - lse[..., r0:r1].unsqueeze(-1))
            out[..., r0:r1, :] = torch.matmul(probs, vf).to(q.dtype)
        return out, lse, None

    @staticmethod
    def backward(grad_out, q, k, v, out, lse, scale, aux):
        kf, vf = k.float(), v.float()
        grad_q = torch.empty_like(q, dtype=torch.float32)
        grad_k = torch.zeros_like(k, dtype=torch.float32)
        grad_v = torch.zeros_like(v, dtype=torch.float32)
        for r0, r1 in _MathKernel._row_chunks(q, k):
            qf, gf = q[..., r0:r1, :].float(), grad_out[..., r0:r1, :].float()
            probs = torch.exp(torch.matmul(qf, kf.transpose(-1, -2)) * scale - lse[..., r0:r1].unsqueeze(-1))
            grad_v += torch.matmul(probs.transpose(-1, -2), gf)
            delta = (gf * out[..., r0:r1, :].float()).sum(-1, keepdim=True)
            grad_scores = probs * (torch.matmul(gf, vf.transpose(-1, -2)) - delta) * scale
            grad_q[..., r0:r1, :] = torch.matmul(grad_scores, kf)
            grad_k += torch.matmul(grad_scores.transpose(-1, -2), qf)
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


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
            grad_out.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), cum_q, cum_k, max_q, max_k, 0.0, False,
            rng_state, unused, scale=scale,
        )
        return grads[0], grads[1], grads[2]


@torch.compiler.assume_constant_result
def _cuda_capability(device: Optional[torch.device]) -> Tuple[int, int]:
    """The GPU's compute capability. Asked inside the forward (backend choice), so a compiled forward asks it once,
    while tracing, and keeps the answer: dynamo need not trace CUDA's device queries (a graph break)."""
    return torch.cuda.get_device_capability(device)


def _kernel_for(tensor: torch.Tensor, backend: str):
    """The per-group kernel of the ``"sdpa"`` backend for ``tensor``'s device and dtype."""
    if tensor.device.type == "cpu":
        return _CpuFlashKernel
    if (
        tensor.device.type == "cuda"
        and tensor.dtype in (torch.float16, torch.bfloat16)
        and tensor.shape[-1] <= 256
        and _cuda_capability(tensor.device)[0] >= 8  # PyTorch's FlashAttention: sm80+
    ):
        return _CudaFlashKernel
    return _MathKernel


# --------------------------------------------------------------------------------------------------
# Varlen FlashAttention (CUDA): one call per block, all scenes and batch items packed as sequences.
# --------------------------------------------------------------------------------------------------


def _import_flash_attn():
    try:
        from flash_attn import flash_attn_interface  # type: ignore

        return flash_attn_interface
    except Exception:  # not installed, or built for another torch
        return None


def _accepted_kwargs(interface, names: Sequence[str]) -> Dict[str, Optional[frozenset]]:
    """The keyword arguments each of flash-attn's ``names`` takes (None: unknown, pass all): flash-attn renamed its
    private arguments across releases."""
    import inspect

    accepted = {}
    for name in names:
        try:
            accepted[name] = frozenset(inspect.signature(getattr(interface, name)).parameters)
        except (TypeError, ValueError):  # a compiled or wrapped function without a readable signature
            accepted[name] = None
    return accepted


# Imported and inspected once, with this module: inside a compiled forward, a failing import or `inspect` would
# break the graph (`torch.compile(fullgraph=True)` fails), so the traced code only reads these two globals.
_FLASH_ATTN = _import_flash_attn()
_FLASH_ATTN_KWARGS = (
    {} if _FLASH_ATTN is None else _accepted_kwargs(_FLASH_ATTN, ("_flash_attn_varlen_forward", "_flash_attn_varlen_backward"))
)


def _call_flash_attn(name: str, *args, **kwargs):
    """``flash_attn_interface.<name>`` with the keyword arguments this release takes."""
    accepted = _FLASH_ATTN_KWARGS[name]
    return getattr(_FLASH_ATTN, name)(*args, **{k: v for k, v in kwargs.items() if accepted is None or k in accepted})


def _varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """One varlen FlashAttention call on ``(T, H, D)`` tensors (views: any row and head strides) -> (out, lse, aux)."""
    if _FLASH_ATTN is not None:
        res = _call_flash_attn(
            "_flash_attn_varlen_forward", q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=scale,
            causal=False, window_size=(-1, -1), window_size_left=-1, window_size_right=-1, softcap=0.0,
            alibi_slopes=None, return_softmax=False,
        )
        return res[0], res[1], res[-1]
    res = torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, False, False, scale=scale)
    return res[0], res[1], (res[2], res[3])


def _varlen_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, aux):
    """Gradients of one varlen call, given the (merged) output and LSE of its rows."""
    if _FLASH_ATTN is not None:
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _call_flash_attn(
            "_flash_attn_varlen_backward", grad_out, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k,
            dropout_p=0.0, softmax_scale=scale, causal=False, window_size=(-1, -1), window_size_left=-1,
            window_size_right=-1, softcap=0.0, alibi_slopes=None, deterministic=False, rng_state=aux,
        )
        return dq, dk, dv
    seed, offset = aux
    grads = torch.ops.aten._flash_attention_backward(
        grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, False, seed, offset, scale=scale
    )
    return grads[0], grads[1], grads[2]


class _VarlenKernel:
    """All groups of a block in one varlen FlashAttention call per batch item, the scenes packed as sequences.

    A region of one batch item, ``(H, rows, D)`` of a ``(B, H, L, D)`` tensor, is handed over as a
    ``(rows, H, D)`` view: the kernels take any row and head strides, so nothing is copied (packing
    several batch items into one call would need a copy of q, k and v).
    """

    @staticmethod
    def pack(x: torch.Tensor, item: int, region: Tuple[int, int]) -> torch.Tensor:
        start, end = region
        return x[item, :, start:end].transpose(0, 1)

    @staticmethod
    def unpack(x: torch.Tensor) -> torch.Tensor:
        # (rows, H, D) -> (1, H, rows, D)
        return x.transpose(0, 1).unsqueeze(0)

    @staticmethod
    def cu_seqlens(groups: List[Group], side: int, device) -> Tuple[torch.Tensor, int]:
        lengths = [g[2 * side + 1] - g[2 * side] for g in groups]
        cu = torch.tensor([0] + lengths, device=device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return cu, max(lengths)

    @staticmethod
    def lse_to_hl(lse: torch.Tensor, heads: int) -> Tuple[torch.Tensor, bool]:
        """LSE as (H, rows) fp32, and whether the kernel gave it heads-first: (H, T) is what FlashAttention-2
        and PyTorch's kernels return (and what a square LSE is taken to be); (T, H) is accepted too."""
        rows_first = lse.shape[1] == heads and lse.shape[0] != heads
        if rows_first:
            return lse.transpose(0, 1).float(), False
        return lse.float(), True

    @staticmethod
    def lse_from_hl(lse: torch.Tensor, heads_first: bool) -> torch.Tensor:
        return lse.contiguous() if heads_first else lse.transpose(0, 1).contiguous()


# --------------------------------------------------------------------------------------------------
# Block kernels: the one forward/backward protocol every grouped backend implements.
# --------------------------------------------------------------------------------------------------

# One piece of a block's output: (batch items, first query row, output (b, H, rows, D), LSE fp32 (b, H, rows)).
Piece = Tuple[slice, int, torch.Tensor, torch.Tensor]


class BlockKernel(Protocol):
    """Runs one block of the plan (:func:`_plan`): the groups between one query region and one key region.

    ``query``, ``key``, ``value`` are the whole ``(B, H, L, D)`` tensors; ``groups`` are
    ``(q_start, q_end, k_start, k_end)`` tiling ``q_region`` and ``k_region`` (sequence positions).
    """

    def forward(self, query, key, value, groups: List["Group"], q_region, k_region, scale: float) -> Tuple[List[Piece], Any]:
        """The block's attention as pieces that tile ``q_region``, and what its backward needs (``aux``)."""

    def backward(self, grad_out, query, key, value, out, lse, groups, q_region, k_region, scale, aux, grads) -> None:
        """Add the block's share of dq, dk, dv into ``grads = (grad_q, grad_k, grad_v)`` (each ``(B, H, L, D)``)
        in place. ``out (B, H, L, D)`` and ``lse (B, H, L)`` are the *merged* result of all blocks of these rows."""


class _PerGroupBlockKernel:
    """Block kernel of the ``"sdpa"`` backend: one fused-kernel call per group, all batch items at once."""

    @staticmethod
    def forward(query, key, value, groups, q_region, k_region, scale):
        kernel = _kernel_for(query, "sdpa")
        pieces, aux = [], []
        for g_q0, g_q1, g_k0, g_k1 in groups:
            o_g, l_g, aux_g = kernel.forward(query[:, :, g_q0:g_q1], key[:, :, g_k0:g_k1], value[:, :, g_k0:g_k1], scale)
            aux.append(aux_g)
            pieces.append((slice(None), g_q0, o_g, l_g))
        return pieces, aux

    @staticmethod
    def backward(grad_out, query, key, value, out, lse, groups, q_region, k_region, scale, aux, grads):
        kernel = _kernel_for(query, "sdpa")
        grad_q, grad_k, grad_v = grads
        for (g_q0, g_q1, g_k0, g_k1), aux_g in zip(groups, aux):
            dq, dk, dv = kernel.backward(
                grad_out[:, :, g_q0:g_q1], query[:, :, g_q0:g_q1], key[:, :, g_k0:g_k1], value[:, :, g_k0:g_k1],
                out[:, :, g_q0:g_q1], lse[:, :, g_q0:g_q1].contiguous(), scale, aux_g,
            )
            grad_q[:, :, g_q0:g_q1] += dq
            grad_k[:, :, g_k0:g_k1] += dk
            grad_v[:, :, g_k0:g_k1] += dv


class _VarlenBlockKernel:
    """Block kernel of the ``"flash"`` backend: all groups of a block in one varlen call per batch item."""

    @staticmethod
    def forward(query, key, value, groups, q_region, k_region, scale):
        heads = query.shape[1]
        cu_q, max_q = _VarlenKernel.cu_seqlens(groups, 0, query.device)
        cu_k, max_k = _VarlenKernel.cu_seqlens(groups, 1, query.device)
        pieces, aux = [], []
        for item in range(query.shape[0]):
            o, l, aux_item = _varlen_forward(
                _VarlenKernel.pack(query, item, q_region),
                _VarlenKernel.pack(key, item, k_region),
                _VarlenKernel.pack(value, item, k_region),
                cu_q, cu_k, max_q, max_k, scale,
            )
            l, heads_first = _VarlenKernel.lse_to_hl(l, heads)
            aux.append((cu_q, cu_k, max_q, max_k, aux_item, heads_first))
            pieces.append((slice(item, item + 1), q_region[0], _VarlenKernel.unpack(o), l.unsqueeze(0)))
        return pieces, aux

    @staticmethod
    def backward(grad_out, query, key, value, out, lse, groups, q_region, k_region, scale, aux, grads):
        (q0, q1), (k0, k1) = q_region, k_region
        grad_q, grad_k, grad_v = grads
        for item, (cu_q, cu_k, max_q, max_k, aux_item, heads_first) in enumerate(aux):
            dq, dk, dv = _varlen_backward(
                _VarlenKernel.pack(grad_out, item, q_region), _VarlenKernel.pack(query, item, q_region),
                _VarlenKernel.pack(key, item, k_region), _VarlenKernel.pack(value, item, k_region),
                _VarlenKernel.pack(out, item, q_region),
                _VarlenKernel.lse_from_hl(lse[item, :, q0:q1], heads_first), cu_q, cu_k, max_q, max_k, scale, aux_item,
            )
            grad_q[item : item + 1, :, q0:q1] += _VarlenKernel.unpack(dq)
            grad_k[item : item + 1, :, k0:k1] += _VarlenKernel.unpack(dk)
            grad_v[item : item + 1, :, k0:k1] += _VarlenKernel.unpack(dv)


# --------------------------------------------------------------------------------------------------
# The grouped plan and its autograd function.
# --------------------------------------------------------------------------------------------------


Plan = Dict[str, List[Tuple[str, List[Group]]]]


def _plan(layout: SceneLayout, variant: str) -> Plan:
    """For each query kind: its key blocks as ``(key_kind, groups)``; the groups of a block tile the
    query kind's region in order, and (per batch item) the key kind's region too."""
    plan: Plan = {TEXT: [], VIDEO: []}
    for q_kind, k_kind, rule in attention_blocks(layout, variant):
        if rule == ALL_SCENES:
            groups = [(*layout.region(q_kind), *layout.region(k_kind))]
        else:
            groups = [(*qs, *ks) for qs, ks in zip(layout.segments(q_kind), layout.segments(k_kind))]
        plan[q_kind].append((k_kind, groups))
    return plan


def _regions(plan: Plan) -> Dict[str, Tuple[int, int]]:
    """``(start, end)`` of the text and video regions, read off the plan's groups."""
    regions = {}
    for q_kind, blocks in plan.items():
        groups = blocks[0][1]
        regions[q_kind] = (groups[0][0], groups[-1][1])
    return regions


# Rows merged at a time: bounds the fp32 temporaries of a merge to (B, H, chunk, D).
_MERGE_CHUNK = 4096


def _merge_into(out: torch.Tensor, lse: torch.Tensor, start: int, part_out: torch.Tensor, part_lse: torch.Tensor) -> None:
    """Fold one more block into the partial result held in ``out``/``lse`` rows ``start:start + rows``, in place.

    ``part_out (B, H, rows, D)`` and ``part_lse (B, H, rows)`` are attention over keys disjoint from those
    already merged; the result is softmax attention over the union. fp32 arithmetic, a chunk of rows at a time.
    """
    rows = part_out.shape[2]
    for c0 in range(0, rows, _MERGE_CHUNK):
        c1 = min(c0 + _MERGE_CHUNK, rows)
        target = slice(start + c0, start + c1)
        old_lse, new_lse = lse[:, :, target], part_lse[:, :, c0:c1]
        merged_lse = torch.logaddexp(old_lse, new_lse)
        merged = out[:, :, target].float() * torch.exp(old_lse - merged_lse).unsqueeze(-1)
        merged += part_out[:, :, c0:c1].float() * torch.exp(new_lse - merged_lse).unsqueeze(-1)
        out[:, :, target] = merged.to(out.dtype)
        lse[:, :, target] = merged_lse


class _GroupedSceneAttention(torch.autograd.Function):
    """Runs a plan of blocks with a registered backend's block kernel, merging each query region's blocks
    through their LSEs; exact backward.

    The first block of a region writes its output straight into ``out``; later blocks are folded in place
    (:func:`_merge_into`), so no per-block copy of the region is kept.
    """

    @staticmethod
    def forward(ctx, query, key, value, plan, backend, scale):
        kernel = _block_kernel(backend)
        out = torch.empty_like(query)
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        regions = _regions(plan)
        saved_aux: Dict[Tuple[str, int], Any] = {}
        for q_kind, blocks in plan.items():
            for block_index, (k_kind, groups) in enumerate(blocks):
                pieces, saved_aux[(q_kind, block_index)] = kernel.forward(
                    query, key, value, groups, regions[q_kind], regions[k_kind], scale
                )
                for items, start, o, l in pieces:
                    rows = slice(start, start + o.shape[2])
                    if block_index == 0:
                        out[items, :, rows] = o
                        lse[items, :, rows] = l
                    else:
                        _merge_into(out[items], lse[items], start, o, l)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.plan, ctx.backend, ctx.scale, ctx.aux = plan, backend, scale, saved_aux
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        kernel = _block_kernel(ctx.backend)
        # Each block adds its share in place: no fp32 copies of q, k, v beside the gradients themselves.
        grads = (torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value))
        grad_out = grad_out.to(query.dtype)
        regions = _regions(ctx.plan)
        for q_kind, blocks in ctx.plan.items():
            for block_index, (k_kind, groups) in enumerate(blocks):
                kernel.backward(
                    grad_out, query, key, value, out, lse, groups, regions[q_kind], regions[k_kind], ctx.scale,
                    ctx.aux[(q_kind, block_index)], grads,
                )
        return (*grads, None, None, None)


# --------------------------------------------------------------------------------------------------
# The backend registry.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionBackend:
    """One way to run scene attention, and what it needs to run.

    Exactly one of:
        block_kernel: a :class:`BlockKernel`; the backend then runs the plan's blocks merged through
            their LSEs, with the exact merged backward (:class:`_GroupedSceneAttention`).
        attend: ``(query, key, value, layout, variant, scale) -> (B, H, L, D)`` for ``(B, H, L, D)``
            inputs, differentiable by autograd.

    Constraints, checked against the query before the backend runs (:meth:`unmet_constraint`):
        device_types: device types it runs on (``("cuda",)``); None means any.
        dtypes: dtypes it takes; None means any.
        max_head_dim: largest head size it takes; None means any.
        unavailable: ``device -> reason or None``, for what only a runtime check can tell (a package that
            must be installed, a GPU generation).
    auto_priority: ``"auto"`` takes the highest-priority backend whose constraints hold; None means the
        backend runs only when asked for by name.
    """

    name: str
    block_kernel: Optional[BlockKernel] = None
    attend: Optional[Callable[..., torch.Tensor]] = None
    device_types: Optional[Tuple[str, ...]] = None
    dtypes: Optional[Tuple[torch.dtype, ...]] = None
    max_head_dim: Optional[int] = None
    unavailable: Optional[Callable[[torch.device], Optional[str]]] = None
    auto_priority: Optional[int] = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name == "auto":
            raise ValueError(f"An attention backend needs a name other than 'auto', got {self.name!r}.")
        if (self.block_kernel is None) == (self.attend is None):
            raise ValueError(f"Attention backend {self.name!r} needs exactly one of `block_kernel` and `attend`.")

    def unmet_constraint(self, query: torch.Tensor) -> Optional[str]:
        """Why this backend cannot run on ``query (B, H, L, D)``, or None when it can."""
        if self.device_types is not None and query.device.type not in self.device_types:
            wanted = " or ".join(t.upper() for t in self.device_types)
            return f"it needs a {wanted} device, got {query.device.type}"
        if self.dtypes is not None and query.dtype not in self.dtypes:
            wanted = "/".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"it needs {wanted} tensors, got {str(query.dtype).replace('torch.', '')}"
        if self.max_head_dim is not None and query.shape[-1] > self.max_head_dim:
            return f"it needs a head size of at most {self.max_head_dim}, got {query.shape[-1]}"
        return self.unavailable(query.device) if self.unavailable is not None else None

    def run(self, query, key, value, layout: SceneLayout, variant: str, scale: float) -> torch.Tensor:
        """Masked attention ``(B, H, L, D)`` of ``layout``'s sequence under mask ``variant``."""
        if self.block_kernel is not None:
            return _GroupedSceneAttention.apply(query, key, value, _plan(layout, variant), self.name, scale)
        return self.attend(query, key, value, layout, variant, scale)


_ATTENTION_BACKENDS: Dict[str, AttentionBackend] = {}


def register_attention_backend(backend: AttentionBackend, replace: bool = False) -> AttentionBackend:
    """Add ``backend`` to the registry (``replace=True`` to swap out one of the same name); returns it."""
    if not isinstance(backend, AttentionBackend):
        raise ValueError(f"`backend` must be an AttentionBackend, got {type(backend).__name__}.")
    if backend.name in _ATTENTION_BACKENDS and not replace:
        raise ValueError(f"An attention backend named {backend.name!r} is already registered; pass replace=True.")
    _ATTENTION_BACKENDS[backend.name] = backend
    return backend


def attention_backend_names() -> Tuple[str, ...]:
    """``"auto"`` and the names of all registered backends."""
    return ("auto", *_ATTENTION_BACKENDS)


def check_backend_name(backend: object, name: str = "backend") -> str:
    """``backend`` if it is ``"auto"`` or a registered backend's name, else a ValueError naming ``name``."""
    names = attention_backend_names()
    if not isinstance(backend, str) or backend not in names:
        raise ValueError(f"`{name}` must be one of {list(names)}, got {backend!r}.")
    return backend


def get_attention_backend(name: str) -> AttentionBackend:
    """The registered backend called ``name`` (not ``"auto"``: see :func:`resolve_backend`)."""
    if name not in _ATTENTION_BACKENDS:
        raise ValueError(f"No attention backend named {name!r}; registered: {list(_ATTENTION_BACKENDS)}.")
    return _ATTENTION_BACKENDS[name]


def _block_kernel(name: str) -> BlockKernel:
    kernel = get_attention_backend(name).block_kernel
    if kernel is None:
        raise ValueError(f"Attention backend {name!r} has no block kernel; run it through `scene_attention`.")
    return kernel


def _dense_attend(query, key, value, layout, variant, scale):
    mask = build_dense_mask(layout, variant, device=query.device)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


def _flash_unavailable(device: Optional[torch.device]) -> Optional[str]:
    if not torch.cuda.is_available():
        return "it needs a CUDA device"
    major, minor = _cuda_capability(device)
    if major < 8:
        return f"it needs an sm80+ GPU, got sm{major}{minor}"
    if _FLASH_ATTN is None and not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return "it needs a varlen FlashAttention (the flash-attn package, or PyTorch's own)"
    return None


register_attention_backend(AttentionBackend(
    name="flash", block_kernel=_VarlenBlockKernel, device_types=("cuda",), dtypes=(torch.float16, torch.bfloat16),
    max_head_dim=256, unavailable=_flash_unavailable, auto_priority=20,
))
register_attention_backend(AttentionBackend(name="sdpa", block_kernel=_PerGroupBlockKernel, auto_priority=10))
# The reference: SDPA with the L×L boolean mask. Never picked by "auto" (O(L²) memory).
register_attention_backend(AttentionBackend(name="dense", attend=_dense_attend))

# The built-in names, for code that imported this tuple; attention_backend_names() is the live list.
BACKENDS = attention_backend_names()


def flash_varlen_available(device: Optional[torch.device] = None) -> bool:
    """Whether the ``"flash"`` backend can run: a CUDA device with sm80+ and a varlen FlashAttention."""
    return _flash_unavailable(device) is None


def resolve_backend(backend: str, query: torch.Tensor) -> str:
    """The name of the backend that runs ``query (B, H, L, D)``: ``backend`` itself if its constraints
    hold, or for ``"auto"`` the highest-priority backend whose constraints hold."""
    check_backend_name(backend, "backend")
    if backend == "auto":
        ranked = sorted(
            (b for b in _ATTENTION_BACKENDS.values() if b.auto_priority is not None), key=lambda b: -b.auto_priority
        )
        for candidate in ranked:
            if candidate.unmet_constraint(query) is None:
                return candidate.name
        raise ValueError(f"No attention backend can run {query.dtype} tensors on {query.device}.")
    reason = get_attention_backend(backend).unmet_constraint(query)
    if reason is not None:
        raise ValueError(f"`backend={backend!r}` cannot run here: {reason}. Use 'auto' to pick one that can.")
    return backend


# --------------------------------------------------------------------------------------------------
# Options and the public entry points.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneAttentionOptions:
    """What a caller chose for scene attention, validated once when made (and normalised).

    Attributes:
        mask: ``"v1"``, ``"v2"``, ``"v3"``, ``"full"`` (or the authors' numbers; stored as the name).
        backend: ``"auto"`` or a registered backend's name (:func:`attention_backend_names`).
        names: the parameter names the two values were given under, so that errors name what the
            caller wrote; by default the ``attention_kwargs`` keys ``scene_mask`` and ``attention_backend``.
    """

    mask: str = DEFAULT_MASK_VARIANT
    backend: str = "auto"
    names: Tuple[str, str] = field(default=("scene_mask", "attention_backend"), compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mask", check_mask_variant(self.mask, self.names[0]))
        object.__setattr__(self, "backend", check_backend_name(self.backend, self.names[1]))

    @classmethod
    def split_attention_kwargs(
        cls, attention_kwargs: Optional[Mapping[str, Any]], default_mask: str = DEFAULT_MASK_VARIANT
    ) -> Tuple["SceneAttentionOptions", Dict[str, Any]]:
        """The options given in ``attention_kwargs`` (keys ``scene_mask``, ``attention_backend``) and the
        remaining keys, which go on to the attention processors. The mapping itself is not changed."""
        rest = dict(attention_kwargs or {})
        options = cls(rest.pop("scene_mask", default_mask), rest.pop("attention_backend", "auto"))
        return options, rest


def run_scene_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: SceneLayout,
    options: SceneAttentionOptions,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """:func:`scene_attention` with already-validated ``options`` (what the attention processor calls).

    ``query``, ``key``, ``value``: ``(B, H, L, D)``; returns ``(B, H, L, D)`` in ``query``'s dtype.
    """
    if query.dim() != 4 or key.shape != query.shape or value.shape[:3] != query.shape[:3]:
        raise ValueError(
            f"`query`, `key`, `value` must be (B, H, L, D) with equal B, H, L; got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}."
        )
    if not isinstance(layout, SceneLayout):
        raise ValueError(f"`layout` must be a SceneLayout, got {type(layout).__name__}.")
    layout.check_sequence_length(query.shape[2], "attention sequence")
    backend = resolve_backend(options.backend, query)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale

    # One scene, or no mask: every variant is plain attention.
    if options.mask == "full" or layout.num_scenes == 1:
        return F.scaled_dot_product_attention(query, key, value, scale=scale)
    return get_attention_backend(backend).run(query, key, value, layout, options.mask, scale)


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
            device), ``"dense"`` (SDPA with the L×L boolean mask: the reference), ``"auto"``, or any
            backend added with :func:`register_attention_backend`.
        scale: softmax scale, default ``1/sqrt(D)``.

    Returns:
        ``(B, H, L, D)``, the same dtype as ``query``.
    """
    options = SceneAttentionOptions(mask, backend, names=("mask", "backend"))
    return run_scene_attention(query, key, value, layout, options, scale)
