"""Training-free multi-prompt videos on a single-scene CogVideoX: DiTCtrl's method (Cai et al., 2024, arXiv 2412.18597).

Mask²DiT needs its fine-tuned checkpoint; DiTCtrl gets a multi-prompt video from an unmodified MM-DiT. The long
latent video is covered by overlapping temporal tiles of the length the model was trained on, one prompt per tile:

- tiles: prompt 1's tile, ``num_transition_tiles`` transition tiles, prompt 2's tile, ...; a transition tile's
  text embedding interpolates between its two prompts (tile j of T: weight ``(j + 1) / (T + 1)`` on the next one);
  consecutive tiles share ``overlap`` latent frames, so the video has ``tile + (num_tiles - 1) * (tile - overlap)``;
- latent blending: at every step each tile is denoised on its own and the predictions are averaged where tiles
  overlap, with triangular weights ``min((2i + 1) / T, 2 - (2i + 1) / T)`` over a tile's frames;
- KV-sharing: in chosen steps and layers, each tile's queries attend to the previous tile's keys and values
  (text and video), which carries the previous tile's appearance into the next one.

As in DiTCtrl's code, KV-sharing evaluates the tiles in adjacent pairs (previous tile plain as the source, next
tile as the target), so a middle tile is predicted twice per step and both predictions enter the blend; in steps
without KV-sharing the two are the same, so it is evaluated once with twice the weight (the same sum).

CogVideoX 1.5 (2 latent frames per temporal patch): a tile's odd latent frame count is padded by the transformer
with its first frame repeated, as for context scenes (`Mask2DiTTransformer3DModel`), not with the filler noise frames
`CogVideoXPipeline` draws for one video, so there one tile is close to stock sampling but not identical.

Everything here is off-switchable and exact where off: with one tile (or tiles without overlap), no KV-sharing and
no blending, each tile is plain CogVideoX sampling of that tile's prompt and noise, bit for bit.
`KVSharingAttnProcessor` is a `Mask2DiTAttnProcessor` (every attention backend of the registry runs under it) that
only changes keys and values in the layers its ``kv_sharing`` argument names; it is installed for one generation by
`kv_sharing_processors` and the previous processors are put back afterwards.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from diffusers import CogVideoXDPMScheduler
from diffusers.pipelines.cogvideo.pipeline_cogvideox import retrieve_timesteps

from .generation_plan import Mask2DiTPipelineOutput, SamplingOptions, plan_pixel_size
from .pipeline_inputs import negative_prompt_lists, scene_prompt_lists
from .transformer import FusedMask2DiTAttnProcessor, Mask2DiTAttnProcessor, scene_rotary_emb

# DiTCtrl's setting for CogVideoX-2b (50 steps, 30 layers): KV-sharing in steps [2, 25) and layers [25, 30).
# Other schedules and depths take the same shares (`default_kv_sharing_range`).
DITCTRL_STEP_SHARE = (2 / 50, 25 / 50)
DITCTRL_LAYER_SHARE = (25 / 30, 30 / 30)

__all__ = [
    "TileLayout",
    "tile_layout",
    "triangular_weights",
    "TilePass",
    "tile_passes",
    "blend_tiles",
    "KVSharing",
    "KVSharingAttnProcessor",
    "FusedKVSharingAttnProcessor",
    "kv_sharing_processors",
    "DiTCtrlMixin",
]


# --------------------------------------------------------------------------------------------------
# Tile layout and blending weights (pure functions)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileLayout:
    """Temporal tiles over a long latent video (all counts in latent frames).

    Attributes:
        tile_frames: latent frames of every tile (what the model generates at once).
        overlap: latent frames shared by consecutive tiles.
        tile_prompts: per tile ``(prompt a, prompt b, weight of b)``: a prompt's own tile is ``(i, i, 0.0)``, a
            transition tile between prompts i and i + 1 is ``(i, i + 1, w)`` with ``0 < w < 1``.
    """

    tile_frames: int
    overlap: int
    tile_prompts: Tuple[Tuple[int, int, float], ...]

    @property
    def num_tiles(self) -> int:
        return len(self.tile_prompts)

    @property
    def stride(self) -> int:
        return self.tile_frames - self.overlap

    @property
    def starts(self) -> List[int]:
        """First latent frame of each tile."""
        return [index * self.stride for index in range(self.num_tiles)]

    @property
    def total_frames(self) -> int:
        """Latent frames of the whole video: ``tile + (num_tiles - 1) * (tile - overlap)``."""
        return self.tile_frames + (self.num_tiles - 1) * self.stride

    @property
    def prompt_tiles(self) -> List[int]:
        """Index of each prompt's own tile."""
        return [index for index, (a, b, _) in enumerate(self.tile_prompts) if a == b]


