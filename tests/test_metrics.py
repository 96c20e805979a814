"""Metric modules of training/metrics against hand-computed values; offline, loaded by path."""

import doctest
import inspect

import numpy as np
import pytest

from training.metrics import (
    METRICS_DIR,
    available_metrics,
    image_text_retrieval_metrics,
    load_metric,
    vqa_normalize_answer,
)

METRIC_NAMES = ["classification_accuracy", "entity_linking", "retrieval_recall", "vqa_accuracy"]


@pytest.fixture(scope="module")
def vqa_accuracy():
    return load_metric("vqa_accuracy")


@pytest.fixture(scope="module")
def vqa_soft_accuracy():
    return load_metric("vqa_accuracy", config_name="soft_scores")


# ---------------------------------------------------------------- loading


def test_available_metrics_lists_the_shipped_modules():
    assert available_metrics() == METRIC_NAMES
    for name in METRIC_NAMES:
        assert (METRICS_DIR / name / f"{name}.py").is_file()


def test_load_metric_unknown_name_lists_available_ones():
    with pytest.raises(ValueError) as error:
        load_metric("bleu")
    for name in METRIC_NAMES:
        assert name in str(error.value)


def test_unknown_vqa_config_is_rejected():
    with pytest.raises(ValueError, match="soft_scores"):
        load_metric("vqa_accuracy", config_name="hard_scores")


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_module_documentation_and_examples(name):
    """Every module documents itself, and the examples in its kwargs description hold."""
    metric = load_metric(name)
    assert metric.description.strip() and metric.citation.strip() and metric.inputs_description.strip()
    module = inspect.getmodule(type(metric))
    test = doctest.DocTestParser().get_doctest(module._KWARGS_DESCRIPTION, {}, name, None, 0)
    assert test.examples, f"{name} has no examples"
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


# ---------------------------------------------------------------- VQA normalisation


@pytest.mark.parametrize(
    "raw, normalised",
    [
        # articles a / an / the are dropped, case is folded
        ("The dog", "dog"),
        ("an Apple and a pear", "apple and pear"),
        # number words become digits ("none" too, as in the official map)
        ("two", "2"),
        ("Ten cats", "10 cats"),
        ("none", "0"),
        # a comma between digits: every mark is deleted without a space
        ("1,000", "1000"),
        ("1,000,000 people", "1000000 people"),
        # other commas: deleted when touching a space, else replaced by one
        ("yes, it is", "yes it is"),
        ("red,blue", "red blue"),
        # hyphen inside a word becomes a space; "(" with no space next to it too, ")" before a space is deleted
        ("black-and-white", "black and white"),
        ("(a) dog", "dog"),
        # periods: removed unless a digit follows
        ("yes.", "yes"),
        ("Two dogs.", "2 dogs"),
        ("3.5", "3.5"),
        ("3.5.", "3.5"),
        ("e.g.", "eg"),
        # apostrophes and colons are kept
        ("girl's", "girl's"),
        ("2:50 pm", "2:50 pm"),
        # missing apostrophes of contractions are restored
        ("dont", "don't"),
        ("Isnt it", "isn't it"),
        ("youre right", "you're right"),
        # tabs and newlines are whitespace
        ("  Two\tDogs\n", "2 dogs"),
    ],
)
def test_vqa_normalize_answer(raw, normalised):
    assert vqa_normalize_answer(raw) == normalised


def test_vqa_normaliser_has_one_home():
    """The re-export is the module next to the metric script, not a second copy of the rules."""
    assert vqa_normalize_answer.__module__ == "training.metrics.vqa_accuracy.vqa_normalization"
    assert not (METRICS_DIR / "vqa_normalization.py").exists()
    import training.metrics.vqa_accuracy.vqa_normalization as normalization

    assert doctest.testmod(normalization).failed == 0


# ---------------------------------------------------------------- VQA accuracy, ten humans


def _humans(matching, n_humans=10, answer="2", other="3"):
    return [answer] * matching + [other] * (n_humans - matching)


