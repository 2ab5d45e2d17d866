"""Scene layout and Mask²DiT attention-mask rules; scene frames and the video positions that run over them.

Pure functions and a small frozen dataclass: no torch modules here. The sequence of one sample is
``[text_1 .. text_n ; video_1 .. video_n]`` (paper Fig. 1): every scene's text tokens first, then every
scene's video tokens, each scene a contiguous run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from diffusers.models.embeddings import get_3d_rotary_pos_embed

TEXT = "text"
VIDEO = "video"

# How a query segment of one kind may see key segments of another kind.
SAME_SCENE = "same_scene"  # only the key segment of the query's own scene
ALL_SCENES = "all_scenes"  # the key segments of every scene

# (query kind, key kind) -> rule, per mask variant (METHOD.md, paper Fig. 2 / Table 2).
# The paper's v4 is not pinned down by any public source, so it is deliberately absent.
MASK_RULES: Dict[str, Dict[Tuple[str, str], str]] = {
    "v1": {
        (TEXT, TEXT): SAME_SCENE,
        (TEXT, VIDEO): SAME_SCENE,
        (VIDEO, TEXT): SAME_SCENE,
        (VIDEO, VIDEO): SAME_SCENE,
    },
    "v2": {
        (TEXT, TEXT): SAME_SCENE,
        (TEXT, VIDEO): SAME_SCENE,
        (VIDEO, TEXT): SAME_SCENE,
        (VIDEO, VIDEO): ALL_SCENES,
    },
    "v3": {
        (TEXT, TEXT): ALL_SCENES,
        (TEXT, VIDEO): SAME_SCENE,
        (VIDEO, TEXT): SAME_SCENE,
        (VIDEO, VIDEO): ALL_SCENES,
    },
    "full": {
        (TEXT, TEXT): ALL_SCENES,
        (TEXT, VIDEO): ALL_SCENES,
        (VIDEO, TEXT): ALL_SCENES,
        (VIDEO, VIDEO): ALL_SCENES,
    },
}
MASK_VARIANTS: Tuple[str, ...] = tuple(MASK_RULES)
DEFAULT_MASK_VARIANT = "v2"

# The authors' config key `attn_msk_version` numbers the variants; their "v5" is no mask at all.
_AUTHOR_VERSION_TO_VARIANT = {1: "v1", 2: "v2", 3: "v3", 5: "full"}


def check_mask_variant(variant: object, name: str = "mask") -> str:
    """Return ``variant`` normalised to one of :data:`MASK_VARIANTS`, or raise a ValueError naming ``name``.

    Accepts ``"v1"``, ``"v2"``, ``"v3"``, ``"full"`` and the authors' numbering (``1``, ``2``, ``3``, ``5``,
    ``"v5"``; v5 means no mask).
    """
    if isinstance(variant, str):
        key = variant.strip().lower()
        if key in MASK_RULES:
            return key
        if key.startswith("v") and key[1:].isdigit():
            variant = int(key[1:])
        elif key.isdigit():
            variant = int(key)
    if isinstance(variant, int) and not isinstance(variant, bool) and variant in _AUTHOR_VERSION_TO_VARIANT:
        return _AUTHOR_VERSION_TO_VARIANT[variant]
    raise ValueError(
        f"`{name}` must be one of {list(MASK_VARIANTS)} (or the authors' numbers 1, 2, 3, 5), got {variant!r}. "
        "The paper's v4 is not specified publicly and is not implemented."
    )


def _check_lengths(values: Sequence[int], name: str) -> Tuple[int, ...]:
    values = tuple(int(v) for v in values)
    if len(values) == 0:
        raise ValueError(f"`{name}` must list at least one scene, got an empty sequence.")
    bad = [v for v in values if v <= 0]
    if bad:
        raise ValueError(f"`{name}` must be positive token counts (empty scenes are not allowed), got {list(values)}.")
    return values


@dataclass(frozen=True)
class SceneLayout:
    """Token counts per scene of one multi-scene sequence ``[text_1..text_n ; video_1..video_n]``.

    Args:
        text_lengths: text tokens of each scene (226 per prompt in CogVideoX).
        video_lengths: video tokens of each scene (latent frames × patches per frame); scenes may differ.
    """

    text_lengths: Tuple[int, ...]
    video_lengths: Tuple[int, ...]

    def __post_init__(self) -> None:
        text = _check_lengths(self.text_lengths, "text_lengths")
        video = _check_lengths(self.video_lengths, "video_lengths")
        if len(text) != len(video):
            raise ValueError(
                f"`text_lengths` and `video_lengths` must have one entry per scene; got {len(text)} text and "
                f"{len(video)} video segments."
            )
        object.__setattr__(self, "text_lengths", text)
        object.__setattr__(self, "video_lengths", video)

    @classmethod
    def uniform(cls, num_scenes: int, text_length: int, video_length: int) -> "SceneLayout":
        """``num_scenes`` scenes with the same text and video token counts."""
        return cls((text_length,) * num_scenes, (video_length,) * num_scenes)

    @property
    def num_scenes(self) -> int:
        return len(self.text_lengths)

    @property
    def text_total(self) -> int:
        return sum(self.text_lengths)

    @property
    def video_total(self) -> int:
        return sum(self.video_lengths)

    @property
    def total(self) -> int:
        return self.text_total + self.video_total

    def segments(self, kind: str) -> List[Tuple[int, int]]:
        """``(start, end)`` of each scene's segment of ``kind`` ("text" or "video"), in sequence positions."""
        lengths = self.text_lengths if kind == TEXT else self.video_lengths
        start = 0 if kind == TEXT else self.text_total
        bounds = []
        for length in lengths:
            bounds.append((start, start + length))
            start += length
        return bounds

    def region(self, kind: str) -> Tuple[int, int]:
        """``(start, end)`` of all tokens of ``kind`` in the sequence."""
        return (0, self.text_total) if kind == TEXT else (self.text_total, self.total)

    def check_sequence_length(self, length: int, name: str = "sequence") -> None:
        if length != self.total:
            raise ValueError(
                f"The {name} has {length} tokens but the scene layout adds up to {self.total} "
                f"(text {list(self.text_lengths)} + video {list(self.video_lengths)})."
            )


