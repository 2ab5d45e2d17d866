import pytest
import torch
import torch.nn.functional as F

from diffusers_mask2dit import SceneLayout, build_dense_mask, scene_attention
from diffusers_mask2dit import attention as attention_module

LAYOUTS = {
    1: SceneLayout([5], [13]),
    2: SceneLayout([4, 6], [9, 14]),
    3: SceneLayout([5, 3, 4], [11, 6, 9]),
    5: SceneLayout([3, 4, 2, 5, 3], [7, 4, 9, 5, 6]),
}


def _dense_reference(q, k, v, layout, variant):
    """Masked softmax attention in float64, written out by hand."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    scores = q64 @ k64.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~build_dense_mask(layout, variant), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v64, (q64, k64, v64)


def _inputs(layout, batch=2, heads=3, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, layout.total, dim, generator=generator, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("num_scenes", sorted(LAYOUTS))
@pytest.mark.parametrize("variant", ["v1", "v2", "v3", "full"])
@pytest.mark.parametrize("backend", ["sdpa", "dense", "auto"])
def test_matches_dense_reference_forward_and_gradients(num_scenes, variant, backend):
    layout = LAYOUTS[num_scenes]
    q, k, v = _inputs(layout, seed=num_scenes)
    out = scene_attention(q, k, v, layout, mask=variant, backend=backend)
    reference, leaves = _dense_reference(q, k, v, layout, variant)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), reference, atol=1e-5, rtol=0)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    reference_grads = torch.autograd.grad(reference, leaves, grad_out.double())
    for ours, theirs in zip(grads, reference_grads):
        torch.testing.assert_close(ours.double(), theirs, atol=1e-5, rtol=0)


def test_masks_actually_differ():
    layout = LAYOUTS[3]
    q, k, v = _inputs(layout)
    outs = {variant: scene_attention(q, k, v, layout, mask=variant) for variant in ("v1", "v2", "v3", "full")}
    for a in outs:
        for b in outs:
            if a < b:
                assert (outs[a] - outs[b]).abs().max() > 1e-3, (a, b)


@pytest.mark.parametrize("variant", ["v1", "v2", "v3"])
def test_one_scene_is_plain_attention(variant):
    layout = LAYOUTS[1]
    q, k, v = _inputs(layout)
    torch.testing.assert_close(scene_attention(q, k, v, layout, variant), F.scaled_dot_product_attention(q, k, v), atol=1e-6, rtol=0)


def test_grouped_path_is_exact_when_it_covers_everything():
    # v2 with n=1 goes straight to SDPA; run the grouped machinery itself on one scene to compare.
    layout = LAYOUTS[1]
    q, k, v = _inputs(layout)
    grouped = attention_module._GroupedSceneAttention.apply(q, k, v, attention_module._plan(layout, "v2"), "sdpa", 8**-0.5)
    torch.testing.assert_close(grouped, F.scaled_dot_product_attention(q, k, v), atol=1e-6, rtol=0)


def test_grouped_backend_uses_views_not_masks_or_copies(monkeypatch):
    """The sdpa backend builds no L×L mask and hands the kernels views of the original keys/values."""
    layout = LAYOUTS[3]
    q, k, v = _inputs(layout)

    def no_dense_mask(*args, **kwargs):
        raise AssertionError("the grouped backend must not build a dense mask")

    monkeypatch.setattr(attention_module, "build_dense_mask", no_dense_mask)
    storages = {k.untyped_storage().data_ptr(), v.untyped_storage().data_ptr()}
    seen = []
    original = attention_module._CpuFlashKernel.forward

    def recording_forward(q_, k_, v_, scale):
        seen.append((k_.untyped_storage().data_ptr() in storages, v_.untyped_storage().data_ptr() in storages, k_.shape[2]))
        return original(q_, k_, v_, scale)

    monkeypatch.setattr(attention_module._CpuFlashKernel, "forward", staticmethod(recording_forward))
    out = scene_attention(q, k, v, layout, mask="v2", backend="sdpa")
    out.sum().backward()
    assert seen and all(k_view and v_view for k_view, v_view, _ in seen)
    # Keys seen in total: text_i + video_i per text group, all video for the video block, text_i per video group.
    assert sum(length for _, _, length in seen) == layout.text_total + layout.video_total + layout.video_total + layout.text_total


def test_bf16_runs_close_to_fp32():
    layout = LAYOUTS[3]
    q, k, v = _inputs(layout)
    ours = scene_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), layout)
    reference = scene_attention(q, k, v, layout)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), reference, atol=3e-2, rtol=0)


def test_bad_arguments():
    layout = LAYOUTS[2]
    q, k, v = _inputs(layout)
    with pytest.raises(ValueError, match="`mask`"):
        scene_attention(q, k, v, layout, mask="v4")
    with pytest.raises(ValueError, match="`backend`"):
        scene_attention(q, k, v, layout, backend="xformers")
    with pytest.raises(ValueError, match="adds up to"):
        scene_attention(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], layout)
    with pytest.raises(ValueError, match="`layout`"):
        scene_attention(q, k, v, [4, 6])
    with pytest.raises(ValueError, match="CUDA"):
        scene_attention(q, k, v, layout, backend="flash")


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["flash", "sdpa"])
@pytest.mark.parametrize("variant", ["v1", "v2", "v3"])
def test_cuda_backends_match_dense_reference(backend, variant):
    if backend == "flash" and not attention_module.flash_varlen_available():
        pytest.skip("no varlen FlashAttention on this GPU")
    layout = SceneLayout([226, 226, 226], [1350, 900, 1350])
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, layout.total, 64, device="cuda", generator=generator, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = scene_attention(q, k, v, layout, mask=variant, backend=backend)
    mask = build_dense_mask(layout, variant).cuda()
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    reference = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask)
    torch.testing.assert_close(out.float(), reference, atol=2e-2, rtol=0)
    grad_out = torch.randn_like(reference)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.bfloat16())
    reference_grads = torch.autograd.grad(reference, (qf, kf, vf), grad_out)
    for ours, theirs in zip(grads, reference_grads):
        torch.testing.assert_close(ours.float(), theirs, atol=5e-2, rtol=5e-2)


@cuda
@pytest.mark.cuda
def test_cuda_fp32_sdpa_is_exact():
    layout = LAYOUTS[3]
    q, k, v = (t.detach().cuda().requires_grad_() for t in _inputs(layout))
    out = scene_attention(q, k, v, layout, backend="sdpa")
    reference, leaves = _dense_reference(q.cpu(), k.cpu(), v.cpu(), layout, "v2")
    torch.testing.assert_close(out.double().cpu(), reference, atol=1e-5, rtol=0)


def _emulated_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """Varlen FlashAttention's contract on packed (T, H, D) tensors, in plain math: LSE as (H, T)."""
    outs, lses = [], []
    for i in range(len(cu_q) - 1):
        qs, ks, vs = (x[c[i] : c[i + 1]].transpose(0, 1) for x, c in ((q, cu_q), (k, cu_k), (v, cu_k)))
        o, lse, _ = attention_module._MathKernel.forward(qs, ks, vs, scale)
        outs.append(o.transpose(0, 1))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, dim=1), None


