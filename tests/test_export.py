"""`reavl export`: the Hub repo folder of DESIGN.md section 6, its model card, and its remote-code loading.

One tiny trained folder (ViT 30 px / patch 2 / hidden 32, BERT hidden 32 with the MiniLM tokenizer, a 6-entry
knowledge base and its real faiss index) is exported once per module; the remote-code test loads that export in a
fresh interpreter in which this project's packages cannot be imported, and compares every output with the
in-process model.
"""

import ast
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.conftest import minilm_path
from tests.remote_code_helpers import run_isolated_json
from training.export import (
    KNOWLEDGE_REVISION_PLACEHOLDER,
    REPO_ID_PLACEHOLDER,
    ExportError,
    WidgetExample,
    check_model_card,
    export_model,
    knowledge_folder_for,
)


TINY_CONFIG = dict(
    vision_config={"model_type": "vit", "image_size": 30, "patch_size": 2, "hidden_size": 32, "num_hidden_layers": 1,
                   "num_attention_heads": 2, "intermediate_size": 37},
    text_config={"model_type": "bert", "vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 1,
                 "num_attention_heads": 2, "intermediate_size": 37},
    projection_dim=16, retrieval_dim=16, num_knowledge=2, max_knowledge_length=16, num_fusion_layers=1,
    fusion_num_attention_heads=2, fusion_intermediate_size=37,
)
ANSWERS = ["red", "blue", "green", "Velmora", "Ostrand"]
KNOWLEDGE_BASE = [
    {"id": "Q1", "title": "Velmora", "text": "Velmora is a river country whose flag is red with a white star."},
    {"id": "Q2", "title": "Ostrand", "text": "Ostrand is a mountain country with a blue flag."},
    {"id": "Q3", "title": "Tarvik", "text": "Tarvik is an island with a green flag and a golden sun."},
    {"id": "Q4", "title": "Olm River", "text": "The Olm is the longest river of Velmora."},
    {"id": "Q5", "title": "Kessel", "text": "Kessel is the capital of Ostrand."},
    {"id": "Q6", "title": "Pyrian", "text": "Pyrian is the language spoken in Tarvik."},
]
QUESTION = "Which country has this flag?"
TEXTS = [QUESTION, "Which river crosses it?"]
EVAL_REPORT = {
    "task": "vqa", "model": "/somewhere/runs/vqa", "data": "/somewhere/world/vqa_test.json", "split": "test",
    "num_examples": 40, "full": {"vqa_accuracy": 0.6125, "loss": 1.5, "timing": {"runtime": 2.0}},
    "no_knowledge": {"vqa_accuracy": 0.4375, "loss": 1.9, "timing": {"runtime": 1.5}},
}