def allowed(variant: str, query_kind: str, query_scene: int, key_kind: str, key_scene: int) -> bool:
    """Whether a query token of ``(query_kind, query_scene)`` may attend to a key of ``(key_kind, key_scene)``."""
    rule = MASK_RULES[check_mask_variant(variant)][(query_kind, key_kind)]
    return rule == ALL_SCENES or query_scene == key_scene


def build_dense_mask(layout: SceneLayout, variant: str = DEFAULT_MASK_VARIANT,
                     device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """The reference mask: bool ``(L, L)`` on ``device`` (default CPU), True where query row may attend to key column.

    Materialises L×L booleans, so it is meant for tests and the ``"dense"`` backend only. Built where it is used:
    filling billions of booleans on the CPU and copying them over takes most of a minute at paper scale.
    """
    variant = check_mask_variant(variant)
    mask = torch.zeros(layout.total, layout.total, dtype=torch.bool, device=device)
    for query_kind in (TEXT, VIDEO):
        for qi, (q0, q1) in enumerate(layout.segments(query_kind)):
            for key_kind in (TEXT, VIDEO):
                for ki, (k0, k1) in enumerate(layout.segments(key_kind)):
                    if allowed(variant, query_kind, qi, key_kind, ki):
                        mask[q0:q1, k0:k1] = True
    return mask


def attention_blocks(layout: SceneLayout, variant: str) -> List[Tuple[str, str, str]]:
    """The ``(query_kind, key_kind, rule)`` blocks whose union is the variant's mask.

    Each block is either one attention over two whole regions (``ALL_SCENES``) or one attention per
    scene between the scene's segments (``SAME_SCENE``): together they cover exactly the allowed pairs.
    """
    rules = MASK_RULES[check_mask_variant(variant)]
    return [(q, k, rules[(q, k)]) for q in (TEXT, VIDEO) for k in (TEXT, VIDEO)]


def allowed_pair_fraction(layout: SceneLayout, variant: str) -> float:
    """Fraction of the L×L query-key pairs the variant keeps (v2 keeps ~98% at paper scale)."""
    count = 0
    lengths = {TEXT: layout.text_lengths, VIDEO: layout.video_lengths}
    totals = {TEXT: layout.text_total, VIDEO: layout.video_total}
    for q_kind, k_kind, rule in attention_blocks(layout, variant):
        if rule == ALL_SCENES:
            count += totals[q_kind] * totals[k_kind]
        else:
            count += sum(a * b for a, b in zip(lengths[q_kind], lengths[k_kind]))
    return count / float(layout.total**2)


# --------------------------------------------------------------------------------------------------
# Scene frames and video positions
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


def rope_over_frames(
    config: Any, latent_height: int, latent_width: int, latent_frames: int, device: Any
) -> Tuple[torch.Tensor, torch.Tensor]:
    """3D RoPE over ``latent_frames`` latent frames, the formula of `CogVideoXPipeline`: ``(cos, sin)``,
    each ``(video_tokens, attention_head_dim)``."""
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    p, p_t = config.patch_size, config.patch_size_t
    grid_height, grid_width = latent_height // p, latent_width // p
    base_width, base_height = config.sample_width // p, config.sample_height // p
    if p_t is None:
        crops = get_resize_crop_region_for_grid((grid_height, grid_width), base_width, base_height)
        return get_3d_rotary_pos_embed(
            embed_dim=config.attention_head_dim,
            crops_coords=crops,
            grid_size=(grid_height, grid_width),
            temporal_size=latent_frames,
            device=device,
        )
    return get_3d_rotary_pos_embed(
        embed_dim=config.attention_head_dim,
        crops_coords=None,
        grid_size=(grid_height, grid_width),
        temporal_size=(latent_frames + p_t - 1) // p_t,
        grid_type="slice",
        max_size=(base_height, base_width),
        device=device,
    )


def scene_rotary_emb(
    config: Any, latent_height: int, latent_width: int, scene_frames: Union[int, Sequence[int]], device: Any
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The ``image_rotary_emb`` a CogVideoX transformer with ``config`` needs for scenes laid end to end.

    Positions run on over all scenes' latent frames (each scene rounded up to whole temporal patches for
    CogVideoX 1.5). None for models without RoPE (2b), which is what they take.

    Args:
        config: the transformer's config (``transformer.config``; works for wrapped models too).
        latent_height, latent_width: latent size ``h, w`` (pixels / 8).
        scene_frames: latent frames of each scene (or one int: one scene).
        device: where to build it.

    Returns:
        ``(cos, sin)``, each ``(video_tokens, attention_head_dim)``, or None.
    """
    if not config.use_rotary_positional_embeddings:
        return None
    frames = [scene_frames] if isinstance(scene_frames, int) else list(scene_frames)
    total = sum(patch_aligned_frames(frames, config.patch_size_t))
    return rope_over_frames(config, latent_height, latent_width, total, device)
