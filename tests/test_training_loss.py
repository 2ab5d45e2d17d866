"""The training objective: per-sample randomness, conditional samples, v-prediction targets and loss masks."""

from __future__ import annotations

import pytest
import torch
from diffusers import CogVideoXDPMScheduler

from diffusers_mask2dit.training.loss import predict, prepare_diffusion_batch, training_loss, v_prediction_loss

SCENE_FRAMES = [3, 2, 3]  # latent frames; scenes of unequal length


def _scheduler():
    return CogVideoXDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
        prediction_type="v_prediction", timestep_spacing="trailing", snr_shift_scale=1.0,
    )


def _latents(batch=4, frames=sum(SCENE_FRAMES)):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, frames, 4, 4, 4, generator=generator), torch.rand(batch, frames, 4, 4, 4, generator=generator) * 0.1


def test_each_sample_depends_only_on_its_seed():
    mean, std = _latents()
    seeds = torch.tensor([11, 12, 13, 14])
    full = prepare_diffusion_batch(mean, std, SCENE_FRAMES, seeds, _scheduler(), cond_prob=0.5)
    alone = prepare_diffusion_batch(mean[2:3], std[2:3], SCENE_FRAMES, seeds[2:3], _scheduler(), cond_prob=0.5)
    assert torch.equal(full.noisy_latents[2:3], alone.noisy_latents)
    assert torch.equal(full.timesteps[2:3], alone.timesteps)
    again = prepare_diffusion_batch(mean, std, SCENE_FRAMES, seeds, _scheduler(), cond_prob=0.5)
    assert torch.equal(full.target, again.target)


def test_conditional_samples_keep_context_clean_at_timestep_zero():
    mean, std = _latents(batch=1)
    batch = prepare_diffusion_batch(mean, std, SCENE_FRAMES, torch.tensor([5]), _scheduler(), cond_prob=1.0)
    assert batch.conditional.tolist() == [True]
    t = int(batch.timesteps[0, -1])
    assert batch.timesteps[0].tolist() == [0, 0, t]
    context = sum(SCENE_FRAMES[:-1])
    assert torch.equal(batch.noisy_latents[:, :context], batch.clean_latents[:, :context])
    assert not torch.allclose(batch.noisy_latents[:, context:], batch.clean_latents[:, context:])
    assert batch.loss_mask[0].tolist() == [False] * context + [True] * SCENE_FRAMES[-1]


def test_unconditional_samples_share_one_timestep_and_count_everywhere():
    mean, std = _latents()
    batch = prepare_diffusion_batch(mean, std, SCENE_FRAMES, torch.arange(4), _scheduler(), cond_prob=0.0)
    assert not batch.conditional.any()
    assert (batch.timesteps == batch.timesteps[:, :1]).all()
    assert batch.loss_mask.all()


def test_conditional_fraction_follows_cond_prob():
    mean, std = _latents(batch=1)
    flags = [
        bool(prepare_diffusion_batch(mean, std, SCENE_FRAMES, torch.tensor([seed]), _scheduler(), 0.5).conditional[0])
        for seed in range(200)
    ]
    assert 0.38 < sum(flags) / len(flags) < 0.62


def test_target_is_the_scheduler_velocity():
    mean, std = _latents(batch=2)
    scheduler = _scheduler()
    batch = prepare_diffusion_batch(mean, None, SCENE_FRAMES, torch.tensor([1, 2]), scheduler, cond_prob=0.0)
    t = batch.timesteps[:, 0]
    alpha_bar = scheduler.alphas_cumprod.float()[t].view(-1, 1, 1, 1, 1)
    noise = (batch.noisy_latents - alpha_bar.sqrt() * mean) / (1 - alpha_bar).sqrt()
    expected = scheduler.get_velocity(mean.flatten(0, 1), noise.flatten(0, 1), t.repeat_interleave(mean.shape[1]))
    torch.testing.assert_close(batch.target, expected.view_as(mean), atol=1e-4, rtol=1e-4)


def test_v_loss_equals_cogvideox_weighted_sample_loss():
    # diffusers' CogVideoX training turns v into x0 and weights by 1/(1 - alpha_bar); that is the same loss.
    mean, _ = _latents(batch=2)
    scheduler = _scheduler()
    batch = prepare_diffusion_batch(mean, None, SCENE_FRAMES, torch.tensor([3, 4]), scheduler, cond_prob=0.0)
    output = torch.randn_like(batch.target)
    t = batch.timesteps[:, 0].repeat_interleave(mean.shape[1])
    x0 = scheduler.get_velocity(output.flatten(0, 1), batch.noisy_latents.flatten(0, 1), t)
    weights = (1 / (1 - scheduler.alphas_cumprod.float()[t])).view(-1, 1, 1, 1)
    reference = (weights * (x0 - mean.flatten(0, 1)) ** 2).mean()
    torch.testing.assert_close(v_prediction_loss(output, batch.target, batch.loss_mask), reference, rtol=1e-4, atol=1e-5)


def test_conditional_samples_give_no_gradient_to_context_predictions():
    mean, std = _latents(batch=2)
    batch = prepare_diffusion_batch(mean, std, SCENE_FRAMES, torch.tensor([7, 8]), _scheduler(), cond_prob=1.0)
    output = torch.randn_like(batch.target, requires_grad=True)
    v_prediction_loss(output, batch.target, batch.loss_mask).backward()
    context = sum(SCENE_FRAMES[:-1])
    assert torch.count_nonzero(output.grad[:, :context]) == 0
    assert torch.count_nonzero(output.grad[:, context:]) == output.grad[:, context:].numel()


def test_conditional_loss_through_the_transformer():
    from diffusers_mask2dit import Mask2DiTTransformer3DModel
    from diffusers_mask2dit.tiny import build_tiny_components

    components = build_tiny_components("5b", seed=0)
    transformer = Mask2DiTTransformer3DModel.from_cogvideox(components["transformer"])
    scene_frames = [3, 3]
    mean = torch.randn(2, 6, 4, 8, 8)
    embeds = torch.randn(2, 2 * 226, 32)
    batch = prepare_diffusion_batch(mean, None, scene_frames, torch.tensor([1, 2]), components["scheduler"], cond_prob=1.0)
    output = predict(transformer, batch, embeds, "v2")
    output.retain_grad()
    loss = v_prediction_loss(output, batch.target, batch.loss_mask)
    loss.backward()
    assert torch.count_nonzero(output.grad[:, :3]) == 0 and torch.count_nonzero(output.grad[:, 3:]) > 0
    assert torch.isfinite(loss) and transformer.proj_out.weight.grad is not None
    assert torch.equal(training_loss(transformer, batch, embeds, "v2").detach(), loss.detach())


def test_bad_arguments_are_named():
    mean, std = _latents(batch=1)
    with pytest.raises(ValueError, match="scene_frames"):
        prepare_diffusion_batch(mean, std, [3, 3], torch.tensor([0]), _scheduler(), 0.5)
    with pytest.raises(ValueError, match="cond_prob"):
        prepare_diffusion_batch(mean, std, [8], torch.tensor([0]), _scheduler(), 0.5)
    with pytest.raises(ValueError, match="sample_seeds"):
        prepare_diffusion_batch(mean, std, SCENE_FRAMES, torch.tensor([0, 1]), _scheduler(), 0.5)
