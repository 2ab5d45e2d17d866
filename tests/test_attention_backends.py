"""The attention backend registry and the options object that validates what callers choose."""

import pytest
import torch

from diffusers_mask2dit import SceneLayout, build_dense_mask, scene_attention
from diffusers_mask2dit import attention as attention_module
from diffusers_mask2dit.attention import (
    AttentionBackend,
    SceneAttentionOptions,
    attention_backend_names,
    get_attention_backend,
    register_attention_backend,
    resolve_backend,
)

LAYOUT = SceneLayout([4, 6, 3], [9, 5, 7])


@pytest.fixture
def registry(monkeypatch):
    """The live registry, restored after the test (backends a test adds do not leak into others)."""
    monkeypatch.setattr(attention_module, "_ATTENTION_BACKENDS", dict(attention_module._ATTENTION_BACKENDS))
    return attention_module._ATTENTION_BACKENDS


def _inputs(seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, LAYOUT.total, 8, generator=generator).to(dtype).requires_grad_() for _ in range(3)]


def _reference(q, k, v, variant):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    scores = (q64 @ k64.transpose(-1, -2) / 8**0.5).masked_fill(~build_dense_mask(LAYOUT, variant), float("-inf"))
    return torch.softmax(scores, -1) @ v64, (q64, k64, v64)


class _MathBlockKernel:
    """A block kernel written against the protocol only: plain-math attention per group."""

    calls = 0

    @classmethod
    def forward(cls, query, key, value, groups, q_region, k_region, scale):
        cls.calls += 1
        pieces, aux = [], []
        for q0, q1, k0, k1 in groups:
            out, lse, _ = attention_module._MathKernel.forward(query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1], scale)
            pieces.append((slice(None), q0, out, lse))
        return pieces, aux

    @staticmethod
    def backward(grad_out, query, key, value, out, lse, groups, q_region, k_region, scale, aux, grads):
        for q0, q1, k0, k1 in groups:
            dq, dk, dv = attention_module._MathKernel.backward(
                grad_out[:, :, q0:q1], query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1], out[:, :, q0:q1],
                lse[:, :, q0:q1], scale, None,
            )
            grads[0][:, :, q0:q1] += dq
            grads[1][:, :, k0:k1] += dk
            grads[2][:, :, k0:k1] += dv


@pytest.mark.parametrize("variant", ["v1", "v2", "v3"])
def test_a_registered_block_kernel_is_exact_through_the_merge(registry, variant):
    register_attention_backend(AttentionBackend(name="math_blocks", block_kernel=_MathBlockKernel))
    assert "math_blocks" in attention_backend_names()
    q, k, v = _inputs()
    _MathBlockKernel.calls = 0
    out = scene_attention(q, k, v, LAYOUT, mask=variant, backend="math_blocks")
    assert _MathBlockKernel.calls == 4  # one call per block: (text, video) queries x (text, video) keys
    reference, leaves = _reference(q, k, v, variant)
    torch.testing.assert_close(out.double(), reference, atol=1e-5, rtol=0)
    grad_out = torch.randn_like(out)
    for ours, theirs in zip(torch.autograd.grad(out, (q, k, v), grad_out), torch.autograd.grad(reference, leaves, grad_out.double())):
        torch.testing.assert_close(ours.double(), theirs, atol=1e-5, rtol=0)


