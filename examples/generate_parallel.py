"""Generate one three-scene video on several GPUs, the scene mask kept exact (one process per GPU, torchrun).

    # 8 GPUs: each guidance pass (unconditional, conditional) on 4 GPUs that share the sequence
    torchrun --nproc-per-node 8 examples/generate_parallel.py --ulysses-degree 4 --cfg-parallel --out out/
    # 4 GPUs, sequence parallelism only
    torchrun --nproc-per-node 4 examples/generate_parallel.py --ulysses-degree 4 --out out/
    # CPU (gloo), a tiny local model: torchrun --nproc-per-node 2 examples/generate_parallel.py --model tiny/ --cfg-parallel ...

The processes run the same pipeline call with the same seed; `enable_parallel_inference` splits the
transformer's work over them (diffusers' ContextParallelConfig for the sequence, a CFG split for the
guidance batch) and every process gets the whole video. Rank 0 shows progress and writes video.mp4,
scene_00.mp4 ..., contact_sheet.png and prompts.txt. --ulysses-degree x (2 with --cfg-parallel) must equal
--nproc-per-node; the degree may not exceed the model's attention heads (48 for CogVideoX-5b).
"""

import argparse

import torch

from diffusers_mask2dit import Mask2DiTPipeline
from diffusers_mask2dit.generate import save_outputs
from diffusers_mask2dit.parallel import enable_parallel_inference, end_parallel, init_parallel, is_main_process

PROMPTS = [
    "A young woman in a yellow raincoat walks along a busy city street in the rain, holding a red umbrella.",
    "Close-up of the same woman stopping under a shop awning, shaking the rain off her umbrella and smiling.",
    "The woman enters a warm cafe, sits by the window and watches the rain on the glass while holding a cup of tea.",
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qth/Mask2DiT", help="Hub id or local folder (default: qth/Mask2DiT)")
    parser.add_argument("--out", default="mask2dit_parallel", help="output folder")
    parser.add_argument("--ulysses-degree", type=int, default=1, help="processes sharing the sequence")
    parser.add_argument("--cfg-parallel", action="store_true", help="guidance passes on two groups of processes")
    parser.add_argument("--collective-timeout", type=int, default=1800, help="seconds before a stuck run stops")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--frames", type=int, default=49, help="pixel frames per scene: 8k+1 (1, 9, ..., 49)")
    parser.add_argument("--guidance", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)

    parallel = args.ulysses_degree > 1 or args.cfg_parallel
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    # One process per GPU: cuda:LOCAL_RANK (NCCL), or CPU (gloo).
    device = init_parallel(device_type, args.collective_timeout) if parallel else torch.device(device_type)
    pipe = Mask2DiTPipeline.from_pretrained(args.model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    pipe.to(device)
    if parallel:
        enable_parallel_inference(pipe, ulysses_degree=args.ulysses_degree, cfg_parallel=args.cfg_parallel)

    output = pipe(
        prompt=PROMPTS,  # one prompt per scene
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=torch.Generator(device="cpu").manual_seed(args.seed),  # the same noise on every process
        output_type="np",
    )
    if is_main_process():
        save_outputs(args.out, output.scene_frames[0], PROMPTS, fps=8)
        print(f"Wrote {len(PROMPTS)} scenes to {args.out}/")
    if parallel:
        end_parallel()
    return output


if __name__ == "__main__":
    main()
