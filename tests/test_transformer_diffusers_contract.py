"""What diffusers' own model tests check of `CogVideoXTransformer3DModel`, checked on ours.

diffusers' CogVideoX model suite (ModelTesterMixin, AttentionTesterMixin, TrainingTesterMixin,
LoraTesterMixin) run with our class swapped in passes wherever it passes on the stock class, except two
tests that hard-code the stock class name (``test_gradient_checkpointing_is_applied``). These tests state
the same contracts in our own terms, for one scene (how diffusers calls the model) and for several.
"""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from diffusers_mask2dit import Mask2DiTAttnProcessor, Mask2DiTTransformer3DModel
from diffusers_mask2dit.transformer import SceneLayerNormZero

# Sizes of diffusers' own tiny CogVideoX test models: 2b-like (sincos) and 1.5-like (RoPE, 2-frame patches).
CONFIGS = {
    "2b": dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2, text_embed_dim=8,
        num_layers=2, sample_width=8, sample_height=8, sample_frames=8, patch_size=2, max_text_seq_length=8,
    ),
    "1.5": dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2, text_embed_dim=8,
        num_layers=2, sample_width=8, sample_height=8, sample_frames=8, patch_size=2, patch_size_t=2,
        max_text_seq_length=8, use_rotary_positional_embeddings=True,
    ),
}


def build(style, **overrides):
    torch.manual_seed(0)
    return Mask2DiTTransformer3DModel(**{**CONFIGS[style], **overrides}).eval()


def inputs(style, num_scenes=1, seed=0):
    """diffusers-style keyword inputs: one scene is what CogVideoXPipeline passes; n scenes add theirs."""
    generator = torch.Generator().manual_seed(seed)
    frames = 2 if style == "1.5" else 1
    kwargs = dict(
        hidden_states=torch.randn(2, frames * num_scenes, 4, 8, 8, generator=generator),
        encoder_hidden_states=torch.randn(2, 8 * num_scenes, 8, generator=generator),
        timestep=torch.randint(0, 1000, (2, num_scenes) if num_scenes > 1 else (2,), generator=generator),
    )
    if num_scenes > 1:
        kwargs["scene_frames"] = [frames] * num_scenes
    return kwargs


def forward(model, **kwargs):
    with torch.no_grad():
        return model(**kwargs, return_dict=False)[0]


@pytest.mark.parametrize("num_scenes", [1, 3])
@pytest.mark.parametrize("style", sorted(CONFIGS))
def test_deterministic_with_tuple_and_dataclass_outputs_alike(style, num_scenes):
    model = build(style)
    first = forward(model, **inputs(style, num_scenes))
    assert first.shape == inputs(style, num_scenes)["hidden_states"].shape
    assert torch.equal(forward(model, **inputs(style, num_scenes)), first)
    with torch.no_grad():
        assert torch.equal(model(**inputs(style, num_scenes)).sample, first)


@pytest.mark.parametrize("how", ["plain", "variant", "sharded", "fp16", "bf16_dtype_alias"])
def test_save_and_load_round_trip(tmp_path, how):
    model = build("1.5")
    expected = forward(model, **inputs("1.5", 2))
    save, load = {}, {}
    if how == "variant":
        save = load = {"variant": "fp16"}
    elif how == "sharded":
        save = {"max_shard_size": "4KB"}
    elif how == "fp16":
        model = model.to(torch.float16)
        load = {"torch_dtype": torch.float16, "low_cpu_mem_usage": True}
    elif how == "bf16_dtype_alias":
        model = model.to(torch.bfloat16)
        load = {"dtype": torch.bfloat16, "low_cpu_mem_usage": True}
    model.save_pretrained(tmp_path, **save)
    if how == "variant":
        with pytest.raises(OSError):
            Mask2DiTTransformer3DModel.from_pretrained(tmp_path)
    if how == "sharded":
        assert len(list(tmp_path.glob("*.safetensors"))) > 1
    loaded = Mask2DiTTransformer3DModel.from_pretrained(tmp_path, **load).eval()
    assert isinstance(loaded.transformer_blocks[0].norm1, SceneLayerNormZero)
    assert all(isinstance(p, Mask2DiTAttnProcessor) for p in loaded.attn_processors.values())
    if how in ("fp16", "bf16_dtype_alias"):
        assert loaded.dtype == model.dtype
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    else:
        assert torch.equal(forward(loaded, **inputs("1.5", 2)), expected)


