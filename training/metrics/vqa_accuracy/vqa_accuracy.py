"""VQA accuracy: the official VQA metric, min(#matching humans / 3, 1) over leave-one-out subsets."""

import datasets
import evaluate

from .vqa_normalization import normalize_answer

_CITATION = """\
@inproceedings{antol2015vqa,
  title     = {{VQA}: Visual Question Answering},
  author    = {Antol, Stanislaw and Agrawal, Aishwarya and Lu, Jiasen and Mitchell, Margaret and
               Batra, Dhruv and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle = {International Conference on Computer Vision (ICCV)},
  year      = {2015}
}
@inproceedings{goyal2017making,
  title     = {Making the {V} in {VQA} Matter: Elevating the Role of Image Understanding in
               Visual Question Answering},
  author    = {Goyal, Yash and Khot, Tejas and Summers-Stay, Douglas and Batra, Dhruv and Parikh, Devi},
  booktitle = {Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2017}
}
@inproceedings{marino2019okvqa,
  title     = {{OK-VQA}: A Visual Question Answering Benchmark Requiring External Knowledge},
  author    = {Marino, Kenneth and Rastegari, Mohammad and Farhadi, Ali and Mottaghi, Roozbeh},
  booktitle = {Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2019}
}
"""

_DESCRIPTION = """\
VQA accuracy as defined by the VQA benchmark (https://visualqa.org/evaluation.html) and used by
VQAv2, OK-VQA and A-OKVQA.

Both the predicted answer and every reference answer first go through the official answer
normalisation: lower-casing; punctuation other than apostrophe and colon deleted or replaced by a
space (a comma between digits is dropped, "1,000" -> "1000"); periods removed except before a
digit (decimals survive); number words zero..ten written as digits; articles a/an/the removed;
missing apostrophes of contractions restored ("dont" -> "don't").

Default configuration: each question has a list of human answers (usually ten). An answer counts
as fully correct when at least three humans gave it: for a set of humans the score is
min(#humans that gave the predicted answer / 3, 1). To stay consistent with human accuracy this is
averaged over the n subsets of n-1 humans that leave one human out ("10 choose 9"). With 10 humans,
a prediction matching m of them scores 0, 0.3, 0.6, 0.9 for m = 0, 1, 2, 3 and 1 from m = 4.
One difference from the official script: it skips normalisation when all humans gave the
identical raw string; here normalisation always applies, which can only matter for raw,
unnormalised predictions (e.g. "Two" against ten "2"s scores 1 here, 0 there).

Configuration "soft_scores": the references of each question are soft labels
{"answer": str, "score": float}, e.g. scores precomputed with the rule above as in OK-VQA and
A-OKVQA training targets; the question scores the score of the (normalised) predicted answer, 0 when
it is not among the (normalised) reference answers; when several reference answers normalise to
the same string, the highest score counts.

The result is the mean over questions, a fraction in [0, 1] (the official tool reports it x100).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): the predicted answer for each question.
    references: for each question,
        - default configuration: `list` of `str`, the human answers (at least two, usually ten);
        - configuration "soft_scores": `list` of `dict` with keys "answer" (`str`) and
          "score" (`float`, normally in [0, 1]).
    return_per_question (`bool`, defaults to `False`): also return the score of every question.

Returns:
    accuracy (`float`): mean VQA accuracy over the questions, in [0, 1].
    per_question (`list` of `float`): each question's score, only with `return_per_question=True`.

Examples:

    >>> import evaluate
    >>> from training.metrics import METRICS_DIR
    >>> vqa_accuracy = evaluate.load(str(METRICS_DIR / "vqa_accuracy"))
    >>> humans = ["2", "2", "two", "3", "3", "3", "3", "3", "3", "3"]  # "two" normalises to "2"
    >>> results = vqa_accuracy.compute(predictions=["Two."], references=[humans])
    >>> print(round(results["accuracy"], 4))
    0.9

    >>> soft = evaluate.load(str(METRICS_DIR / "vqa_accuracy"), config_name="soft_scores")
    >>> references = [[{"answer": "tennis", "score": 1.0}, {"answer": "ping pong", "score": 0.3}],
    ...               [{"answer": "dog", "score": 0.6}]]
    >>> results = soft.compute(predictions=["Ping-Pong", "cat"], references=references,
    ...                        return_per_question=True)
    >>> print(round(results["accuracy"], 4), [round(s, 4) for s in results["per_question"]])
    0.15 [0.3, 0.0]
"""

