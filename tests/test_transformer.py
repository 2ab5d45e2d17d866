import json

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel

from diffusers_mask2dit import Mask2DiTAttnProcessor, Mask2DiTTransformer3DModel

TEXT = 7  # tokens per prompt in these tiny models (226 in CogVideoX)


def tiny_config(style):
    config = dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=12, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        max_text_seq_length=TEXT,
    )
    if style in ("5b", "1.5"):
        config["use_rotary_positional_embeddings"] = True
    if style == "1.5":
        config["patch_size_t"] = 2
    return config


def pair(style, seed=0):
    torch.manual_seed(seed)
    stock = CogVideoXTransformer3DModel(**tiny_config(style)).eval()
    ours = Mask2DiTTransformer3DModel(**tiny_config(style)).eval()
    ours.load_state_dict(stock.state_dict())
    return stock, ours


@pytest.mark.parametrize("style", ["2b", "5b", "1.5"])
def test_one_scene_reproduces_stock_cogvideox(style):
    stock, ours = pair(style)
    frames = 4 if style == "1.5" else 3
    x, text, t = torch.randn(2, frames, 4, 8, 8), torch.randn(2, TEXT, 12), torch.tensor([10, 700])
    rope = ours.rotary_embeddings(8, 8, frames, "cpu") if style != "2b" else None
    with torch.no_grad():
        expected = stock(x, text, t, image_rotary_emb=rope).sample
        # with an explicit RoPE, as CogVideoXPipeline passes it
        torch.testing.assert_close(ours(x, text, t, image_rotary_emb=rope).sample, expected, atol=1e-5, rtol=0)
        # per-scene timesteps that are all equal are the same thing
        torch.testing.assert_close(ours(x, text, t[:, None], image_rotary_emb=rope).sample, expected, atol=1e-5, rtol=0)
        # without RoPE the model runs without it, as stock does
        torch.testing.assert_close(ours(x, text, t).sample, stock(x, text, t).sample, atol=1e-5, rtol=0)


@pytest.mark.parametrize("style", ["2b", "5b"])
def test_equal_scene_timesteps_equal_per_sample_timestep(style):
    _, ours = pair(style)
    x, text = torch.randn(2, 5, 4, 8, 8), torch.randn(2, 2 * TEXT, 12)
    with torch.no_grad():
        per_sample = ours(x, text, torch.tensor([300, 300]), scene_frames=[2, 3]).sample
        per_scene = ours(x, text, torch.tensor([[300, 300], [300, 300]]), scene_frames=[2, 3]).sample
    # the same numbers up to float rounding: whether the scenes' timesteps are equal is not looked at (that would
    # sync with the host and break compiled graphs); the pipeline passes per-sample timesteps when they are
    torch.testing.assert_close(per_scene, per_sample, atol=1e-6, rtol=0)


def test_isolated_scenes_equal_separate_runs_at_their_positions():
    """v1: each scene only sees itself, so n scenes with their own timesteps must equal n single-scene runs
    given that scene's rows of the joint RoPE (positions run on across scenes): checks the layout, the
    per-scene modulation and the continuous positions together."""
    _, ours = pair("5b")
    frames = [2, 3, 2]
    x, text = torch.randn(1, sum(frames), 4, 8, 8), torch.randn(1, 3 * TEXT, 12)
    t = torch.tensor([[0, 450, 900]])
    cos, sin = ours.rotary_embeddings(8, 8, sum(frames), "cpu")
    tokens_per_frame = 16
    with torch.no_grad():
        joint = ours(
            x, text, t, scene_frames=frames, image_rotary_emb=(cos, sin), attention_kwargs={"scene_mask": "v1"}
        ).sample
        start = 0
        for i, f in enumerate(frames):
            rows = slice(start * tokens_per_frame, (start + f) * tokens_per_frame)
            alone = ours(
                x[:, start : start + f], text[:, i * TEXT : (i + 1) * TEXT], t[:, i], image_rotary_emb=(cos[rows], sin[rows])
            ).sample
            torch.testing.assert_close(joint[:, start : start + f], alone, atol=1e-5, rtol=1e-5)
            start += f
        # ...and the positions do matter: scene 2 run from position 0 differs.
        second_from_zero = ours(
            x[:, 2:5], text[:, TEXT : 2 * TEXT], t[:, 1], image_rotary_emb=ours.rotary_embeddings(8, 8, 3, "cpu")
        ).sample
        assert (joint[:, 2:5] - second_from_zero).abs().max() > 1e-3


