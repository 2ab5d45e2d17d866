"""DiTCtrl-style training-free multi-prompt generation: tile layout, blending weights, KV-sharing gate, exactness."""

import pytest
import torch
import torch.nn.functional as F

from diffusers_mask2dit import Mask2DiTPipeline
from diffusers_mask2dit.ditctrl import (
    KVSharing,
    KVSharingAttnProcessor,
    TilePass,
    blend_tiles,
    default_kv_sharing_range,
    kv_sharing_processors,
    tile_layout,
    tile_passes,
    triangular_weights,
)
from diffusers_mask2dit.tiny import build_tiny_components
from diffusers_mask2dit.transformer import Mask2DiTAttnProcessor, scene_rotary_emb

STEPS = 2
PROMPTS = ["a cat walks on the beach", "a dog runs through the grass", "a bird flies over the ocean"]


def make_pipe(style="5b"):
    pipe = Mask2DiTPipeline(**build_tiny_components(style=style, seed=0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# Tile layout, passes and blending weights
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompts, tile, overlap, transitions", [(1, 3, 1, 2), (2, 3, 1, 0), (3, 13, 4, 2), (4, 5, 0, 1)])
def test_tile_layout_lengths_overlaps_and_length_formula(prompts, tile, overlap, transitions):
    layout = tile_layout(prompts, tile, overlap, transitions)
    assert layout.num_tiles == prompts + (prompts - 1) * transitions
    assert layout.total_frames == tile + (layout.num_tiles - 1) * (tile - overlap)
    assert layout.starts == [k * (tile - overlap) for k in range(layout.num_tiles)]
    assert layout.starts[-1] + tile == layout.total_frames  # the last tile ends the video
    for previous, start in zip(layout.starts, layout.starts[1:]):
        assert previous + tile - start == overlap  # consecutive tiles share exactly `overlap` frames
    assert layout.prompt_tiles == [k * (transitions + 1) for k in range(prompts)]
    for prompt, first in enumerate(layout.prompt_tiles):
        assert layout.tile_prompts[first] == (prompt, prompt, 0.0)
        if prompt + 1 < prompts:
            between = layout.tile_prompts[first + 1 : first + 1 + transitions]
            assert [(a, b) for a, b, _ in between] == [(prompt, prompt + 1)] * transitions
            assert [w for _, _, w in between] == pytest.approx([(j + 1) / (transitions + 1) for j in range(transitions)])


def test_ditctrl_reference_setting_gives_its_video_length():
    # DiTCtrl's length formula: tile + (segments - 1) * (tile - overlap); 3 prompts with 2 transition tiles each are 7.
    assert tile_layout(3, 13, 4, 2).total_frames == 13 + 6 * 9


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_prompts=0, tile_frames=3, overlap=0, num_transition_tiles=0), "num_prompts"),
    (dict(num_prompts=2, tile_frames=3, overlap=3, num_transition_tiles=0), "overlap"),
    (dict(num_prompts=2, tile_frames=3, overlap=-1, num_transition_tiles=0), "overlap"),
    (dict(num_prompts=2, tile_frames=3, overlap=1, num_transition_tiles=1.5), "num_transition_tiles"),
])
def test_tile_layout_refuses_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tile_layout(**kwargs)


