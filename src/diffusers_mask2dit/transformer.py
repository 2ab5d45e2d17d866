"""Scene-aware CogVideoX transformer: the Mask²DiT attention processor and model.

`Mask2DiTTransformer3DModel` subclasses diffusers' `CogVideoXTransformer3DModel` and keeps its modules and
state-dict keys, so it loads every CogVideoX transformer (2b sincos, 5b RoPE, 1.5 with `patch_size_t`) and
the authors' released one. What it adds:

- n scenes in one sequence ``[text_1..text_n ; video_1..video_n]`` with the Mask²DiT attention mask;
- video positions (sincos or RoPE) continuous over all scenes' latent frames;
- per-scene timesteps ``(B, n)``: each scene's text and video tokens are modulated (norm1, norm2 of every
  block and the final norm) with their own scene's time embedding, which is how the segment-level
  conditional mask holds context scenes clean at timestep 0.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import apply_rotary_emb, get_3d_rotary_pos_embed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers

from .attention import scene_attention
from .layout import DEFAULT_MASK_VARIANT, SceneLayout, check_mask_variant

# --------------------------------------------------------------------------------------------------
# Attention processor
# --------------------------------------------------------------------------------------------------


class Mask2DiTAttnProcessor:
    """CogVideoX attention (projections, QK norm, RoPE on video tokens) with Mask²DiT scene attention.

    Extra call arguments, passed through the transformer's ``attention_kwargs``:
        scene_layout: the `SceneLayout` of the sequence; None means one scene (plain CogVideoX attention).
        scene_mask: mask variant ("v1", "v2", "v3", "full").
        attention_backend: "auto", "flash", "sdpa" or "dense".
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        scene_layout: Optional[SceneLayout] = None,
        scene_mask: str = DEFAULT_MASK_VARIANT,
        attention_backend: str = "auto",
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ValueError("`attention_mask` is not supported by Mask2DiTAttnProcessor: the scene layout defines the mask.")
        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, sequence_length, _ = hidden_states.shape
        if scene_layout is None:
            scene_layout = SceneLayout([text_seq_length], [sequence_length - text_seq_length])

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
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

        hidden_states = scene_attention(query, key, value, scene_layout, mask=scene_mask, backend=attention_backend)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
        )
        return hidden_states, encoder_hidden_states


# --------------------------------------------------------------------------------------------------
# Per-segment adaptive LayerNorm modulation
# --------------------------------------------------------------------------------------------------


def _modulation(norm_module: torch.nn.Module, temb: torch.Tensor, chunks: int) -> List[torch.Tensor]:
    """The ada-norm parameters of ``norm_module`` for ``temb``.

    temb ``(B, D)`` gives ``chunks`` tensors ``(B, 1, C)`` (one set per sample, as stock CogVideoX);
    temb ``(B, n, D)`` gives ``chunks`` tensors ``(B, n, C)`` (one set per scene).
    """
    params = norm_module.linear(norm_module.silu(temb))
    if temb.dim() == 2:
        return [p[:, None, :] for p in params.chunk(chunks, dim=1)]
    return list(params.chunk(chunks, dim=-1))


def _per_segment(fn, x: torch.Tensor, lengths: Sequence[int], *params: torch.Tensor) -> torch.Tensor:
    """Apply ``fn(x_segment, *params_of_segment)`` per scene segment along dim 1.

    Per-sample parameters ``(B, 1, C)`` broadcast over all tokens in one call (the stock path); per-scene
    parameters ``(B, n, C)`` are applied segment by segment, so no per-token copy of them is made.
    """
    if params[0].shape[1] == 1:
        return fn(x, *params)
    pieces = []
    start = 0
    for index, length in enumerate(lengths):
        pieces.append(fn(x[:, start : start + length], *(p[:, index : index + 1] for p in params)))
        start += length
    return torch.cat(pieces, dim=1)


