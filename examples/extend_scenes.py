"""Generate three scenes, then extend the story scene by scene (Mask²DiT auto-regressive scene extension).

    python examples/extend_scenes.py --out out/
    python examples/extend_scenes.py --model path/to/local/folder --out out/

Each new scene is conditioned on the previous two scenes' latents, which stay clean (timestep 0) while only the
new scene is denoised. `pipe.generate_long(prompts, scenes_per_window=3)` does the same loop in one call.
"""

import argparse

import torch

from diffusers_mask2dit import Mask2DiTPipeline
from diffusers_mask2dit.generate import save_outputs

FIRST_SCENES = [
    "An old fisherman pushes his wooden boat into a calm sea at dawn.",
    "The fisherman rows away from the shore as the sun rises over the water.",
    "The fisherman casts his net from the boat, gulls circling above him.",
]
NEXT_SCENES = [
    "The fisherman pulls up the heavy net full of silver fish and laughs.",
    "The fisherman rows back to the village harbor in the golden evening light.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qth/Mask2DiT", help="Hub id or local folder (default: qth/Mask2DiT)")
    parser.add_argument("--out", default="mask2dit_extended", help="output folder")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--frames", type=int, default=49, help="pixel frames per scene: 8k+1 (1, 9, ..., 49)")
    parser.add_argument("--guidance", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cpu-offload", action="store_true")
    args = parser.parse_args()

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    pipe = Mask2DiTPipeline.from_pretrained(args.model, dtype=dtype)
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device=args.device)
    else:
        pipe.to(args.device)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    options = dict(
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=generator,
        output_type="latent",  # keep latents: the next scene is conditioned on them exactly
    )

    # 1. The first three scenes in one pass.
    prompts = list(FIRST_SCENES)
    first = pipe(prompt=prompts, **options)
    scene_latents = [scene.unsqueeze(0) for scene in first.scene_frames[0]]  # each (1, F, C, h, w)

    # 2. One new scene at a time, conditioned on the last two.
    for new_prompt in NEXT_SCENES:
        extended = pipe.extend(
            prompt=new_prompt,
            context_prompts=prompts[-2:],
            context_latents=torch.cat(scene_latents[-2:], dim=1),
            **options,
        )
        scene_latents.append(extended.scene_frames[0][-1].unsqueeze(0))
        prompts.append(new_prompt)

    # 3. Decode every scene on its own and save.
    latents = torch.cat(scene_latents, dim=1)
    _, scenes = pipe.decode_scenes(latents, [s.shape[1] for s in scene_latents], output_type="np")
    save_outputs(args.out, scenes[0], prompts, fps=8)
    print(f"Wrote {len(prompts)} scenes to {args.out}/")


if __name__ == "__main__":
    main()