def test_triangular_weights():
    torch.testing.assert_close(triangular_weights(4), torch.tensor([0.25, 0.75, 0.75, 0.25]))
    torch.testing.assert_close(triangular_weights(3), torch.tensor([1 / 3, 1.0, 1 / 3]))
    for length in range(1, 14):
        weights = triangular_weights(length)
        assert (weights > 0).all() and weights.max() <= 1
        torch.testing.assert_close(weights, weights.flip(0))  # symmetric
        half = weights[: (length + 1) // 2]
        assert (half[1:] > half[:-1]).all()  # rising to the middle


def test_tile_passes_are_ditctrls_adjacent_pairs():
    assert tile_passes(1, True) == [TilePass(0)]
    assert tile_passes(3, True) == [TilePass(0), TilePass(1, 0), TilePass(1), TilePass(2, 2)]
    assert tile_passes(3, False) == [TilePass(0), TilePass(1, None, 2), TilePass(2)]


def test_blend_is_the_weighted_mean_of_the_tiles_covering_each_frame():
    layout = tile_layout(2, 4, 2, 0)  # frames 0-3 and 2-5
    predictions = torch.randn(2, 1, 4, 2, 3, 3)
    blended = blend_tiles(predictions, layout, tile_passes(2, False))
    w = triangular_weights(4)
    torch.testing.assert_close(blended[:, :2], predictions[0, :, :2])  # one tile only: itself
    torch.testing.assert_close(blended[:, 4:], predictions[1, :, 2:])
    for frame, (i, j) in {2: (2, 0), 3: (3, 1)}.items():  # index in tile 0, index in tile 1
        expected = (w[i] * predictions[0, :, i] + w[j] * predictions[1, :, j]) / (w[i] + w[j])
        torch.testing.assert_close(blended[:, frame], expected)
    uniform = blend_tiles(predictions, layout, tile_passes(2, False), latent_blending=False)
    torch.testing.assert_close(uniform[:, 2], (predictions[0, :, 2] + predictions[1, :, 0]) / 2)
    constant = blend_tiles(torch.full_like(predictions, 3.0), layout, tile_passes(2, False))
    torch.testing.assert_close(constant, torch.full_like(constant, 3.0))


def test_blend_without_overlap_puts_tiles_side_by_side_exactly():
    layout = tile_layout(3, 3, 0, 0)
    predictions = torch.randn(3, 2, 3, 4, 2, 2)
    assert torch.equal(blend_tiles(predictions, layout, tile_passes(3, False)), torch.cat(list(predictions), dim=1))


def test_multiplicity_stands_for_ditctrls_repeated_predictions():
    layout = tile_layout(3, 3, 1, 0)
    per_tile = torch.randn(3, 1, 3, 2, 2, 2)
    pairs = tile_passes(3, True)  # tile 1 twice
    repeated = blend_tiles(per_tile[[p.tile for p in pairs]], layout, pairs)
    # The same sum in another order (a + x + x against a + 2x): equal up to rounding.
    torch.testing.assert_close(blend_tiles(per_tile, layout, tile_passes(3, False)), repeated, rtol=0, atol=1e-6)


def test_default_kv_sharing_range_is_ditctrls_share():
    assert default_kv_sharing_range(50, (2 / 50, 25 / 50)) == (2, 25)
    assert default_kv_sharing_range(30, (25 / 30, 1.0)) == (25, 30)
    assert default_kv_sharing_range(4, (25 / 30, 1.0)) == (3, 4)
    assert default_kv_sharing_range(1, (2 / 50, 25 / 50)) == (0, 1)


# ------------------------------------------------------------------------------------------------
# The KV-sharing processor and its gate
# ------------------------------------------------------------------------------------------------


def _transformer_inputs(pipe, batch=2, frames=3, seed=0):
    torch.manual_seed(seed)
    config = pipe.transformer.config
    latents = torch.randn(batch, frames, config.in_channels, config.sample_height, config.sample_width)
    text = torch.randn(batch, 8, config.text_embed_dim)
    rope = scene_rotary_emb(config, config.sample_height, config.sample_width, frames, "cpu")
    return dict(hidden_states=latents, encoder_hidden_states=text, timestep=torch.tensor([500, 500]), image_rotary_emb=rope,
                return_dict=False)


def _block_outputs(transformer, **kwargs):
    outputs = []
    hooks = [block.register_forward_hook(lambda m, a, out: outputs.append(out[0].clone())) for block in transformer.transformer_blocks]
    try:
        final = transformer(**kwargs)[0]
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, final


def test_kv_sharing_gate_is_bit_identical_outside_its_layers(pipe):
    transformer = pipe.transformer
    inputs = _transformer_inputs(pipe)
    stock_blocks, stock = _block_outputs(transformer, **inputs)
    share = KVSharing(torch.tensor([0, 0]), frozenset({1}))  # item 1 reads item 0's keys/values in block 1
    with kv_sharing_processors(transformer):
        assert all(isinstance(p, KVSharingAttnProcessor) for p in transformer.attn_processors.values())
        off_blocks, off = _block_outputs(transformer, **inputs)  # no kv_sharing argument: stock
        elsewhere_blocks, elsewhere = _block_outputs(transformer, attention_kwargs={"kv_sharing": KVSharing(share.source, frozenset({7}))}, **inputs)
        shared_blocks, shared = _block_outputs(transformer, attention_kwargs={"kv_sharing": share}, **inputs)
    assert all(isinstance(p, Mask2DiTAttnProcessor) and not isinstance(p, KVSharingAttnProcessor)
               for p in transformer.attn_processors.values())  # put back
    assert torch.equal(off, stock) and torch.equal(elsewhere, stock)
    assert all(torch.equal(a, b) for a, b in zip(off_blocks + elsewhere_blocks, stock_blocks + stock_blocks))
    assert torch.equal(shared_blocks[0], stock_blocks[0])  # before the shared layer: stock, bit for bit
    assert torch.equal(shared_blocks[1][0], stock_blocks[1][0])  # the source item attends to itself
    assert not torch.allclose(shared_blocks[1][1], stock_blocks[1][1])  # the target item does not
    assert not torch.allclose(shared[1], stock[1])


def test_kv_sharing_with_itself_or_an_identical_source_is_stock(pipe):
    transformer = pipe.transformer
    inputs = _transformer_inputs(pipe)
    inputs["hidden_states"][1] = inputs["hidden_states"][0]
    inputs["encoder_hidden_states"][1] = inputs["encoder_hidden_states"][0]
    stock = transformer(**inputs)[0]
    all_layers = frozenset(range(len(transformer.transformer_blocks)))
    with kv_sharing_processors(transformer):
        for source in ([0, 1], [0, 0]):
            shared = transformer(attention_kwargs={"kv_sharing": KVSharing(torch.tensor(source), all_layers)}, **inputs)[0]
            torch.testing.assert_close(shared, stock, rtol=0, atol=1e-6)


def _reference_shared_attention(attn, hidden_states, encoder_hidden_states, rope, source):
    """Queries of each item, keys and values of its source item (DiTCtrl's definition), written out densely."""
    from diffusers.models.embeddings import apply_rotary_emb

    text = encoder_hidden_states.shape[1]
    x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    heads = attn.heads
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (attn.to_q(x), attn.to_k(x)[source], attn.to_v(x)[source]))
    q, k = attn.norm_q(q), attn.norm_k(k)
    q[:, :, text:] = apply_rotary_emb(q[:, :, text:], rope)
    k[:, :, text:] = apply_rotary_emb(k[:, :, text:], rope)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
    out = attn.to_out[1](attn.to_out[0](out))
    return out[:, text:], out[:, :text]


