"""Train the Shapes world's `AutoencoderKLCogVideoX` from scratch on rendered clips (CPU, minutes to hours).

The VAE is diffusers' own CogVideoX VAE class at small widths with the real structure: four blocks (8x spatial
and 4x temporal compression, 9 frames -> 3 latent frames), causal 3D convolutions, the spatially-conditioned
decoder. Training clips are drawn on the fly from the world generator (single scenes, random backgrounds);
the held-out clips come from seeds the training never draws. Loss: mean squared error in [-1, 1] plus a small
KL term, with the posterior sampled, so the decoder tolerates latents that are slightly off (as generated
latents are). At the end the latents' scaling factor is set to ``1 / std`` of the training latents, as for
CogVideoX, so the transformer sees unit-variance latents.

    python -m diffusers_mask2dit.shapes.vae --out runs/vae --steps 4000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from . import world

VAE_WIDTHS = (8, 16, 32, 32)
LATENT_CHANNELS = 8
TRAIN_SEED = 11  # world seeds of training clips: (TRAIN_SEED, step, item)
HELD_OUT_SEED = 7_000_011  # world seeds of held-out clips: (HELD_OUT_SEED, index); never drawn in training
INITIAL_LOGVAR = -8.0
CHECKPOINT_NAME = "vae_training_state.pt"


def build_vae(seed: int = 0, widths: Sequence[int] = VAE_WIDTHS):
    """A fresh `AutoencoderKLCogVideoX` for the world's 48x48, 9-frame clips (random weights from ``seed``)."""
    from diffusers import AutoencoderKLCogVideoX

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLCogVideoX(
            in_channels=3,
            out_channels=3,
            down_block_types=("CogVideoXDownBlock3D",) * len(widths),
            up_block_types=("CogVideoXUpBlock3D",) * len(widths),
            block_out_channels=tuple(widths),
            latent_channels=LATENT_CHANNELS,
            layers_per_block=1,
            norm_num_groups=8,
            temporal_compression_ratio=4,
            sample_height=world.HEIGHT,
            sample_width=world.WIDTH,
            scaling_factor=1.0,  # replaced by 1 / std of the latents after training
        )
    # Start with a small posterior std (log-variance -8): with the default 0 the sampled latents are unit noise
    # and the decoder first has to wait for the encoder to learn to shrink it.
    with torch.no_grad():
        vae.encoder.conv_out.conv.bias[LATENT_CHANNELS:] = INITIAL_LOGVAR
    return vae


def clip_batch(seed: int, step: int, batch_size: int) -> torch.Tensor:
    """``(B, 3, F, H, W)`` in [-1, 1]: random single scenes drawn from ``(seed, step, item)``."""
    clips = [world.render_scene(world.sample_scene(world.scene_rng(seed, step, item))) for item in range(batch_size)]
    return to_model_pixels(np.stack(clips))


