"""Pipelines over REAVL heads (`knowledge-vqa`, `multimodal-entity-linking`, the built-in
`zero-shot-image-classification`), the Inference Endpoints handler and `reavl ask`.

In-process tests compare the pipelines with direct model calls; one isolated interpreter (the project's packages
blocked) loads the exported folders with `pipeline(model=folder, trust_remote_code=True)` and the handler, and must
give the in-process outputs.
"""

import base64
import io
import json
import shutil

import pytest
import torch
from PIL import Image

from modeling_reavl import ReavlForEntityLinking, ReavlForImageTextRetrieval, ReavlForQuestionAnswering
from modeling_reavl.handler import EndpointHandler, decode_image
from modeling_reavl.pipeline_reavl import EntityLinkingPipeline, KnowledgeVQAPipeline
from processing.processing_reavl import ReavlProcessor
from tests.remote_code_helpers import run_isolated_json
from tests.test_export import KNOWLEDGE_BASE, QUESTION, build_trained_folder, make_image
from training.export import WidgetExample, export_model


SENTENCE = "The delegation from Ostrand arrived under its blue banner."
MENTION = "Ostrand"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("pipelines")


@pytest.fixture(scope="module")
def qa_folder(workdir):
    return build_trained_folder(workdir / "qa")


@pytest.fixture(scope="module")
def el_folder(workdir):
    return build_trained_folder(workdir / "el", head="el")


@pytest.fixture(scope="module")
def qa(qa_folder):
    model = ReavlForQuestionAnswering.from_pretrained(qa_folder).eval()
    processor = ReavlProcessor.from_pretrained(qa_folder)
    return model, processor


@pytest.fixture(scope="module")
def qa_pipe(qa):
    from transformers import pipeline

    model, processor = qa
    return pipeline("knowledge-vqa", model=model, processor=processor, device=-1)


@pytest.fixture(scope="module")
def el_pipe(el_folder):
    model = ReavlForEntityLinking.from_pretrained(el_folder).eval()
    return EntityLinkingPipeline(model=model, processor=ReavlProcessor.from_pretrained(el_folder), device=-1)


