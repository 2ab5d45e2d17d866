"""Scene-aware CogVideoX transformer: the Mask²DiT attention processor, scene-aware norms and the model.

`Mask2DiTTransformer3DModel` subclasses diffusers' `CogVideoXTransformer3DModel` and keeps its modules and
state-dict keys, so it loads every CogVideoX transformer (2b sincos, 5b RoPE, 1.5 with `patch_size_t`) and
the authors' released one. What it adds:

- n scenes in one sequence ``[text_1..text_n ; video_1..video_n]`` with the Mask²DiT attention mask;
- video positions (sincos or RoPE) continuous over all scenes' latent frames;
- per-scene timesteps ``(B, n)``: each scene's text and video tokens are modulated (norm1, norm2 of every
  block and the final norm) with their own scene's time embedding, which is how the segment-level
  conditional mask holds context scenes clean at timestep 0.

Every block runs as a module through stock `CogVideoXBlock.forward`, so whatever diffusers hooks onto
blocks (caches, group offloading, layerwise casting, gradient checkpointing) engages as on the stock model.
The scene information travels in the blocks' own arguments, never in module or global state (which would
break under threads, under hooks that replay or skip calls, and when gradient checkpointing recomputes a
block during the backward pass, long after the forward has returned):

- ``temb``: a `PerSceneEmbedding` (the ``(B, n, D)`` embeddings and the scene layout) in place of the
  ``(B, D)`` tensor when scenes have their own timesteps. Stock blocks hand ``temb`` unchanged to
  ``norm1``/``norm2``; those are `scene_norms.SceneLayerNormZero` (the same modules, class swapped in place);
- ``attention_kwargs``: ``scene_layout`` and ``scene_options``, which stock `Attention` passes on to
  `Mask2DiTAttnProcessor`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.normalization import AdaLayerNorm, CogVideoXLayerNormZero
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers

from .attention import SceneAttentionOptions, run_scene_attention
from .layout import (
    DEFAULT_MASK_VARIANT,
    SceneLayout,
    check_mask_variant,
    drop_leading_frames,
    patch_aligned_frames,
    rope_over_frames,
    scene_rotary_emb,
)
from .parallel import SCENE_CP_PLAN, SequenceShard, check_same_inputs, resolve_parallel_config, sequence_shard
from .scene_norms import (  # noqa: F401  (SceneGate, scene_gate: importable from here as before)
    PerSceneEmbedding,
    SceneAdaLayerNorm,
    SceneGate,
    SceneLayerNormZero,
    make_scene_aware,
    scene_gate,
)

# --------------------------------------------------------------------------------------------------
# Attention processors
# --------------------------------------------------------------------------------------------------


class Mask2DiTAttnProcessor:
    """CogVideoX attention (projections, QK norm, RoPE on video tokens) with Mask²DiT scene attention.

    Extra call arguments, which the transformer puts into the blocks' ``attention_kwargs`` and stock
    `Attention` hands on to its processor:
        scene_layout: the `SceneLayout` of the sequence; None means one scene (plain CogVideoX attention).
        scene_options: `SceneAttentionOptions` (mask variant, backend), already validated; None: defaults.
        scene_shard: under Ulysses context parallelism, this rank's `SequenceShard`: the inputs are its slice of
            the sequence, and an all-to-all over heads gathers the whole sequence around scene attention.

    ``hidden_states (B, Lv, C)`` and ``encoder_hidden_states (B, Lt, C)`` in; the same shapes out.
    """

    def _project(self, attn, hidden_states: torch.Tensor) -> Sequence[torch.Tensor]:
        """Query, key, value ``(B, L, C)`` each, from ``(B, L, C)``."""
        return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        scene_layout: Optional[SceneLayout] = None,
        scene_options: Optional[SceneAttentionOptions] = None,
        scene_shard: Optional[SequenceShard] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ValueError(f"`attention_mask` is not supported by {type(self).__name__}: the scene layout defines the mask.")
        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, sequence_length, _ = hidden_states.shape
        if scene_layout is None:
            scene_layout = SceneLayout([text_seq_length], [sequence_length - text_seq_length])

        query, key, value = self._project(attn, hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # RoPE acts on video tokens only, as in CogVideoX.
        if image_rotary_emb is not None:
            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)

        options = scene_options if scene_options is not None else _DEFAULT_OPTIONS
        if scene_shard is None:
            hidden_states = run_scene_attention(query, key, value, scene_layout, options)
        else:
            scene_shard.check_local_tokens(text_seq_length, sequence_length - text_seq_length)
            query, key, value = scene_shard.gather_sequence(query, key, value)
            hidden_states = run_scene_attention(query, key, value, scene_layout, options)
            hidden_states = scene_shard.scatter_sequence(hidden_states, attn.heads)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
        )
        return hidden_states, encoder_hidden_states


class FusedMask2DiTAttnProcessor(Mask2DiTAttnProcessor):
    """`Mask2DiTAttnProcessor` for fused projections (``attn.to_qkv``, after ``fuse_qkv_projections()``)."""

    def _project(self, attn, hidden_states: torch.Tensor) -> Sequence[torch.Tensor]:
        qkv = attn.to_qkv(hidden_states)
        return torch.split(qkv, qkv.shape[-1] // 3, dim=-1)


_DEFAULT_OPTIONS = SceneAttentionOptions()


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


def _as_int_list(values: Sequence[Any], name: str) -> List[int]:
    try:
        result = [int(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a list of positive integers, got {values!r}.") from None
    if not result or any(v <= 0 for v in result):
        raise ValueError(f"`{name}` must be a non-empty list of positive integers, got {values!r}.")
    return result


class Mask2DiTTransformer3DModel(CogVideoXTransformer3DModel):
    """CogVideoX transformer for n scenes with the Mask²DiT mask and per-scene timesteps.

    Same weights and state-dict keys as `CogVideoXTransformer3DModel`; two config keys are added:
    ``attn_mask_variant`` (default "v2") and ``attn_msk_version`` (the authors' key, mapped onto the former).

    Multi-GPU inference with diffusers' parallel API keeps the scene mask: ``enable_parallelism(
    config=ContextParallelConfig(ulysses_degree=d))`` splits the sequence by ``_cp_plan`` (see `parallel`).
    """

    # How diffusers' context-parallel hooks split and gather the sequence (`parallel.SCENE_CP_PLAN`).
    _cp_plan = SCENE_CP_PLAN
    # The blocks `compile_repeated_blocks()` compiles once and reuses (regional compilation).
    _repeated_blocks = ["CogVideoXBlock"]

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 30,
        attention_head_dim: int = 64,
        in_channels: int = 16,
        out_channels: Optional[int] = 16,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        time_embed_dim: int = 512,
        ofs_embed_dim: Optional[int] = None,
        text_embed_dim: int = 4096,
        num_layers: int = 30,
        dropout: float = 0.0,
        attention_bias: bool = True,
        sample_width: int = 90,
        sample_height: int = 60,
        sample_frames: int = 49,
        patch_size: int = 2,
        patch_size_t: Optional[int] = None,
        temporal_compression_ratio: int = 4,
        max_text_seq_length: int = 226,
        activation_fn: str = "gelu-approximate",
        timestep_activation_fn: str = "silu",
        norm_elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
        spatial_interpolation_scale: float = 1.875,
        temporal_interpolation_scale: float = 1.0,
        use_rotary_positional_embeddings: bool = False,
        use_learned_positional_embeddings: bool = False,
        patch_bias: bool = True,
        attn_mask_variant: str = DEFAULT_MASK_VARIANT,
        attn_msk_version: Optional[Union[int, str]] = None,
    ):
        super().__init__(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            flip_sin_to_cos=flip_sin_to_cos,
            freq_shift=freq_shift,
            time_embed_dim=time_embed_dim,
            ofs_embed_dim=ofs_embed_dim,
            text_embed_dim=text_embed_dim,
            num_layers=num_layers,
            dropout=dropout,
            attention_bias=attention_bias,
            sample_width=sample_width,
            sample_height=sample_height,
            sample_frames=sample_frames,
            patch_size=patch_size,
            patch_size_t=patch_size_t,
            temporal_compression_ratio=temporal_compression_ratio,
            max_text_seq_length=max_text_seq_length,
            activation_fn=activation_fn,
            timestep_activation_fn=timestep_activation_fn,
            norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=norm_eps,
            spatial_interpolation_scale=spatial_interpolation_scale,
            temporal_interpolation_scale=temporal_interpolation_scale,
            use_rotary_positional_embeddings=use_rotary_positional_embeddings,
            use_learned_positional_embeddings=use_learned_positional_embeddings,
            patch_bias=patch_bias,
        )
        self._init_mask2dit(attn_msk_version if attn_msk_version is not None else attn_mask_variant)

    def _init_mask2dit(self, variant: Union[int, str]) -> None:
        variant = check_mask_variant(variant, "attn_mask_variant")
        self.register_to_config(attn_mask_variant=variant)
        for index, block in enumerate(self.transformer_blocks):
            make_scene_aware(block.norm1, CogVideoXLayerNormZero, SceneLayerNormZero, f"transformer_blocks.{index}.norm1")
            make_scene_aware(block.norm2, CogVideoXLayerNormZero, SceneLayerNormZero, f"transformer_blocks.{index}.norm2")
        make_scene_aware(self.norm_out, AdaLayerNorm, SceneAdaLayerNorm, "norm_out")
        self.set_attn_processor(Mask2DiTAttnProcessor())

    def _resolve_parallel_config(self, config):
        """diffusers' step of `enable_parallelism` that builds the mesh: refuses what scene attention cannot run
        (ring attention, a degree above the head count) and also works without an accelerator (gloo on CPU),
        where diffusers' own divides by the accelerator count (`parallel.resolve_parallel_config`)."""
        return resolve_parallel_config(self, config, super()._resolve_parallel_config)

    def fuse_qkv_projections(self) -> None:
        """Fuse each attention's query, key and value projections into one (diffusers' method), keeping the
        scene mask: the fused processor is `FusedMask2DiTAttnProcessor`; ``unfuse_qkv_projections()`` puts
        back the processors that were set before."""
        super().fuse_qkv_projections()
        self.set_attn_processor(FusedMask2DiTAttnProcessor())

    @classmethod
    def from_cogvideox(
        cls, transformer: CogVideoXTransformer3DModel, mask_variant: Optional[str] = None
    ) -> "Mask2DiTTransformer3DModel":
        """Turn a plain `CogVideoXTransformer3DModel` into this class in place (same object, same weights)."""
        if not isinstance(transformer, CogVideoXTransformer3DModel):
            raise ValueError(
                f"`transformer` must be a CogVideoXTransformer3DModel, got {type(transformer).__name__}."
            )
        if isinstance(transformer, cls):
            if mask_variant is not None:
                transformer.register_to_config(attn_mask_variant=check_mask_variant(mask_variant, "mask_variant"))
            return transformer
        transformer.__class__ = cls
        config = transformer.config
        variant = mask_variant or config.get("attn_msk_version") or config.get("attn_mask_variant") or DEFAULT_MASK_VARIANT
        transformer._init_mask2dit(variant)
        return transformer

    # ----------------------------------------------------------------------------------------------
    # Inputs

    def _check_timestep(self, timestep: Any, batch_size: int, device: torch.device) -> torch.Tensor:
        """``timestep`` as a tensor: ``(B,)`` (or ``(1,)``, broadcast as stock does) or per scene ``(B, n)``."""
        timestep = torch.as_tensor(timestep, device=device)
        if timestep.dim() == 0:
            timestep = timestep.expand(batch_size)
        if timestep.dim() > 2 or timestep.shape[0] not in (1, batch_size):
            raise ValueError(f"`timestep` must be (batch={batch_size},) or (batch, num_scenes); got {tuple(timestep.shape)}.")
        return timestep

    def _resolve_scenes(
        self,
        num_frames: int,
        text_tokens: int,
        timestep: torch.Tensor,
        scene_frames: Optional[Sequence[int]],
        text_lengths: Optional[Sequence[int]],
    ) -> Tuple[List[int], List[int]]:
        """Latent frames and text tokens per scene, checked against the inputs' ``num_frames``/``text_tokens``."""
        if scene_frames is None:
            num_scenes = timestep.shape[1] if timestep.dim() == 2 else 1
            if num_frames % num_scenes:
                raise ValueError(
                    f"{num_frames} latent frames cannot be split evenly into {num_scenes} scenes; pass `scene_frames`."
                )
            scene_frames = [num_frames // num_scenes] * num_scenes
        scene_frames = _as_int_list(scene_frames, "scene_frames")
        if sum(scene_frames) != num_frames:
            raise ValueError(
                f"`scene_frames` {scene_frames} add up to {sum(scene_frames)} latent frames but `hidden_states` has "
                f"{num_frames}."
            )
        num_scenes = len(scene_frames)
        if text_lengths is None:
            if text_tokens % num_scenes:
                raise ValueError(
                    f"`encoder_hidden_states` has {text_tokens} tokens, which cannot be split evenly into {num_scenes} "
                    "scenes; pass `text_lengths`."
                )
            text_lengths = [text_tokens // num_scenes] * num_scenes
        text_lengths = _as_int_list(text_lengths, "text_lengths")
        if len(text_lengths) != num_scenes or sum(text_lengths) != text_tokens:
            raise ValueError(
                f"`text_lengths` {text_lengths} must have one entry per scene ({num_scenes}) and add up to the "
                f"{text_tokens} tokens of `encoder_hidden_states`."
            )
        if timestep.dim() == 2 and timestep.shape[1] != num_scenes:
            raise ValueError(
                f"`timestep` of shape {tuple(timestep.shape)} must be (batch,) or (batch, num_scenes={num_scenes})."
            )
        return scene_frames, text_lengths

    def _check_scene_inputs(self, layout: SceneLayout, image_rotary_emb, parallel: bool = False) -> None:
        """The RoPE must cover every video token, and with several scenes (or any number under context
        parallelism) every attention processor must apply the scene mask: a stock processor would drop the scene
        arguments with only a log line."""
        if image_rotary_emb is not None and image_rotary_emb[0].shape[0] != layout.video_total:
            raise ValueError(
                f"`image_rotary_emb` covers {image_rotary_emb[0].shape[0]} video tokens but the scenes have "
                f"{layout.video_total}; build it with `transformer.prepare_rotary_emb(height, width, scene_frames, "
                "device)`."
            )
        if layout.num_scenes == 1 and not parallel:
            return
        for index, block in enumerate(self.transformer_blocks):
            processor = block.attn1.processor
            if not isinstance(processor, Mask2DiTAttnProcessor):
                if parallel:
                    raise ValueError(
                        f"`transformer_blocks.{index}.attn1` has a {type(processor).__name__}, which cannot run under "
                        "context parallelism: it would attend within each rank's slice of the sequence only. Set "
                        "`Mask2DiTAttnProcessor()` (or `FusedMask2DiTAttnProcessor()`)."
                    )
                raise ValueError(
                    f"`transformer_blocks.{index}.attn1` has a {type(processor).__name__}, which cannot apply the "
                    f"Mask²DiT scene mask: with {layout.num_scenes} scenes its attention would silently be unmasked. "
                    "Set a scene-aware processor with `set_attn_processor(Mask2DiTAttnProcessor())` (or "
                    "`FusedMask2DiTAttnProcessor()` after `fuse_qkv_projections()`), or pass one scene."
                )

    # ----------------------------------------------------------------------------------------------
    # Embeddings

    def _time_embedding(self, timestep: torch.Tensor, timestep_cond, ofs, dtype) -> torch.Tensor:
        """``(B, D)`` for per-sample timesteps ``(B,)``, ``(B, n, D)`` for per-scene ones ``(B, n)``."""
        per_scene = timestep.dim() == 2
        flat = timestep.reshape(-1)
        t_emb = self.time_proj(flat).to(dtype=dtype)
        if per_scene and timestep_cond is not None:
            timestep_cond = timestep_cond.repeat_interleave(timestep.shape[1], dim=0)
        emb = self.time_embedding(t_emb, timestep_cond)
        if self.ofs_embedding is not None:
            ofs_emb = self.ofs_embedding(self.ofs_proj(ofs).to(dtype=dtype))
            if per_scene:
                ofs_emb = ofs_emb.repeat_interleave(timestep.shape[1], dim=0)
            emb = emb + ofs_emb
        return emb.view(*timestep.shape, -1)

    def rotary_embeddings(
        self, latent_height: int, latent_width: int, latent_frames: int, device: torch.device
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """3D RoPE over ``latent_frames`` frames (all scenes, padded), the same formula as `CogVideoXPipeline`."""
        return rope_over_frames(self.config, latent_height, latent_width, latent_frames, device)

    def prepare_rotary_emb(
        self, latent_height: int, latent_width: int, scene_frames: Union[int, Sequence[int]], device: Any
    ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The ``image_rotary_emb`` to pass to `forward` for scenes of ``scene_frames`` latent frames each:
        ``(cos, sin)`` ``(video_tokens, head_dim)`` continuous over all scenes, or None for sincos models
        (see `scene_rotary_emb`). Without it the model runs without RoPE, as stock CogVideoX does."""
        return scene_rotary_emb(self.config, latent_height, latent_width, scene_frames, device)

    def _pad_scenes(self, hidden_states: torch.Tensor, scene_frames: List[int]) -> Tuple[torch.Tensor, List[int]]:
        """CogVideoX 1.5 patches 2 latent frames at a time: repeat each scene's first frame in front to fill.
        Returns the padded latents and the padded frame count of each scene."""
        padded_frames = patch_aligned_frames(scene_frames, self.config.patch_size_t)
        if padded_frames == scene_frames:
            return hidden_states, padded_frames
        pieces, start = [], 0
        for frames, padded in zip(scene_frames, padded_frames):
            scene = hidden_states[:, start : start + frames]
            filler = scene[:, :1].expand(-1, padded - frames, -1, -1, -1)
            pieces.append(torch.cat([filler, scene], dim=1))
            start += frames
        return torch.cat(pieces, dim=1), padded_frames

    def _embed(self, encoder_hidden_states: torch.Tensor, hidden_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Text tokens ``(B, Lt, D)`` and video tokens ``(B, Lv, D)`` with positions continuous over all frames."""
        text = self.patch_embed.text_proj(encoder_hidden_states)
        # The stock patch embedding (2b) insists on exactly `max_text_seq_length` text tokens before the video
        # when it adds sincos positions. Feeding it a placeholder text of that length lets it patchify the
        # video and place positions over all scenes' frames, however many prompts there are.
        placeholder = encoder_hidden_states.new_zeros(
            encoder_hidden_states.shape[0], self.config.max_text_seq_length, encoder_hidden_states.shape[-1]
        )
        joint = self.patch_embed(placeholder, hidden_states)
        video = joint[:, self.config.max_text_seq_length :]
        return text, video

    # ----------------------------------------------------------------------------------------------
    # Forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: Union[int, float, torch.Tensor],
        timestep_cond: Optional[torch.Tensor] = None,
        ofs: Optional[Union[int, float, torch.Tensor]] = None,
        image_rotary_emb: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        attention_kwargs: Optional[Dict[str, Any]] = None,
        return_dict: bool = True,
        scene_frames: Optional[Sequence[int]] = None,
        text_lengths: Optional[Sequence[int]] = None,
    ) -> Union[Tuple[torch.Tensor], Transformer2DModelOutput]:
        """Denoise n scenes at once (one scene: exactly stock `CogVideoXTransformer3DModel.forward`).

        Args:
            hidden_states: ``(B, F, C, h, w)``: the scenes' latent frames concatenated along frames.
            encoder_hidden_states: ``(B, Lt, D_text)``: the scenes' prompt embeddings concatenated.
            timestep: scalar, ``(B,)`` or per scene ``(B, n)``.
            image_rotary_emb: RoPE ``(cos, sin)``, each ``(video_tokens, head_dim)``, over all F frames (see
                `prepare_rotary_emb`); None runs without RoPE, as stock does.
            attention_kwargs: ``scene_mask`` (default ``config.attn_mask_variant``), ``attention_backend``
                (both checked by `SceneAttentionOptions`), the LoRA ``scale``; other keys go on to the
                attention processors, as in stock.
            scene_frames: latent frames per scene (default: one scene, or an even split into n when
                ``timestep`` is ``(B, n)``).
            text_lengths: text tokens per scene (default: an even split of ``Lt``).

        Returns:
            The predicted sample ``(B, F, C, h, w)``.
        """
        options, attention_kwargs = SceneAttentionOptions.split_attention_kwargs(
            attention_kwargs, self.config.attn_mask_variant
        )
        lora_scale = attention_kwargs.pop("scale", 1.0)
        if USE_PEFT_BACKEND:
            scale_lora_layers(self, lora_scale)
        try:
            output = self._forward(
                hidden_states, encoder_hidden_states, timestep, timestep_cond, ofs, image_rotary_emb, options,
                attention_kwargs, scene_frames, text_lengths,
            )
        finally:
            if USE_PEFT_BACKEND:
                unscale_lora_layers(self, lora_scale)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

    def _forward(
        self, hidden_states, encoder_hidden_states, timestep, timestep_cond, ofs, image_rotary_emb, options,
        attention_kwargs, scene_frames, text_lengths,
    ) -> torch.Tensor:
        """`forward` after the LoRA scale is applied: ``(B, F, C, h, w)`` in and out."""
        batch_size, num_frames, _, height, width = hidden_states.shape
        latents = hidden_states
        p, p_t = self.config.patch_size, self.config.patch_size_t
        if height % p or width % p:
            raise ValueError(
                f"Latent height and width must be divisible by the patch size {p}; got {height}x{width} "
                f"(pixel sizes must be multiples of {p * 8} for the CogVideoX VAE)."
            )
        timestep = self._check_timestep(timestep, batch_size, hidden_states.device)
        scene_frames, text_lengths = self._resolve_scenes(
            num_frames, encoder_hidden_states.shape[1], timestep, scene_frames, text_lengths
        )
        # One scene's timestep is a per-sample timestep. Decided from the shape only: comparing the values would
        # sync with the host and break `torch.compile` graphs (per-scene modulation of equal timesteps gives
        # the same numbers as the per-sample path).
        if timestep.dim() == 2 and timestep.shape[1] == 1:
            timestep = timestep[:, 0]

        # 1. Time embedding: (B, D) or (B, n, D)
        emb = self._time_embedding(timestep, timestep_cond, ofs, hidden_states.dtype)

        # 2. Patch embedding, with 1.5-style scenes padded to whole temporal patches
        hidden_states, padded_frames = self._pad_scenes(hidden_states, scene_frames)
        encoder_hidden_states, hidden_states = self._embed(encoder_hidden_states, hidden_states)
        patches_per_frame = (height // p) * (width // p)
        layout = SceneLayout(text_lengths, [f // (p_t or 1) * patches_per_frame for f in padded_frames])
        # Under Ulysses context parallelism: this rank's slice of the sequence (None otherwise).
        shard = sequence_shard(getattr(self, "_parallel_config", None), layout)
        self._check_scene_inputs(layout, image_rotary_emb, parallel=shard is not None)
        hidden_states = self.embedding_dropout(hidden_states)
        encoder_hidden_states = self.embedding_dropout(encoder_hidden_states)

        # 3. Transformer blocks, called as modules; the scene information rides in their arguments
        if shard is not None:
            # Padded to whole slices; the `_cp_plan` hooks split the sequence at the first block.
            check_same_inputs(latents, shard.group, "hidden_states")
            encoder_hidden_states, hidden_states, image_rotary_emb = shard.pad(
                encoder_hidden_states, hidden_states, image_rotary_emb
            )
        if emb.dim() == 3:
            emb = PerSceneEmbedding(emb, layout if shard is None else shard.segments)
        if layout.num_scenes > 1 or shard is not None:
            attention_kwargs = {**attention_kwargs, "scene_layout": layout, "scene_options": options}
            if shard is not None:
                attention_kwargs["scene_shard"] = shard
        hidden_states, encoder_hidden_states = self._run_blocks(
            hidden_states, encoder_hidden_states, emb, image_rotary_emb, attention_kwargs
        )

        # 4. Final norm (per-scene modulation when `emb` is per scene) and projection
        hidden_states = self.norm_final(hidden_states)
        hidden_states = self.norm_out(hidden_states, temb=emb)
        hidden_states = self.proj_out(hidden_states)
        if shard is not None:  # gathered from all ranks by the `_cp_plan` hook on proj_out
            hidden_states = shard.unpad_video(hidden_states)

        # 5. Unpatchify, then drop the frames added to fill temporal patches
        output = self._unpatchify(hidden_states, batch_size, sum(padded_frames), height, width)
        return drop_leading_frames(output, scene_frames, padded_frames)

    def _run_blocks(self, hidden_states, encoder_hidden_states, emb, image_rotary_emb, attention_kwargs):
        """Every block as a module, with stock `CogVideoXBlock.forward` (and stock checkpointing), so hooks on
        the blocks run. ``hidden_states (B, Lv, C)``, ``encoder_hidden_states (B, Lt, C)`` in and out."""
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states, encoder_hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, encoder_hidden_states, emb, image_rotary_emb, attention_kwargs
                )
            else:
                hidden_states, encoder_hidden_states = block(
                    hidden_states=hidden_states,
                    encoder_hidden_states=encoder_hidden_states,
                    temb=emb,
                    image_rotary_emb=image_rotary_emb,
                    attention_kwargs=attention_kwargs,
                )
        return hidden_states, encoder_hidden_states

    def _unpatchify(self, hidden_states: torch.Tensor, batch_size: int, frames: int, height: int, width: int) -> torch.Tensor:
        """Patch tokens ``(B, Lv, p_t * p * p * C)`` -> latents ``(B, frames, C, height, width)``."""
        p, p_t = self.config.patch_size, self.config.patch_size_t
        if p_t is None:
            output = hidden_states.reshape(batch_size, frames, height // p, width // p, -1, p, p)
            return output.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)
        output = hidden_states.reshape(batch_size, frames // p_t, height // p, width // p, -1, p_t, p, p)
        return output.permute(0, 1, 5, 4, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(1, 2)