_CONFIGS = ("default", "soft_scores")

# datasets>=4 has `List`, whose dict items stay a list of dicts; the older `Sequence` turns a
# list of dicts into a dict of lists (handled in `_soft_label_pairs`).
_ListFeature = getattr(datasets, "List", datasets.Sequence)

# A set of humans agreeing on an answer this many times makes it fully correct.
_HUMANS_FOR_FULL_CREDIT = 3


def leave_one_out_accuracy(prediction: str, human_answers: list) -> float:
    """Official VQA score of one already normalised prediction against normalised human answers.

    Dropping human i removes one match exactly when human i gave the prediction, so subset i
    scores min((total_matches - matches_i) / 3, 1); the result is the mean over the n subsets.
    """
    if len(human_answers) < 2:
        raise ValueError(
            "VQA accuracy leaves one human answer out, so it needs at least two per question "
            f"(got {len(human_answers)}); use config_name='soft_scores' with score 1.0 for "
            "datasets with a single gold answer."
        )
    matches = [answer == prediction for answer in human_answers]
    total_matches = sum(matches)
    subset_scores = [min((total_matches - is_match) / _HUMANS_FOR_FULL_CREDIT, 1.0) for is_match in matches]
    return sum(subset_scores) / len(subset_scores)


def _soft_label_pairs(reference):
    """(answer, score) pairs from a list of {"answer", "score"} dicts or a dict of two lists."""
    if isinstance(reference, dict):  # the `Sequence` encoding of older datasets versions
        return list(zip(reference["answer"], reference["score"]))
    return [(label["answer"], label["score"]) for label in reference]


def soft_score_accuracy(prediction: str, reference) -> float:
    """Score of one already normalised prediction under soft labels (0 when absent)."""
    best_score_by_answer = {}
    for answer, score in _soft_label_pairs(reference):
        answer = normalize_answer(answer)
        best_score_by_answer[answer] = max(score, best_score_by_answer.get(answer, score))
    return float(best_score_by_answer.get(prediction, 0.0))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VqaAccuracy(evaluate.Metric):
    """VQA accuracy with the official answer normalisation; configurations "default" and "soft_scores"."""

    def _info(self):
        if self.config_name not in _CONFIGS:
            raise ValueError(f"Unknown configuration {self.config_name!r} for vqa_accuracy; expected one of {_CONFIGS}.")
        if self.config_name == "soft_scores":
            reference_feature = _ListFeature({"answer": datasets.Value("string"), "score": datasets.Value("float64")})
        else:
            reference_feature = _ListFeature(datasets.Value("string"))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": reference_feature}),
            reference_urls=["https://visualqa.org/evaluation.html", "https://okvqa.allenai.org/"],
        )

    def _compute(self, predictions, references, return_per_question=False):
        if not predictions:
            raise ValueError("vqa_accuracy needs at least one prediction.")
        per_question = []
        for prediction, reference in zip(predictions, references):
            prediction = normalize_answer(prediction)
            if self.config_name == "soft_scores":
                per_question.append(soft_score_accuracy(prediction, reference))
            else:
                humans = [normalize_answer(answer) for answer in reference]
                per_question.append(leave_one_out_accuracy(prediction, humans))
        result = {"accuracy": sum(per_question) / len(per_question)}
        if return_per_question:
            result["per_question"] = per_question
        return result
