"""Mask²DiT (CVPR 2025) multi-scene long video generation for Hugging Face diffusers."""

from .layout import MASK_VARIANTS, SceneLayout, build_dense_mask
from .attention import AttentionBackend, SceneAttentionOptions, register_attention_backend, scene_attention

__version__ = "0.1.0"
from .transformer import FusedMask2DiTAttnProcessor, Mask2DiTAttnProcessor, Mask2DiTTransformer3DModel
from .pipeline import Mask2DiTPipeline, Mask2DiTPipelineOutput