def test_context_timestep_zero_changes_only_what_it_should():
    _, ours = pair("5b")
    frames = [2, 2]
    x, text = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 2 * TEXT, 12)
    with torch.no_grad():
        def run(t, mask):
            return ours(x, text, torch.tensor([t]), scene_frames=frames, attention_kwargs={"scene_mask": mask}).sample
        # Isolated scenes: the context's timestep changes the context's output and nothing else.
        base, cond = run([600, 600], "v1"), run([0, 600], "v1")
        assert (base[:, :2] - cond[:, :2]).abs().max() > 1e-3
        torch.testing.assert_close(base[:, 2:], cond[:, 2:], atol=1e-6, rtol=0)
        # v2: the new scene sees the context's video tokens, so it follows the context's state.
        base, cond = run([600, 600], "v2"), run([0, 600], "v2")
        assert (base[:, 2:] - cond[:, 2:]).abs().max() > 1e-4
        # Changing only the new scene's timestep leaves v1's context output untouched.
        torch.testing.assert_close(run([0, 600], "v1")[:, :2], run([0, 100], "v1")[:, :2], atol=1e-6, rtol=0)


def test_text_only_reaches_its_own_scene_under_v2():
    _, ours = pair("5b")
    frames = [2, 2]
    x, text = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 2 * TEXT, 12)
    changed = text.clone()
    changed[:, TEXT:] += 1.0  # second prompt only
    with torch.no_grad():
        a = ours(x, text, torch.tensor([500]), scene_frames=frames).sample
        b = ours(x, changed, torch.tensor([500]), scene_frames=frames).sample
        full = ours(x, changed, torch.tensor([500]), scene_frames=frames, attention_kwargs={"scene_mask": "full"}).sample
    assert (a[:, 2:] - b[:, 2:]).abs().max() > 1e-3
    # In one layer the first scene's video would be untouched; through 2 layers it changes only via
    # scene 2's video tokens, so it moves much less than with no mask at all.
    assert (a[:, :2] - b[:, :2]).abs().max() < (a[:, :2] - full[:, :2]).abs().max()


def test_one_layer_v2_keeps_other_scenes_text_out():
    torch.manual_seed(0)
    config = tiny_config("5b") | {"num_layers": 1}
    ours = Mask2DiTTransformer3DModel(**config).eval()
    x, text = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 2 * TEXT, 12)
    changed = text.clone()
    changed[:, TEXT:] += 1.0
    with torch.no_grad():
        a = ours(x, text, torch.tensor([500]), scene_frames=[2, 2]).sample
        b = ours(x, changed, torch.tensor([500]), scene_frames=[2, 2]).sample
    torch.testing.assert_close(a[:, :2], b[:, :2], atol=1e-6, rtol=0)
    assert (a[:, 2:] - b[:, 2:]).abs().max() > 1e-3


@pytest.mark.parametrize("style", ["2b", "5b", "1.5"])
def test_unequal_scenes_shapes_and_gradients(style):
    _, ours = pair(style)
    frames = [3, 5] if style == "1.5" else [2, 3]
    x = torch.randn(2, sum(frames), 4, 8, 8, requires_grad=True)
    text = torch.randn(2, 2 * TEXT, 12)
    out = ours.train()(x, text, torch.tensor([[0, 500], [0, 800]]), scene_frames=frames).sample
    assert out.shape == x.shape
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_same_gradients():
    _, ours = pair("5b")
    ours.train()
    x = torch.randn(1, 4, 4, 8, 8)
    text = torch.randn(1, 2 * TEXT, 12)
    t = torch.tensor([[0, 300]])

    def grads():
        ours.zero_grad()
        ours(x, text, t, scene_frames=[2, 2]).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}

    plain = grads()
    ours.enable_gradient_checkpointing()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=0)


