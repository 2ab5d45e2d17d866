"""Per-scene adaptive LayerNorm modulation: what lets each scene's tokens carry their own timestep.

The transformer passes a `PerSceneEmbedding` as the blocks' ``temb`` when scenes have their own timesteps; the
blocks' ``norm1``/``norm2`` (`SceneLayerNormZero`) and the final ``norm_out`` (`SceneAdaLayerNorm`) apply each
scene's shift, scale and gate to that scene's tokens. Both are the stock modules with their class swapped in place
(`make_scene_aware`), so parameters, state-dict keys and hooks stay as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
from diffusers.models.normalization import AdaLayerNorm, CogVideoXLayerNormZero

from .layout import SceneLayout


@dataclasses.dataclass(frozen=True, eq=False)
class PerSceneEmbedding:
    """Each scene's time embedding, with the scene layout that says which tokens are whose.

    The transformer passes it as the blocks' ``temb`` (in place of the ``(B, D)`` tensor) when scenes have
    their own timesteps. It travels with the block's arguments, so gradient checkpointing, hooks and threads
    all see the embedding that belongs to the call.

    Attributes:
        emb: ``(B, n, D)``: one embedding per sample and scene.
        layout: text and video tokens per scene (under context parallelism, of this rank's slice of the
            sequence: a `parallel.ShardSegments`).
    """

    emb: torch.Tensor
    layout: SceneLayout

    def to(self, *args, **kwargs) -> "PerSceneEmbedding":
        # Hooks that move a block's inputs to its device (group offloading, accelerate's) call `.to`.
        return dataclasses.replace(self, emb=self.emb.to(*args, **kwargs))


def _per_segment(fn, x: torch.Tensor, lengths: Sequence[int], *params: torch.Tensor) -> torch.Tensor:
    """Apply ``fn(x_segment, *params_of_segment)`` per scene segment along dim 1 of ``x (B, L, C)``.

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


class SceneGate:
    """Per-scene gates ``(B, n, C)`` that multiply token states ``(B, L, C)`` scene by scene.

    Stock `CogVideoXBlock.forward` computes ``gate * states``. A per-token copy of the gates would be as
    large as the states, and autograd would keep it for the backward pass in every block; this object
    applies each scene's ``(B, 1, C)`` row to that scene's segment instead.
    """

    __slots__ = ("gate", "lengths")

    def __init__(self, gate: torch.Tensor, lengths: Sequence[int]):
        self.gate = gate
        self.lengths = lengths

    def __mul__(self, states: torch.Tensor) -> torch.Tensor:
        return _per_segment(_gate, states, self.lengths, self.gate)

    __rmul__ = __mul__


def scene_gate(gate: torch.Tensor, lengths: Sequence[int]):
    """Per-scene gates ``(B, n, C)`` as the object stock blocks multiply token states ``(B, L, C)`` with.

    Eagerly a `SceneGate` (no per-token copy). Inside `torch.compile` a ``(B, L, C)`` tensor of each scene's
    row expanded over its tokens: dynamo cannot trace `SceneGate`'s operator, and the compiler fuses the
    expansion into the multiply, so the per-token copy is never stored there either. The same values either way.
    """
    if not torch.compiler.is_compiling():
        return SceneGate(gate, lengths)
    rows = [gate[:, index : index + 1].expand(-1, length, -1) for index, length in enumerate(lengths)]
    return torch.cat(rows, dim=1)


class SceneLayerNormZero(CogVideoXLayerNormZero):
    """`CogVideoXLayerNormZero` that also takes a `PerSceneEmbedding` as ``temb``.

    With a ``(B, D)`` tensor it is the stock module. With per-scene embeddings ``(B, n, D)``, each scene's
    video tokens (of ``hidden_states (B, Lv, C)``) and text tokens (of ``encoder_hidden_states (B, Lt, C)``)
    get that scene's shift and scale, and the gates come back from `scene_gate`. Same parameters and
    state-dict keys as the stock module (it is put in place by swapping the class of the existing one).
    """

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb):
        if not isinstance(temb, PerSceneEmbedding):
            return super().forward(hidden_states, encoder_hidden_states, temb)
        shift, scale, gate, enc_shift, enc_scale, enc_gate = self.linear(self.silu(temb.emb)).chunk(6, dim=-1)
        video, text = temb.layout.video_lengths, temb.layout.text_lengths
        hidden_states = _per_segment(_scale_shift, self.norm(hidden_states), video, scale, shift)
        encoder_hidden_states = _per_segment(_scale_shift, self.norm(encoder_hidden_states), text, enc_scale, enc_shift)
        return hidden_states, encoder_hidden_states, scene_gate(gate, video), scene_gate(enc_gate, text)


class SceneAdaLayerNorm(AdaLayerNorm):
    """The final `AdaLayerNorm` (``chunk_dim=1``) that also takes a `PerSceneEmbedding` as ``temb``.

    ``x (B, Lv, C)`` in and out; each scene's video tokens get that scene's shift and scale. With a
    ``(B, D)`` tensor it is the stock module; same parameters and state-dict keys.
    """

    def forward(self, x: torch.Tensor, timestep: Optional[torch.Tensor] = None, temb=None) -> torch.Tensor:
        if not isinstance(temb, PerSceneEmbedding):
            return super().forward(x, timestep, temb)
        shift, scale = self.linear(self.silu(temb.emb)).chunk(2, dim=-1)
        return _per_segment(_scale_shift, self.norm(x), temb.layout.video_lengths, scale, shift)


def make_scene_aware(module: torch.nn.Module, stock_class: type, scene_class: type, name: str) -> None:
    """Turn the stock norm ``module`` into ``scene_class`` in place.

    Swapping the class keeps the very same object: its parameters, device, dtype, state-dict keys, LoRA
    target names and any hooks already attached stay as they are. The subclasses add behaviour only.
    """
    if isinstance(module, scene_class):
        return
    if type(module) is not stock_class:
        raise ValueError(f"`{name}` must be a {stock_class.__name__} to be made scene-aware, got {type(module).__name__}.")
    module.__class__ = scene_class