def make_image(seed: int) -> Image.Image:
    """A deterministic 30 px RGB image."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(30, 30, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def build_trained_folder(folder: Path, head: str = "qa", seed: int = 0) -> Path:
    """A folder as `reavl finetune` leaves it: a tiny REAVL head, its processor and a real knowledge index."""
    from transformers import AutoTokenizer, ViTImageProcessor

    from modeling_reavl import ReavlConfig, ReavlForEntityLinking, ReavlForQuestionAnswering
    from processing.knowledge_index import build_knowledge_index
    from processing.processing_reavl import ReavlProcessor

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    if head == "qa":
        # With the answers' token ids, as `reavl finetune` sets them: the head also copies answers from the entries
        # ("Velmora" and "Ostrand" occur in the knowledge base), so the exported copy path is exercised too.
        answer_token_ids = [tokenizer(answer, add_special_tokens=False)["input_ids"] for answer in ANSWERS]
        config = ReavlConfig(**TINY_CONFIG, id2label=dict(enumerate(ANSWERS)), answer_token_ids=answer_token_ids)
        model = ReavlForQuestionAnswering(config)
    else:
        model = ReavlForEntityLinking(ReavlConfig(**{**TINY_CONFIG, "num_knowledge": 3}))
    model.eval()
    image_processor = ViTImageProcessor(size={"height": 30, "width": 30}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = ReavlProcessor(
        image_processor, tokenizer, num_knowledge=model.config.num_knowledge, max_knowledge_length=16,
    )
    retriever = build_knowledge_index(model, processor, KNOWLEDGE_BASE, folder / "knowledge", progress=False)
    processor.set_knowledge(retriever)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def trained(workdir):
    return build_trained_folder(workdir / "trained")


@pytest.fixture(scope="module")
def eval_json(workdir):
    path = workdir / "eval.json"
    path.write_text(json.dumps(EVAL_REPORT))
    return path


def _export(trained: Path, output: Path, eval_json: Path, **options):
    return export_model(
        trained, output, eval_json=eval_json,
        widget_examples=[WidgetExample(make_image(1), QUESTION, title="A flag")],
        datasets=["reavl-org/knowledge-world"], training_data="A synthetic world of flags.", **options,
    )


@pytest.fixture(scope="module")
def exported(trained, workdir, eval_json):
    return _export(trained, workdir / "hub" / "reavl-vqa", eval_json)


EXPECTED_FILES = {
    "README.md", "config.json", "model.safetensors", "configuration_reavl.py", "modeling_reavl.py",
    "processor_config.json", "tokenizer.json", "tokenizer_config.json", "processing_reavl.py", "retrieval_reavl.py",
    "pipeline_reavl.py", "handler.py", "examples/widget-0.png", "knowledge/README.md", "knowledge/index.faiss",
    "knowledge/knowledge_config.json", "knowledge/data/train-00000-of-00001.parquet",
}
AUTO_CLASSES = {
    "AutoConfig", "AutoModel", "AutoModelForPreTraining", "AutoModelForVisualQuestionAnswering",
    "AutoModelForZeroShotImageClassification", "AutoModelForMultipleChoice", "AutoModelForSequenceClassification",
}


def test_folder_layout_and_config(exported):
    folder = exported.output_dir
    assert set(exported.files) == EXPECTED_FILES
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "reavl" and config["architectures"] == ["ReavlForQuestionAnswering"]
    assert set(config["auto_map"]) == AUTO_CLASSES
    assert config["custom_pipelines"] == {
        "knowledge-vqa": {
            "impl": "pipeline_reavl.KnowledgeVQAPipeline", "pt": ["AutoModelForVisualQuestionAnswering"],
            "type": "multimodal",
        }
    }
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_reavl.ReavlProcessor"}
    assert processor_config["knowledge_path"] == "knowledge" and processor_config["knowledge_repo_id"] is None
    # Remote-code rule: the copied files import their siblings relatively, never the project's packages.
    for name in ("modeling_reavl.py", "processing_reavl.py", "retrieval_reavl.py", "pipeline_reavl.py", "handler.py"):
        assert _absolute_imports_of_project(folder / name) == [], name


def _absolute_imports_of_project(path: Path) -> list[str]:
    imported = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.append(node.module)
    return [name for name in imported if name.split(".")[0] in ("modeling_reavl", "processing", "training")]


ABSOLUTE_MARKERS = ("/home", "/root", "/work", "/tmp")


def _absolute_path_hits(folder: Path, extra: list[str]) -> list[str]:
    hits = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        markers = (*ABSOLUTE_MARKERS, *extra)
        hits += [f"{path.relative_to(folder)} contains {marker}" for marker in markers if marker in text]
    return hits


def test_no_absolute_path_in_any_written_file(exported, trained, workdir):
    assert _absolute_path_hits(exported.output_dir, [str(workdir), str(trained)]) == []
    # The evaluation JSON held local paths; only the data file's base name reaches the card.
    assert "vqa_test.json" in (exported.output_dir / "README.md").read_text()


def test_export_is_deterministic(exported, trained, workdir, eval_json):
    again = _export(trained, workdir / "again" / "reavl-vqa", eval_json)
    assert file_hashes(again.output_dir) == file_hashes(exported.output_dir)


def test_interrupted_export_leaves_no_folder(trained, workdir, eval_json, monkeypatch):
    import training.export

    def crash(*args, **kwargs):
        raise RuntimeError("disk full while writing README.md")

    monkeypatch.setattr(training.export, "render_model_card", crash)
    parent = workdir / "interrupted"
    with pytest.raises(RuntimeError, match="disk full"):
        _export(trained, parent / "reavl-vqa", eval_json)
    assert list(parent.iterdir()) == []  # neither the target nor a temporary sibling

    # Replacing an existing export: a failure keeps the previous one as it was.
    previous = parent / "existing"
    previous.mkdir()
    (previous / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="disk full"):
        _export(trained, previous, eval_json, overwrite=True)
    assert [path.name for path in parent.iterdir()] == ["existing"]
    assert file_hashes(previous) == {"config.json": hashlib.sha256(b"{}").hexdigest()}


def test_existing_output_needs_overwrite(exported, trained, eval_json):
    with pytest.raises(ExportError, match="already exists; pass --overwrite"):
        _export(trained, exported.output_dir, eval_json)


def _without_processor(folder: Path) -> None:
    for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()


def _without_index(folder: Path) -> None:
    shutil.rmtree(folder / "knowledge")


def _index_of_other_encoder(folder: Path) -> None:
    other = build_trained_folder(folder.parent / f"{folder.name}-other", seed=1)
    shutil.rmtree(folder / "knowledge")
    shutil.copytree(other / "knowledge", folder / "knowledge")


@pytest.mark.parametrize(
    "damage, expected",
    [
        (_without_processor, r"has no processor \(processor_config\.json and tokenizer files\).*save_pretrained"),
        (_without_index, r"has no knowledge index at .*knowledge.*build it with `reavl build-index --model"),
        (_index_of_other_encoder, r"cannot serve this model: .*encoder fingerprint.*Rebuild it .*`reavl build-index"),
    ],
    ids=["no-processor", "no-index", "other-encoder"],
)
def test_bad_input_says_what_is_missing(trained, workdir, damage, expected):
    broken = workdir / f"broken-{damage.__name__}"
    shutil.copytree(trained, broken)
    damage(broken)
    output = workdir / "never" / broken.name
    with pytest.raises(ExportError, match=expected):
        export_model(broken, output)
    assert not output.parent.exists() or list(output.parent.iterdir()) == []


def test_bad_input_through_the_cli(workdir, capsys):
    from training.export import main

    empty = workdir / "empty-model"
    empty.mkdir()
    assert main(["--model", str(empty), "--output", str(workdir / "never-cli")]) == 1
    assert "has no config.json: it is not a saved REAVL model folder" in capsys.readouterr().err


def test_export_through_the_cli(exported, trained, workdir, eval_json, capsys):
    from training.export import main

    image = workdir / "cli-widget.png"
    make_image(1).save(image)
    output = workdir / "cli" / "reavl-vqa"
    arguments = ["--model", str(trained), "--output", str(output), "--eval-json", str(eval_json),
                 "--widget-image", str(image), "--widget-question", QUESTION, "--json"]
    assert main(arguments) == 0
    assert json.loads(capsys.readouterr().out)["files"] == exported.files
    # Same model, image and question as the module's export: the same widget answers.
    assert _card_metadata(output / "README.md")["widget"][0]["output"] == exported.widget_examples[0].output


def _card_metadata(readme: Path) -> dict:
    return yaml.safe_load(readme.read_text().split("---\n")[1])


def test_model_card_metadata(exported):
    readme = exported.output_dir / "README.md"
    assert check_model_card(readme) == []
    metadata = _card_metadata(readme)
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "visual-question-answering"
    assert metadata["license"] == "apache-2.0"
    assert {"custom_code", "reavl"} <= set(metadata["tags"])
    assert metadata["datasets"] == ["reavl-org/knowledge-world"]
    # model-index from the evaluation JSON, the no-knowledge ablation beside the full model; loss is not a metric.
    (result,) = metadata["model-index"][0]["results"]
    assert result["task"]["type"] == "visual-question-answering"
    assert result["dataset"] == {"name": "vqa_test.json", "type": "custom", "split": "test"}
    assert [(m["name"], m["value"]) for m in result["metrics"]] == [
        ("vqa_accuracy (full model)", 0.6125), ("vqa_accuracy (no knowledge)", 0.4375)
    ]
    text = readme.read_text()
    assert "| vqa_accuracy | 0.6125 | 0.4375 | +0.1750 |" in text
    # The widget example's output is what this model answers (checked against the exported pipeline in the
    # remote-code test); here: three answers of the vocabulary, best first.
    (widget,) = metadata["widget"]
    assert widget["src"] == "examples/widget-0.png" and widget["text"] == QUESTION
    labels = [item["label"] for item in widget["output"]]
    scores = [item["score"] for item in widget["output"]]
    assert len(labels) == 3 and set(labels) <= set(ANSWERS) and scores == sorted(scores, reverse=True)
    assert exported.widget_examples[0].output == widget["output"]


def test_model_card_check_finds_problems(exported, tmp_path):
    text = (exported.output_dir / "README.md").read_text()
    broken = text.replace("library_name: transformers", "library_name: timm").replace("- custom_code\n", "")
    broken = re.sub(r"score: (\S+)", r"score: '\1'", broken.replace("## Limitations", "## Caveats"), count=1)
    path = tmp_path / "README.md"
    path.write_text(broken)
    problems = check_model_card(path)
    assert "library_name must be transformers" in problems
    assert "tag 'custom_code' is missing" in problems
    assert "section '## Limitations' is missing" in problems
    assert "widget[0].output must be a list of {label, score}" in problems
    path.write_text("---\nwidget: [unclosed\n---\n# card\n")
    assert check_model_card(path)[0].startswith("metadata does not parse")


def test_knowledge_repo_export_and_pinned_push(trained, workdir, eval_json):
    from datasets import load_dataset

    from tests.test_push import RecordingHubApi
    from training.push import push_to_hub

    result = _export(trained, workdir / "split" / "reavl-vqa", eval_json, knowledge_repo_id="reavl-org/reavl-kb")
    model_dir, knowledge_dir = result.output_dir, result.knowledge_dir
    assert knowledge_dir == knowledge_folder_for(model_dir) and knowledge_dir.name == "reavl-vqa-knowledge"
    assert set(result.files) == {name for name in EXPECTED_FILES if not name.startswith("knowledge/")}
    assert set(file_hashes(knowledge_dir)) == {
        "README.md", "index.faiss", "knowledge_config.json", "data/train-00000-of-00001.parquet"
    }
    assert _absolute_path_hits(model_dir, [str(workdir)]) + _absolute_path_hits(knowledge_dir, [str(workdir)]) == []
    settings = json.loads((model_dir / "processor_config.json").read_text())
    assert settings["knowledge_repo_id"] == "reavl-org/reavl-kb"
    assert settings["knowledge_revision"] == KNOWLEDGE_REVISION_PLACEHOLDER and settings["knowledge_path"] is None
    assert "reavl-org/reavl-kb" in _card_metadata(model_dir / "README.md")["datasets"]

    # The dataset folder is a dataset repo: its card's configs/data_files let `load_dataset` read it as is.
    card = _card_metadata(knowledge_dir / "README.md")
    assert card["configs"][0]["data_files"][0]["split"] == "train"
    entries = load_dataset(str(knowledge_dir), split="train")
    assert entries["id"] == [entry["id"] for entry in KNOWLEDGE_BASE]

    api = RecordingHubApi()
    push = push_to_hub(model_dir, "reavl-org/reavl-vqa", api=api)
    pinned = json.loads(api.uploads["reavl-org/reavl-vqa"]["processor_config.json"])
    assert pinned["knowledge_revision"] == push.commits["reavl-org/reavl-kb"]
    assert set(api.uploads["reavl-org/reavl-kb"]) == set(file_hashes(knowledge_dir))


def _usage_snippets(readme: str) -> list[str]:
    usage = readme.split("## Usage", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", usage, flags=re.S)


REMOTE_CODE_CHECK = r"""
import contextlib, io, json
import torch
from PIL import Image
from transformers import (AutoConfig, AutoModel, AutoModelForPreTraining, AutoModelForVisualQuestionAnswering,
                          AutoProcessor)

