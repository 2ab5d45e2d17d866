"""What the parallel tests run, once in one process (the reference) and once in each of 2 or 4 gloo processes.

Run as a script it is one rank of a multi-process run (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set):

    python parallel_scenarios.py --world 2|4 --out DIR [--kill | --example-model MODEL]

Rank 0 writes ``DIR/results.safetensors`` (every scenario's output) and ``DIR/messages.json`` (the errors the
bad setups raised). Then, with ``--kill``, the last rank kills itself (SIGKILL) inside a forward pass and every
other rank writes ``DIR/error_rank{r}.json`` (the error it stopped with, and when); with ``--example-model``,
``examples/generate_parallel.py`` runs with CFG parallelism on that model and rank 0 writes its frames to
``DIR/example.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import signal
import sys
import time
from typing import Callable, Dict, List

import torch

SCENE_FRAMES = [2, 3, 2]  # latent frames per scene; 15 patches per frame -> 105 video tokens (padded for 2 and 4)
TEXT_TOKENS = 7  # per scene -> 21 text tokens (padded for 2 and 4)
MASKS = ("v1", "v2", "v3", "full")
HEADS = 6  # 6 heads over 4 ranks: 2, 2, 1, 1
COLLECTIVE_TIMEOUT = 20  # seconds


# --------------------------------------------------------------------------------------------------
# Transformer scenarios: every mask, per-sample and per-scene (extension) timesteps, lengths that need padding
# --------------------------------------------------------------------------------------------------


STYLES = ("5b", "2b", "1.5")  # RoPE; sincos positions; RoPE and 2-frame temporal patches
GRADIENT_PARAMETERS = (
    "time_embedding.linear_1.weight", "transformer_blocks.0.attn1.to_q.weight", "transformer_blocks.1.ff.net.0.proj.weight",
    "norm_out.linear.weight",
)


def tiny_transformer(style: str = "5b"):
    from diffusers_mask2dit import Mask2DiTTransformer3DModel

    torch.manual_seed(0)
    return Mask2DiTTransformer3DModel(
        num_attention_heads=HEADS, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=12, num_layers=2, sample_width=10, sample_height=6, sample_frames=9, patch_size=2,
        patch_size_t=2 if style == "1.5" else None, max_text_seq_length=TEXT_TOKENS,
        use_rotary_positional_embeddings=style != "2b",
    ).eval()


def transformer_inputs(scenes=SCENE_FRAMES):
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, sum(scenes), 4, 6, 10, generator=generator)
    text = torch.randn(2, len(scenes) * TEXT_TOKENS, 12, generator=generator)
    return latents, text


def transformer_outputs(model, style: str = "5b") -> Dict[str, torch.Tensor]:
    """Every transformer scenario's output, keyed by name."""
    latents, text = transformer_inputs()
    rope = model.prepare_rotary_emb(6, 10, SCENE_FRAMES, "cpu")
    per_sample = torch.tensor([10, 700])
    per_scene = torch.tensor([[0, 0, 500], [0, 0, 900]])  # extension: context scenes clean at timestep 0
    outputs = {}
    with torch.no_grad():
        for mask in MASKS:
            for name, timestep in (("t", per_sample), ("scene_t", per_scene)):
                outputs[f"{style}/{mask}/{name}"] = model(
                    latents, text, timestep, image_rotary_emb=rope, scene_frames=SCENE_FRAMES,
                    attention_kwargs={"scene_mask": mask},
                ).sample
        one_scene = latents[:, :3], text[:, :TEXT_TOKENS]
        outputs[f"{style}/one_scene"] = model(
            *one_scene, per_sample, image_rotary_emb=model.prepare_rotary_emb(6, 10, 3, "cpu")
        ).sample
    return outputs


def transformer_gradients(model, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda grad: grad):
    """Gradients of a few parameters for a weighted sum of the v2 output with per-scene timesteps; ``reduce``
    sums each over the processes (each holds its tokens' share)."""
    latents, text = transformer_inputs()
    model.zero_grad()
    output = model(
        latents, text, torch.tensor([[0, 0, 500], [0, 0, 900]]), scene_frames=SCENE_FRAMES,
        image_rotary_emb=model.prepare_rotary_emb(6, 10, SCENE_FRAMES, "cpu"), attention_kwargs={"scene_mask": "v2"},
    ).sample
    (output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum().backward()
    parameters = dict(model.named_parameters())
    return {f"grad/{name}": reduce(parameters[name].grad.clone()) for name in GRADIENT_PARAMETERS}


# --------------------------------------------------------------------------------------------------
# Pipeline scenarios: __call__ with guidance, extend, generate_long (latents out)
# --------------------------------------------------------------------------------------------------

PROMPTS = ["A red fox walks in the snow.", "The fox looks at a frozen river.", "The fox runs into the trees.",
           "Night falls over the forest."]
# 13 text tokens per prompt (39 for 3 scenes) and 45 video tokens per scene: both need padding for 2 and 4 ranks.
CALL = dict(height=48, width=80, num_frames=9, guidance_scale=6.0, output_type="latent", max_sequence_length=13)


def tiny_pipeline():
    """The tiny 5b-style pipeline with a 6-head transformer; 48x80 pixels, 9 frames -> 45 video tokens per scene."""
    from diffusers import CogVideoXTransformer3DModel

    from diffusers_mask2dit import Mask2DiTPipeline
    from diffusers_mask2dit.tiny import build_tiny_components

    components = build_tiny_components("5b")
    torch.manual_seed(0)
    config = {**components["transformer"].config, "num_attention_heads": HEADS}
    components["transformer"] = CogVideoXTransformer3DModel.from_config(config).eval()
    pipe = Mask2DiTPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generator():
    return torch.Generator().manual_seed(7)


def pipeline_outputs(pipe, prefix: str) -> Dict[str, torch.Tensor]:
    first = pipe(prompt=PROMPTS[:3], generator=_generator(), num_inference_steps=2, **CALL).frames
    extended = pipe.extend(
        prompt=PROMPTS[3], context_prompts=PROMPTS[1:3], context_latents=first[:, 3:], generator=_generator(),
        num_inference_steps=1, **CALL,
    ).frames
    long = pipe.generate_long(PROMPTS, scenes_per_window=3, generator=_generator(), num_inference_steps=1, **CALL).frames
    return {f"{prefix}/call": first, f"{prefix}/extend": extended, f"{prefix}/generate_long": long}


def reference_outputs() -> Dict[str, torch.Tensor]:
    """Everything in one process, no torch.distributed."""
    outputs = {}
    for style in STYLES:
        outputs.update(transformer_outputs(tiny_transformer(style), style))
    outputs.update(transformer_gradients(tiny_transformer("5b")))
    outputs.update(pipeline_outputs(tiny_pipeline(), "pipe"))
    return outputs


# --------------------------------------------------------------------------------------------------
# The torchrun example, on a tiny local model
# --------------------------------------------------------------------------------------------------

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "generate_parallel.py")


