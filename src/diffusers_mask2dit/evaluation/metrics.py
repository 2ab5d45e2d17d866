"""Multi-scene video metrics on embeddings and frames (NumPy only).

Notation: a video has ``S >= 2`` scenes; scene ``i`` has a video embedding ``v_i`` (``D``), a prompt embedding
``t_i`` (``D``) and ``F_i >= 2`` frames with frame embeddings ``e_{i,1..F_i}``. ``cos(a, b) = a.b / (|a| |b|)``,
clipped to ``[-1, 1]``. Percent scores are ``100 * cos`` (so they may be negative for anti-aligned embeddings).

* **Visual consistency** (Mask²DiT, Table 1) -- mean pairwise video-video similarity between scenes::

      VC = 100 * mean_{i < j} cos(v_i, v_j)

  Identical scenes give 100, scenes with orthogonal embeddings give 0.
* **Semantic consistency** (Mask²DiT) -- mean similarity of each scene with its own prompt::

      SC = 100 * mean_i cos(v_i, t_i)

* **Sequence consistency** (Mask²DiT) -- ``(VC + SC) / 2``.
* **CSCV** (CLIP Similarity Coefficient of Variation, DiTCtrl's MPVBench) -- with ``s_k = cos(e_k, e_{k+1})`` the
  similarities of consecutive frames, ``CSCV = std(s) / mean(s)`` (population std, ``ddof=0``); lower is steadier.
  ``cscv`` runs over the whole video (all scenes concatenated, so the ``S - 1`` scene cuts are included, which is
  what DiTCtrl measures for prompt transitions); ``cscv_within_scene`` is the mean over scenes of the per-scene
  value (cuts excluded).
* **Smoothness** -- ``100 * mean_k cos(e_k, e_{k+1})`` per scene (cuts excluded), averaged over scenes.
* **Pixel smoothness** (no encoder) -- ``100 * (1 - mean_k mean|x_{k+1} - x_k| / 255)`` per scene on ``uint8``
  frames, averaged over scenes.

Batch summaries (:func:`summarize`) give the mean, the sample std (``ddof=1``) and a 95% interval
``mean ± c * std / sqrt(n)`` with ``c`` the Student-t 0.975 quantile on ``n - 1`` degrees of freedom (default,
right for the small ``n`` of typical evaluation sets) or ``c = 1.96`` (``method="normal"``).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

ArrayLike = Any  # np.ndarray, torch.Tensor or nested lists

#: Scalar metrics that :func:`~diffusers_mask2dit.evaluation.evaluate_scenes` returns and batch mode summarises.
METRIC_KEYS = (
    "visual_consistency",
    "semantic_consistency",
    "sequence_consistency",
    "cscv",
    "cscv_within_scene",
    "smoothness",
    "pixel_smoothness",
)

_EPS = 1e-12


def as_matrix(x: ArrayLike, name: str = "embeddings") -> np.ndarray:
    """``x`` as a float64 matrix ``(N, D)`` (a single ``(D,)`` vector becomes ``(1, D)``)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    array = np.asarray(x, dtype=np.float64)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"`{name}` must be a (N, D) matrix or a (D,) vector; got shape {array.shape}.")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` contains NaN or infinite values.")
    return array


def _normalize(matrix: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    if np.any(norms < _EPS):
        raise ValueError(f"`{name}` contains a zero vector; cosine similarity is undefined for it.")
    return matrix / norms


def cosine_similarity_matrix(a: ArrayLike, b: Optional[ArrayLike] = None) -> np.ndarray:
    """Cosine similarities ``(N, M)`` between the rows of ``a`` ``(N, D)`` and ``b`` ``(M, D)`` (``b = a`` if omitted)."""
    left = _normalize(as_matrix(a, "a"), "a")
    right = left if b is None else _normalize(as_matrix(b, "b"), "b")
    if left.shape[1] != right.shape[1]:
        raise ValueError(f"`a` and `b` must have the same embedding size; got {left.shape[1]} and {right.shape[1]}.")
    return np.clip(left @ right.T, -1.0, 1.0)


def consecutive_similarities(frame_embeddings: ArrayLike) -> np.ndarray:
    """``s_k = cos(e_k, e_{k+1})`` for ``k = 0 .. F-2``; ``frame_embeddings`` is ``(F, D)`` with ``F >= 2``. Returns ``(F-1,)``."""
    e = _normalize(as_matrix(frame_embeddings, "frame_embeddings"), "frame_embeddings")
    if e.shape[0] < 2:
        raise ValueError(f"`frame_embeddings` needs at least 2 frames; got {e.shape[0]}.")
    return np.clip(np.sum(e[:-1] * e[1:], axis=1), -1.0, 1.0)


def visual_consistency(scene_embeddings: ArrayLike) -> float:
    """``100 * mean_{i<j} cos(v_i, v_j)`` over the scene video embeddings ``(S, D)``, ``S >= 2``."""
    v = as_matrix(scene_embeddings, "scene_embeddings")
    if v.shape[0] < 2:
        raise ValueError(f"`scene_embeddings` needs at least 2 scenes for visual consistency; got {v.shape[0]}.")
    sims = cosine_similarity_matrix(v)
    upper = sims[np.triu_indices(v.shape[0], k=1)]
    return float(100.0 * upper.mean())


def semantic_scores(scene_embeddings: ArrayLike, text_embeddings: ArrayLike) -> np.ndarray:
    """Per-scene ``100 * cos(v_i, t_i)``; both inputs ``(S, D)``. Returns ``(S,)``."""
    v = as_matrix(scene_embeddings, "scene_embeddings")
    t = as_matrix(text_embeddings, "text_embeddings")
    if v.shape != t.shape:
        raise ValueError(
            f"`text_embeddings` must match `scene_embeddings` (one prompt per scene, same size); "
            f"got {t.shape} and {v.shape}."
        )
    v = _normalize(v, "scene_embeddings")
    t = _normalize(t, "text_embeddings")
    return 100.0 * np.clip(np.sum(v * t, axis=1), -1.0, 1.0)


def semantic_consistency(scene_embeddings: ArrayLike, text_embeddings: ArrayLike) -> float:
    """``100 * mean_i cos(v_i, t_i)``; ``scene_embeddings`` and ``text_embeddings`` are ``(S, D)``."""
    return float(semantic_scores(scene_embeddings, text_embeddings).mean())


def sequence_consistency(visual: float, semantic: float) -> float:
    """Mean of visual and semantic consistency (both in percent)."""
    return (float(visual) + float(semantic)) / 2.0


def cscv(frame_embeddings: ArrayLike) -> float:
    """``std(s) / mean(s)`` of consecutive-frame similarities ``s`` of ``frame_embeddings`` ``(F, D)``, ``F >= 2``.

    Raises ``ValueError`` if ``mean(s) <= 0`` (the coefficient of variation is meaningless there).
    """
    s = consecutive_similarities(frame_embeddings)
    mean = float(s.mean())
    if mean <= _EPS:
        raise ValueError(
            f"CSCV is undefined: the mean consecutive-frame similarity is {mean:.4g} (must be > 0)."
        )
    return float(s.std() / mean)


def smoothness(frame_embeddings: ArrayLike) -> float:
    """``100 * mean_k cos(e_k, e_{k+1})`` of ``frame_embeddings`` ``(F, D)``, ``F >= 2``."""
    return float(100.0 * consecutive_similarities(frame_embeddings).mean())


def pixel_smoothness(frames: np.ndarray) -> float:
    """``100 * (1 - mean|x_{k+1} - x_k| / 255)`` of ``uint8`` frames ``(F, H, W, 3)``, ``F >= 2``."""
    array = np.asarray(frames)
    if array.ndim != 4 or array.shape[0] < 2:
        raise ValueError(f"`frames` must be (F, H, W, C) with F >= 2; got shape {array.shape}.")
    diffs = np.abs(np.diff(array.astype(np.float32), axis=0))
    return float(100.0 * (1.0 - diffs.mean(dtype=np.float64) / 255.0))


# ----------------------------------------------------------------------------------------------------- summaries

# Student-t 0.975 quantiles for 1..30 degrees of freedom.
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)
_Z975 = 1.959963984540054


def t_critical_975(df: int) -> float:
    """Two-sided 95% Student-t critical value on ``df >= 1`` degrees of freedom (table to 30, then Cornish-Fisher)."""
    if df < 1:
        raise ValueError(f"`df` must be >= 1; got {df}.")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def mean_interval(values: Sequence[float], method: str = "t") -> Dict[str, Optional[float]]:
    """Mean, sample std and 95% interval of ``values``.

    ``method="t"``: ``mean ± t_{0.975, n-1} * std / sqrt(n)``; ``method="normal"``: ``mean ± 1.96 * std / sqrt(n)``.
    With one value the std and interval are ``None``. Returns keys ``n, mean, std, half_width, low, high``.
    """
    if method not in ("t", "normal"):
        raise ValueError(f"`method` must be 't' or 'normal'; got {method!r}.")
    data = np.asarray([float(v) for v in values], dtype=np.float64)
    n = int(data.size)
    if n == 0:
        raise ValueError("`values` is empty; need at least one value to summarise.")
    mean = float(data.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "half_width": None, "low": None, "high": None}
    std = float(data.std(ddof=1))
    critical = t_critical_975(n - 1) if method == "t" else 1.96
    half = critical * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "half_width": half, "low": mean - half, "high": mean + half}


def summarize(
    results: Sequence[Mapping[str, Any]], keys: Sequence[str] = METRIC_KEYS, method: str = "t"
) -> Dict[str, Dict[str, Optional[float]]]:
    """Per metric of ``keys``: :func:`mean_interval` over the ``results`` that hold a number for it."""
    if not results:
        raise ValueError("`results` is empty; need at least one evaluated sample to summarise.")
    summary: Dict[str, Dict[str, Optional[float]]] = {}
    for key in keys:
        values: List[float] = [r[key] for r in results if isinstance(r.get(key), (int, float))]
        if values:
            summary[key] = mean_interval(values, method=method)
    return summary