def _emulated_varlen_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, aux):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for i in range(len(cu_q) - 1):
        rows, cols = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        grads = attention_module._MathKernel.backward(
            grad_out[rows].transpose(0, 1), q[rows].transpose(0, 1), k[cols].transpose(0, 1), v[cols].transpose(0, 1),
            out[rows].transpose(0, 1), lse[:, rows], scale, None,
        )
        dq[rows], dk[cols], dv[cols] = (g.transpose(0, 1) for g in grads)
    return dq, dk, dv


@pytest.mark.parametrize("lse_heads_first", [True, False])
@pytest.mark.parametrize("variant", ["v1", "v2", "v3"])
def test_flash_path_packing_and_merging_on_cpu(monkeypatch, variant, lse_heads_first):
    """The flash backend's packing, cu_seqlens, LSE layout and merged backward, checked on CPU with the
    varlen kernel replaced by its plain-math contract (the kernel itself runs only on a GPU). Kernels
    give the LSE as (H, T) (FlashAttention-2) or (T, H); both must round-trip."""
    forward, backward = _emulated_varlen_forward, _emulated_varlen_backward
    if not lse_heads_first:
        def forward(*args):
            out, lse, aux = _emulated_varlen_forward(*args)
            return out, lse.T.contiguous(), aux

        def backward(grad_out, q, k, v, out, lse, *rest):
            return _emulated_varlen_backward(grad_out, q, k, v, out, lse.T, *rest)
    layout = LAYOUTS[3]
    q, k, v = _inputs(layout)
    # Each call gets views of one batch item's q, k, v: the packing copies nothing.
    storages = {x.untyped_storage().data_ptr() for x in (q, k, v)}
    calls = []

    def viewing_forward(q_, k_, v_, *rest):
        calls.append(all(x.untyped_storage().data_ptr() in storages for x in (q_, k_, v_)))
        return forward(q_, k_, v_, *rest)

    monkeypatch.setattr(attention_module, "_varlen_forward", viewing_forward)
    monkeypatch.setattr(attention_module, "_varlen_backward", backward)
    plan = attention_module._plan(layout, variant)
    out = attention_module._GroupedSceneAttention.apply(q, k, v, plan, "flash", 8**-0.5)
    reference, leaves = _dense_reference(q, k, v, layout, variant)
    torch.testing.assert_close(out.double(), reference, atol=1e-5, rtol=0)
    grad_out = torch.randn_like(out)
    for ours, theirs in zip(torch.autograd.grad(out, (q, k, v), grad_out), torch.autograd.grad(reference, leaves, grad_out.double())):
        torch.testing.assert_close(ours.double(), theirs, atol=1e-5, rtol=0)
    # one call per block and batch item
    assert len(calls) == q.shape[0] * sum(len(blocks) for blocks in plan.values()) and all(calls)