def example_frames(model: str, out: str, extra: List[str]) -> torch.Tensor:
    """Frames ``(1, F, H, W, 3)`` of the example script (it also writes ``out`` on rank 0)."""
    example = runpy.run_path(EXAMPLE)  # defines main() without running it
    argv = ["--model", model, "--out", out, "--height", "64", "--width", "64", "--frames", "9", "--steps", "2", *extra]
    return torch.from_numpy(example["main"](argv).frames)


# --------------------------------------------------------------------------------------------------
# One rank of a multi-process run
# --------------------------------------------------------------------------------------------------


def _message(call: Callable[[], object]) -> str:
    try:
        call()
    except Exception as error:  # the setups below must fail; the test reads what they said
        return f"{type(error).__name__}: {error}"
    return "no error"


def bad_setups(world: int) -> Dict[str, str]:
    """The errors of setups that must be refused, in a started process group."""
    from diffusers import ContextParallelConfig

    from diffusers_mask2dit.parallel import enable_parallel_inference

    model = tiny_transformer()
    latents, text = transformer_inputs()
    messages = {
        "ring": _message(lambda: tiny_transformer().enable_parallelism(config=ContextParallelConfig(ring_degree=world))),
        "degree": _message(lambda: enable_parallel_inference(None, ulysses_degree=world, cfg_parallel=True)),
    }
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    different = latents + torch.distributed.get_rank()  # as if each rank drew its own noise
    messages["latents"] = _message(lambda: model(different, text, torch.tensor([10, 10]), scene_frames=SCENE_FRAMES))
    return messages


def _sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(tensor)
    return tensor


def parallel_outputs(world: int) -> Dict[str, torch.Tensor]:
    from diffusers import ContextParallelConfig

    from diffusers_mask2dit.parallel import enable_parallel_inference

    outputs = {}
    for style in STYLES:
        model = tiny_transformer(style)
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))  # diffusers' own entry point
        outputs.update(transformer_outputs(model, style))
        if style == "5b":
            outputs.update(transformer_gradients(model, _sum_over_processes))
    pipe = tiny_pipeline()
    enable_parallel_inference(pipe, ulysses_degree=world // 2, cfg_parallel=True)
    outputs.update(pipeline_outputs(pipe, "pipe"))
    if world == 2:  # Ulysses over both processes, guidance batch whole on each
        pipe = tiny_pipeline()
        enable_parallel_inference(pipe, ulysses_degree=2)
        outputs.update(pipeline_outputs(pipe, "pipe_ulysses"))
    return outputs


def die_in_a_forward(world: int, out: str) -> None:
    """Rank ``world - 1`` kills itself inside the second block; the others must stop with a clear error."""
    from diffusers import ContextParallelConfig

    rank = torch.distributed.get_rank()
    model = tiny_transformer()
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    if rank == world - 1:
        def kill(*_):
            with open(os.path.join(out, "killed_at.json"), "w") as handle:
                json.dump({"time": time.time()}, handle)
            os.kill(os.getpid(), signal.SIGKILL)

        model.transformer_blocks[1].register_forward_pre_hook(kill)
    latents, text = transformer_inputs()
    try:
        with torch.no_grad():
            model(latents, text, torch.tensor([10, 10]), scene_frames=SCENE_FRAMES)
    except Exception as error:
        with open(os.path.join(out, f"error_rank{rank}.json"), "w") as handle:
            json.dump({"type": type(error).__name__, "message": str(error), "time": time.time()}, handle)
        raise


def main(argv=None) -> int:
    import datetime

    from safetensors.torch import save_file

    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--kill", action="store_true")
    parser.add_argument("--example-model")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT))
    outputs = parallel_outputs(args.world)
    messages = bad_setups(args.world)
    if torch.distributed.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in outputs.items()}, os.path.join(args.out, "results.safetensors"))
        with open(os.path.join(args.out, "messages.json"), "w") as handle:
            json.dump(messages, handle)
    if args.kill:
        die_in_a_forward(args.world, args.out)
    if args.example_model:  # last: the example ends torch.distributed itself
        frames = example_frames(args.example_model, os.path.join(args.out, "example"), ["--cfg-parallel"])
        if os.environ["RANK"] == "0":
            save_file({"frames": frames.contiguous()}, os.path.join(args.out, "example.safetensors"))
        return 0
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