def test_a_registered_backend_reaches_the_transformer(registry):
    """Adding a backend is one registration: the options object, the transformer and the processor take it."""
    from diffusers_mask2dit import Mask2DiTTransformer3DModel

    seen = []

    def dense_and_count(query, key, value, layout, variant, scale):
        seen.append((layout.num_scenes, variant))
        return attention_module._dense_attend(query, key, value, layout, variant, scale)

    register_attention_backend(AttentionBackend(name="counting", attend=dense_and_count))
    torch.manual_seed(0)
    model = Mask2DiTTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=4, text_embed_dim=8,
        num_layers=2, sample_width=8, sample_height=8, sample_frames=5, max_text_seq_length=5,
    ).eval()
    x, text, t = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 10, 8), torch.tensor([[0, 500]])
    with torch.no_grad():
        counted = model(x, text, t, scene_frames=[2, 2], attention_kwargs={"attention_backend": "counting", "scene_mask": 3}).sample
        dense = model(x, text, t, scene_frames=[2, 2], attention_kwargs={"attention_backend": "dense", "scene_mask": "v3"}).sample
    assert seen == [(2, "v3"), (2, "v3")]  # one call per block, with the normalised variant
    assert torch.equal(counted, dense)


def test_auto_picks_the_highest_priority_backend_whose_constraints_hold(registry):
    q = torch.randn(1, 2, LAYOUT.total, 8)
    assert resolve_backend("auto", q) == "sdpa"  # on CPU; "flash" needs CUDA
    dense = get_attention_backend("dense").attend
    register_attention_backend(AttentionBackend(name="gpu_only", attend=dense, device_types=("cuda",), auto_priority=99))
    register_attention_backend(AttentionBackend(name="bf16_only", attend=dense, dtypes=(torch.bfloat16,), auto_priority=50))
    register_attention_backend(AttentionBackend(name="small_heads", attend=dense, max_head_dim=4, auto_priority=40))
    assert resolve_backend("auto", q) == "sdpa"
    assert resolve_backend("auto", q.bfloat16()) == "bf16_only"
    assert resolve_backend("auto", q[..., :4].bfloat16()) == "bf16_only"
    assert resolve_backend("auto", q[..., :4]) == "small_heads"


def test_unmet_constraints_and_bad_registrations_raise_clear_errors(registry):
    q = torch.randn(1, 2, LAYOUT.total, 8)
    dense = get_attention_backend("dense").attend
    register_attention_backend(AttentionBackend(name="needs_pkg", attend=dense, unavailable=lambda device: "it needs the `foo` package"))
    with pytest.raises(ValueError, match="`backend='needs_pkg'` cannot run here: it needs the `foo` package"):
        resolve_backend("needs_pkg", q)
    register_attention_backend(AttentionBackend(name="half", attend=dense, dtypes=(torch.float16,)))
    with pytest.raises(ValueError, match="needs float16 tensors, got float32"):
        scene_attention(q, q, q, LAYOUT, backend="half")
    with pytest.raises(ValueError, match="already registered"):
        register_attention_backend(AttentionBackend(name="half", attend=dense))
    register_attention_backend(AttentionBackend(name="half", attend=dense), replace=True)
    with pytest.raises(ValueError, match="exactly one of"):
        AttentionBackend(name="neither")
    with pytest.raises(ValueError, match="other than 'auto'"):
        AttentionBackend(name="auto", attend=dense)


def test_options_are_validated_once_and_normalised():
    assert SceneAttentionOptions(3, "dense") == SceneAttentionOptions("v3", "dense")
    assert SceneAttentionOptions("V5").mask == "full" and SceneAttentionOptions().backend == "auto"
    with pytest.raises(ValueError, match="`scene_mask`"):
        SceneAttentionOptions("v4")
    with pytest.raises(ValueError, match="`attention_backend`.*'sdpa'"):
        SceneAttentionOptions("v2", "xformers")
    with pytest.raises(Exception):  # frozen
        SceneAttentionOptions().mask = "v1"
    given = {"scene_mask": "v1", "scale": 0.5, "other": 1}
    options, rest = SceneAttentionOptions.split_attention_kwargs(given, default_mask="v3")
    assert options == SceneAttentionOptions("v1", "auto") and rest == {"scale": 0.5, "other": 1}
    assert given == {"scene_mask": "v1", "scale": 0.5, "other": 1}  # the caller's dict is left alone
    assert SceneAttentionOptions.split_attention_kwargs(None, default_mask="v3")[0].mask == "v3"
