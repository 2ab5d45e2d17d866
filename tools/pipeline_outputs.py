"""Record the pipeline's outputs on the tiny models, or compare them bit for bit with a recording.

A refactor of `Mask2DiTPipeline` must not change a single bit of its outputs. Record before changing
anything, compare after:

    PYTHONPATH=src python tools/pipeline_outputs.py record /tmp/before.pt
    # ... change the code ...
    PYTHONPATH=src python tools/pipeline_outputs.py compare /tmp/before.pt

Cases: the tiny 5b, 2b and 1.5 models; ``__call__``, ``extend`` (from latents and from pixels) and
``generate_long``; guidance 1 and 6, dynamic guidance, batches of 2 with 2 videos per prompt, scenes of
different lengths, prompt embeddings, a callback that edits the latents, and four schedulers. Only the
public API is used, so a recording stays comparable across refactors. Comparison is ``torch.equal``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict

import numpy as np
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler

from diffusers_mask2dit import Mask2DiTPipeline
from diffusers_mask2dit.tiny import build_tiny_components

PROMPTS = ["a cat walks on the beach", "a dog runs through the grass", "a bird flies over the ocean"]
MORE = ["a fish swims", "a boat sails", "a train crosses a bridge"]
SCHEDULERS = (CogVideoXDDIMScheduler, CogVideoXDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler)
STEPS = 3


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pipe(style: str, scheduler=None) -> Mask2DiTPipeline:
    pipe = Mask2DiTPipeline(**build_tiny_components(style=style))
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    return pipe


def _halve_latents(pipe, step, timestep, tensors):
    return {"latents": tensors["latents"] * 0.5}


def _style_cases(style: str) -> Dict[str, Callable[[], torch.Tensor]]:
    pipe = _pipe(style)
    frames = [9, 1, 9] if style != "1.5" else [9, 17, 9]
    pixels = [np.random.default_rng(i).random((9, 64, 64, 3), dtype=np.float32) for i in range(2)]

    def call(**kwargs):
        return pipe(num_inference_steps=STEPS, generator=_gen(), output_type="latent", **kwargs).frames

    def extend(**kwargs):
        return pipe.extend(num_inference_steps=STEPS, generator=_gen(1), output_type="latent", **kwargs).frames

    def embeds_call():
        embeds, negative, _ = pipe.encode_scene_prompts([PROMPTS], [["", "blurry", ""]], True)
        return call(prompt_embeds=embeds.view(1, 3, 226, -1), negative_prompt_embeds=negative.view(1, 3, 226, -1))

    context = torch.randn(2, 6, 4, 8, 8, generator=_gen(3))
    return {
        "call_cfg6": lambda: call(prompt=PROMPTS),
        "call_cfg1": lambda: call(prompt=PROMPTS, guidance_scale=1.0),
        "call_dynamic": lambda: call(prompt=PROMPTS, use_dynamic_cfg=True),
        "call_frames": lambda: call(prompt=PROMPTS, num_frames=frames, negative_prompt=["", "ugly", "blurry"]),
        "call_one_scene": lambda: call(prompt=PROMPTS[:1]),
        "call_batch2x2": lambda: call(prompt=[PROMPTS[:2], PROMPTS[1:]], num_videos_per_prompt=2),
        "call_batch2_cfg1": lambda: call(prompt=[PROMPTS[:2], PROMPTS[1:]], guidance_scale=1.0),
        "call_embeds": embeds_call,
        "call_callback": lambda: call(prompt=PROMPTS, callback_on_step_end=_halve_latents),
        "call_mask_v1": lambda: call(prompt=PROMPTS, attention_kwargs={"scene_mask": "v1"}),
        "call_pt": lambda: pipe(PROMPTS[:2], num_inference_steps=2, generator=_gen(), output_type="pt").frames,
        "extend_cfg6": lambda: extend(prompt="a fish", context_prompts=PROMPTS[:2], context_latents=context[:1]),
        "extend_cfg1": lambda: extend(
            prompt="a fish", context_prompts=PROMPTS[:2], context_latents=context[:1], guidance_scale=1.0
        ),
        "extend_batch2": lambda: extend(
            prompt=["a fish", "a boat"], context_prompts=[PROMPTS[:2], PROMPTS[1:]], context_latents=context,
            num_videos_per_prompt=2,
        ),
        "extend_two_new": lambda: extend(
            prompt=MORE[:2], context_prompts=PROMPTS[:1], context_latents=context[:1, :3], num_new_scenes=2,
            num_frames=[9, 1] if style != "1.5" else [9, 17],
        ),
        "extend_pixels": lambda: extend(prompt="a fish", context_prompts=PROMPTS[:2], context_frames=pixels),
        "extend_callback": lambda: extend(
            prompt="a fish", context_prompts=PROMPTS[:2], context_latents=context[:1],
            callback_on_step_end=_halve_latents,
        ),
        "long_cfg6": lambda: pipe.generate_long(
            PROMPTS + MORE, num_inference_steps=STEPS, generator=_gen(), output_type="latent"
        ).frames,
        "long_batch2_cfg1": lambda: pipe.generate_long(
            [PROMPTS + MORE[:1], MORE + PROMPTS[:1]], num_inference_steps=STEPS, generator=_gen(),
            guidance_scale=1.0, output_type="latent", num_videos_per_prompt=2,
        ).frames,
        "long_window2_np": lambda: torch.from_numpy(
            pipe.generate_long(PROMPTS, scenes_per_window=2, num_inference_steps=2, generator=_gen(),
                               output_type="np").frames
        ),
    }


def _scheduler_cases() -> Dict[str, Callable[[], torch.Tensor]]:
    cases = {}
    for scheduler in SCHEDULERS:
        pipe = _pipe("5b", scheduler)

        def run(pipe=pipe):
            first = pipe(PROMPTS[:2], num_inference_steps=STEPS, generator=_gen(), output_type="latent").frames
            extended = pipe.extend("a fish", context_prompts=PROMPTS[1:2], context_latents=first,
                                   num_inference_steps=STEPS, generator=_gen(1), output_type="latent").frames
            return torch.cat([first, extended], dim=1)

        cases[f"scheduler_{scheduler.__name__}"] = run
    return cases


def run_all() -> Dict[str, torch.Tensor]:
    outputs = {}
    for style in ("5b", "2b", "1.5"):
        for name, case in _style_cases(style).items():
            outputs[f"{style}/{name}"] = case()
            print(f"{style}/{name}: {tuple(outputs[f'{style}/{name}'].shape)}", flush=True)
    for name, case in _scheduler_cases().items():
        outputs[name] = case()
        print(f"{name}: {tuple(outputs[name].shape)}", flush=True)
    return outputs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["record", "compare"])
    parser.add_argument("path")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the same thread count for both runs: CPU kernels may split work by threads
    outputs = run_all()
    if args.mode == "record":
        torch.save(outputs, args.path)
        print(f"recorded {len(outputs)} outputs to {args.path}")
        return 0
    recorded = torch.load(args.path)
    differ = [name for name in recorded if name not in outputs or not torch.equal(recorded[name], outputs[name])]
    missing = sorted(set(outputs) - set(recorded))
    for name in differ:
        print(f"DIFFERS: {name}")
    print(f"{len(recorded) - len(differ)}/{len(recorded)} outputs bit-identical" + (f"; new: {missing}" if missing else ""))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