folder = json.load(open("paths.json"))["export"]
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
images = [Image.open("examples/widget-0.png").convert("RGB"), Image.open("second.png").convert("RGB")]
inputs = processor(images=images, text=TEXTS, padding=True, truncation=True, return_tensors="pt")
result = {"config_class": type(config).__name__, "processor_class": type(processor).__name__,
          "custom_pipelines": config.custom_pipelines, "input_ids": inputs["input_ids"].tolist(),
          "pixel_sum": inputs["pixel_values"].sum().item(), "retriever_ids": processor.retriever.ids}
with torch.no_grad():
    for name, auto_class in (("base", AutoModel), ("vqa", AutoModelForVisualQuestionAnswering)):
        model = auto_class.from_pretrained(folder, trust_remote_code=True)
        model.set_retriever(processor.retriever)
        outputs = model(**inputs)
        result[name] = {"class": type(model).__name__, "knowledge_indices": outputs.knowledge_indices.tolist(),
                        "knowledge_gates": outputs.knowledge_gates.tolist()}
        result[name]["values"] = (outputs.logits if name == "vqa" else outputs.last_hidden_state[:, 0]).tolist()
    pretraining = AutoModelForPreTraining.from_pretrained(folder, trust_remote_code=True)
    outputs = pretraining(**inputs, compute_itm=False)
    result["pretraining"] = {"class": type(pretraining).__name__, "values": outputs.logits_per_image.tolist()}

