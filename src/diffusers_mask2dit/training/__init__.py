"""Mask²DiT training: data, latent cache, loss and the accelerate loop (see ``docs/training.md``)."""

from .config import TrainingConfig, parse_bool
from .data import Clip, MultiSceneDataset, frame_indices, load_training_records
from .loss import DiffusionBatch, prepare_diffusion_batch, training_loss, v_prediction_loss
from .precompute import SceneEncoder, precompute
from .trainer import CollectiveTimeoutError, NonFiniteLossError, TrainingResult, train

__all__ = [
    "Clip",
    "CollectiveTimeoutError",
    "DiffusionBatch",
    "MultiSceneDataset",
    "NonFiniteLossError",
    "SceneEncoder",
    "TrainingConfig",
    "TrainingResult",
    "frame_indices",
    "load_training_records",
    "parse_bool",
    "precompute",
    "prepare_diffusion_batch",
    "train",
    "training_loss",
    "v_prediction_loss",
]
