"""Recall@k for ranked retrieval with one or more positives per query."""

import datasets
import evaluate

_CITATION = """\
@inproceedings{karpathy2015deep,
  title     = {Deep Visual-Semantic Alignments for Generating Image Descriptions},
  author    = {Karpathy, Andrej and Fei-Fei, Li},
  booktitle = {Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2015}
}
"""

_DESCRIPTION = """\
Recall@k (R@k) as used for image-text retrieval (COCO, Flickr30k): each query comes with its
candidates ranked best first and the set of positive candidates (for image-to-text, the five
captions of an image; for text-to-image, the one image of a caption). A query is a hit at k when any
positive is among its first k ranked candidates; R@k is the fraction of hit queries.

Only the first max(k) ranked candidates matter, so rankings may be truncated to that length.
`training.metrics.image_text_retrieval_metrics` computes both retrieval directions from a
similarity matrix through this module.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): for each query, candidate indices ranked best first.
    references (`list` of `list` of `int`): for each query, the indices of its positive candidates
        (at least one).
    k_values (`list` of `int`, defaults to `[1, 5, 10]`): the cut-offs reported as "r@k".

Returns:
    r@k (`float`): for each k in `k_values`, the fraction of queries with a positive in the top k,
        in [0, 1].

Examples:

    >>> import evaluate
    >>> from training.metrics import METRICS_DIR
    >>> retrieval_recall = evaluate.load(str(METRICS_DIR / "retrieval_recall"))
    >>> predictions = [[4, 2, 0, 1, 3, 5], [0, 1, 2, 3, 4, 5, 6]]
    >>> references = [[2, 3], [6]]  # first positive at rank 2, then rank 7
    >>> results = retrieval_recall.compute(predictions=predictions, references=references)
    >>> print(results)
    {'r@1': 0.0, 'r@5': 0.5, 'r@10': 1.0}
"""

# datasets>=4 spells a list feature `List`; older versions only have `Sequence`.
_ListFeature = getattr(datasets, "List", datasets.Sequence)


def first_positive_rank(ranking, positives):
    """1-based rank of the best-ranked positive, or None when no positive was retrieved."""
    positives = set(positives)
    for position, candidate in enumerate(ranking, start=1):
        if candidate in positives:
            return position
    return None


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalRecall(evaluate.Metric):
    """R@k over ranked candidate indices with a set of positives per query."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": _ListFeature(datasets.Value("int64")),
                    "references": _ListFeature(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references, k_values=(1, 5, 10)):
        if not predictions:
            raise ValueError("retrieval_recall needs at least one query.")
        # A query without positives can never be a hit; that is a data error, not a miss.
        empty = [query for query, positives in enumerate(references) if len(positives) == 0]
        if empty:
            raise ValueError(f"retrieval_recall: queries without any positive index: {empty[:10]}")
        ranks = [first_positive_rank(ranking, positives) for ranking, positives in zip(predictions, references)]
        return {f"r@{k}": sum(rank is not None and rank <= k for rank in ranks) / len(ranks) for k in k_values}