@pytest.mark.parametrize("fused", [False, True])
def test_kv_sharing_processor_matches_a_dense_reference(fused):
    pipe = make_pipe()
    attn = pipe.transformer.transformer_blocks[0].attn1
    torch.manual_seed(1)
    dim = attn.to_q.in_features
    config = pipe.transformer.config
    tokens = (config.sample_height // config.patch_size) * (config.sample_width // config.patch_size)  # one latent frame
    hidden, text = torch.randn(3, tokens, dim), torch.randn(3, 8, dim)
    rope = scene_rotary_emb(config, config.sample_height, config.sample_width, 1, "cpu")
    source = torch.tensor([0, 0, 1])
    expected = _reference_shared_attention(attn, hidden, text, rope, source)
    if fused:
        pipe.transformer.fuse_qkv_projections()
    with kv_sharing_processors(pipe.transformer):
        processor = attn.processor
        got = processor(attn, hidden, text, image_rotary_emb=rope, kv_sharing=KVSharing(source, frozenset({0})))
    assert type(processor).__name__ == ("FusedKVSharingAttnProcessor" if fused else "KVSharingAttnProcessor")
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_kv_sharing_source_must_match_the_batch(pipe):
    inputs = _transformer_inputs(pipe)
    with kv_sharing_processors(pipe.transformer), pytest.raises(ValueError, match="kv_sharing.source"):
        pipe.transformer(attention_kwargs={"kv_sharing": KVSharing(torch.tensor([0]), frozenset({0}))}, **inputs)


# ------------------------------------------------------------------------------------------------
# generate_ditctrl
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["5b", "2b"])
def test_one_prompt_without_sharing_or_blending_is_stock_generation(style):
    pipe = make_pipe(style)
    kwargs = dict(num_inference_steps=3, guidance_scale=6.0, output_type="latent")
    stock = pipe(["a cat walks on the beach"], generator=gen(), **kwargs)
    ditctrl = pipe.generate_ditctrl(["a cat walks on the beach"], kv_sharing=False, latent_blending=False, generator=gen(), **kwargs)
    assert torch.equal(ditctrl.latents, stock.latents)