def test_vqa_leave_one_out_two_matching_humans(vqa_accuracy):
    # The prediction matches 2 of 10 humans. Leaving out one of the 2 matching humans leaves 1
    # match: min(1/3, 1) = 1/3 (2 such subsets). Leaving out any of the 8 others leaves 2
    # matches: min(2/3, 1) = 2/3 (8 subsets). Mean: (2 * 1/3 + 8 * 2/3) / 10 = (18/3) / 10 = 0.6.
    result = vqa_accuracy.compute(predictions=["2"], references=[_humans(2)])
    assert result["accuracy"] == pytest.approx(0.6)


@pytest.mark.parametrize(
    "matching, expected",
    [
        (0, 0.0),  # no subset has a match
        (1, 0.3),  # (1 * 0 + 9 * 1/3) / 10
        (3, 0.9),  # (3 * 2/3 + 7 * 1) / 10
        (4, 1.0),  # every subset keeps at least 3 matches
        (10, 1.0),
    ],
)
def test_vqa_leave_one_out_match_counts(vqa_accuracy, matching, expected):
    result = vqa_accuracy.compute(predictions=["2"], references=[_humans(matching)])
    assert result["accuracy"] == pytest.approx(expected)


def test_vqa_five_humans(vqa_accuracy):
    # 1 of 5 humans matches: (1 * 0 + 4 * 1/3) / 5 = 4/15.
    result = vqa_accuracy.compute(predictions=["2"], references=[_humans(1, n_humans=5)])
    assert result["accuracy"] == pytest.approx(4 / 15)


def test_vqa_matching_uses_normalisation_on_both_sides(vqa_accuracy):
    # "Two." -> "2"; humans "two", "2", "the 2" all normalise to "2": 3 matches of 10 -> 0.9.
    humans = ["two", "2", "the 2", "3", "3", "3", "3", "3", "3", "3"]
    result = vqa_accuracy.compute(predictions=["Two."], references=[humans])
    assert result["accuracy"] == pytest.approx(0.9)


def test_vqa_mean_over_questions_and_per_question(vqa_accuracy):
    # question scores 0.6, 1.0, 0.0 -> mean 1.6 / 3
    result = vqa_accuracy.compute(
        predictions=["2", "2", "cat"],
        references=[_humans(2), _humans(7), _humans(5)],
        return_per_question=True,
    )
    assert result["per_question"] == pytest.approx([0.6, 1.0, 0.0])
    assert result["accuracy"] == pytest.approx(1.6 / 3)


def test_vqa_needs_two_humans(vqa_accuracy):
    with pytest.raises(ValueError, match="at least two"):
        vqa_accuracy.compute(predictions=["2"], references=[["2"]])


# ---------------------------------------------------------------- VQA accuracy, soft scores


def test_vqa_soft_scores(vqa_soft_accuracy):
    references = [
        [{"answer": "Tennis", "score": 1.0}, {"answer": "ping pong", "score": 0.3}],  # "ping-pong" -> 0.3
        [{"answer": "dog", "score": 0.6}],  # "cat" is absent -> 0
        [{"answer": "2", "score": 0.3}, {"answer": "two", "score": 0.9}],  # both normalise to "2": max 0.9
        [{"answer": "tennis", "score": 1.0}],  # "The tennis." -> "tennis" -> 1.0
    ]
    predictions = ["ping-pong", "cat", "2", "The tennis."]
    result = vqa_soft_accuracy.compute(predictions=predictions, references=references, return_per_question=True)
    assert result["per_question"] == pytest.approx([0.3, 0.0, 0.9, 1.0])
    assert result["accuracy"] == pytest.approx((0.3 + 0.0 + 0.9 + 1.0) / 4)


# ---------------------------------------------------------------- entity linking