def test_loading_and_in_place_conversion(tmp_path):
    stock, _ = pair("5b")
    stock.save_pretrained(tmp_path / "stock")
    loaded = Mask2DiTTransformer3DModel.from_pretrained(tmp_path / "stock")
    assert loaded.config.attn_mask_variant == "v2"
    assert isinstance(loaded.transformer_blocks[0].attn1.processor, Mask2DiTAttnProcessor)
    assert loaded.state_dict().keys() == stock.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in stock.state_dict().items())

    # The authors' layout: their class name and an extra `attn_msk_version` key.
    config_path = tmp_path / "stock" / "config.json"
    config = json.loads(config_path.read_text())
    config.update({"_class_name": "CogVideoXTransformer3DModelMask2DiT", "attn_msk_version": 3})
    config_path.write_text(json.dumps(config))
    official = Mask2DiTTransformer3DModel.from_pretrained(tmp_path / "stock")
    assert official.config.attn_mask_variant == "v3"

    plain = CogVideoXTransformer3DModel(**tiny_config("5b"))
    converted = Mask2DiTTransformer3DModel.from_cogvideox(plain)
    assert converted is plain and isinstance(plain, Mask2DiTTransformer3DModel)
    assert isinstance(plain.transformer_blocks[1].attn1.processor, Mask2DiTAttnProcessor)
    with pytest.raises(ValueError, match="CogVideoXTransformer3DModel"):
        Mask2DiTTransformer3DModel.from_cogvideox(torch.nn.Linear(2, 2))


def test_bad_inputs_raise_clear_errors():
    _, ours = pair("5b")
    x, text = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 2 * TEXT, 12)
    with pytest.raises(ValueError, match="scene_frames"):
        ours(x, text, torch.tensor([1]), scene_frames=[2, 3])
    with pytest.raises(ValueError, match="scene_frames"):
        ours(x, text, torch.tensor([1]), scene_frames=[4, 0])
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        ours(x, text[:, :-1], torch.tensor([1]), scene_frames=[2, 2])
    with pytest.raises(ValueError, match="text_lengths"):
        ours(x, text, torch.tensor([1]), scene_frames=[2, 2], text_lengths=[TEXT, TEXT + 1])
    with pytest.raises(ValueError, match="timestep"):
        ours(x, text, torch.tensor([[1, 2, 3]]), scene_frames=[2, 2])
    with pytest.raises(ValueError, match="patch size"):
        ours(torch.randn(1, 4, 4, 8, 7), text, torch.tensor([1]), scene_frames=[2, 2])
    with pytest.raises(ValueError, match="scene_mask"):
        ours(x, text, torch.tensor([1]), scene_frames=[2, 2], attention_kwargs={"scene_mask": "v4"})


@pytest.mark.parametrize("style", ["2b", "5b", "1.5"])
def test_one_scene_is_bit_identical_to_stock(style):
    stock, ours = pair(style)
    frames = 4 if style == "1.5" else 3
    x, text, t = torch.randn(2, frames, 4, 8, 8), torch.randn(2, TEXT, 12), torch.tensor([10, 700])
    rope = ours.prepare_rotary_emb(8, 8, frames, "cpu")
    assert (rope is None) == (style == "2b")
    with torch.no_grad():
        assert torch.equal(ours(x, text, t, image_rotary_emb=rope).sample, stock(x, text, t, image_rotary_emb=rope).sample)
        assert torch.equal(ours(x, text, t).sample, stock(x, text, t).sample)
        # a (1,) timestep broadcasts over the batch, as stock's does
        assert torch.equal(ours(x, text, t[:1]).sample, stock(x, text, t[:1]).sample)


def test_no_rope_is_built_inside(monkeypatch):
    """Without `image_rotary_emb` the model runs without RoPE, as stock does; it never builds one itself."""
    from diffusers_mask2dit import layout as layout_module
    from diffusers_mask2dit import transformer as transformer_module

    _, ours = pair("1.5")

    def no_rope(*args, **kwargs):
        raise AssertionError("the transformer must not build RoPE when none is given")

    monkeypatch.setattr(transformer_module, "rope_over_frames", no_rope)
    monkeypatch.setattr(layout_module, "rope_over_frames", no_rope)
    monkeypatch.setattr(layout_module, "get_3d_rotary_pos_embed", no_rope)
    x, text = torch.randn(1, 5, 4, 8, 8), torch.randn(1, 2 * TEXT, 12)
    with torch.no_grad():
        out = ours(x, text, torch.tensor([[0, 400]]), scene_frames=[2, 3]).sample
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_prepare_rotary_emb_covers_every_scene_padded_to_whole_patches():
    _, ours = pair("1.5")
    cos, sin = ours.prepare_rotary_emb(8, 8, [3, 5], "cpu")  # padded to 4 + 6 frames -> 5 temporal patches
    reference = ours.rotary_embeddings(8, 8, 10, "cpu")
    assert cos.shape == (5 * 16, 16) and torch.equal(cos, reference[0]) and torch.equal(sin, reference[1])
    with pytest.raises(ValueError, match="prepare_rotary_emb"):
        ours(torch.randn(1, 8, 4, 8, 8), torch.randn(1, 2 * TEXT, 12), torch.tensor([1]), scene_frames=[3, 5],
             image_rotary_emb=ours.prepare_rotary_emb(8, 8, [3, 3], "cpu"))