def test_attention_processor_api():
    model = build("2b")
    processors = model.attn_processors
    assert len(processors) == 2 and all(isinstance(p, Mask2DiTAttnProcessor) for p in processors.values())
    model.set_attn_processor({name: AttnProcessor() for name in processors})
    assert all(type(p) is AttnProcessor for p in model.attn_processors.values())
    with pytest.raises(ValueError):
        model.set_attn_processor({next(iter(processors)): AttnProcessor()})
    attention = model.transformer_blocks[0].attn1
    attention.set_processor(Mask2DiTAttnProcessor())
    assert isinstance(attention.get_processor(), Mask2DiTAttnProcessor)


@pytest.mark.parametrize("style", sorted(CONFIGS))
def test_fuse_and_unfuse_qkv_projections(style):
    model = build(style)
    for num_scenes in (1, 2):
        before = forward(model, **inputs(style, num_scenes))
        model.fuse_qkv_projections()
        assert all(hasattr(block.attn1, "to_qkv") for block in model.transformer_blocks)
        torch.testing.assert_close(forward(model, **inputs(style, num_scenes)), before, atol=1e-5, rtol=1e-5)
        model.unfuse_qkv_projections()
        assert torch.equal(forward(model, **inputs(style, num_scenes)), before)


@pytest.mark.parametrize("num_scenes", [1, 2])
@pytest.mark.parametrize("style", sorted(CONFIGS))
def test_gradient_checkpointing_toggles_and_gives_the_same_step(style, num_scenes):
    model = build(style, dropout=0.0).train()
    assert not model.is_gradient_checkpointing
    kwargs = inputs(style, num_scenes)

    def step():
        model.zero_grad()
        loss = model(**kwargs).sample.square().mean()
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = step()
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    loss, grads = step()
    assert torch.equal(loss, plain_loss) and grads.keys() == plain_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], atol=1e-6, rtol=0)
    model.disable_gradient_checkpointing()
    assert not model.is_gradient_checkpointing


@pytest.mark.parametrize("num_scenes", [1, 2])
def test_training_steps_with_ema_and_bf16_autocast(num_scenes):
    from diffusers.training_utils import EMAModel

    model = build("1.5").train()
    ema = EMAModel(model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(**inputs("1.5", num_scenes)).sample
        loss = torch.nn.functional.mse_loss(output.float(), torch.randn(output.shape))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    ema.step(model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert ema.optimization_step == 1


def _add_lora(model, **overrides):
    from peft import LoraConfig

    config = dict(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    torch.manual_seed(1)
    model.add_adapter(LoraConfig(**{**config, **overrides}))
    return model


def test_lora_adapter_save_load_round_trip(tmp_path):
    model = build("1.5")
    plain = forward(model, **inputs("1.5", 2))
    _add_lora(model, lora_bias=True)  # a bias on lora_B too, as diffusers' suite also checks
    with_lora = forward(model, **inputs("1.5", 2))
    assert (with_lora - plain).abs().max() > 1e-4
    model.save_lora_adapter(tmp_path)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    fresh = build("1.5")
    fresh.load_lora_adapter(tmp_path, prefix=None, use_safetensors=True)
    assert torch.equal(forward(fresh, **inputs("1.5", 2)), with_lora)


def test_lora_fusing_guards_against_non_finite_weights():
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = _add_lora(build("2b"))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BaseTunerLayer) and hasattr(module, "lora_A"):
                module.lora_A["default"].weight += float("inf")
    with pytest.raises(ValueError):
        model.fuse_lora(safe_fusing=True)
    model.fuse_lora(safe_fusing=False)
    assert torch.isnan(forward(model, **inputs("2b", 2))).all()


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_lora_with_layerwise_casting(compute_dtype):
    model = _add_lora(build("1.5").to(compute_dtype))
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
    assert model.transformer_blocks[0].attn1.to_q.base_layer.weight.dtype == torch.float8_e4m3fn
    assert model.transformer_blocks[0].norm1.linear.weight.dtype == compute_dtype  # "norm" is never cast
    kwargs = inputs("1.5", 2)
    kwargs = {k: v.to(compute_dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
    output = forward(model, **kwargs)
    assert output.dtype == compute_dtype and torch.isfinite(output).all()
