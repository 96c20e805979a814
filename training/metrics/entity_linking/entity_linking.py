"""Entity linking metrics: Hits@1/5/10 and mean reciprocal rank over ranked candidate entities."""

import datasets
import evaluate

_CITATION = """\
@inproceedings{voorhees1999trec8qa,
  title     = {The {TREC-8} Question Answering Track Report},
  author    = {Voorhees, Ellen M.},
  booktitle = {Proceedings of the Eighth Text REtrieval Conference (TREC-8)},
  year      = {1999}
}
"""

_DESCRIPTION = """\
Ranking metrics for (multimodal) entity linking, as reported on WikiMEL, RichpediaMEL and
WikiDiverse: each mention comes with a ranked list of candidate knowledge-base entity ids (best
first) and one gold entity id.

Hits@k: fraction of mentions whose gold entity is among the first k candidates (a ranking shorter
than k counts as far as it goes).
MRR: mean over mentions of 1 / (1-based rank of the gold entity in the full given ranking), 0 when
the gold entity is not in the ranking, e.g. when the candidate retriever missed it.

Ids are compared as exact strings; when a ranking lists the gold id twice, the first
occurrence counts.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `str`): for each mention, candidate entity ids ranked best
        first (may be empty).
    references (`list` of `str`): the gold entity id of each mention.
    k_values (`list` of `int`, defaults to `[1, 5, 10]`): the cut-offs reported as "hits@k".

Returns:
    hits@k (`float`): for each k in `k_values`, the fraction of mentions with the gold entity in
        the top k, in [0, 1].
    mrr (`float`): mean reciprocal rank of the gold entity, in [0, 1].

Examples:

    >>> import evaluate
    >>> from training.metrics import METRICS_DIR
    >>> entity_linking = evaluate.load(str(METRICS_DIR / "entity_linking"))
    >>> predictions = [["Q1", "Q2"], ["Q3", "Q4", "Q5"], ["Q6"]]
    >>> references = ["Q1", "Q5", "Q7"]  # ranks 1, 3 and missing
    >>> results = entity_linking.compute(predictions=predictions, references=references)
    >>> print({name: round(value, 4) for name, value in results.items()})
    {'hits@1': 0.3333, 'hits@5': 0.6667, 'hits@10': 0.6667, 'mrr': 0.4444}
"""

# datasets>=4 spells a list feature `List`; older versions only have `Sequence`.
_ListFeature = getattr(datasets, "List", datasets.Sequence)


def gold_rank(ranking, gold):
    """1-based position of `gold` in `ranking`, or None when absent."""
    for position, candidate in enumerate(ranking, start=1):
        if candidate == gold:
            return position
    return None


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EntityLinking(evaluate.Metric):
    """Hits@k and MRR of ranked candidate entity ids against one gold id per mention."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": _ListFeature(datasets.Value("string")), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, k_values=(1, 5, 10)):
        if not predictions:
            raise ValueError("entity_linking needs at least one mention.")
        ranks = [gold_rank(ranking, gold) for ranking, gold in zip(predictions, references)]
        result = {
            f"hits@{k}": sum(rank is not None and rank <= k for rank in ranks) / len(ranks) for k in k_values
        }
        result["mrr"] = sum(1.0 / rank for rank in ranks if rank is not None) / len(ranks)
        return result
