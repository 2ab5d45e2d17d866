"""Reference attention implementations the benchmarks compare `scene_attention` against.

None of these is used by the package itself; they exist only to be measured side by side with it.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from diffusers_mask2dit import SceneLayout, build_dense_mask
from diffusers_mask2dit.layout import TEXT, VIDEO, allowed


def unmasked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """Plain softmax attention over the whole sequence (no scene mask): the cost ceiling for v2."""
    return F.scaled_dot_product_attention(query, key, value, scale=scale)


def dense_mask_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: Optional[float] = None
) -> torch.Tensor:
    """SDPA with an L×L boolean mask (True = may attend), e.g. ``build_dense_mask(layout, "v2")``."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


def authors_scene_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: SceneLayout,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """The authors' grouped v2 attention, re-implemented from METHOD.md / paper Sec. 3.2 for comparison only.

    This is not the package's method; it is written here from the published description so that its
    cost can be measured at the same shapes. For every scene i:

    - the text_i queries attend to the keys ``[text_i ; video_i]``;
    - the video_i queries attend to the keys ``[text_i ; video_1 .. video_n]``, a key/value set that is
      built by concatenation, i.e. all video keys and values are materialised once per scene, and the
      n copies are alive together (one batched attention over the scenes), which is n² video memory.

    Like the authors' code it needs every scene to have the same text length and the same video length.
    Input and output are ``(B, H, L, D)`` in the package's token order ``[text_1..text_n ; video_1..video_n]``.
    """
    n = layout.num_scenes
    if len(set(layout.text_lengths)) != 1 or len(set(layout.video_lengths)) != 1:
        raise ValueError("authors_scene_attention needs equal text and video lengths in every scene (as the authors' code).")
    layout.check_sequence_length(query.shape[2])
    batch, heads, _, dim = query.shape
    text_len, video_len = layout.text_lengths[0], layout.video_lengths[0]
    text_total = layout.text_total
    scale = 1.0 / math.sqrt(dim) if scale is None else scale

    def per_scene(x: torch.Tensor, start: int, length: int) -> torch.Tensor:
        # (B, H, n * length, D) region -> (n, B, H, length, D) view, scene-major
        return x[:, :, start : start + n * length].reshape(batch, heads, n, length, dim).permute(2, 0, 1, 3, 4)

    def batched(x: torch.Tensor) -> torch.Tensor:
        # (n, B, H, length, D) -> (n * B, H, length, D): one attention call over all scenes
        return x.reshape(n * batch, heads, x.shape[-2], dim)

    def to_sequence(x: torch.Tensor, length: int) -> torch.Tensor:
        # (n * B, H, length, D) -> (B, H, n * length, D)
        return x.reshape(n, batch, heads, length, dim).permute(1, 2, 0, 3, 4).reshape(batch, heads, n * length, dim)

    q_text, q_video = per_scene(query, 0, text_len), per_scene(query, text_total, video_len)
    k_text, k_video = per_scene(key, 0, text_len), per_scene(key, text_total, video_len)
    v_text, v_video = per_scene(value, 0, text_len), per_scene(value, text_total, video_len)

    # Video queries of scene i: keys [text_i ; video_1..video_n]. The concatenation writes all video
    # keys/values once per scene: n copies, alive together for the one batched call.
    all_video_k = key[:, :, text_total:].unsqueeze(0).expand(n, -1, -1, -1, -1)
    all_video_v = value[:, :, text_total:].unsqueeze(0).expand(n, -1, -1, -1, -1)
    video_keys = batched(torch.cat([k_text, all_video_k], dim=3))
    video_values = batched(torch.cat([v_text, all_video_v], dim=3))
    out_video = F.scaled_dot_product_attention(batched(q_video), video_keys, video_values, scale=scale)
    del video_keys, video_values

    # Text queries of scene i: keys [text_i ; video_i].
    text_keys = batched(torch.cat([k_text, k_video], dim=3))
    text_values = batched(torch.cat([v_text, v_video], dim=3))
    out_text = F.scaled_dot_product_attention(batched(q_text), text_keys, text_values, scale=scale)

    return torch.cat([to_sequence(out_text, text_len), to_sequence(out_video, video_len)], dim=2)


