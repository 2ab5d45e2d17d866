"""Generate one three-scene video with Mask²DiT.

    python examples/generate_multiscene.py --out out/           # the released checkpoint, qth/Mask2DiT
    python examples/generate_multiscene.py --model THUDM/CogVideoX-5b --out out_base/   # base model, same code

Writes video.mp4, scene_00.mp4 ..., contact_sheet.png and prompts.txt. The paper's setting (3 scenes x 49 frames,
480x720, 50 steps, guidance 6) needs a large GPU; add --cpu-offload --vae-tiling on smaller ones.
"""

import argparse

import torch

from diffusers_mask2dit import Mask2DiTPipeline
from diffusers_mask2dit.generate import save_outputs

PROMPTS = [
    "A young woman in a yellow raincoat walks along a busy city street in the rain, holding a red umbrella.",
    "Close-up of the same woman stopping under a shop awning, shaking the rain off her umbrella and smiling.",
    "The woman enters a warm cafe, sits by the window and watches the rain on the glass while holding a cup of tea.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qth/Mask2DiT", help="Hub id or local folder (default: qth/Mask2DiT)")
    parser.add_argument("--out", default="mask2dit_multiscene", help="output folder")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--frames", type=int, default=49, help="pixel frames per scene: 8k+1 (1, 9, ..., 49)")
    parser.add_argument("--guidance", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cpu-offload", action="store_true")
    parser.add_argument("--vae-tiling", action="store_true")
    args = parser.parse_args()

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    pipe = Mask2DiTPipeline.from_pretrained(args.model, dtype=dtype)
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device=args.device)
    else:
        pipe.to(args.device)
    if args.vae_tiling:
        pipe.vae.enable_tiling()

    output = pipe(
        prompt=PROMPTS,  # one prompt per scene
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
        output_type="np",
    )
    save_outputs(args.out, output.scene_frames[0], PROMPTS, fps=8)
    print(f"Wrote {len(PROMPTS)} scenes to {args.out}/")


if __name__ == "__main__":
    main()