def assert_same_result(actual, expected, tolerance=1e-5):
    """Equal structures (dicts, lists, strings) with floats equal to `tolerance` (outputs of two interpreters)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), (actual, expected)
        for key in expected:
            assert_same_result(actual[key], expected[key], tolerance)
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), (actual, expected)
        for actual_item, expected_item in zip(actual, expected):
            assert_same_result(actual_item, expected_item, tolerance)
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, abs=tolerance)
    else:
        assert actual == expected


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_knowledge_vqa_answers_with_evidence(qa, qa_pipe):
    model, processor = qa
    image = make_image(1)
    result = qa_pipe(image, QUESTION, top_k=3)
    assert isinstance(qa_pipe, KnowledgeVQAPipeline) and qa_pipe.task == "knowledge-vqa"

    with torch.no_grad():
        outputs = model(**processor(images=image, text=QUESTION, return_tensors="pt"))
    probabilities = outputs.logits[0].sigmoid()
    best = probabilities.argsort(descending=True)[:3].tolist()
    assert [item["answer"] for item in result["answers"]] == [model.config.id2label[i] for i in best]
    torch.testing.assert_close(torch.tensor([item["score"] for item in result["answers"]]), probabilities[best])

    rows = outputs.knowledge_indices[0].tolist()
    assert len(result["evidence"]) == model.config.num_knowledge == 2
    assert [entry["index"] for entry in result["evidence"]] == rows
    assert [entry["id"] for entry in result["evidence"]] == [KNOWLEDGE_BASE[row]["id"] for row in rows]
    assert [entry["title"] for entry in result["evidence"]] == [KNOWLEDGE_BASE[row]["title"] for row in rows]
    torch.testing.assert_close(torch.tensor([e["gate"] for e in result["evidence"]]), outputs.knowledge_gates[0])
    torch.testing.assert_close(
        torch.tensor([e["retrieval_score"] for e in result["evidence"]]), outputs.knowledge_scores[0]
    )


def test_no_knowledge_ablation(qa, qa_pipe):
    model, processor = qa
    image = make_image(1)
    result = qa_pipe(image, QUESTION, top_k=5, use_knowledge=False)
    assert result["evidence"] == []
    with torch.no_grad():
        logits = model(**processor(images=image, text=QUESTION, return_tensors="pt"), use_knowledge=False).logits
    scores = sorted(logits[0].sigmoid().tolist(), reverse=True)
    assert [item["score"] for item in result["answers"]] == pytest.approx(scores, abs=1e-6)
    assert result != qa_pipe(image, QUESTION, top_k=5)  # knowledge changes the reading


def test_call_forms(qa_pipe, tmp_path):
    single = qa_pipe(make_image(1), QUESTION, top_k=2)
    assert qa_pipe({"image": make_image(1), "question": QUESTION}, top_k=2) == single
    batch = qa_pipe([make_image(1), make_image(2)], [QUESTION, "Which river crosses it?"], top_k=2)
    assert isinstance(batch, list) and len(batch) == 2 and batch[0] == single
    assert qa_pipe([{"image": make_image(1), "question": QUESTION}], top_k=2) == [single]
    encoded = base64.b64encode(_png_bytes(make_image(1))).decode()
    assert qa_pipe(encoded, QUESTION, top_k=2) == single  # base64 strings, paths and URLs are accepted too
    make_image(1).save(tmp_path / "image.png")
    assert qa_pipe(tmp_path / "image.png", QUESTION, top_k=2) == single
    assert qa_pipe(str(tmp_path / "image.png"), QUESTION, top_k=2) == single


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda pipe: pipe(None, QUESTION), "needs an image"),
        (lambda pipe: pipe(make_image(1), "   "), "question must be a non-empty string"),
        (lambda pipe: pipe(make_image(1), QUESTION, top_k=0), "top_k must be >= 1"),
        (lambda pipe: pipe([make_image(1)], [QUESTION, QUESTION]), "got 1 images"),
    ],
)
def test_bad_pipeline_input(qa_pipe, call, message):
    with pytest.raises(ValueError, match=message):
        call(qa_pipe)


def test_pipeline_loads_processor_and_retriever_itself(qa_folder, qa_pipe):
    model = ReavlForQuestionAnswering.from_pretrained(qa_folder)
    assert model.retriever is None
    pipe = KnowledgeVQAPipeline(model=model, device=-1)
    assert isinstance(pipe.processor, ReavlProcessor) and model.retriever is not None
    assert pipe(make_image(1), QUESTION, top_k=3) == qa_pipe(make_image(1), QUESTION, top_k=3)


def test_missing_knowledge_index_is_explained(qa_folder, workdir):
    folder = workdir / "qa-without-index"
    shutil.copytree(qa_folder, folder)
    shutil.rmtree(folder / "knowledge")
    with pytest.raises(ValueError, match=r"could not load its knowledge index \(no knowledge index at .*"
                                         r"retrieves 2 entries per example"):
        KnowledgeVQAPipeline(model=ReavlForQuestionAnswering.from_pretrained(folder), device=-1)


def test_entity_linking_ranks_candidates(el_pipe):
    model, processor = el_pipe.model, el_pipe.processor
    ranked = el_pipe(make_image(3), SENTENCE, mention=MENTION, top_k=3)
    assert len(ranked) == 3 and all(entry["id"] in {e["id"] for e in KNOWLEDGE_BASE} for entry in ranked)
    scores = [entry["score"] for entry in ranked]
    assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-5)  # K = 3 candidates

    # The mention mask covers exactly the mention's tokens, and the ranking is the head's.
    inputs = processor(images=make_image(3), text=SENTENCE, return_tensors="pt")
    mask = el_pipe._mention_mask(SENTENCE, MENTION, inputs)
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0][mask[0].bool()].tolist())
    assert "".join(token.removeprefix("##") for token in tokens) == MENTION.lower()
    with torch.no_grad():
        outputs = model(**inputs, mention_mask=mask)
    order = outputs.logits[0].argsort(descending=True).tolist()
    assert [entry["index"] for entry in ranked] == outputs.knowledge_indices[0][order].tolist()
    assert [entry["title"] for entry in ranked] == [KNOWLEDGE_BASE[entry["index"]]["title"] for entry in ranked]

    with pytest.raises(ValueError, match="mention 'Tarvik' does not occur in the sentence"):
        el_pipe(make_image(3), SENTENCE, mention="Tarvik")


def test_decode_image_errors():
    png = _png_bytes(make_image(1))
    assert decode_image(base64.b64encode(png).decode()).size == (30, 30)
    assert decode_image("data:image/png;base64," + base64.b64encode(png).decode()).mode == "RGB"
    assert decode_image(png).size == (30, 30)
    with pytest.raises(ValueError, match=r"inputs.image is not valid base64"):
        decode_image("not base64 at all!", where="inputs.image")
    with pytest.raises(ValueError, match=r"decodes to 9 bytes that are not a readable image"):
        decode_image(base64.b64encode(b"text file").decode())
    with pytest.raises(ValueError, match="URLs are not fetched"):
        decode_image("https://example.com/cat.png")


def test_handler_requests(qa_pipe):
    handler = EndpointHandler.__new__(EndpointHandler)  # the exported folder's handler is loaded in the isolated test
    handler.pipeline, handler.text_keys = qa_pipe, ("question",)
    encoded = base64.b64encode(_png_bytes(make_image(1))).decode()
    answer = handler({"inputs": {"image": encoded, "question": QUESTION}, "parameters": {"top_k": 2}})
    assert answer == qa_pipe(make_image(1), QUESTION, top_k=2)
    assert handler({"inputs": [{"image": encoded, "question": QUESTION}], "parameters": {"top_k": 2}}) == [answer]
    for request, message in [
        ({"inputs": {"question": QUESTION}}, 'has no "image": send the image as a base64 string'),
        ({"inputs": {"image": encoded}}, 'has no "question"'),
        ({"inputs": {"image": "%%%", "question": QUESTION}}, r'"inputs".image is not valid base64'),
        ({"inputs": [{"image": encoded, "question": QUESTION}, {"question": QUESTION}]},
         r'"inputs"\[1\] has no "image"'),
        ({"inputs": {"image": encoded, "question": QUESTION}, "parameters": {"temperature": 1}}, "unknown parameters"),
        ({"image": encoded}, 'must be a JSON object with "inputs"'),
    ]:
        with pytest.raises(ValueError, match=message):
            handler(request)


def test_reavl_ask(qa_folder, qa_pipe, workdir, capsys):
    from training.ask import main

    image_path = workdir / "ask.png"
    make_image(1).save(image_path)
    expected = qa_pipe(make_image(1), QUESTION, top_k=2)
    arguments = ["--model", str(qa_folder), "--image", str(image_path), "--question", QUESTION, "--top-k", "2"]
    assert main(arguments + ["--json"]) == 0
    assert_same_result(json.loads(capsys.readouterr().out), expected)
    assert main(arguments) == 0
    table = capsys.readouterr().out
    assert expected["answers"][0]["answer"] in table and expected["evidence"][0]["title"] in table
    assert main(["--model", str(qa_folder), "--image", str(workdir / "missing.png"), "--question", QUESTION]) == 2
    assert "does not exist" in capsys.readouterr().err


ISOLATED_PIPELINES = r"""
import base64, json, sys
from PIL import Image
from transformers import pipeline

