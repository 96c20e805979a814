"""Evaluation metrics of the downstream tasks, shipped as `evaluate` modules loaded offline by path.

Each metric lives in ``<name>/<name>.py`` below this folder (the layout ``evaluate.load`` expects
of a local directory), so no Hub access is needed:

- ``vqa_accuracy``: official VQA accuracy; config ``"soft_scores"`` for soft answer labels;
- ``entity_linking``: hits@1/5/10 and MRR of ranked candidate entity ids;
- ``retrieval_recall``: r@1/5/10 of ranked candidate indices with positives per query;
- ``classification_accuracy``: accuracy of integer class predictions.

This package adds :func:`load_metric`, the importable VQA normaliser
:func:`vqa_normalize_answer`, and :func:`image_text_retrieval_metrics` (R@k in both directions
from a similarity matrix).
"""

from pathlib import Path

import numpy as np

# The normaliser's only copy lives next to the VQA metric script, where evaluate's module cache can
# import it relatively; the metric folder is imported here as a namespace package.
from .vqa_accuracy.vqa_normalization import normalize_answer as vqa_normalize_answer

__all__ = [
    "METRICS_DIR",
    "available_metrics",
    "image_text_retrieval_metrics",
    "load_metric",
    "vqa_normalize_answer",
]

METRICS_DIR = Path(__file__).resolve().parent

# Both retrieval directions report these cut-offs.
_RETRIEVAL_K_VALUES = (1, 5, 10)

# Rows of the similarity matrix sorted at once; bounds the argsort's memory on large test sets.
_RANKING_CHUNK_ROWS = 1024


def available_metrics() -> list:
    """Names of the metric modules shipped here (folders holding ``<name>/<name>.py``)."""
    return sorted(path.name for path in METRICS_DIR.iterdir() if (path / f"{path.name}.py").is_file())


def load_metric(name: str, **kwargs):
    """Load a shipped metric by name, offline: ``evaluate.load(str(METRICS_DIR / name), **kwargs)``.

    Args:
        name: one of :func:`available_metrics`, e.g. ``"vqa_accuracy"``.
        **kwargs: passed to ``evaluate.load``, e.g. ``config_name="soft_scores"``.

    Raises:
        ValueError: for an unknown name, listing the available ones.
    """
    available = available_metrics()
    if name not in available:
        raise ValueError(f"Unknown metric {name!r}; the metrics shipped in {METRICS_DIR} are: {', '.join(available)}")
    import evaluate  # deferred: importing evaluate (and datasets) takes seconds

    return evaluate.load(str(METRICS_DIR / name), **kwargs)


def _top_k_rankings(scores: np.ndarray, k: int) -> list:
    """Per row, the column indices of the k highest scores, best first.

    A stable sort keeps ties in index order, so rankings are deterministic.
    """
    rankings = []
    for start in range(0, scores.shape[0], _RANKING_CHUNK_ROWS):
        order = np.argsort(-scores[start : start + _RANKING_CHUNK_ROWS], axis=1, kind="stable")
        rankings.extend(order[:, :k].tolist())
    return rankings


def image_text_retrieval_metrics(similarity, text_to_image) -> dict:
    """Image-text retrieval R@1/5/10 in both directions, computed with the ``retrieval_recall`` module.

    Image-to-text ranks all texts for each image (hit when any of the image's texts is in the top
    k); text-to-image ranks all images for each text (hit when its image is in the top k). Only the
    top 10 of each ranking is passed on, which is all R@10 needs. Equal similarities rank in index
    order.

    Args:
        similarity: array of shape (n_images, n_texts); higher means more similar.
        text_to_image: sequence of n_texts ints, ``text_to_image[j]`` the index of text j's image.

    Returns:
        dict with ``i2t_r@1``, ``i2t_r@5``, ``i2t_r@10``, ``t2i_r@1``, ``t2i_r@5``, ``t2i_r@10``
        (fractions in [0, 1]) and ``r_mean``, their mean.

    Raises:
        ValueError: on a malformed matrix, a mismatched or out-of-range ``text_to_image``, or an
            image without any text (its image-to-text recall would be undefined).
    """
    similarity = np.asarray(similarity, dtype=np.float64)
    text_to_image = np.asarray(text_to_image, dtype=np.int64)
    if similarity.ndim != 2 or similarity.size == 0:
        raise ValueError(f"similarity must be a non-empty (n_images, n_texts) matrix, got shape {similarity.shape}")
    if not np.isfinite(similarity).all():
        raise ValueError("similarity contains NaN or infinite values")
    n_images, n_texts = similarity.shape
    if text_to_image.shape != (n_texts,):
        raise ValueError(f"text_to_image must hold one image index per text ({n_texts}), got shape {text_to_image.shape}")
    if text_to_image.min() < 0 or text_to_image.max() >= n_images:
        raise ValueError(f"text_to_image holds image indices outside [0, {n_images})")

    texts_of_image = [[] for _ in range(n_images)]
    for text_index, image_index in enumerate(text_to_image.tolist()):
        texts_of_image[image_index].append(text_index)
    captionless = [image for image, texts in enumerate(texts_of_image) if not texts]
    if captionless:
        raise ValueError(f"images without any text in text_to_image: {captionless[:10]}")

    max_k = max(_RETRIEVAL_K_VALUES)
    recall = load_metric("retrieval_recall")
    image_to_text = recall.compute(
        predictions=_top_k_rankings(similarity, max_k), references=texts_of_image, k_values=_RETRIEVAL_K_VALUES
    )
    text_to_image_scores = recall.compute(
        predictions=_top_k_rankings(similarity.T, max_k),
        references=[[image] for image in text_to_image.tolist()],
        k_values=_RETRIEVAL_K_VALUES,
    )
    result = {f"i2t_{name}": value for name, value in image_to_text.items()}
    result.update({f"t2i_{name}": value for name, value in text_to_image_scores.items()})
    result["r_mean"] = sum(result.values()) / len(result)
    return result
