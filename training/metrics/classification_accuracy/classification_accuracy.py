"""Classification accuracy over integer labels (SNLI-VE, NLVR2-style pair classification)."""

import datasets
import evaluate

_CITATION = """\
@article{xie2019visual,
  title   = {Visual Entailment: A Novel Task for Fine-Grained Image Understanding},
  author  = {Xie, Ning and Lai, Farley and Doran, Derek and Kadav, Asim},
  journal = {arXiv preprint arXiv:1901.06706},
  year    = {2019}
}
@inproceedings{suhr2019corpus,
  title     = {A Corpus for Reasoning about Natural Language Grounded in Photographs},
  author    = {Suhr, Alane and Zhou, Stephanie and Zhang, Ally and Zhang, Iris and Bai, Huajun and Artzi, Yoav},
  booktitle = {Proceedings of the 57th Annual Meeting of the Association for Computational Linguistics (ACL)},
  year      = {2019}
}
"""

_DESCRIPTION = """\
Accuracy of image-text pair classification (e.g. SNLI-VE entailment / neutral / contradiction,
NLVR2 true / false): the fraction of examples whose predicted class id equals the gold class id.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): gold class ids.

Returns:
    accuracy (`float`): fraction of correct predictions, in [0, 1].

Examples:

    >>> import evaluate
    >>> from training.metrics import METRICS_DIR
    >>> accuracy = evaluate.load(str(METRICS_DIR / "classification_accuracy"))
    >>> print(accuracy.compute(predictions=[0, 2, 1, 1], references=[0, 1, 1, 1]))
    {'accuracy': 0.75}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ClassificationAccuracy(evaluate.Metric):
    """Fraction of predicted class ids equal to the gold ones."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        if not predictions:
            raise ValueError("classification_accuracy needs at least one example.")
        correct = sum(int(prediction) == int(reference) for prediction, reference in zip(predictions, references))
        return {"accuracy": correct / len(predictions)}
