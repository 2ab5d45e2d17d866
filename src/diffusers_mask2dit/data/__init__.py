"""Multi-scene training data from long videos (``mask2dit prepare-data``): the paper's data pipeline.

Long videos -> shots (PySceneDetect, or chapters) -> clips cut to the trainer's frames and size -> groups of n
consecutive shots -> groups whose inter-shot relevance (mean pairwise cosine of an injected encoder's shot
embeddings) reaches a threshold -> one caption per shot -> the authors' pretraining CSV and SFT JSON, our JSONL,
a report. See docs/data.md.
"""

from .plugins import register_captioner, register_encoder
from .prepare import PrepareOptions, prepare_data
from .shots import DetectOptions

__all__ = ["DetectOptions", "PrepareOptions", "prepare_data", "register_captioner", "register_encoder"]