def to_model_pixels(clips: np.ndarray) -> torch.Tensor:
    """``uint8 (B, F, H, W, 3)`` -> ``float (B, 3, F, H, W)`` in [-1, 1]."""
    return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """``(B, 3, F, H, W)`` in [-1, 1] -> ``uint8 (B, F, H, W, 3)``, rounded as the pipeline's postprocessing does."""
    video = ((video.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).cpu().numpy()
    return (video * 255).round().astype(np.uint8)


def psnr(reference: np.ndarray, decoded: np.ndarray) -> float:
    """PSNR in dB of one clip, over all its frames, pixels and channels (8-bit peak)."""
    mse = float(np.mean((reference.astype(np.float64) - decoded.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def held_out_clips(count: int) -> np.ndarray:
    """``uint8 (count, F, H, W, 3)`` held-out clips (seeds the training never draws)."""
    return np.stack([world.render_scene(world.sample_scene(world.scene_rng(HELD_OUT_SEED, i))) for i in range(count)])


@torch.no_grad()
def reconstruction_psnr(vae, clips: np.ndarray, batch_size: int = 8) -> List[float]:
    """Per-clip PSNR of encode (posterior mode) -> decode, as the pipeline uses the VAE."""
    values: List[float] = []
    for start in range(0, len(clips), batch_size):
        batch = clips[start : start + batch_size]
        latents = vae.encode(to_model_pixels(batch)).latent_dist.mode()
        decoded = to_uint8(vae.decode(latents).sample)
        values += [psnr(ref, out) for ref, out in zip(batch, decoded)]
    return values


@torch.no_grad()
def latent_std(vae, seed: int, num_batches: int = 8, batch_size: int = 8) -> float:
    """Standard deviation of posterior means over training clips: the scaling factor is its inverse."""
    means = [vae.encode(clip_batch(seed, 10**9 + index, batch_size)).latent_dist.mean for index in range(num_batches)]
    return float(torch.cat([m.flatten() for m in means]).std())


def _save_state(path: str, vae, optimizer, step: int, log: List[Dict]) -> None:
    tmp = path + ".tmp"
    torch.save({"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "log": log}, tmp)
    os.replace(tmp, path)


def train_vae(
    out: str,
    steps: int = 4000,
    batch_size: int = 4,
    learning_rate: float = 1e-3,
    kl_weight: float = 1e-4,
    seed: int = 0,
    widths: Sequence[int] = VAE_WIDTHS,
    loss: str = "mse",
    eval_every: int = 250,
    eval_clips: int = 32,
    final_eval_clips: int = 200,
    progress: bool = True,
) -> Dict[str, object]:
    """Train, write ``out/vae`` (a diffusers folder, safetensors) and ``out/vae_report.json``; returns the report.

    A resumable training state (``out/vae_training_state.pt``: weights, optimizer, step, log; our own file,
    read with ``weights_only=True``) is written at every evaluation, so an interrupted run continues.
    """
    from tqdm.auto import tqdm

    os.makedirs(out, exist_ok=True)
    vae = build_vae(seed, widths)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, betas=(0.9, 0.99), weight_decay=0.0)
    schedule = lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    state_path = os.path.join(out, CHECKPOINT_NAME)
    step, log = 0, []
    if loss not in ("mse", "l1"):
        raise ValueError(f"`loss` must be 'mse' or 'l1'; got {loss!r}.")
    if os.path.exists(state_path):
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, log = int(state["step"]), list(state["log"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule, last_epoch=step - 1)
    held_out = held_out_clips(eval_clips)
    generator = torch.Generator().manual_seed(seed)
    generator.manual_seed(seed + step)  # posterior noise continues deterministically after a resume
    started = time.time()
    vae.train()
    bar = tqdm(total=steps, initial=step, desc="vae", disable=not progress)
    while step < steps:
        pixels = clip_batch(TRAIN_SEED, step, batch_size)
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        decoded = vae.decode(latents).sample
        reconstruction = (decoded - pixels).square().mean()
        kl = 0.5 * (posterior.mean.square() + posterior.var - 1.0 - posterior.logvar).mean()
        objective = reconstruction if loss == "mse" else (decoded - pixels).abs().mean()
        objective = objective + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        bar.update(1)
        bar.set_postfix(mse=f"{reconstruction.item():.5f}", kl=f"{kl.item():.2f}")
        if step % eval_every == 0 or step == steps:
            vae.eval()
            values = reconstruction_psnr(vae, held_out)
            vae.train()
            entry = {"step": step, "mse": reconstruction.item(), "kl": kl.item(), "held_out_psnr_mean": float(np.mean(values)),
                     "held_out_psnr_min": float(np.min(values)), "seconds": time.time() - started}
            log.append(entry)
            bar.write(json.dumps(entry))
            _save_state(state_path, vae, optimizer, step, log)
    bar.close()
    return finish_vae(out, vae, log, final_eval_clips)


def finish_vae(out: str, vae, log: List[Dict], final_eval_clips: int = 200) -> Dict[str, object]:
    """Set the scaling factor, save ``out/vae`` and measure the held-out PSNR of every one of ``final_eval_clips`` clips."""
    vae.eval()
    std = latent_std(vae, TRAIN_SEED)
    vae.register_to_config(scaling_factor=round(1.0 / std, 6))
    staging = os.path.join(out, ".tmp-vae")
    shutil.rmtree(staging, ignore_errors=True)
    vae.save_pretrained(staging, safe_serialization=True)
    final = os.path.join(out, "vae")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    values = reconstruction_psnr(vae, held_out_clips(final_eval_clips))
    report = {
        "held_out_clips": final_eval_clips,
        "held_out_seed": HELD_OUT_SEED,
        "psnr_mean": float(np.mean(values)),
        "psnr_min": float(np.min(values)),
        "psnr_5th_percentile": float(np.percentile(values, 5)),
        "clips_at_or_above_30db": int(np.sum(np.asarray(values) >= 30.0)),
        "scaling_factor": float(vae.config.scaling_factor),
        "log": log,
    }
    with open(os.path.join(out, "vae_report.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
    return report


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Train the Shapes world's CogVideoX VAE from scratch.")
    parser.add_argument("--out", required=True, help="output folder (vae/, vae_report.json, resumable state)")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--widths", default=",".join(map(str, VAE_WIDTHS)), help="block_out_channels, comma-separated")
    parser.add_argument("--loss", default="mse", choices=("mse", "l1"), help="reconstruction loss (default: mse)")
    parser.add_argument("--eval-every", type=int, default=250)
    args = parser.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    report = train_vae(args.out, args.steps, args.batch_size, args.learning_rate, args.kl_weight, args.seed, widths, args.loss,
                       args.eval_every)
    print(json.dumps({k: v for k, v in report.items() if k != "log"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
