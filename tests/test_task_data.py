"""Task data readers and collators: formats, soft VQA targets, bad records reported by id, placeholder images."""

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import minilm_path, require_shared_data
from training.knowledge_world import generate_world
from training.task_data import (
    ClassificationCollator,
    EntityLinkingCollator,
    VqaCollator,
    answer_vocabulary_coverage,
    build_answer_vocabulary,
    load_answer_vocabulary,
    load_image,
    mention_token_mask,
    read_captions,
    read_classification,
    read_entity_linking,
    read_vqa,
    soft_scores_from_answers,
    vqa_metric_references,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny synthetic knowledge world on disk (24 countries, one image each)."""
    root = tmp_path_factory.mktemp("world")
    paths = generate_world(seed=0, num_entities=24, images_per_entity=1, query_images_per_entity=1).write(root / "w")
    return paths


def _write_image(path: Path, color=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def _write_json(path: Path, content) -> Path:
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------------------------
# VQA
# ------------------------------------------------------------------------------------------------------------------


def test_soft_scores_are_the_official_vqa_accuracy_of_each_answer():
    scores = soft_scores_from_answers(["2"] * 3 + ["Three"] * 7)
    # "2": 3 humans; leaving one of them out leaves 2 (score 2/3), leaving another out leaves 3 (score 1).
    assert scores["2"] == pytest.approx((3 * 2 / 3 + 7 * 1.0) / 10)
    assert scores["3"] == pytest.approx(1.0)  # normalised: "Three" -> "3"
    assert soft_scores_from_answers(["dog"]) == {"dog": 1.0}


def test_world_vqa_reads_human_answers_and_resolves_relative_images(world):
    data = read_vqa(world["vqa_train"])
    assert data.format == "vqa" and len(data) == 90
    record = data[0]
    assert Path(record["image"]).is_file() and Path(record["image"]).is_absolute() is Path(world["root"]).is_absolute()
    assert len(record["answers"]) == 10
    assert record["soft_labels"] == {record["answers"][0]: 1.0}
    config_name, references = vqa_metric_references(data)
    assert config_name == "default" and references[0] == record["answers"]


def test_okvqa_soft_labels_are_normalised_and_vocabulary_coverage_is_measured(tmp_path):
    _write_image(tmp_path / "images" / "COCO_val2014_000000000001.jpg")
    _write_image(tmp_path / "images" / "val2014" / "COCO_val2014_000000000002.jpg")
    path = _write_json(tmp_path / "okvqa.json", [
        {"sent": "What sport?", "question_id": 1, "img_id": "COCO_val2014_000000000001",
         "label": {"Tennis": 1, "ping-pong": 0.6, "tennis": 0.3}},
        {"sent": "Who?", "question_id": 2, "img_id": "COCO_val2014_000000000002", "label": {"the clown": 1}},
    ])
    data = read_vqa(path, image_root=tmp_path / "images")
    assert data.format == "okvqa"
    assert data[0]["soft_labels"] == {"tennis": 1.0, "ping pong": 0.6}  # merged case, best score kept
    assert data[1]["soft_labels"] == {"clown": 1.0}
    assert data[1]["image"].endswith("val2014/COCO_val2014_000000000002.jpg")  # COCO split subfolder
    assert vqa_metric_references(data)[0] == "soft_scores"
    coverage = answer_vocabulary_coverage(data, {"tennis": 0, "dog": 1})
    assert coverage == {"questions": 2, "covered": 0.5, "oracle_accuracy": 0.5}


def test_vqa_record_without_answers_is_reported_by_id(tmp_path, caplog):
    _write_image(tmp_path / "a.png")
    path = _write_json(tmp_path / "vqa.json", [
        {"question_id": 11, "image": "a.png", "question": "Q?", "answers": ["x", "x"]},
        {"question_id": 12, "image": "a.png", "question": "Q?", "answers": []},
        {"question_id": 13, "image": "a.png", "question": "Q?"},
    ])
    with pytest.raises(ValueError, match=r"2 invalid record\(s\): id 12: no answers.*id 13: no answers"):
        read_vqa(path)
    with caplog.at_level(logging.WARNING, logger="training.task_data"):
        data = read_vqa(path, on_invalid="skip")
    assert [record["id"] for record in data] == ["11"]
    assert [record_id for record_id, _ in data.skipped] == ["12", "13"]
    assert "id 12" in caplog.text and "id 13" in caplog.text


def test_missing_images_are_errors_unless_placeholders_are_asked_for(tmp_path):
    path = _write_json(tmp_path / "vqa.json", [{"question_id": 7, "img_id": "nowhere", "question": "Q?",
                                                 "answers": ["a", "a"]}])
    with pytest.raises(ValueError, match="id 7: image not found"):
        read_vqa(path)
    data = read_vqa(path, missing_images="placeholder")
    assert data[0]["image"] is None
    placeholder = load_image(None, "7", size=(30, 20))
    assert placeholder.size == (30, 20) and placeholder.getpixel((0, 0)) == (127, 127, 127)


def test_undecodable_image_is_reported_with_the_record_id(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    path = _write_json(tmp_path / "vqa.json", [{"question_id": 99, "image": "broken.png", "question": "Q?",
                                                 "answers": ["a", "a"]}])
    with pytest.raises(ValueError, match=r"id 99: image .*broken.png cannot be decoded"):
        read_vqa(path)
    data = read_vqa(path, verify_images=False)  # not checked when reading: the collator's decode names the record
    with pytest.raises(ValueError, match=r"record 99: cannot decode image .*broken.png"):
        load_image(data[0]["image"], data[0]["id"])


def test_answer_vocabulary_files_are_validated(tmp_path):
    assert load_answer_vocabulary(_write_json(tmp_path / "a.json", {"yes": 1, "no": 0})) == {"yes": 1, "no": 0}
    assert load_answer_vocabulary(_write_json(tmp_path / "b.json", ["no", "yes"])) == {"no": 0, "yes": 1}
    with pytest.raises(ValueError, match="duplicated ids"):
        load_answer_vocabulary(_write_json(tmp_path / "c.json", {"yes": 0, "no": 0}))
    with pytest.raises(ValueError, match="ids run from 1 to 2"):
        load_answer_vocabulary(_write_json(tmp_path / "d.json", {"yes": 1, "no": 2}))


def test_built_vocabulary_is_ordered_by_frequency_and_respects_min_count(world):
    data = read_vqa(world["vqa_train"])
    vocabulary = build_answer_vocabulary(data)
    assert sorted(vocabulary.values()) == list(range(len(vocabulary)))
    counts = [sum(answer in record["soft_labels"] for record in data) for answer in vocabulary]
    assert counts == sorted(counts, reverse=True)
    assert len(build_answer_vocabulary(data, min_count=3)) < len(vocabulary)
    assert answer_vocabulary_coverage(read_vqa(world["vqa_test"]), vocabulary)["covered"] == 1.0


# ------------------------------------------------------------------------------------------------------------------
# Entity linking
# ------------------------------------------------------------------------------------------------------------------


def test_world_entity_linking_and_unknown_entity_ids(world, tmp_path):
    kb_ids = [json.loads(line)["id"] for line in Path(world["knowledge"]).read_text().splitlines()]
    data = read_entity_linking(world["entity_linking_train"], knowledge_ids=kb_ids)
    assert data.format == "jsonl" and len(data) == 18
    record = data[0]
    assert record["sentence"][slice(*record["mention_span"])] == record["mention"]
    rows = [json.loads(line) for line in Path(world["entity_linking_train"]).read_text().splitlines()]
    rows[3]["entity_id"] = "E9999"
    bad = _write_jsonl(Path(world["root"]) / "el_bad.jsonl", rows)
    with pytest.raises(ValueError, match=f"id {rows[3]['id']}: gold entity 'E9999' is not in the knowledge base"):
        read_entity_linking(bad, knowledge_ids=kb_ids)
    assert len(read_entity_linking(bad, knowledge_ids=kb_ids, on_invalid="skip")) == 17


def test_wikimel_format_splits_mentions_and_uses_placeholders(tmp_path):
    folder = tmp_path / "wikimel"
    folder.mkdir()
    _write_json(folder / "samples.json", {
        "1": {"id": "1", "sentence": "Ada Lovelace with Charles Babbage", "mentions": ["Ada Lovelace", "Babbage"],
              "entities": ["Ada Lovelace", "Charles Babbage"], "answer": ["Q7259", "Q46633"]},
        "2": {"id": "2", "sentence": "Babbage in 1860", "mentions": ["Babbage"], "entities": ["x"],
              "answer": ["Q46633"]},
    })
    _write_json(folder / "splits.json", {"train": ["1", "3"], "test": ["2"]})
    _write_image(folder / "images" / "2.jpg")
    train = read_entity_linking(folder, knowledge_ids=["Q7259", "Q46633"], split="train")
    assert [record["id"] for record in train] == ["1-0", "1-1"]  # id 3 has no sample: left out
    assert [record["entity_id"] for record in train] == ["Q7259", "Q46633"]
    assert train[1]["mention_span"] == [26, 33] and train[0]["image"] is None  # no image file: placeholder
    test = read_entity_linking(folder / "samples.json", split="test")
    assert test[0]["image"].endswith("images/2.jpg")
    with pytest.raises(ValueError, match="id 1-1: gold entity 'Q46633' is not in the knowledge base"):
        read_entity_linking(folder, knowledge_ids=["Q7259"], split="train")
    with pytest.raises(ValueError, match="no split 'dev'"):
        read_entity_linking(folder, split="dev")


def test_mention_token_mask_marks_overlapping_tokens():
    offsets = [(0, 0), (0, 3), (4, 12), (12, 13), (14, 21), (0, 0)]  # [CLS] Ada Lovelace , Babbage [SEP]
    assert mention_token_mask(offsets, [0, 12]) == [0, 1, 1, 0, 0, 0]
    assert mention_token_mask(offsets, [14, 21]) == [0, 0, 0, 0, 1, 0]
    assert mention_token_mask(offsets, None) == [0] * 6


# ------------------------------------------------------------------------------------------------------------------
# Retrieval and classification
# ------------------------------------------------------------------------------------------------------------------


def test_captions_csv(world, tmp_path):
    data = read_captions(world["captions"])
    assert len(data) == 24 and all(Path(record["image"]).is_file() for record in data)
    (tmp_path / "c.csv").write_text("image,caption\na.png,hello\na.png,\n", encoding="utf-8")
    _write_image(tmp_path / "a.png")
    with pytest.raises(ValueError, match="id 2: empty caption"):
        read_captions(tmp_path / "c.csv")
    (tmp_path / "d.csv").write_text("picture,text\n", encoding="utf-8")
    with pytest.raises(ValueError, match="needs the columns image,caption"):
        read_captions(tmp_path / "d.csv")


def test_snli_ve_and_nlvr2_classification(tmp_path):
    _write_image(tmp_path / "100.jpg")
    snli = _write_jsonl(tmp_path / "snli_ve.jsonl", [
        {"pairID": "p1", "Flickr30K_ID": "100", "sentence2": "A dog runs.", "gold_label": "neutral"},
        {"pairID": "p2", "Flickr30K_ID": "100", "sentence2": "A cat.", "gold_label": "contradiction"},
        {"pairID": "p3", "Flickr30K_ID": "100", "sentence2": "Unsure.", "gold_label": "-"},
    ])
    with pytest.raises(ValueError, match=r"id p3: label '-' is not one of \['entailment', 'neutral', 'contradiction'\]"):
        read_classification(snli)
    data = read_classification(snli, on_invalid="skip")
    assert data.format == "snli-ve" and data.labels == ["entailment", "neutral", "contradiction"]
    assert data[0]["images"][0].endswith("100.jpg") and data[0]["label"] == "neutral"

    for name in ("dev-850-0-img0.png", "dev-850-0-img1.png"):
        _write_image(tmp_path / name)
    nlvr2 = _write_jsonl(tmp_path / "nlvr2.jsonl", [
        {"identifier": "dev-850-0-0", "sentence": "Two dogs.", "label": "True"},
        {"identifier": "dev-850-0-1", "sentence": "No dogs.", "label": False},
    ])
    data = read_classification(nlvr2)
    assert data.format == "nlvr2" and data.labels == ["False", "True"]
    assert [Path(path).name for path in data[0]["images"]] == ["dev-850-0-img0.png", "dev-850-0-img1.png"]
    assert data[1]["label"] == "False"


# ------------------------------------------------------------------------------------------------------------------
# Collators
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoTokenizer, ViTImageProcessor

    from processing.processing_reavl import ReavlProcessor

    return ReavlProcessor(image_processor=ViTImageProcessor(size={"height": 30, "width": 30}),
                          tokenizer=AutoTokenizer.from_pretrained(minilm_path()))


def test_vqa_collator_gives_soft_targets_over_the_vocabulary(processor, tmp_path):
    _write_image(tmp_path / "a.png")
    path = _write_json(tmp_path / "vqa.json", [
        {"question_id": 1, "image": "a.png", "question": "How many?", "answers": ["2"] * 3 + ["three"] * 7},
        {"question_id": 2, "img_id": "missing", "question": "What is this?", "answers": ["a dog", "cat"]},
    ])
    data = read_vqa(path, missing_images="placeholder")
    batch = VqaCollator(processor, {"3": 0, "dog": 1, "2": 2}, use_knowledge=False)(data.records)
    assert batch["pixel_values"].shape == (2, 3, 30, 30) and batch["input_ids"].shape[0] == 2
    # "dog" is 1 of 2 humans: leaving that human out scores 0, leaving the other out 1/3; mean 1/6.
    assert torch.allclose(batch["labels"], torch.tensor([[1.0, 0.0, 0.9], [0.0, 1 / 6, 0.0]]))
    assert batch["use_knowledge"] is False
    # The placeholder is mid-grey, which the processor's 0.5/0.5 normalisation maps to about 0.
    assert batch["pixel_values"][1].abs().max() < 0.01 < batch["pixel_values"][0].abs().max()


def test_entity_linking_collator_marks_the_mention_and_finds_the_gold_row(processor, tmp_path):
    _write_image(tmp_path / "a.png")
    path = _write_jsonl(tmp_path / "el.jsonl", [
        {"id": "m1", "image": "a.png", "sentence": "Ada Lovelace met Charles Babbage.", "mention": "Charles Babbage",
         "entity_id": "Q46633"},
        {"id": "m2", "image": "a.png", "sentence": "A portrait of Ada", "mention": "Ada", "entity_id": "Q7259"},
    ])
    data = read_entity_linking(path)
    rows = {"Q7259": 4, "Q46633": 9}
    batch = EntityLinkingCollator(processor, rows.__getitem__)(data.records)
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0][batch["mention_mask"][0].bool()])
    assert processor.tokenizer.convert_tokens_to_string(tokens) == "charles babbage"
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][1][batch["mention_mask"][1].bool()])
    assert tokens == ["ada"]
    assert batch["gold_knowledge_index"].tolist() == [9, 4]
    with pytest.raises(ValueError, match="record m2: gold entity 'Q7259' is not in the knowledge index"):
        EntityLinkingCollator(processor, {"Q46633": 9}.__getitem__)(data.records)


def test_two_image_classification_collator_stacks_the_pair(processor, tmp_path):
    for name in ("dev-1-0-img0.png", "dev-1-0-img1.png"):
        _write_image(tmp_path / name)
    path = _write_jsonl(tmp_path / "nlvr2.jsonl", [
        {"identifier": "dev-1-0-0", "sentence": "Two dogs.", "label": "True"},
        {"identifier": "dev-1-0-1", "sentence": "No dogs at all.", "label": "False"},
    ])
    data = read_classification(path)
    batch = ClassificationCollator(processor, data.labels)(data.records)
    assert batch["pixel_values"].shape == (2, 2, 3, 30, 30)
    assert batch["input_ids"].shape[0] == 2 and batch["labels"].tolist() == [1, 0]
    text = processor.tokenizer.decode(batch["input_ids"][1], skip_special_tokens=True)
    assert text == "no dogs at all."


# ------------------------------------------------------------------------------------------------------------------
# Real data (../shared)
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_okvqa_parses_and_its_vocabulary_validates():
    folder = require_shared_data("okvqa")
    train = read_vqa(folder / "train.json", missing_images="placeholder")  # the release has no COCO images
    assert len(train) == 9009 and not train.skipped
    vocabulary = load_answer_vocabulary(folder / "trainval_ans2label.json")
    assert len(vocabulary) == 11062
    coverage = answer_vocabulary_coverage(train, vocabulary)
    # The vocabulary is partly stemmed ("tenni", "basebal"), so only ~83% of the questions have an answer in it.
    assert 0.80 < coverage["covered"] < 0.86


@pytest.mark.realdata
def test_real_wikimel_test_split_has_5131_mentions_in_the_kb():
    folder = require_shared_data("wikimel")
    names = json.loads((folder / "qid2ne.json").read_text(encoding="utf-8"))
    test = read_entity_linking(folder, knowledge_ids=names, split="test")
    assert len(test) == 5131  # 4,412 of the 4,883 test ids have a record (data README)
    assert 0 < sum(record["image"] is not None for record in test) < 50