paths = json.load(open("paths.json"))
image = Image.open("image.png").convert("RGB")
result = {}
pipe = pipeline(model=paths["qa"], trust_remote_code=True)  # task inferred from config.json custom_pipelines
result["qa_task"], result["qa_class"] = pipe.task, type(pipe).__name__
result["qa"] = pipe(image, paths["question"], top_k=3)
zero_shot = pipeline("zero-shot-image-classification", model=paths["qa"], trust_remote_code=True)
result["zero_shot"] = zero_shot(image, candidate_labels=paths["labels"])

sys.path.insert(0, paths["qa"])  # Inference Endpoints imports handler.py from the repository folder
from handler import EndpointHandler

handler = EndpointHandler(paths["qa"])
encoded = base64.b64encode(open("image.png", "rb").read()).decode()
result["handler"] = handler({"inputs": {"image": encoded, "question": paths["question"]}, "parameters": {"top_k": 3}})
try:
    handler({"inputs": {"image": "@@not-base64@@", "question": paths["question"]}})
except ValueError as error:
    result["handler_error"] = str(error)

linker = pipeline(model=paths["el"], trust_remote_code=True)
result["el_task"] = linker.task
result["el"] = linker(image, paths["sentence"], mention=paths["mention"], top_k=3)
emit(result)
"""


def test_exported_pipelines_and_handler_in_fresh_interpreter(qa_folder, el_folder, qa_pipe, el_pipe, workdir, tmp_path):
    from transformers import ZeroShotImageClassificationPipeline

    qa_export = export_model(qa_folder, workdir / "hub" / "qa",
                             widget_examples=[WidgetExample(make_image(1), QUESTION)])
    el_export = export_model(el_folder, workdir / "hub" / "el",
                             widget_examples=[WidgetExample(make_image(3), SENTENCE, mention=MENTION)])
    assert json.loads((el_export.output_dir / "config.json").read_text())["custom_pipelines"] == {
        "multimodal-entity-linking": {
            "impl": "pipeline_reavl.EntityLinkingPipeline", "pt": ["AutoModelForMultipleChoice"], "type": "multimodal"
        }
    }
    labels = ["a red flag", "a blue flag", "a green flag"]
    make_image(1).save(tmp_path / "image.png")
    (tmp_path / "paths.json").write_text(json.dumps({
        "qa": str(qa_export.output_dir), "el": str(el_export.output_dir), "question": QUESTION,
        "sentence": SENTENCE, "mention": MENTION, "labels": labels,
    }))
    remote = run_isolated_json(ISOLATED_PIPELINES, cwd=tmp_path, timeout=240)

    image = Image.open(tmp_path / "image.png").convert("RGB")
    expected_qa = qa_pipe(image, QUESTION, top_k=3)
    assert (remote["qa_task"], remote["qa_class"]) == ("knowledge-vqa", "KnowledgeVQAPipeline")
    assert_same_result(remote["qa"], expected_qa)
    assert_same_result(remote["handler"], expected_qa)
    assert remote["handler_error"].startswith('"inputs".image is not valid base64')
    assert remote["el_task"] == "multimodal-entity-linking"
    assert_same_result(remote["el"], el_pipe(image, SENTENCE, mention=MENTION, top_k=3))

    processor = ReavlProcessor.from_pretrained(qa_folder)
    zero_shot = ZeroShotImageClassificationPipeline(
        model=ReavlForImageTextRetrieval.from_pretrained(qa_folder).eval(), tokenizer=processor.tokenizer,
        image_processor=processor.image_processor, device=-1,
    )
    assert_same_result(remote["zero_shot"], zero_shot(image, candidate_labels=labels))
    # The card's widget output is the exported model's own answer.
    widget = qa_export.widget_examples[0].output
    assert [item["label"] for item in widget] == [item["answer"] for item in remote["qa"]["answers"]]