def check_authors_matches_dense(layout: SceneLayout, batch: int = 2, heads: int = 2, dim: int = 16, seed: int = 0) -> float:
    """Forward and gradients of :func:`authors_scene_attention` vs SDPA with ``build_dense_mask(layout, "v2")``
    in float64. Raises AssertionError on a mismatch; returns the largest absolute difference."""
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(batch, heads, layout.total, dim, generator=generator, dtype=torch.float64) for _ in range(3)]
    ours = [t.clone().requires_grad_() for t in tensors]
    ref = [t.clone().requires_grad_() for t in tensors]
    out = authors_scene_attention(*ours, layout)
    expected = dense_mask_attention(*ref, build_dense_mask(layout, "v2"))
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    grads = torch.autograd.grad(out, ours, grad_out)
    expected_grads = torch.autograd.grad(expected, ref, grad_out)
    worst = (out - expected).abs().max().item()
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
        worst = max(worst, (got - want).abs().max().item())
    return worst


# --------------------------------------------------------------------------------------------------
# A reference for sequences too long for SDPA with a dense mask: fp32 math on sampled query rows.
# --------------------------------------------------------------------------------------------------


def sample_query_rows(layout: SceneLayout, per_segment: int = 4) -> torch.Tensor:
    """Query positions to check: the first, last and ``per_segment - 2`` evenly spaced rows of every scene's
    text and video segment (so every (query kind, scene) block of the mask is covered). Sorted, int64."""
    rows = set()
    for kind in (TEXT, VIDEO):
        for start, end in layout.segments(kind):
            count = min(per_segment, end - start)
            rows.update(start + (i * (end - start - 1)) // max(1, count - 1) for i in range(count))
    return torch.tensor(sorted(rows), dtype=torch.long)


def mask_rows(layout: SceneLayout, variant: str, rows: torch.Tensor, device=None) -> torch.Tensor:
    """Rows ``rows`` of ``build_dense_mask(layout, variant)``, bool ``(R, L)``, without building the L×L mask."""
    out = torch.zeros(len(rows), layout.total, dtype=torch.bool, device=device)
    for query_kind in (TEXT, VIDEO):
        for qi, (q0, q1) in enumerate(layout.segments(query_kind)):
            hit = ((rows >= q0) & (rows < q1)).nonzero().flatten().tolist()
            if not hit:
                continue
            for key_kind in (TEXT, VIDEO):
                for ki, (k0, k1) in enumerate(layout.segments(key_kind)):
                    if allowed(variant, query_kind, qi, key_kind, ki):
                        out[hit, k0:k1] = True
    return out


def sampled_rows_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor,
    grad_out: Optional[torch.Tensor] = None, chunk: int = 16,
):
    """Masked attention in fp32 math for the query rows ``rows`` only: ``(out_rows, dq_rows)``, each
    ``(B, H, R, D)`` fp32 (``dq_rows`` None without ``grad_out``, the ``(B, H, L, D)`` gradient of the output).

    ``mask`` is the ``(R, L)`` boolean mask of those rows (:func:`mask_rows`). The gradient of a query row needs
    only its own row of probabilities: ``dq_i = scale * sum_j P_ij (g_i . v_j - g_i . o_i) k_j``. Rows are taken
    ``chunk`` at a time so that the ``(B, H, chunk, L)`` scores stay small at any ``L``.
    """
    scale = 1.0 / math.sqrt(query.shape[-1])
    key32, value32 = key.detach().float(), value.detach().float()
    outs, dqs = [], []
    for first in range(0, len(rows), chunk):
        index = rows[first : first + chunk].to(query.device)
        q = query.detach()[:, :, index].float()
        scores = (q @ key32.transpose(-1, -2)) * scale
        scores.masked_fill_(~mask[first : first + chunk].to(query.device), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        del scores
        out = probs @ value32
        outs.append(out)
        if grad_out is not None:
            g = grad_out[:, :, index].float()
            d_probs = g @ value32.transpose(-1, -2)
            d_scores = probs * (d_probs - (g * out).sum(-1, keepdim=True))
            del d_probs
            dqs.append((d_scores @ key32) * scale)
        del probs
    return torch.cat(outs, dim=2), (torch.cat(dqs, dim=2) if grad_out is not None else None)


# --------------------------------------------------------------------------------------------------
# FlexAttention (torch.nn.attention.flex_attention): what an expert would reach for to run a custom mask.
# --------------------------------------------------------------------------------------------------


def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def flex_mask_mod(layout: SceneLayout, variant: str, device: torch.device) -> Callable:
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` for ``variant`` over ``layout``, read off the
    layout rules (:func:`diffusers_mask2dit.layout.allowed`): it allows exactly the pairs of
    ``build_dense_mask(layout, variant)``.

    Every variant lets a scene's tokens see each other; on top of that a (query kind, key kind) pair whose
    rule is "all scenes" is allowed across scenes. Written as a few boolean ops on per-token tables so that
    ``create_block_mask`` (which evaluates it over all L×L pairs) needs about 3 bytes per pair.
    """
    scene = torch.empty(layout.total, dtype=torch.int32)
    is_video = torch.zeros(layout.total, dtype=torch.bool)
    for kind in (TEXT, VIDEO):
        for index, (start, end) in enumerate(layout.segments(kind)):
            scene[start:end] = index
    is_video[layout.text_total :] = True
    scene, is_video = scene.to(device), is_video.to(device)
    flags = {TEXT: ~is_video, VIDEO: is_video}
    pairs = [(q, k) for q in (TEXT, VIDEO) for k in (TEXT, VIDEO)]
    if not all(allowed(variant, q, 0, k, 0) for q, k in pairs):
        raise ValueError(f"mask {variant!r} forbids pairs within a scene; flex_mask_mod does not cover that case.")
    across = [(flags[q], flags[k]) for q, k in pairs if allowed(variant, q, 0, k, 1)]

    def mask_mod(b, h, q_idx, kv_idx):
        keep = scene[q_idx] == scene[kv_idx]
        for query_flags, key_flags in across:
            keep = keep | (query_flags[q_idx] & key_flags[kv_idx])
        return keep

    return mask_mod


def flex_block_mask(layout: SceneLayout, variant: str, device: torch.device, block_size: int = 128):
    """The ``BlockMask`` of ``variant`` over ``layout`` (one for every batch item and head), built by
    ``create_block_mask`` from :func:`flex_mask_mod`. Built once per layout and reused by every call, as a
    model would share it between its layers."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = flex_mask_mod(layout, variant, device)
    return create_block_mask(mask_mod, None, None, layout.total, layout.total, device=device, BLOCK_SIZE=block_size)


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_scene_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask, compiled: bool = True,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """FlexAttention with ``block_mask`` (see :func:`flex_block_mask`), ``(B, H, L, D)`` in and out.

    ``compiled``: through ``torch.compile`` (fused kernels, the way FlexAttention is meant to run); eager
    FlexAttention materialises the full score matrix and is for small checks only.
    """
    if compiled:
        return _compiled_flex_attention()(query, key, value, block_mask=block_mask, scale=scale)
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(query, key, value, block_mask=block_mask, scale=scale)


def flex_backward_error(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None if FlexAttention's backward runs on ``device`` (tried eagerly on a 128-token sequence), else what
    failed (torch 2.13 has no CPU backward: ``flex_attention`` refuses CPU inputs that require grad)."""
    layout = SceneLayout.uniform(2, 16, 48)
    tensors = [torch.randn(1, 1, layout.total, 16, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    try:
        out = flex_scene_attention(*tensors, flex_block_mask(layout, "v2", device), compiled=False)
        torch.autograd.grad(out.sum(), tensors)
    except (NotImplementedError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}".splitlines()[0]
    return None