def test_tiles_without_overlap_sharing_or_blending_are_stock_generations_of_each_tile(pipe):
    layout = pipe.ditctrl_tile_layout(2, 9, 0, 0)
    noise = torch.randn(1, layout.total_frames, 4, 8, 8, generator=gen(3))
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=6.0, output_type="latent")
    output = pipe.generate_ditctrl(PROMPTS[:2], temporal_tile_size=9, temporal_overlap=0, num_transition_tiles=0,
                                   kv_sharing=False, latent_blending=False, latents=noise, **kwargs)
    for prompt, start in zip(PROMPTS[:2], layout.starts):
        tile = slice(start, start + layout.tile_frames)
        stock = pipe([prompt], latents=noise[:, tile], **kwargs).latents
        torch.testing.assert_close(output.latents[:, tile], stock, rtol=0, atol=1e-5)


def test_kv_sharing_runs_only_in_its_steps_and_changes_the_video(pipe, monkeypatch):
    kwargs = dict(temporal_tile_size=9, temporal_overlap=4, num_transition_tiles=1, num_inference_steps=3,
                  generator=gen(), output_type="latent")
    plain = pipe.generate_ditctrl(PROMPTS[:2], kv_sharing=False, **kwargs).latents
    calls = []
    forward = type(pipe.transformer).forward

    def spy(self, *args, **kw):
        share = (kw.get("attention_kwargs") or {}).get("kv_sharing")
        calls.append(None if share is None else (kw["hidden_states"].shape[0], share.source.tolist(), sorted(share.layers)))
        return forward(self, *args, **kw)

    monkeypatch.setattr(type(pipe.transformer), "forward", spy)
    shared = pipe.generate_ditctrl(PROMPTS[:2], kv_sharing_steps=(1, 2), kv_sharing_layers=(1, 2), **kwargs).latents
    # 3 tiles; step 1 runs DiTCtrl's pairs (0,1), (1,2): 4 passes x 2 guidance branches, targets read their sources.
    assert calls == [None, (8, [0, 0, 2, 2, 4, 4, 6, 6], [1]), None]
    assert not torch.allclose(shared, plain)


def test_output_has_the_whole_video_and_each_prompts_tile(pipe):
    output = pipe.generate_ditctrl(PROMPTS[:2], temporal_tile_size=9, temporal_overlap=4, num_transition_tiles=0,
                                   num_inference_steps=1, generator=gen(), output_type="np")
    layout = pipe.ditctrl_tile_layout(2, 9, 4, 0)
    assert output.latents.shape[1] == layout.total_frames == 3 + 2
    assert output.frames.shape == (1, pipe.decoded_frames(layout.total_frames), 64, 64, 3)
    assert [scene.shape for scene in output.scene_frames[0]] == [(9, 64, 64, 3)] * 2