def test_blocks_run_as_modules_with_scene_aware_norms():
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

    from diffusers_mask2dit.transformer import SceneAdaLayerNorm, SceneLayerNormZero

    stock, ours = pair("5b")
    assert list(ours.state_dict()) == list(stock.state_dict())
    assert all(type(block) is CogVideoXBlock for block in ours.transformer_blocks)
    assert all(isinstance(b.norm1, SceneLayerNormZero) and isinstance(b.norm2, SceneLayerNormZero) for b in ours.transformer_blocks)
    assert isinstance(ours.norm_out, SceneAdaLayerNorm)
    calls = []
    for index, block in enumerate(ours.transformer_blocks):
        block.register_forward_pre_hook(lambda module, args, index=index: calls.append(index))
    x, text = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 2 * TEXT, 12)
    ours.train()
    ours(x, text, torch.tensor([[0, 300]]), scene_frames=[2, 2]).sample.mean().backward()
    assert calls == [0, 1]
    calls.clear()
    ours.enable_gradient_checkpointing()
    ours(x, text, torch.tensor([[0, 300]]), scene_frames=[2, 2]).sample.mean().backward()
    assert sorted(calls) == [0, 0, 1, 1]  # each block once forward, once recomputed in the backward


def test_concurrent_calls_with_different_layouts_do_not_mix():
    """The scene information rides in each call's arguments, never in module state: two threads running
    different scene layouts on one model each get what they get alone."""
    import threading

    _, ours = pair("5b")
    jobs = [
        (torch.randn(1, 4, 4, 8, 8), torch.randn(1, 2 * TEXT, 12), torch.tensor([[0, 600]]), [1, 3], "v1"),
        (torch.randn(1, 6, 4, 8, 8), torch.randn(1, 3 * TEXT, 12), torch.tensor([[900, 0, 300]]), [2, 2, 2], "v2"),
    ]

    def run(job):
        x, text, t, frames, mask = job
        with torch.no_grad():
            return ours(x, text, t, scene_frames=frames, attention_kwargs={"scene_mask": mask}).sample

    expected = [run(job) for job in jobs]
    results = [[None] * 4 for _ in jobs]

    def worker(i):
        for repeat in range(4):
            results[i][repeat] = run(jobs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, job_results in enumerate(results):
        assert all(torch.equal(r, expected[i]) for r in job_results)


def test_lora_on_the_scene_norms_keeps_stock_names():
    from peft import LoraConfig

    stock, ours = pair("5b")
    config = dict(r=2, lora_alpha=2, target_modules=["to_q", "to_v", "norm1.linear", "norm_out.linear"], init_lora_weights=False)
    for model in (stock, ours):
        torch.manual_seed(1)
        model.add_adapter(LoraConfig(**config))
    assert list(ours.state_dict()) == list(stock.state_dict())
    assert any("norm1.linear.lora_A" in key for key in ours.state_dict())
    ours.load_state_dict(stock.state_dict())
    x, text, t = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 2 * TEXT, 12), torch.tensor([[0, 300]])
    with torch.no_grad():
        assert torch.equal(ours(x[:, :2], text[:, :TEXT], t[:, 1]).sample, stock(x[:, :2], text[:, :TEXT], t[:, 1]).sample)
        # ... and the adapters act on multi-scene calls as well.
        with_lora = ours(x, text, t, scene_frames=[2, 2]).sample
        ours.disable_adapters()
        without = ours(x, text, t, scene_frames=[2, 2]).sample
    assert (with_lora[:, :2] - without[:, :2]).abs().max() > 1e-4
