"""Scene groups: runs of n consecutive shots of one video, scored by inter-shot relevance and filtered.

A group's relevance is the mean over its shot pairs of the cosine similarity of the shots' embeddings (the
paper's ViCLIP similarity; here any injected encoder's ``encode_video``).
"""

from __future__ import annotations

from itertools import combinations
from typing import Dict, List, Optional, Sequence

import numpy as np

GROUPINGS = ("sliding", "disjoint")


def group_starts(num_shots: int, size: int, grouping: str = "sliding") -> List[int]:
    """Index of the first shot of every group of ``size`` consecutive shots: every position (``sliding``) or
    back to back without overlap (``disjoint``). Empty when the video has fewer than ``size`` shots."""
    if size < 1:
        raise ValueError(f"`--num-scenes` must be >= 1; got {size}.")
    if grouping not in GROUPINGS:
        raise ValueError(f"`--grouping` must be one of {', '.join(GROUPINGS)}; got {grouping!r}.")
    step = 1 if grouping == "sliding" else size
    return list(range(0, num_shots - size + 1, step))


def cosine_matrix(embeddings: np.ndarray) -> np.ndarray:
    """``(N, N)`` cosine similarities of ``(N, D)`` embeddings (a zero vector has similarity 0 with everything)."""
    vectors = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.where(norms > 0, norms, 1.0)
    return unit @ unit.T


def group_relevance(similarity: np.ndarray, start: int, size: int) -> float:
    """Mean pairwise similarity of shots ``start .. start + size - 1`` (1.0 for a single shot)."""
    pairs = list(combinations(range(start, start + size), 2))
    if not pairs:
        return 1.0
    return float(np.mean([similarity[i, j] for i, j in pairs]))


def histogram(values: Sequence[float], bins: int = 20, low: float = -1.0, high: float = 1.0) -> Dict[str, List[float]]:
    """``{"edges": [...], "counts": [...]}`` over ``[low, high]``; values outside are counted in the end bins."""
    clipped = np.clip(np.asarray(list(values), dtype=np.float64), low, high)
    counts, edges = np.histogram(clipped, bins=bins, range=(low, high))
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}


def keep_group(relevance: Optional[float], min_similarity: float) -> bool:
    """A group passes when its relevance reaches ``min_similarity`` (without an encoder every group passes)."""
    return relevance is None or relevance >= min_similarity