def test_ditctrl_runs_on_a_15_style_transformer():
    pipe = make_pipe("1.5")
    output = pipe.generate_ditctrl(PROMPTS[:2], temporal_tile_size=9, temporal_overlap=4, num_transition_tiles=0,
                                   kv_sharing_steps=(0, 1), num_inference_steps=STEPS, generator=gen(), output_type="latent")
    assert output.latents.shape[1] == 5 and torch.isfinite(output.latents).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(temporal_tile_size=10), "temporal_tile_size"),
    (dict(temporal_tile_size=9, temporal_overlap=3), "temporal_overlap"),
    (dict(temporal_tile_size=9, temporal_overlap=12), "temporal_overlap"),
    (dict(num_transition_tiles=-1), "num_transition_tiles"),
    (dict(kv_sharing_steps=(2, 1)), "kv_sharing_steps"),
    (dict(kv_sharing_layers=(0, 99)), "kv_sharing_layers"),
    (dict(kv_sharing="yes"), "kv_sharing"),
    (dict(latents=torch.zeros(1, 2, 4, 8, 8)), "latents"),
    (dict(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["prompt_embeds"]), "callback_on_step_end_tensor_inputs"),
])
def test_bad_input_raises_a_clear_value_error(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe.generate_ditctrl(PROMPTS[:2], num_inference_steps=STEPS, **kwargs)


def test_cli_options_reach_generate_ditctrl(pipe):
    import argparse

    from diffusers_mask2dit.generate.ditctrl import add_ditctrl_arguments, ditctrl_options, generate_ditctrl_video

    parser = argparse.ArgumentParser()
    add_ditctrl_arguments(parser)
    args = parser.parse_args(["--method", "ditctrl", "--tile-frames", "9", "--tile-overlap", "4", "--transition-tiles", "0",
                              "--kv-sharing-steps", "0", "1", "--no-latent-blending"])
    assert ditctrl_options(args) == dict(temporal_tile_size=9, temporal_overlap=4, num_transition_tiles=0, kv_sharing=True,
                                         kv_sharing_steps=(0, 1), kv_sharing_layers=None, latent_blending=False)
    assert parser.parse_args([]).method == "mask2dit"
    scenes, video = generate_ditctrl_video(pipe, PROMPTS[:2], args, gen(), num_inference_steps=1)
    assert [s.shape for s in scenes] == [(9, 64, 64, 3)] * 2 and video.shape == (17, 64, 64, 3)
    with pytest.raises(SystemExit):
        parser.parse_args(["--method", "other"])


def test_generate_method_ditctrl_writes_each_prompts_tile_and_the_whole_video(tmp_path, capsys):
    """`mask2dit generate --method ditctrl` on the shipped Shapes model: one scene file per prompt (its own tile), the
    whole video with the transition tiles (longer than the prompts' tiles joined), and no latents file."""
    from diffusers_mask2dit.cli import main
    from diffusers_mask2dit.shapes.model import shipped_model_path
    from diffusers_mask2dit.video_io import read_video

    out = tmp_path / "ditctrl"
    code = main(["generate", "--model", shipped_model_path(), "--method", "ditctrl", "--prompt", "a red circle moves left",
                 "--prompt", "a blue square moves up", "--steps", "2", "--device", "cpu", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    tiles = [read_video(str(out / f"scene_{index:02d}.mp4")) for index in range(2)]
    whole = read_video(str(out / "video.mp4"))
    assert [tile.shape for tile in tiles] == [(9, 48, 48, 3)] * 2
    assert whole.shape[0] > 2 * 9 and whole.shape[1:] == (48, 48, 3)
    assert not (out / "latents.safetensors").exists() and (out / "contact_sheet.png").is_file()


def test_generate_method_ditctrl_refuses_options_it_cannot_take(tmp_path, capsys):
    import argparse

    from diffusers_mask2dit.cli import main
    from diffusers_mask2dit.generate.ditctrl import check_ditctrl_options

    code = main(["generate", "--method", "ditctrl", "--prompt", "a", "--prompt", "b", "--out", str(tmp_path / "o"), "--frames", "9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--frames" in err[0] and "--tile-frames" in err[0]
    # Under torchrun (where the launcher's own check passes) the mode itself refuses parallel options.
    with pytest.raises(ValueError, match="--ulysses-degree"):
        check_ditctrl_options(argparse.Namespace(method="ditctrl", frames=None, ulysses_degree=2, cfg_parallel=False))
