"""The Mask²DiT training objective: noising with per-scene timesteps, conditional samples, v-prediction loss.

Per sample (paper Sec. 3.3–3.4, METHOD.md):

- one timestep ``t`` drawn uniformly from the scheduler's training timesteps, shared by all its scenes;
- with probability ``cond_prob`` the sample is *conditional*: its first n−1 scenes stay clean latents at
  timestep 0 and only the last scene is noised and counted in the loss;
- the target is the velocity ``v = sqrt(a_t) * noise - sqrt(1 - a_t) * x0`` of CogVideoX's DPM scheduler.

All randomness of a sample (conditional choice, timestep, VAE posterior sample, noise) is drawn from one CPU
generator seeded with the sample's seed, in that fixed order, so results do not depend on the device, the
batch a sample lands in or the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import torch

from ..transformer import scene_rotary_emb


@dataclass
class DiffusionBatch:
    """Model inputs and targets of one batch of multi-scene samples.

    Attributes:
        clean_latents: ``(B, F, C, h, w)`` latents of all scenes concatenated along frames.
        noisy_latents: ``(B, F, C, h, w)``; context scenes of conditional samples equal ``clean_latents``.
        timesteps: ``(B, n)`` per-scene timesteps (0 for context scenes of conditional samples).
        target: ``(B, F, C, h, w)`` velocity targets.
        loss_mask: ``(B, F)`` bool, latent frames that count in the loss.
        conditional: ``(B,)`` bool, which samples are conditional.
        scene_frames: latent frames of each scene.
    """

    clean_latents: torch.Tensor
    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    loss_mask: torch.Tensor
    conditional: torch.Tensor
    scene_frames: Sequence[int]


def _check_scene_frames(scene_frames: Sequence[int], num_frames: int) -> list:
    scene_frames = [int(f) for f in scene_frames]
    if not scene_frames or any(f <= 0 for f in scene_frames) or sum(scene_frames) != num_frames:
        raise ValueError(
            f"`scene_frames` {scene_frames} must be positive latent frame counts adding up to the {num_frames} "
            "latent frames of the batch."
        )
    return scene_frames


def prepare_diffusion_batch(
    latent_mean: torch.Tensor,
    latent_std: Optional[torch.Tensor],
    scene_frames: Sequence[int],
    sample_seeds: torch.Tensor,
    scheduler: Any,
    cond_prob: float,
) -> DiffusionBatch:
    """Draw each sample's conditional choice, timestep, posterior sample and noise; build inputs and targets.

    Args:
        latent_mean: ``(B, F, C, h, w)`` VAE posterior means (scaled), scenes concatenated along frames.
        latent_std: same shape, posterior standard deviations (scaled); None uses the means as the latents.
        scene_frames: latent frames of each scene, adding up to ``F``.
        sample_seeds: ``(B,)`` int seeds, one per sample.
        scheduler: a scheduler with ``add_noise``, ``get_velocity`` and ``config.num_train_timesteps``
            (CogVideoX's ``CogVideoXDPMScheduler``).
        cond_prob: probability that a sample is conditional (0 in pretraining).
    """
    if not 0.0 <= cond_prob <= 1.0:
        raise ValueError(f"`cond_prob` must be in [0, 1], got {cond_prob}.")
    batch_size, num_frames = latent_mean.shape[:2]
    scene_frames = _check_scene_frames(scene_frames, num_frames)
    if sample_seeds.shape != (batch_size,):
        raise ValueError(f"`sample_seeds` must be ({batch_size},), got {tuple(sample_seeds.shape)}.")
    num_scenes = len(scene_frames)
    if cond_prob > 0 and num_scenes < 2:
        raise ValueError("`cond_prob` > 0 needs at least 2 scenes: a conditional sample has context scenes.")
    num_train_timesteps = int(scheduler.config.num_train_timesteps)
    shape = tuple(latent_mean.shape[1:])

    conditional, timestep, posterior_eps, noise = [], [], [], []
    for seed in sample_seeds.tolist():
        generator = torch.Generator().manual_seed(int(seed))
        conditional.append(bool(torch.rand((), generator=generator) < cond_prob))
        timestep.append(int(torch.randint(0, num_train_timesteps, (), generator=generator)))
        posterior_eps.append(torch.randn(shape, generator=generator))
        noise.append(torch.randn(shape, generator=generator))

    device = latent_mean.device
    conditional_t = torch.tensor(conditional, dtype=torch.bool, device=device)
    timestep_t = torch.tensor(timestep, dtype=torch.long, device=device)
    noise_t = torch.stack(noise).to(device)
    clean = latent_mean.float()
    if latent_std is not None:
        clean = clean + latent_std.float() * torch.stack(posterior_eps).to(device)

    # Per-scene timesteps: t everywhere, 0 on the context scenes of conditional samples.
    scene_timesteps = timestep_t[:, None].expand(batch_size, num_scenes).clone()
    scene_timesteps[conditional_t, : num_scenes - 1] = 0
    frame_scene = torch.repeat_interleave(torch.arange(num_scenes, device=device), torch.tensor(scene_frames, device=device))
    frame_timesteps = scene_timesteps[:, frame_scene]  # (B, F)
    context = conditional_t[:, None] & (frame_scene[None, :] < num_scenes - 1)  # (B, F)

    flat = lambda x: x.flatten(0, 1)  # noqa: E731  (B, F, ...) -> (B*F, ...), the scheduler broadcasts per row
    noisy = scheduler.add_noise(flat(clean), flat(noise_t), flat(frame_timesteps)).view_as(clean)
    noisy = torch.where(context[..., None, None, None], clean, noisy)  # context stays exactly clean
    target = scheduler.get_velocity(flat(clean), flat(noise_t), flat(frame_timesteps)).view_as(clean)
    return DiffusionBatch(
        clean_latents=clean,
        noisy_latents=noisy,
        timesteps=scene_timesteps,
        target=target,
        loss_mask=~context,
        conditional=conditional_t,
        scene_frames=scene_frames,
    )


def drop_captions(prompt_embeds: torch.Tensor, sample_seeds: torch.Tensor, null_embeds: torch.Tensor, probability: float) -> torch.Tensor:
    """Replace every scene's prompt of a sample by the empty prompt with ``probability`` (caption dropout).

    Args:
        prompt_embeds: ``(B, n * L, D)``, the scenes' prompt embeddings concatenated.
        sample_seeds: ``(B,)``; each sample's choice comes from its own generator (seeded from its seed, apart from
            the draws of :func:`prepare_diffusion_batch`, which therefore do not change).
        null_embeds: ``(L, D)``, the embedding of the empty prompt.

    A whole sample is dropped, not single scenes: classifier-free guidance runs the model with every scene's
    prompt empty at once.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"`caption_dropout` must be in [0, 1], got {probability}.")
    length = null_embeds.shape[0]
    if prompt_embeds.shape[1] % length or prompt_embeds.shape[2] != null_embeds.shape[1]:
        raise ValueError(
            f"`null_embeds` {tuple(null_embeds.shape)} does not fit prompt embeddings {tuple(prompt_embeds.shape)} "
            "(tokens per scene x width)."
        )
    dropped = torch.tensor(
        [bool(torch.rand((), generator=torch.Generator().manual_seed(int(seed) ^ 0xCA9D)) < probability) for seed in sample_seeds.tolist()],
        device=prompt_embeds.device,
    )
    null = null_embeds.to(prompt_embeds).repeat(prompt_embeds.shape[1] // length, 1)
    return torch.where(dropped[:, None, None], null[None], prompt_embeds)


def v_prediction_loss(model_output: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked latent frames of each sample, averaged over samples.

    Args:
        model_output, target: ``(B, F, C, h, w)``.
        loss_mask: ``(B, F)`` bool; frames outside it get no gradient.
    """
    if model_output.shape != target.shape:
        raise ValueError(f"`model_output` {tuple(model_output.shape)} and `target` {tuple(target.shape)} must match.")
    per_frame = (model_output.float() - target.float()).square().flatten(2).mean(-1)  # (B, F)
    weights = loss_mask.to(per_frame.dtype)
    per_sample = (per_frame * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    return per_sample.mean()


def predict(
    transformer: torch.nn.Module,
    batch: DiffusionBatch,
    prompt_embeds: torch.Tensor,
    mask_variant: str,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """The transformer's velocity prediction ``(B, F, C, h, w)`` for ``batch``.

    Args:
        prompt_embeds: ``(B, n * L, D)``, the scenes' prompt embeddings concatenated.
        dtype: dtype of the model inputs (the frozen weights' dtype); defaults to the latents' dtype.
    """
    dtype = dtype or batch.noisy_latents.dtype
    # The transformer runs without RoPE unless given one (as stock CogVideoX). accelerate may have wrapped it:
    # DDP and DeepSpeed hold it as `.module` (DeepSpeed's own `.config` is its engine settings).
    config = getattr(transformer, "module", transformer).config
    height, width = batch.noisy_latents.shape[-2:]
    image_rotary_emb = scene_rotary_emb(config, height, width, batch.scene_frames, batch.noisy_latents.device)
    return transformer(
        hidden_states=batch.noisy_latents.to(dtype),
        encoder_hidden_states=prompt_embeds.to(dtype),
        timestep=batch.timesteps,
        image_rotary_emb=image_rotary_emb,
        attention_kwargs={"scene_mask": mask_variant},
        scene_frames=list(batch.scene_frames),
        return_dict=False,
    )[0]


def training_loss(
    transformer: torch.nn.Module,
    batch: DiffusionBatch,
    prompt_embeds: torch.Tensor,
    mask_variant: str,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Scalar v-prediction loss of ``transformer`` on ``batch`` (see :func:`predict`)."""
    return v_prediction_loss(predict(transformer, batch, prompt_embeds, mask_variant, dtype), batch.target, batch.loss_mask)


def loss_summary(batch: DiffusionBatch) -> Dict[str, float]:
    """Numbers worth logging about a batch: share of conditional samples and mean timestep."""
    return {
        "conditional_fraction": float(batch.conditional.float().mean()),
        "timestep_mean": float(batch.timesteps[:, -1].float().mean()),
    }