def test_merge_in_row_chunks_is_exact(monkeypatch):
    monkeypatch.setattr(attention_module, "_MERGE_CHUNK", 3)  # many chunks, ragged last one
    layout = LAYOUTS[3]
    q, k, v = _inputs(layout)
    out = scene_attention(q, k, v, layout, mask="v2", backend="sdpa")
    reference, _ = _dense_reference(q, k, v, layout, "v2")
    torch.testing.assert_close(out.double(), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("budget", [1 << 28, 40])
def test_math_kernel_matches_reference_in_row_chunks(monkeypatch, budget):
    """The fallback kernel (fp32 on CUDA, other devices) is exact, also when its score budget forces
    many small row chunks; checked on CPU through the grouped machinery."""
    monkeypatch.setattr(attention_module, "_MATH_SCORES_BUDGET", budget)
    monkeypatch.setattr(attention_module, "_kernel_for", lambda tensor, backend: attention_module._MathKernel)
    layout = LAYOUTS[3]
    q, k, v = _inputs(layout)
    out = scene_attention(q, k, v, layout, mask="v2", backend="sdpa")
    reference, leaves = _dense_reference(q, k, v, layout, "v2")
    torch.testing.assert_close(out.double(), reference, atol=1e-5, rtol=0)
    grad_out = torch.randn_like(out)
    for ours, theirs in zip(torch.autograd.grad(out, (q, k, v), grad_out), torch.autograd.grad(reference, leaves, grad_out.double())):
        torch.testing.assert_close(ours.double(), theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["v1", "v2", "v3"])
def test_flash_path_fits_pytorch_flash_kernel_signatures(monkeypatch, variant):
    """The flash backend's real calls into PyTorch's varlen FlashAttention ops, run on fake tensors: the ops'
    shape functions take the real arguments and give the real output layouts (LSE (H, T)), so arity and
    packing/layout mistakes fail here without a GPU. What only the kernel checks (cu_seqlens dtype, max
    lengths) and the numbers need `-m cuda`; the same packing with a plain-math kernel is checked above."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(attention_module, "_FLASH_ATTN", None)  # PyTorch's own kernels, even with flash-attn installed
    layout = SceneLayout([5, 7, 6], [11, 9, 13])
    with FakeTensorMode():
        q, k, v = (torch.randn(2, 3, layout.total, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        with RecordOps() as record:
            out = attention_module._GroupedSceneAttention.apply(q, k, v, attention_module._plan(layout, variant), "flash", 0.25)
            grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert {"aten._flash_attention_forward.default", "aten._flash_attention_backward.default"} <= record.names
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    for grad, leaf in zip(grads, (q, k, v)):
        assert grad.shape == leaf.shape and grad.dtype == leaf.dtype