def tile_layout(num_prompts: int, tile_frames: int, overlap: int, num_transition_tiles: int) -> TileLayout:
    """The tiles of ``num_prompts`` prompts with ``num_transition_tiles`` transition tiles between neighbours."""
    for name, value, low in (("num_prompts", num_prompts, 1), ("tile_frames", tile_frames, 1),
                             ("overlap", overlap, 0), ("num_transition_tiles", num_transition_tiles, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"`{name}` must be an int >= {low}; got {value!r}.")
    if overlap >= tile_frames:
        raise ValueError(f"`overlap` ({overlap} latent frames) must be smaller than the tile ({tile_frames}).")
    tiles: List[Tuple[int, int, float]] = []
    for prompt in range(num_prompts):
        tiles.append((prompt, prompt, 0.0))
        if prompt + 1 < num_prompts:
            tiles += [(prompt, prompt + 1, (j + 1) / (num_transition_tiles + 1)) for j in range(num_transition_tiles)]
    return TileLayout(tile_frames, overlap, tuple(tiles))


def triangular_weights(length: int) -> torch.Tensor:
    """DiTCtrl's blending weights over a tile's ``length`` frames: ``min(x, 2 - x)`` at ``x = (2i + 1) / length``,
    largest in the middle, symmetric, all positive. Returns ``(length,)`` float32."""
    x = (torch.arange(length, dtype=torch.float32) + 0.5) * 2.0 / length
    return torch.minimum(x, 2.0 - x)


@dataclass(frozen=True)
class TilePass:
    """One tile evaluation in a step: ``tile``, the pass whose keys/values it attends to under KV-sharing
    (``source``, None: its own), and how many of DiTCtrl's evaluations it stands for (``multiplicity``)."""

    tile: int
    source: Optional[int] = None
    multiplicity: int = 1


def tile_passes(num_tiles: int, kv_sharing: bool) -> List[TilePass]:
    """The evaluations of one step. With KV-sharing, DiTCtrl's adjacent pairs: for each pair, the earlier tile plain
    (the source) and the later one attending to it; without, each tile once, a middle tile with multiplicity 2 (it
    is in two pairs, and both of its identical predictions enter DiTCtrl's blend)."""
    if num_tiles == 1:
        return [TilePass(0)]
    if kv_sharing:
        passes: List[TilePass] = []
        for tile in range(num_tiles - 1):
            passes += [TilePass(tile), TilePass(tile + 1, source=len(passes))]
        return passes
    return [TilePass(tile, None, 1 if tile in (0, num_tiles - 1) else 2) for tile in range(num_tiles)]


def blend_tiles(
    predictions: torch.Tensor, layout: TileLayout, passes: Sequence[TilePass], latent_blending: bool = True
) -> torch.Tensor:
    """Merge per-pass predictions ``(P, B, T, C, h, w)`` into the whole video ``(B, F, C, h, w)``.

    Each frame is the weighted mean of the passes covering it: triangular weights with ``latent_blending``, equal
    weights without, times each pass's multiplicity. When no frame is covered by two passes, the tiles are put side by
    side unchanged (exactly)."""
    if layout.overlap == 0 and len(passes) == layout.num_tiles:
        return torch.cat([predictions[index] for index in sorted(range(len(passes)), key=lambda i: passes[i].tile)], dim=1)
    base = triangular_weights(layout.tile_frames) if latent_blending else torch.ones(layout.tile_frames)
    base = base.to(device=predictions.device, dtype=predictions.dtype)
    batch, _, *rest = predictions.shape[1:]
    total = predictions.new_zeros(batch, layout.total_frames, *rest)
    weight_sum = predictions.new_zeros(layout.total_frames)
    view = (1, -1) + (1,) * len(rest)
    for prediction, tile_pass in zip(predictions, passes):
        start = layout.starts[tile_pass.tile]
        weights = base * tile_pass.multiplicity
        total[:, start : start + layout.tile_frames] += prediction * weights.view(view)
        weight_sum[start : start + layout.tile_frames] += weights
    return total / weight_sum.view(view)


def default_kv_sharing_range(count: int, share: Tuple[float, float]) -> Tuple[int, int]:
    """DiTCtrl's share of ``count`` steps or layers as a range ``[start, end)`` of indices (at least one index)."""
    start = min(int(round(share[0] * count)), count - 1)
    return start, max(int(round(share[1] * count)), start + 1)


# --------------------------------------------------------------------------------------------------
# KV-sharing attention processor
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class KVSharing:
    """What the processors share in one transformer call (passed as ``attention_kwargs["kv_sharing"]``).

    Attributes:
        source: ``(batch,)`` long tensor: batch item ``b`` attends to the keys/values of item ``source[b]``
            (``source[b] == b``: its own).
        layers: indices of the transformer blocks that share; every other block attends as usual.
    """

    source: torch.Tensor
    layers: FrozenSet[int]


class _SharedKeyValueAttention:
    """``attn`` seen through KV-sharing: ``to_k`` / ``to_v`` (or the key and value thirds of ``to_qkv``) return the
    projections of the source items; everything else is ``attn``'s. Sharing at the projection is the same as sharing
    after QK-norm and RoPE: both act per token, and the source tile has the same positions."""

    def __init__(self, attn, source: torch.Tensor) -> None:
        self._attn = attn
        self._source = source

    def __getattr__(self, name: str) -> Any:
        return getattr(self._attn, name)

    def to_k(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self._attn.to_k(hidden_states)[self._source]

    def to_v(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self._attn.to_v(hidden_states)[self._source]

    def to_qkv(self, hidden_states: torch.Tensor) -> torch.Tensor:
        query, key, value = self._attn.to_qkv(hidden_states).chunk(3, dim=-1)
        return torch.cat([query, key[self._source], value[self._source]], dim=-1)


class KVSharingAttnProcessor(Mask2DiTAttnProcessor):
    """`Mask2DiTAttnProcessor` of block ``layer_index`` that, when ``kv_sharing`` names its layer, lets each batch
    item attend to the keys and values of its source item. Otherwise (``kv_sharing`` None or another layer) it is
    `Mask2DiTAttnProcessor`, exactly."""

    def __init__(self, layer_index: int) -> None:
        self.layer_index = layer_index

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        scene_layout=None,
        scene_options=None,
        scene_shard=None,
        kv_sharing: Optional[KVSharing] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        if kv_sharing is not None and self.layer_index in kv_sharing.layers:
            if kv_sharing.source.shape != (hidden_states.shape[0],):
                raise ValueError(
                    f"`kv_sharing.source` must hold one index per batch item ({hidden_states.shape[0]}); got shape "
                    f"{tuple(kv_sharing.source.shape)}."
                )
            attn = _SharedKeyValueAttention(attn, kv_sharing.source.to(hidden_states.device))
        return super().__call__(
            attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, scene_layout, scene_options,
            scene_shard,
        )


class FusedKVSharingAttnProcessor(KVSharingAttnProcessor, FusedMask2DiTAttnProcessor):
    """`KVSharingAttnProcessor` for fused projections (after ``fuse_qkv_projections()``)."""


@contextlib.contextmanager
def kv_sharing_processors(transformer) -> Iterator[None]:
    """Give every block's attention its KV-sharing processor (fused or not, as set now) for the ``with`` body,
    then put the previous processors back. Blocks with a processor other than Mask²DiT's are refused."""
    previous = transformer.attn_processors
    processors = {}
    for name, processor in previous.items():
        index = int(name.split(".")[1])  # "transformer_blocks.<i>.attn1.processor"
        if isinstance(processor, FusedMask2DiTAttnProcessor):
            processors[name] = FusedKVSharingAttnProcessor(index)
        elif isinstance(processor, Mask2DiTAttnProcessor):
            processors[name] = KVSharingAttnProcessor(index)
        else:
            raise ValueError(
                f"KV-sharing needs the Mask²DiT attention processor; `{name}` is a {type(processor).__name__}."
            )
    transformer.set_attn_processor(processors)
    try:
        yield
    finally:
        transformer.set_attn_processor(previous)


# --------------------------------------------------------------------------------------------------
# The pipeline method
# --------------------------------------------------------------------------------------------------


@dataclass
class _DiTCtrlRun:
    """One generation's fixed parts: the layout, per-tile text embeddings ``(B', L, D)`` (negative ones None without
    guidance), the tile's RoPE, and the KV-sharing steps and layers (empty: off)."""

    layout: TileLayout
    tile_embeds: List[torch.Tensor]
    negative_tile_embeds: Optional[List[torch.Tensor]]
    image_rotary_emb: Optional[Tuple[torch.Tensor, torch.Tensor]]
    kv_steps: range
    kv_layers: FrozenSet[int]
    latent_blending: bool


def _interpolate(embeds: Sequence[torch.Tensor], tile: Tuple[int, int, float], nearest: bool) -> torch.Tensor:
    """A tile's text embedding: its prompt's, or between two prompts (``nearest``: the closer one's, as DiTCtrl
    takes for the unconditional branch)."""
    a, b, weight = tile
    if a == b:
        return embeds[a]
    if nearest:
        return embeds[a] if weight < 0.5 else embeds[b]
    return (1.0 - weight) * embeds[a] + weight * embeds[b]


def _check_range(value: Any, name: str, count: int, what: str) -> range:
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            and 0 <= value[0] < value[1] <= count):
        raise ValueError(f"`{name}` must be a pair (start, end) of {what} indices with 0 <= start < end <= {count}; got {value!r}.")
    return range(value[0], value[1])


class DiTCtrlMixin:
    """``generate_ditctrl``: DiTCtrl-style multi-prompt generation for `Mask2DiTPipeline` (any CogVideoX checkpoint)."""

    def ditctrl_tile_layout(self, num_prompts: int, temporal_tile_size: int, temporal_overlap: int,
                            num_transition_tiles: int) -> TileLayout:
        """The `TileLayout` of ``generate_ditctrl``'s arguments (pixel frames converted to latent frames)."""
        temporal = self.vae_scale_factor_temporal
        if not isinstance(temporal_tile_size, int) or not self.is_valid_num_frames(temporal_tile_size):
            raise ValueError(
                f"`temporal_tile_size` must be a frame count the VAE decodes back to itself (1, 9, 17, ..., 49: 8k+1); "
                f"got {temporal_tile_size!r}."
            )
        tile = self.latent_frames(temporal_tile_size)
        if not isinstance(temporal_overlap, int) or temporal_overlap < 0 or temporal_overlap % temporal or temporal_overlap // temporal >= tile:
            raise ValueError(
                f"`temporal_overlap` must be a multiple of {temporal} pixel frames (one latent frame each) below the tile's "
                f"{tile} latent frames: 0 to {(tile - 1) * temporal}; got {temporal_overlap!r}."
            )
        return tile_layout(num_prompts, tile, temporal_overlap // temporal, num_transition_tiles)

    @torch.no_grad()
    def generate_ditctrl(
        self,
        prompts: Union[List[str], List[List[str]]],
        temporal_tile_size: Optional[int] = None,
        temporal_overlap: Optional[int] = None,
        num_transition_tiles: int = 2,
        kv_sharing: bool = True,
        kv_sharing_steps: Optional[Tuple[int, int]] = None,
        kv_sharing_layers: Optional[Tuple[int, int]] = None,
        latent_blending: bool = True,
        negative_prompt: Optional[Union[str, List[str], List[List[str]]]] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: Optional[int] = None,
        timesteps: Optional[List[int]] = None,
        guidance_scale: Optional[float] = None,
        use_dynamic_cfg: bool = False,
        num_videos_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: Optional[Dict[str, Any]] = None,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],
        max_sequence_length: Optional[int] = None,
    ):
        """One video from several prompts without multi-scene training (DiTCtrl): overlapping temporal tiles, one
        prompt per tile, transition tiles between prompts, triangular latent blending and KV-sharing.

        Args:
            prompts: the prompts in order for one video, or a list of such lists for a batch (same count).
            temporal_tile_size: pixel frames of a tile (what the model generates at once; 8k+1); default the
                transformer's ``sample_frames`` (49 for CogVideoX).
            temporal_overlap: pixel frames shared by consecutive tiles, a multiple of 4 (one latent frame each);
                default a third of the tile's latent frames (DiTCtrl's 4 of 13).
            num_transition_tiles: tiles between two prompts' own tiles whose text embedding moves from one prompt
                to the next (DiTCtrl's default 2; 0 for none).
            kv_sharing: in ``kv_sharing_steps`` and ``kv_sharing_layers`` each tile's queries attend to the
                previous tile's keys and values.
            kv_sharing_steps, kv_sharing_layers: ``(start, end)`` ranges of step and block indices; default
                DiTCtrl's share (steps 2-25 of 50, blocks 25-30 of 30).
            latent_blending: triangular weights where tiles overlap (False: equal weights).
            negative_prompt: a string, one per prompt, or one such list per sample; a transition tile takes the
                nearer prompt's.
            latents: initial noise of the whole video ``(B * num_videos_per_prompt, F, C, h, w)``, F the
                layout's ``total_frames`` (`ditctrl_tile_layout`); overlapping tiles share their frames' noise.
            Other arguments as in ``__call__``; callbacks get the whole video's latents.

        Returns:
            `Mask2DiTPipelineOutput`: ``frames`` the whole video (decoded at once), ``scene_frames`` per sample each
            prompt's own tile decoded alone, ``latents`` the whole video's final latents.
        """
        # 1. Check the sampling options; reset the per-call state
        sampling = self._begin_sampling(
            SamplingOptions(
                num_inference_steps, timesteps, guidance_scale, use_dynamic_cfg, eta, generator, attention_kwargs,
                callback_on_step_end, callback_on_step_end_tensor_inputs, max_sequence_length, output_type,
            )
        )
        if set(sampling.callback_on_step_end_tensor_inputs or []) - {"latents"}:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` of `generate_ditctrl` may only be ['latents'] (the whole video); "
                f"got {sampling.callback_on_step_end_tensor_inputs}."
            )
        height, width = plan_pixel_size(self, height, width)
        prompt_lists = scene_prompt_lists(prompts, "prompts")
        negative_lists = negative_prompt_lists(negative_prompt, len(prompt_lists), len(prompt_lists[0]))

        # 2. The tiles: prompts' own tiles and transition tiles, overlapping; the KV-sharing steps and layers
        tile_size = self.transformer.config.sample_frames if temporal_tile_size is None else temporal_tile_size
        if temporal_overlap is None:
            temporal_overlap = self.latent_frames(tile_size) // 3 * self.vae_scale_factor_temporal
        layout = self.ditctrl_tile_layout(len(prompt_lists[0]), tile_size, temporal_overlap, num_transition_tiles)
        kv_steps, kv_layers = self._ditctrl_kv_ranges(kv_sharing, kv_sharing_steps, kv_sharing_layers, sampling.num_inference_steps)

        # 3. Encode each prompt once; each tile's embedding is its prompt's or an interpolation of two
        device = self._execution_device
        positive, negative, _ = self.encode_scene_prompts(
            prompt_lists, negative_lists, sampling.do_classifier_free_guidance, num_videos_per_prompt,
            sampling.max_sequence_length, device, per_scene=True,
        )
        scale = self.vae_scale_factor_spatial
        run = _DiTCtrlRun(
            layout, [_interpolate(positive, tile, False) for tile in layout.tile_prompts],
            None if negative is None else [_interpolate(negative, tile, True) for tile in layout.tile_prompts],
            scene_rotary_emb(self.transformer.config, height // scale, width // scale, layout.tile_frames, device),
            kv_steps, kv_layers, latent_blending,
        )

        # 4. Draw the whole video's noise and denoise it tile by tile
        latents = self._ditctrl_noise(run, len(prompt_lists) * num_videos_per_prompt, height, width, generator, latents)
        with kv_sharing_processors(self.transformer) if kv_layers else contextlib.nullcontext():
            latents = self._ditctrl_denoise(run, latents, sampling)

        # 5. Decode the whole video, and each prompt's own tile alone
        return self._ditctrl_finish(run.layout, latents, output_type, return_dict)

    def _ditctrl_kv_ranges(self, enabled: bool, steps: Any, layers: Any, num_inference_steps: int) -> Tuple[range, FrozenSet[int]]:
        """The KV-sharing step range and block set (empty when off), checked; None takes DiTCtrl's share."""
        if not isinstance(enabled, bool):
            raise ValueError(f"`kv_sharing` must be True or False; got {enabled!r}.")
        if not enabled:
            return range(0), frozenset()
        num_layers = len(self.transformer.transformer_blocks)
        steps = default_kv_sharing_range(num_inference_steps, DITCTRL_STEP_SHARE) if steps is None else steps
        layers = default_kv_sharing_range(num_layers, DITCTRL_LAYER_SHARE) if layers is None else layers
        return (_check_range(steps, "kv_sharing_steps", num_inference_steps, "step"),
                frozenset(_check_range(layers, "kv_sharing_layers", num_layers, "transformer block")))

    def _ditctrl_noise(self, run: _DiTCtrlRun, batch: int, height: int, width: int, generator, latents) -> torch.Tensor:
        """The whole video's initial noise ``(batch, F, C, h, w)``, drawn as `CogVideoXPipeline` draws one video."""
        shape = (batch, run.layout.total_frames, self.transformer.config.in_channels,
                 height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial)
        if latents is not None and (not torch.is_tensor(latents) or tuple(latents.shape) != shape):
            raise ValueError(
                f"`latents` must have shape {shape} (videos, the layout's latent frames, channels, h, w); got "
                f"{tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__}."
            )
        pixel_frames = (run.layout.total_frames - 1) * self.vae_scale_factor_temporal + 1
        return self.prepare_latents(batch, shape[2], pixel_frames, height, width, run.tile_embeds[0].dtype,
                                    self._execution_device, generator, latents)

    def _ditctrl_predict(self, run: _DiTCtrlRun, latents: torch.Tensor, t, passes: Sequence[TilePass], share: bool) -> torch.Tensor:
        """The transformer's prediction for every pass ``(P * B', T, C, h, w)`` (with guidance, ``2 P B'``: the
        unconditional half first), the passes' tiles as one batch; ``share``: KV-sharing in this step."""
        frames, batch = run.layout.tile_frames, latents.shape[0]
        starts = [run.layout.starts[tile_pass.tile] for tile_pass in passes]
        model_latents = self.scheduler.scale_model_input(torch.cat([latents[:, s : s + frames] for s in starts]), t)
        text_embeds = torch.cat([run.tile_embeds[tile_pass.tile] for tile_pass in passes])
        # Item (pass p, sample b) reads the keys/values of (its source pass, b), in each guidance branch.
        sources = [index if tile_pass.source is None else tile_pass.source for index, tile_pass in enumerate(passes)]
        source = (torch.tensor(sources)[:, None] * batch + torch.arange(batch)[None, :]).flatten()
        if run.negative_tile_embeds is not None:
            model_latents = torch.cat([model_latents] * 2)
            text_embeds = torch.cat([torch.cat([run.negative_tile_embeds[p.tile] for p in passes]), text_embeds])
            source = torch.cat([source, source + len(passes) * batch])
        attention_kwargs = dict(self._attention_kwargs or {})
        if share:
            attention_kwargs["kv_sharing"] = KVSharing(source, run.kv_layers)
        cache_context = getattr(self.transformer, "cache_context", None)
        with cache_context("cond_uncond") if cache_context else contextlib.nullcontext():
            noise_pred = self.transformer(
                hidden_states=model_latents,
                encoder_hidden_states=text_embeds,
                timestep=t.expand(model_latents.shape[0]),
                image_rotary_emb=run.image_rotary_emb,
                attention_kwargs=attention_kwargs,
                return_dict=False,
                scene_frames=[frames],
                text_lengths=[text_embeds.shape[1]],
            )[0]
        return noise_pred.float()

    def _ditctrl_step_prediction(self, run: _DiTCtrlRun, latents: torch.Tensor, t, step: int, guidance: bool) -> torch.Tensor:
        """One step's guided prediction of the whole video ``(B', F, C, h, w)``: every tile, then blended."""
        share = step in run.kv_steps and run.layout.num_tiles > 1
        passes = tile_passes(run.layout.num_tiles, share)
        noise_pred = self._ditctrl_predict(run, latents, t, passes, share)
        if guidance:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)
        predictions = noise_pred.unflatten(0, (len(passes), latents.shape[0]))
        return blend_tiles(predictions, run.layout, passes, run.latent_blending)

    def _ditctrl_denoise(self, run: _DiTCtrlRun, latents: torch.Tensor, sampling) -> torch.Tensor:
        """The denoising loop over the whole video's ``latents (B', F, C, h, w)``: the loop of ``__call__`` (same
        guidance, dynamic CFG, scheduler steps, callbacks), with each step's prediction made tile by tile."""
        device = latents.device
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, sampling.num_inference_steps, device, sampling.timesteps)
        self._num_timesteps = len(timesteps)
        extra_step_kwargs = self.prepare_extra_step_kwargs(sampling.generator, sampling.eta)
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        old_pred_original_sample = None  # CogVideoXDPMScheduler's multistep state
        guidance = run.negative_tile_embeds is not None
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            progress_bar.set_description(f"DiTCtrl, {run.layout.num_tiles} tiles")
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                if sampling.use_dynamic_cfg:
                    self._guidance_scale = 1 + sampling.guidance_scale * (
                        (1 - math.cos(math.pi * ((num_inference_steps - t.item()) / num_inference_steps) ** 5.0)) / 2
                    )
                noise_pred = self._ditctrl_step_prediction(run, latents, t, i, guidance)
                if not isinstance(self.scheduler, CogVideoXDPMScheduler):
                    latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                else:
                    latents, old_pred_original_sample = self.scheduler.step(
                        noise_pred, old_pred_original_sample, t, timesteps[i - 1] if i > 0 else None, latents,
                        **extra_step_kwargs, return_dict=False,
                    )
                latents = latents.to(run.tile_embeds[0].dtype)
                if sampling.callback_on_step_end is not None:
                    callback_kwargs = {"latents": latents} if "latents" in sampling.callback_on_step_end_tensor_inputs else {}
                    latents = sampling.callback_on_step_end(self, i, t, callback_kwargs).pop("latents", latents)
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
        self._current_timestep = None
        return latents

    def _ditctrl_finish(self, layout: TileLayout, latents: torch.Tensor, output_type: str, return_dict: bool):
        """Decode the whole video at once and each prompt's own tile alone; offload; wrap the result."""
        video, _ = self.decode_scenes(latents, [layout.total_frames], output_type)
        own_tiles = torch.cat([latents[:, s : s + layout.tile_frames] for s in (layout.starts[i] for i in layout.prompt_tiles)], dim=1)
        _, scenes = self.decode_scenes(own_tiles, [layout.tile_frames] * len(layout.prompt_tiles), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video, scenes)
        return Mask2DiTPipelineOutput(frames=video, scene_frames=scenes, latents=latents)