def test_entity_linking_hits_and_mrr():
    long_ranking = [f"E{i}" for i in range(1, 13)]  # E1 .. E12
    predictions = [
        ["a", "b", "c"],  # gold "a" at rank 1
        ["x", "y", "g"],  # gold "g" at rank 3
        long_ranking,  # gold "E7" at rank 7
        long_ranking,  # gold "E11" at rank 11: counts for MRR, not for hits@10
        ["p"],  # gold "q" absent: 0 everywhere
    ]
    references = ["a", "g", "E7", "E11", "q"]
    result = load_metric("entity_linking").compute(predictions=predictions, references=references)
    assert result["hits@1"] == pytest.approx(1 / 5)
    assert result["hits@5"] == pytest.approx(2 / 5)
    assert result["hits@10"] == pytest.approx(3 / 5)
    assert result["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 7 + 1 / 11 + 0) / 5)
    assert set(result) == {"hits@1", "hits@5", "hits@10", "mrr"}


# ---------------------------------------------------------------- retrieval recall


def test_retrieval_recall_module():
    ranking = list(range(12))
    predictions = [ranking, ranking, ranking, ranking]
    # first positive at rank 1, 5 (index 4), 8 (index 7; index 11 is later), none
    references = [[0], [4, 9], [11, 7], [20]]
    result = load_metric("retrieval_recall").compute(predictions=predictions, references=references)
    assert result == pytest.approx({"r@1": 1 / 4, "r@5": 2 / 4, "r@10": 3 / 4})


def test_image_text_retrieval_3x3():
    similarity = np.array(
        [
            [0.90, 0.10, 0.30],
            [0.20, 0.80, 0.70],
            [0.95, 0.60, 0.50],
        ]
    )
    # Image -> text (rows): image 0 ranks texts [0, 2, 1] (its text 0 at rank 1); image 1 ranks
    # [1, 2, 0] (rank 1); image 2 ranks [0, 1, 2] (rank 3). R@1 = 2/3, R@5 = R@10 = 1.
    # Text -> image (columns): text 0 ranks images [2, 0, 1] (image 0 at rank 2); text 1 ranks
    # [1, 2, 0] (rank 1); text 2 ranks [1, 2, 0] (image 2 at rank 2). R@1 = 1/3, R@5 = R@10 = 1.
    result = image_text_retrieval_metrics(similarity, [0, 1, 2])
    expected = {
        "i2t_r@1": 2 / 3, "i2t_r@5": 1.0, "i2t_r@10": 1.0,
        "t2i_r@1": 1 / 3, "t2i_r@5": 1.0, "t2i_r@10": 1.0,
        "r_mean": (2 / 3 + 1 + 1 + 1 / 3 + 1 + 1) / 6,
    }
    assert result == pytest.approx(expected)


def test_image_text_retrieval_several_texts_per_image():
    # 2 images, texts 0-1 of image 0 and texts 2-3 of image 1.
    similarity = np.array(
        [
            [0.1, 0.9, 0.5, 0.2],  # image 0 ranks texts [1, 2, 3, 0]: text 1 is its own -> rank 1
            [0.8, 0.7, 0.1, 0.6],  # image 1 ranks texts [0, 1, 3, 2]: text 3 is its first own -> rank 3
        ]
    )
    # Text -> image: text 0 prefers image 1 (miss at 1), text 1 image 0 (hit), text 2 image 0
    # (miss), text 3 image 1 (hit): R@1 = 2/4. Every rank is at most 2, so R@5 = R@10 = 1.
    result = image_text_retrieval_metrics(similarity, [0, 0, 1, 1])
    assert result["i2t_r@1"] == pytest.approx(1 / 2)
    assert result["i2t_r@5"] == pytest.approx(1.0)
    assert result["t2i_r@1"] == pytest.approx(2 / 4)
    assert result["t2i_r@10"] == pytest.approx(1.0)


def test_image_text_retrieval_rejects_bad_inputs():
    with pytest.raises(ValueError, match="one image index per text"):
        image_text_retrieval_metrics(np.eye(3), [0, 1])
    with pytest.raises(ValueError, match="outside"):
        image_text_retrieval_metrics(np.eye(3), [0, 1, 3])
    with pytest.raises(ValueError, match="without any text"):
        image_text_retrieval_metrics(np.eye(3), [0, 0, 1])


# ---------------------------------------------------------------- classification accuracy


def test_classification_accuracy():
    result = load_metric("classification_accuracy").compute(predictions=[1, 0, 2, 2, 1], references=[1, 1, 2, 0, 1])
    assert result == {"accuracy": pytest.approx(3 / 5)}