def _scale_shift(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def _gate(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return gate * x


def _scene_block_forward(
    block: torch.nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    image_rotary_emb: Optional[Tuple[torch.Tensor, torch.Tensor]],
    layout: SceneLayout,
    attention_kwargs: Dict[str, Any],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`CogVideoXBlock.forward` with per-scene modulation, reusing the block's own modules."""
    text_seq_length = encoder_hidden_states.size(1)
    video_lengths, text_lengths = layout.video_lengths, layout.text_lengths

    shift, scale, gate, enc_shift, enc_scale, enc_gate = _modulation(block.norm1, temb, 6)
    norm_hidden_states = _per_segment(_scale_shift, block.norm1.norm(hidden_states), video_lengths, scale, shift)
    norm_encoder_hidden_states = _per_segment(
        _scale_shift, block.norm1.norm(encoder_hidden_states), text_lengths, enc_scale, enc_shift
    )
    attn_hidden_states, attn_encoder_hidden_states = block.attn1(
        hidden_states=norm_hidden_states,
        encoder_hidden_states=norm_encoder_hidden_states,
        image_rotary_emb=image_rotary_emb,
        scene_layout=layout,
        **attention_kwargs,
    )
    hidden_states = hidden_states + _per_segment(_gate, attn_hidden_states, video_lengths, gate)
    encoder_hidden_states = encoder_hidden_states + _per_segment(_gate, attn_encoder_hidden_states, text_lengths, enc_gate)

    shift, scale, gate, enc_shift, enc_scale, enc_gate = _modulation(block.norm2, temb, 6)
    norm_hidden_states = _per_segment(_scale_shift, block.norm2.norm(hidden_states), video_lengths, scale, shift)
    norm_encoder_hidden_states = _per_segment(
        _scale_shift, block.norm2.norm(encoder_hidden_states), text_lengths, enc_scale, enc_shift
    )
    # Rebinding frees the separate normed states before the feed-forward, where memory peaks.
    norm_hidden_states = torch.cat([norm_encoder_hidden_states, norm_hidden_states], dim=1)
    del norm_encoder_hidden_states
    ff_output = block.ff(norm_hidden_states)
    del norm_hidden_states
    hidden_states = hidden_states + _per_segment(_gate, ff_output[:, text_seq_length:], video_lengths, gate)
    encoder_hidden_states = encoder_hidden_states + _per_segment(
        _gate, ff_output[:, :text_seq_length], text_lengths, enc_gate
    )
    return hidden_states, encoder_hidden_states


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


def patch_aligned_frames(scene_frames: Sequence[int], patch_size_t: Optional[int]) -> List[int]:
    """Latent frames per scene rounded up to whole temporal patches (CogVideoX 1.5); unchanged without them."""
    return [f + (-f) % patch_size_t if patch_size_t else f for f in scene_frames]


def drop_leading_frames(x: torch.Tensor, scene_frames: Sequence[int], padded_frames: Sequence[int]) -> torch.Tensor:
    """``(B, sum(padded_frames), ...)`` -> ``(B, sum(scene_frames), ...)``: drop each scene's leading filler frames."""
    if list(scene_frames) == list(padded_frames):
        return x
    pieces, start = [], 0
    for frames, padded in zip(scene_frames, padded_frames):
        pieces.append(x[:, start + padded - frames : start + padded])
        start += padded
    return torch.cat(pieces, dim=1)


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
    """

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
        self.set_attn_processor(Mask2DiTAttnProcessor())

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

    def _resolve_scenes(
        self,
        num_frames: int,
        text_tokens: int,
        timestep: torch.Tensor,
        scene_frames: Optional[Sequence[int]],
        text_lengths: Optional[Sequence[int]],
    ) -> Tuple[List[int], List[int]]:
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

    def _time_embedding(self, timestep: torch.Tensor, timestep_cond, ofs, dtype) -> torch.Tensor:
        """``(B, D)`` for per-sample timesteps, ``(B, n, D)`` for per-scene ones."""
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
        """3D RoPE over ``latent_frames`` frames (all scenes), the same formula as `CogVideoXPipeline`."""
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        p, p_t = self.config.patch_size, self.config.patch_size_t
        grid_height, grid_width = latent_height // p, latent_width // p
        base_width, base_height = self.config.sample_width // p, self.config.sample_height // p
        if p_t is None:
            crops = get_resize_crop_region_for_grid((grid_height, grid_width), base_width, base_height)
            return get_3d_rotary_pos_embed(
                embed_dim=self.config.attention_head_dim,
                crops_coords=crops,
                grid_size=(grid_height, grid_width),
                temporal_size=latent_frames,
                device=device,
            )
        return get_3d_rotary_pos_embed(
            embed_dim=self.config.attention_head_dim,
            crops_coords=None,
            grid_size=(grid_height, grid_width),
            temporal_size=(latent_frames + p_t - 1) // p_t,
            grid_type="slice",
            max_size=(base_height, base_width),
            device=device,
        )

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
        """Denoise n scenes at once.

        Args:
            hidden_states: ``(B, F, C, h, w)``: the scenes' latent frames concatenated along frames.
            encoder_hidden_states: ``(B, Lt, D_text)``: the scenes' prompt embeddings concatenated.
            timestep: scalar, ``(B,)`` or per scene ``(B, n)``.
            image_rotary_emb: RoPE over all F frames; built here when None and the model uses RoPE.
            attention_kwargs: ``scene_mask`` (default ``config.attn_mask_variant``), ``attention_backend``
                and the LoRA ``scale``.
            scene_frames: latent frames per scene (default: one scene, or an even split into n when
                ``timestep`` is ``(B, n)``).
            text_lengths: text tokens per scene (default: an even split of ``Lt``).

        Returns:
            The predicted sample ``(B, F, C, h, w)``.
        """
        attention_kwargs = dict(attention_kwargs or {})
        lora_scale = attention_kwargs.pop("scale", 1.0)
        attention_kwargs.setdefault("scene_mask", self.config.attn_mask_variant)
        check_mask_variant(attention_kwargs["scene_mask"], "scene_mask")
        if USE_PEFT_BACKEND:
            scale_lora_layers(self, lora_scale)
        try:
            return self._forward(
                hidden_states, encoder_hidden_states, timestep, timestep_cond, ofs, image_rotary_emb,
                attention_kwargs, return_dict, scene_frames, text_lengths,
            )
        finally:
            if USE_PEFT_BACKEND:
                unscale_lora_layers(self, lora_scale)

    def _forward(
        self, hidden_states, encoder_hidden_states, timestep, timestep_cond, ofs, image_rotary_emb,
        attention_kwargs, return_dict, scene_frames, text_lengths,
    ):
        batch_size, num_frames, _, height, width = hidden_states.shape
        p, p_t = self.config.patch_size, self.config.patch_size_t
        if height % p or width % p:
            raise ValueError(
                f"Latent height and width must be divisible by the patch size {p}; got {height}x{width} "
                f"(pixel sizes must be multiples of {p * 8} for the CogVideoX VAE)."
            )
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.dim() == 0:
            timestep = timestep.expand(batch_size)
        if timestep.shape[0] != batch_size or timestep.dim() > 2:
            raise ValueError(f"`timestep` must be (batch={batch_size},) or (batch, num_scenes); got {tuple(timestep.shape)}.")
        scene_frames, text_lengths = self._resolve_scenes(
            num_frames, encoder_hidden_states.shape[1], timestep, scene_frames, text_lengths
        )
        # Equal per-scene timesteps are one per-sample timestep: take the stock path (bit-identical).
        if timestep.dim() == 2 and bool((timestep == timestep[:, :1]).all()):
            timestep = timestep[:, 0]

        # 1. Time embedding: (B, D) or (B, n, D)
        emb = self._time_embedding(timestep, timestep_cond, ofs, hidden_states.dtype)

        # 2. Patch embedding, with 1.5-style scenes padded to whole temporal patches
        hidden_states, padded_frames = self._pad_scenes(hidden_states, scene_frames)
        total_frames = sum(padded_frames)
        if image_rotary_emb is None and self.config.use_rotary_positional_embeddings:
            image_rotary_emb = self.rotary_embeddings(height, width, total_frames, hidden_states.device)
        encoder_hidden_states, hidden_states = self._embed(encoder_hidden_states, hidden_states)
        patches_per_frame = (height // p) * (width // p)
        video_tokens = [f // (p_t or 1) * patches_per_frame for f in padded_frames]
        if image_rotary_emb is not None and image_rotary_emb[0].shape[0] != sum(video_tokens):
            raise ValueError(
                f"`image_rotary_emb` covers {image_rotary_emb[0].shape[0]} video tokens but the scenes have "
                f"{sum(video_tokens)}; pass None to have RoPE built over all scenes."
            )
        hidden_states = self.embedding_dropout(hidden_states)
        encoder_hidden_states = self.embedding_dropout(encoder_hidden_states)
        layout = SceneLayout(text_lengths, video_tokens)

        # 3. Transformer blocks
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states, encoder_hidden_states = self._gradient_checkpointing_func(
                    _scene_block_forward, block, hidden_states, encoder_hidden_states, emb, image_rotary_emb,
                    layout, attention_kwargs,
                )
            else:
                hidden_states, encoder_hidden_states = _scene_block_forward(
                    block, hidden_states, encoder_hidden_states, emb, image_rotary_emb, layout, attention_kwargs
                )

        # 4. Final norm (per-scene modulation) and projection
        hidden_states = self.norm_final(hidden_states)
        shift, scale = _modulation(self.norm_out, emb, 2)
        hidden_states = _per_segment(_scale_shift, self.norm_out.norm(hidden_states), video_tokens, scale, shift)
        hidden_states = self.proj_out(hidden_states)

        # 5. Unpatchify, then drop the frames added to fill temporal patches
        if p_t is None:
            output = hidden_states.reshape(batch_size, total_frames, height // p, width // p, -1, p, p)
            output = output.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)
        else:
            output = hidden_states.reshape(batch_size, total_frames // p_t, height // p, width // p, -1, p_t, p, p)
            output = output.permute(0, 1, 5, 4, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(1, 2)
        output = drop_leading_frames(output, scene_frames, padded_frames)

        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
