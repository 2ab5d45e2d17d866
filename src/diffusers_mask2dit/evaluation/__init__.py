"""Multi-scene video evaluation: Mask²DiT's visual / semantic / sequence consistency, DiTCtrl's CSCV and smoothness.

Quick use::

    from diffusers_mask2dit.evaluation import CLIPVideoEncoder, evaluate_scenes

    encoder = CLIPVideoEncoder.from_pretrained("path/to/clip", frames_per_scene=8)
    scores = evaluate_scenes([scene0_frames, scene1_frames], ["prompt 0", "prompt 1"], encoder)

Formulas are documented in :mod:`diffusers_mask2dit.evaluation.metrics`. The ``mask2dit evaluate`` command lives in
:mod:`diffusers_mask2dit.evaluation.cli`.
"""

from .core import (
    evaluate_batch,
    evaluate_scenes,
    evaluate_video,
    load_scenes,
    parse_scene_frames,
    read_prompts,
    sample_folders,
    scene_files,
    split_scenes,
)
from .encoders import (
    CLIPVideoEncoder,
    FrameEncoder,
    VideoTextEncoder,
    encode_frame_embeddings,
    sample_frame_indices,
    save_tiny_clip,
)
from .metrics import (
    METRIC_KEYS,
    consecutive_similarities,
    cosine_similarity_matrix,
    cscv,
    mean_interval,
    pixel_smoothness,
    semantic_consistency,
    semantic_scores,
    sequence_consistency,
    smoothness,
    summarize,
    t_critical_975,
    visual_consistency,
)

__all__ = [
    "CLIPVideoEncoder",
    "FrameEncoder",
    "METRIC_KEYS",
    "VideoTextEncoder",
    "consecutive_similarities",
    "cosine_similarity_matrix",
    "cscv",
    "encode_frame_embeddings",
    "evaluate_batch",
    "evaluate_scenes",
    "evaluate_video",
    "load_scenes",
    "mean_interval",
    "parse_scene_frames",
    "pixel_smoothness",
    "read_prompts",
    "sample_folders",
    "sample_frame_indices",
    "save_tiny_clip",
    "scene_files",
    "semantic_consistency",
    "semantic_scores",
    "sequence_consistency",
    "smoothness",
    "split_scenes",
    "summarize",
    "t_critical_975",
    "visual_consistency",
]
