"""`torch.compile` on the Mask²DiT transformer: whole model with ``fullgraph=True`` (0 graph breaks) and
regional (`compile_repeated_blocks`), for every mask, shared and per-scene timesteps (scene extension) and a
training step; compiled results equal eager ones and a new prompt recompiles nothing.

Dynamo is what breaks graphs, so most cases compile with the ``"eager"`` backend (dynamo's graph, run
eagerly: seconds on 2 cores); the training step uses ``"aot_eager"``, which also traces the backward
(AOTAutograd, the custom scene-attention autograd function included). Inductor's code generation takes minutes
on 2 cores: `benchmarks/bench_compile.py` runs it.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from diffusers_mask2dit import Mask2DiTPipeline
from diffusers_mask2dit.tiny import build_tiny_components

from test_transformer import TEXT, pair

SCENE_FRAMES = [2, 2, 2]


def _inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, 6, 4, 8, 8, generator=generator), torch.randn(1, 3 * TEXT, 12, generator=generator)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", ["v1", "v2", "v3", "full"])
def test_fullgraph_shared_and_per_scene_timesteps_match_eager_without_recompiles(variant):
    _, model = pair("5b")
    rope = model.prepare_rotary_emb(8, 8, SCENE_FRAMES, "cpu")
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)  # a graph break would raise
    kwargs = dict(image_rotary_emb=rope, scene_frames=SCENE_FRAMES, attention_kwargs={"scene_mask": variant})
    # shared timestep (`__call__`), then per-scene timesteps with context scenes at 0 (`extend`)
    timesteps = [torch.tensor([500]), torch.tensor([[0, 0, 500]])]
    with torch.no_grad():
        for timestep in timesteps:
            for seed in (0, 1):  # a new prompt and new latents: the same graph
                x, text = _inputs(seed)
                expected = model(x, text, timestep, **kwargs).sample
                torch.testing.assert_close(compiled(x, text, timestep, **kwargs).sample, expected, atol=1e-5, rtol=0)
    assert counter.frame_count == len(timesteps)


def test_fullgraph_training_step_matches_eager_gradients():
    _, model = pair("5b")
    model.train()
    rope = model.prepare_rotary_emb(8, 8, SCENE_FRAMES, "cpu")
    timestep = torch.tensor([[0, 0, 700]])  # the segment-level conditional mask: context clean at 0
    x, text = _inputs()

    def loss_and_grads(module):
        module.zero_grad()
        output = module(x, text, timestep, image_rotary_emb=rope, scene_frames=SCENE_FRAMES).sample
        output.square().mean().backward()
        return output.detach(), [p.grad.clone() for p in model.parameters()]

    counter = CompileCounterWithBackend("aot_eager")
    compiled_out, compiled_grads = loss_and_grads(torch.compile(model, backend=counter, fullgraph=True))
    eager_out, eager_grads = loss_and_grads(model)
    assert counter.frame_count == 1
    torch.testing.assert_close(compiled_out, eager_out, atol=1e-5, rtol=0)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad, atol=1e-5, rtol=0)


def _pipeline_runs(pipe, prompts):
    """A 3-scene `__call__` and an `extend` of one scene after two context scenes, as latents."""
    common = dict(num_frames=9, height=64, width=64, num_inference_steps=2, output_type="latent")
    call = pipe(prompt=prompts, generator=torch.Generator().manual_seed(0), **common).frames
    context = torch.randn(1, 6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    extended = pipe.extend(
        prompt=prompts[0], context_prompts=prompts[1:], context_latents=context,
        generator=torch.Generator().manual_seed(2), **common,
    ).frames
    return call, extended


@pytest.mark.parametrize("regional", [False, True], ids=["whole", "regional"])
def test_compiled_pipeline_call_and_extend_match_eager_and_new_prompts_recompile_nothing(regional):
    pipe = Mask2DiTPipeline(**build_tiny_components("5b"))
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a cat walks", "a dog runs", "a bird flies"]
    expected = _pipeline_runs(pipe, prompts)
    counter = CompileCounterWithBackend("eager")
    if regional:
        assert pipe.transformer._repeated_blocks == ["CogVideoXBlock"]
        pipe.transformer.compile_repeated_blocks(backend=counter, fullgraph=True)
    else:
        pipe.transformer = torch.compile(pipe.transformer, backend=counter, fullgraph=True)
    for got, want in zip(_pipeline_runs(pipe, prompts), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    graphs = counter.frame_count
    assert graphs > 0
    _pipeline_runs(pipe, ["a red square moves up", "a fish swims", "a boat sails"])
    assert counter.frame_count == graphs


@pytest.mark.parametrize("variant", ["v1", "v2", "v3"])  # "full" is one unmasked SDPA call, no scene groups
def test_cuda_flash_path_traces_fullgraph_forward_and_backward(monkeypatch, variant):
    """The ``"flash"`` backend's code (varlen packing, cu_seqlens, LSE merging, PyTorch's varlen FlashAttention op)
    compiles with ``fullgraph=True``, forward and backward. No GPU here: the backend is allowed on the CPU, and the
    captured graphs run on fake tensors (shapes only; FlashAttention has no CPU kernel). A graph break, e.g. an
    import or `inspect` call inside the forward, would raise."""
    import dataclasses

    from torch._dynamo.backends.common import aot_autograd
    from torch._subclasses.fake_tensor import FakeTensorMode

    from diffusers_mask2dit import attention
    from diffusers_mask2dit.layout import SceneLayout

    monkeypatch.setattr(attention, "_FLASH_ATTN", None)  # PyTorch's varlen kernel, even with flash-attn installed
    flash = attention.get_attention_backend("flash")
    allowed_here = dataclasses.replace(flash, unavailable=lambda device: None, device_types=None)
    monkeypatch.setitem(attention._ATTENTION_BACKENDS, "flash", allowed_here)
    graphs = []

    def shapes_only(graph_module, example_inputs):
        graphs.append(graph_module)

        def run(*args):
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                return graph_module(*[mode.from_tensor(a) if torch.is_tensor(a) else a for a in args])

        return run

    layout = SceneLayout((4, 4, 4), (8, 12, 8))
    query, key, value = (torch.randn(2, 2, layout.total, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    compiled = torch.compile(attention.scene_attention, fullgraph=True,
                             backend=aot_autograd(fw_compiler=shapes_only, bw_compiler=shapes_only))
    out = compiled(query, key, value, layout, variant, "flash")
    assert out.shape == query.shape and out.dtype == torch.bfloat16
    out.float().sum().backward()
    targets = [[str(node.target) for node in graph.graph.nodes] for graph in graphs]
    assert len(graphs) == 2  # one forward graph, one backward graph
    assert any("_flash_attention_forward" in target for target in targets[0])
    assert any("_flash_attention_backward" in target for target in targets[1])


def test_the_gpu_capability_question_stays_out_of_a_fullgraph_forward(monkeypatch):
    """Choosing a backend asks the GPU's compute capability inside the forward; compiled, that question is answered
    while tracing and kept as a constant, even where dynamo could not trace the query itself."""
    from diffusers_mask2dit import attention

    def capability_dynamo_cannot_trace(device=None):
        torch._dynamo.graph_break()
        return (9, 0)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *args: None)  # dynamo keeps CUDA's RNG state when it
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda *args: None)  # sees CUDA available
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability_dynamo_cannot_trace)
    monkeypatch.setattr(attention, "_FLASH_ATTN", object())  # "a varlen FlashAttention is installed"

    def forward(x):
        return x * (1.0 if attention._flash_unavailable(torch.device("cuda", 0)) is None else 2.0)

    counter = CompileCounterWithBackend("eager")
    x = torch.ones(3)
    assert torch.equal(torch.compile(forward, backend=counter, fullgraph=True)(x), x)  # sm90: flash available
    assert counter.frame_count == 1