printed = []
for snippet in json.load(open("paths.json"))["snippets"]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(compile(snippet, "README.md", "exec"), {"__name__": "__main__"})
    printed.append(buffer.getvalue())
result["snippet_output"] = printed
emit(result)
"""


def test_remote_code_loads_and_matches_in_process(exported, trained, tmp_path):
    from modeling_reavl import ReavlForPreTraining, ReavlForQuestionAnswering, ReavlModel
    from processing.processing_reavl import ReavlProcessor

    folder = exported.output_dir
    readme = (folder / "README.md").read_text()
    snippets = [snippet.replace(REPO_ID_PLACEHOLDER, str(folder)) for snippet in _usage_snippets(readme)]
    assert len(snippets) == 2 and all(str(folder) in snippet for snippet in snippets)
    shutil.copytree(folder / "examples", tmp_path / "examples")
    make_image(2).save(tmp_path / "second.png")
    (tmp_path / "paths.json").write_text(json.dumps({"export": str(folder), "snippets": snippets}))
    remote = run_isolated_json(REMOTE_CODE_CHECK.replace("TEXTS", repr(TEXTS)), cwd=tmp_path, timeout=240)

    processor = ReavlProcessor.from_pretrained(trained)
    images = [Image.open(tmp_path / "examples/widget-0.png").convert("RGB"), make_image(2)]
    inputs = processor(images=images, text=TEXTS, padding=True, truncation=True, return_tensors="pt")
    assert remote["config_class"] == "ReavlConfig" and remote["processor_class"] == "ReavlProcessor"
    assert remote["custom_pipelines"]["knowledge-vqa"]["impl"] == "pipeline_reavl.KnowledgeVQAPipeline"
    assert remote["input_ids"] == inputs["input_ids"].tolist()
    assert remote["pixel_sum"] == pytest.approx(inputs["pixel_values"].sum().item(), abs=1e-3)
    assert remote["retriever_ids"] == [entry["id"] for entry in KNOWLEDGE_BASE]
    with torch.no_grad():
        for name, model_class in (("base", ReavlModel), ("vqa", ReavlForQuestionAnswering)):
            model = model_class.from_pretrained(trained).eval()
            model.set_retriever(processor.retriever)
            outputs = model(**inputs)
            expected = outputs.logits if name == "vqa" else outputs.last_hidden_state[:, 0]
            assert remote[name]["class"] == model_class.__name__
            assert remote[name]["knowledge_indices"] == outputs.knowledge_indices.tolist()
            torch.testing.assert_close(torch.tensor(remote[name]["knowledge_gates"]), outputs.knowledge_gates)
            torch.testing.assert_close(torch.tensor(remote[name]["values"]), expected)
        pretraining = ReavlForPreTraining.from_pretrained(trained).eval()
        expected = pretraining(**inputs, compute_itm=False).logits_per_image
    assert remote["pretraining"]["class"] == "ReavlForPreTraining"
    torch.testing.assert_close(torch.tensor(remote["pretraining"]["values"]), expected)

    # The card's usage snippets ran against the export and printed this model's answers and evidence.
    pipeline_output, auto_output = remote["snippet_output"]
    widget_output = _card_metadata(folder / "README.md")["widget"][0]["output"]
    first_line = pipeline_output.splitlines()[0]
    assert first_line == f"{widget_output[0]['label']}: {widget_output[0]['score']:.3f}"
    titles = {entry["title"] for entry in KNOWLEDGE_BASE}
    assert any(line.split(" ", 1)[1].rsplit(" ", 2)[0] in titles for line in pipeline_output.splitlines()[3:])
    assert auto_output.splitlines()[0] == widget_output[0]["label"]
