"""`reavl export`: turn a trained REAVL folder into the folder that is pushed to the Hub (DESIGN.md section 6).

```
reavl export --model runs/vqa/final --output out/reavl-vqa                                   # knowledge inline
reavl export --model runs/vqa/final --output out/reavl-vqa --knowledge-repo-id my-org/reavl-kb
reavl export --model runs/vqa/final --output out/reavl-vqa --eval-json runs/vqa/eval.json \
    --widget-image flag.png --widget-question "Which language is spoken in this country?"
```

The input folder holds what `save_pretrained` of a REAVL head and of its `ReavlProcessor` write, with the
knowledge index the processor points to (`knowledge/` by default, built by `reavl build-index`, written by
`reavl pretrain` / `reavl finetune`). The output folder:

```
config.json              auto_map for every Auto class, custom_pipelines (the head's REAVL pipeline)
model.safetensors
configuration_reavl.py  modeling_reavl.py                      model code (remote code)
processor_config.json  tokenizer.json  tokenizer_config.json  processor + image processor + tokenizer settings
processing_reavl.py  retrieval_reavl.py  pipeline_reavl.py      processor, retriever and pipeline code
handler.py               Inference Endpoints custom handler
README.md                model card rendered from MODEL_CARD.md (metadata, usage, evaluation, limitations)
examples/widget-*.png    the widget's images (their outputs, in README.md, were computed by this model)
knowledge/               the knowledge index (inline mode)
```

With `--knowledge-repo-id ORG/NAME` the index goes instead to a second folder, `<output>-knowledge/` (a dataset
repo: `data/*.parquet` with `configs`/`data_files` in its card, `index.faiss`, `knowledge_config.json`), and the
processor names the dataset: `knowledge_repo_id` = ORG/NAME and `knowledge_revision` =
`KNOWLEDGE_REVISION_PLACEHOLDER`. The placeholder is resolved at push time: `reavl push` uploads the dataset first
and uploads `processor_config.json` with `knowledge_revision` set to that commit's sha, so a published model always
loads the index it was exported with. Likewise the README's usage snippets name `REPO_ID_PLACEHOLDER` and its widget
images by relative path; `reavl push` fills in the repo id and the image URLs. The local folders are never changed
after the export.

Guarantees: no absolute path in any written file (checked before the folder is published); deterministic (the same
input gives the same bytes); atomic (everything is written into a temporary sibling and renamed into place, so an
interrupted export leaves no partial folder under the target name).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODEL_CARD_TEMPLATE = PROJECT_ROOT / "MODEL_CARD.md"
# Copied from modeling_reavl/ next to the model code. The handler serves the head's REAVL pipeline, so it ships only
# with heads that have one (question answering, entity linking).
LIBRARY_FILES = ("pipeline_reavl.py",)
HANDLER_FILE = "handler.py"

REPO_ID_PLACEHOLDER = "your-username/your-reavl-model"
KNOWLEDGE_REVISION_PLACEHOLDER = "set-by-reavl-push"
KNOWLEDGE_FOLDER_SUFFIX = "-knowledge"
BUILD_INDEX_HINT = "reavl build-index --model {model} --knowledge KB.jsonl --output {index}"

# Hub pipeline tag and card wording per head. Heads without a Hub task (entity linking, pair classification, the
# pre-training and base models) get no pipeline_tag.
PIPELINE_TAGS = {
    "ReavlForQuestionAnswering": "visual-question-answering",
    "ReavlForImageTextRetrieval": "zero-shot-image-classification",
}
HEAD_DESCRIPTIONS = {
    "ReavlModel": "base (fused features)",
    "ReavlForPreTraining": "pre-training",
    "ReavlForQuestionAnswering": "knowledge-based visual question answering",
    "ReavlForEntityLinking": "multimodal entity linking",
    "ReavlForImageTextRetrieval": "image-text retrieval",
    "ReavlForImageTextClassification": "image-text pair classification",
}
EVALUATION_TASK_TYPES = {
    "ReavlForQuestionAnswering": "visual-question-answering",
    "ReavlForEntityLinking": "multimodal-entity-linking",
    "ReavlForImageTextRetrieval": "image-text-retrieval",
    "ReavlForImageTextClassification": "image-text-classification",
}


class ExportError(ValueError):
    """The input cannot be exported; the message names what is missing and how to produce it."""


# --------------------------------------------------------------------------------------------------------------------
# Layout helpers (also used by `reavl push`)
# --------------------------------------------------------------------------------------------------------------------


def knowledge_folder_for(export_dir: str | Path) -> Path:
    """Where `export_model(..., knowledge_repo_id=...)` writes the dataset folder: `<export_dir>-knowledge`."""
    export_dir = Path(export_dir)
    return export_dir.with_name(export_dir.name + KNOWLEDGE_FOLDER_SUFFIX)


@dataclass
class ExportLayout:
    """What an exported folder says about itself (read from its files, no model loaded)."""

    architecture: str
    knowledge_repo_id: str | None
    knowledge_revision: str | None


def read_export_layout(export_dir: str | Path) -> ExportLayout:
    """Read an exported folder's head and knowledge mode; raise if it is not a complete export."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise FileNotFoundError(f"{export_dir} does not exist; write it with `reavl export`")
    required = ("config.json", "model.safetensors", "processor_config.json", "README.md", "modeling_reavl.py")
    missing = [name for name in required if not (export_dir / name).is_file()]
    if missing:
        raise ValueError(
            f"{export_dir} is not a complete REAVL export (missing {', '.join(missing)}); re-run reavl export"
        )
    config = json.loads((export_dir / "config.json").read_text(encoding="utf-8"))
    settings = json.loads((export_dir / "processor_config.json").read_text(encoding="utf-8"))
    repo_id = settings.get("knowledge_repo_id")
    inline_index = export_dir / "knowledge" / "index.faiss"
    if repo_id is None and config.get("num_knowledge", 0) > 0 and not inline_index.is_file():
        raise ValueError(f"{export_dir} has neither knowledge/ nor a knowledge_repo_id; re-run reavl export")
    return ExportLayout(
        architecture=(config.get("architectures") or ["ReavlModel"])[0],
        knowledge_repo_id=repo_id,
        knowledge_revision=settings.get("knowledge_revision"),
    )


# --------------------------------------------------------------------------------------------------------------------
# Loading and checking the input folder
# --------------------------------------------------------------------------------------------------------------------


def load_model_and_processor(model_dir: str | Path):
    """(model of the saved head, ReavlProcessor with its retriever attached to the model) from a trained folder.

    Raises:
        ExportError: the folder has no model, no processor, no knowledge index, or an index embedded by another
            knowledge encoder; the message says how to produce what is missing.
    """
    import modeling_reavl
    from processing.processing_reavl import ReavlProcessor

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ExportError(
            f"{model_dir} has no config.json: it is not a saved REAVL model folder (write one with "
            "`reavl finetune` / `reavl pretrain`, or model.save_pretrained(folder))"
        )
    config = modeling_reavl.ReavlConfig.from_pretrained(model_dir)
    architecture = (config.architectures or ["ReavlModel"])[0]
    model_class = getattr(modeling_reavl, architecture, None)
    if model_class is None:
        raise ExportError(
            f"{model_dir}/config.json names the architecture {architecture!r}, which is not a REAVL class"
        )
    if not (model_dir / "processor_config.json").is_file():
        raise ExportError(
            f"{model_dir} has no processor (processor_config.json and tokenizer files): save the ReavlProcessor the "
            "model was trained with into it, processor.save_pretrained(folder) (reavl finetune and reavl pretrain "
            "do this)"
        )
    processor = ReavlProcessor.from_pretrained(model_dir)
    model = model_class.from_pretrained(model_dir)
    model.eval()
    if config.num_knowledge > 0:
        index_dir = _local_index_dir(model_dir, processor)
        hint = BUILD_INDEX_HINT.format(model=model_dir, index=index_dir)
        if not (index_dir / "index.faiss").is_file() or not (index_dir / "knowledge_config.json").is_file():
            raise ExportError(
                f"{model_dir} has no knowledge index at {index_dir} (index.faiss, knowledge_config.json, data/): "
                f"build it with `{hint}`"
            )
        try:
            retriever = processor.retriever
            model.set_retriever(retriever)
        except (ValueError, FileNotFoundError) as error:  # inconsistent or partial index, or another encoder's
            raise ExportError(
                f"the knowledge index at {index_dir} cannot serve this model: {error}. Rebuild it with this model's "
                f"knowledge encoder: `{hint}`"
            ) from None
    return model, processor


def _local_index_dir(model_dir: Path, processor) -> Path:
    if getattr(processor, "knowledge_repo_id", None):
        raise ExportError(
            f"the processor in {model_dir} reads its knowledge from the Hub dataset {processor.knowledge_repo_id}; "
            "export (and reavl ask) need a local index folder: attach one with processor.set_knowledge(folder) and "
            "save the processor again"
        )
    return model_dir / (getattr(processor, "knowledge_path", None) or "knowledge")


# --------------------------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class WidgetExample:
    """A widget example: an image and its question (or sentence, or candidate labels); `output` is filled in by
    running the model at export time."""

    image: Any  # a path or a PIL image
    text: str
    title: str | None = None
    mention: str | None = None
    candidate_labels: list[str] | None = None
    output: list[dict[str, Any]] = field(default_factory=list)


def _round(value: float) -> float:
    return float(f"{value:.4f}")


def _run_widget_examples(model, processor, examples: list[WidgetExample], architecture: str) -> None:
    """Fill each example's `output` by running this model on it (top answers / labels with scores)."""
    from modeling_reavl.pipeline_reavl import EntityLinkingPipeline, KnowledgeVQAPipeline

    if not examples:
        return
    if architecture == "ReavlForQuestionAnswering":
        pipe = KnowledgeVQAPipeline(model=model, processor=processor, device=-1)
        for example in examples:
            result = pipe(_open_image(example.image), example.text, top_k=3)
            example.output = [{"label": item["answer"], "score": _round(item["score"])} for item in result["answers"]]
    elif architecture == "ReavlForEntityLinking":
        pipe = EntityLinkingPipeline(model=model, processor=processor, device=-1)
        for example in examples:
            ranked = pipe(_open_image(example.image), example.text, mention=example.mention, top_k=3)
            example.output = [{"label": item["title"], "score": _round(item["score"])} for item in ranked]
    elif architecture == "ReavlForImageTextRetrieval":
        from transformers import ZeroShotImageClassificationPipeline

        pipe = ZeroShotImageClassificationPipeline(
            model=model, tokenizer=processor.tokenizer, image_processor=processor.image_processor, device=-1
        )
        for example in examples:
            labels = example.candidate_labels or [example.text]
            ranked = pipe(_open_image(example.image), candidate_labels=labels)
            example.output = [{"label": item["label"], "score": _round(item["score"])} for item in ranked[:3]]


def _open_image(image):
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    return image.convert("RGB")


NON_METRIC_KEYS = ("loss",)  # reported by `reavl evaluate` next to the metrics, not a quality measure


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _evaluation(eval_json: str | Path | None, architecture: str):
    """(table rows, EvalResults, task, dataset name) from the JSON `reavl evaluate --json` writes:
    `{"task": ..., "data": ..., "split": ..., "full": {metric: value, "timing": {...}}, "no_knowledge": {...}}`.

    Only the base name of `data` reaches the card (the JSON holds local paths)."""
    from huggingface_hub import EvalResult

    if eval_json is None:
        return [], None, None, None
    path = Path(eval_json)
    if not path.is_file():
        raise ExportError(f"evaluation JSON {path} does not exist; write it with `reavl evaluate ... --json {path}`")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ExportError(f"evaluation JSON {path} is not valid JSON ({error})") from None
    if not isinstance(report, dict) or not isinstance(report.get("full"), dict) or not report["full"]:
        raise ExportError(
            f'evaluation JSON {path} must hold {{"task": ..., "full": {{metric: value}}, "no_knowledge": {{...}}}}'
        )
    ablation = report.get("no_knowledge") or {}
    task = str(report.get("task") or architecture)
    dataset_name = Path(str(report.get("dataset") or report.get("data") or "evaluation set")).name
    task_type = EVALUATION_TASK_TYPES.get(architecture, task)
    rows, results = [], []
    for metric in sorted(report["full"]):
        full, without = report["full"][metric], ablation.get(metric)
        if metric in NON_METRIC_KEYS or not _is_number(full):
            continue
        has_ablation = _is_number(without)
        rows.append(
            {
                "metric": metric,
                "full": f"{full:.4f}",
                "no_knowledge": f"{without:.4f}" if has_ablation else "n/a",
                "difference": f"{full - without:+.4f}" if has_ablation else "n/a",
            }
        )
        common = dict(task_type=task_type, task_name=task, dataset_type="custom", dataset_name=dataset_name,
                      dataset_split=report.get("split"), metric_type=metric)
        results.append(EvalResult(**common, metric_value=_round(full), metric_name=f"{metric} (full model)"))
        if has_ablation:
            results.append(EvalResult(**common, metric_value=_round(without), metric_name=f"{metric} (no knowledge)",
                                      metric_config="no_knowledge"))
    if not rows:
        raise ExportError(f"evaluation JSON {path} has no numeric metric under 'full'")
    return rows, results, task, dataset_name


def render_model_card(
    model,
    processor,
    architecture: str,
    knowledge_info: dict[str, Any],
    widget_examples: list[WidgetExample],
    widget_paths: list[str],
    eval_json: str | Path | None = None,
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
    training_data: str | None = None,
    model_title: str = "REAVL",
    template_path: str | Path | None = None,
) -> str:
    """README.md text: MODEL_CARD.md rendered with `ModelCard.from_template` and `ModelCardData`."""
    import transformers
    from huggingface_hub import ModelCard, ModelCardData

    from modeling_reavl.pipeline_reavl import PIPELINES_BY_ARCHITECTURE

    config = model.config
    rows, eval_results, evaluation_task, evaluation_dataset = _evaluation(eval_json, architecture)
    pipeline_task = PIPELINES_BY_ARCHITECTURE.get(architecture, (None,))[0]
    if architecture == "ReavlForImageTextRetrieval":
        pipeline_task = "zero-shot-image-classification"
    widget = []
    # The Hub renders widgets for its own tasks only: heads without a pipeline tag keep the examples for the usage
    # snippet but get no widget metadata.
    for example, path in zip(widget_examples if PIPELINE_TAGS.get(architecture) else [], widget_paths):
        entry: dict[str, Any] = {"src": path}
        if example.candidate_labels:
            entry["candidate_labels"] = ", ".join(example.candidate_labels)
        else:
            entry["text"] = example.text
        if example.title:
            entry["example_title"] = example.title
        entry["output"] = example.output
        widget.append(entry)
    dataset_ids = list(datasets or [])
    if knowledge_info.get("repo_id") and knowledge_info["repo_id"] not in dataset_ids:
        dataset_ids.append(knowledge_info["repo_id"])
    card_data = ModelCardData(
        library_name="transformers",
        license=license,
        pipeline_tag=PIPELINE_TAGS.get(architecture),
        tags=["reavl", "custom_code", "vision-language", "knowledge-retrieval", "retrieval-augmented"],
        datasets=dataset_ids or None,
        metrics=sorted({row["metric"] for row in rows}) or None,
        model_name=model_title if eval_results else None,
        eval_results=eval_results,
        widget=widget or None,
    )
    vision = config.vision_config
    image_size = getattr(vision, "image_size", "?")
    first = widget_examples[0] if widget_examples else None
    template = Path(template_path) if template_path is not None else MODEL_CARD_TEMPLATE
    if not template.is_file():
        raise ExportError(f"model card template {template} not found (MODEL_CARD.md at the project root)")
    card = ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_title=model_title,
        repo_id=REPO_ID_PLACEHOLDER,
        transformers_version=transformers.__version__,
        architecture=architecture,
        head_description=HEAD_DESCRIPTIONS.get(architecture, architecture),
        pipeline_task=pipeline_task,
        vision_model_type=vision.model_type,
        image_size=image_size,
        text_model_type=config.text_config.model_type,
        knowledge_encoder=(
            "the text tower" if config.knowledge_config is None else f"`{config.knowledge_config.model_type}`"
        ),
        num_fusion_layers=config.num_fusion_layers,
        num_knowledge=config.num_knowledge,
        retrieval_dim=config.retrieval_dim,
        num_labels=config.num_labels,
        num_parameters=f"{model.num_parameters():,}",
        knowledge_mode="inline" if not knowledge_info.get("repo_id") else "repo",
        knowledge_repo_id=knowledge_info.get("repo_id"),
        knowledge_rows=knowledge_info.get("rows", "?"),
        index_factory=knowledge_info.get("factory", "?"),
        encoder_fingerprint=knowledge_info.get("fingerprint", "?"),
        example_image=widget_paths[0] if widget_paths else "image.png",
        example_question=(first.text if first else "What is shown in this image?").replace('"', "'"),
        example_mention=(first.mention or "") if first else "",
        example_labels=json.dumps(first.candidate_labels if first and first.candidate_labels else ["a photo"]),
        training_data=training_data or "Not recorded at export time (pass `--training-data` to `reavl export`).",
        evaluation_rows=rows,
        evaluation_task=evaluation_task,
        evaluation_dataset=evaluation_dataset,
    )
    return str(card)


REQUIRED_CARD_SECTIONS = ("## Usage", "## Training data", "## Evaluation", "## Limitations", "## Citation")
HUB_PIPELINE_TAGS = {"visual-question-answering", "zero-shot-image-classification", "image-text-to-text",
                     "feature-extraction", "image-classification"}


def check_model_card(readme: str | Path) -> list[str]:
    """Offline checks in the spirit of `ModelCard.validate` (which needs the network): the metadata parses,
    survives a YAML round trip and a `ModelCardData` re-parse (model-index included), carries the keys the Hub
    reads, its widget examples are well formed, and the body has every section. Returns the problems found."""
    from huggingface_hub import ModelCard, ModelCardData

    path = Path(readme)
    problems = []
    try:
        card = ModelCard.load(path)
    except Exception as error:  # a broken YAML block
        return [f"metadata does not parse: {error}"]
    data = card.data.to_dict()
    if yaml.safe_load(card.data.to_yaml()) != data:
        problems.append("metadata does not survive a YAML round trip")
    try:
        ModelCardData(**data)
    except ValueError as error:
        problems.append(f"ModelCardData rejects the metadata: {error}")
    if data.get("library_name") != "transformers":
        problems.append("library_name must be transformers")
    if not data.get("license"):
        problems.append("license is missing")
    tags = data.get("tags") or []
    problems += [f"tag {tag!r} is missing" for tag in ("custom_code", "reavl") if tag not in tags]
    tag = data.get("pipeline_tag")
    if tag is not None and tag not in HUB_PIPELINE_TAGS:
        problems.append(f"pipeline_tag {tag!r} is not a Hub task this model serves")
    for position, example in enumerate(data.get("widget") or []):
        if not isinstance(example, dict) or not example.get("src"):
            problems.append(f"widget[{position}] has no src")
            continue
        if not (example.get("text") or example.get("candidate_labels")):
            problems.append(f"widget[{position}] has neither text nor candidate_labels")
        output = example.get("output")
        if not isinstance(output, list) or not all(
            isinstance(item, dict) and isinstance(item.get("label"), str) and isinstance(item.get("score"), float)
            for item in output
        ):
            problems.append(f"widget[{position}].output must be a list of {{label, score}}")
    body = card.text
    problems += [f"section {section!r} is missing" for section in REQUIRED_CARD_SECTIONS if section not in body]
    if "{{" in body or "{%" in body:
        problems.append("unrendered template placeholders remain")
    return problems


# --------------------------------------------------------------------------------------------------------------------
# Knowledge
# --------------------------------------------------------------------------------------------------------------------


def _read_knowledge_info(index_dir: Path) -> dict[str, Any]:
    """What the card says about the index, from its `knowledge_config.json`."""
    settings = json.loads((index_dir / "knowledge_config.json").read_text(encoding="utf-8"))
    return {
        "rows": settings.get("num_rows", "?"),
        "factory": settings.get("index_factory", "?"),
        "fingerprint": settings.get("encoder_fingerprint", "?"),
    }


def _set_processor_knowledge(processor_config: Path, repo_id: str) -> None:
    """Point the exported processor at the dataset repo, with the revision placeholder `reavl push` resolves."""
    settings = json.loads(processor_config.read_text(encoding="utf-8"))
    settings["knowledge_path"] = None  # no local index: the processor reads the dataset repo
    settings["knowledge_repo_id"] = repo_id
    settings["knowledge_revision"] = KNOWLEDGE_REVISION_PLACEHOLDER
    processor_config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    output_dir: Path
    knowledge_dir: Path | None
    files: list[str]
    widget_examples: list[WidgetExample]


def _forbidden_paths(*folders: Path) -> list[str]:
    paths = {str(Path.home()), os.getcwd()}
    for folder in folders:
        paths.update({str(folder), str(folder.resolve())})
    return sorted(path for path in paths if len(path) > 1)


def find_absolute_paths(folder: Path, forbidden: list[str]) -> list[str]:
    """`file: path` for every text file under `folder` that contains one of `forbidden`."""
    hits = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # weights, parquet, faiss, PNG
        hits += [f"{path.relative_to(folder)}: {needle}" for needle in forbidden if needle in text]
    return hits


def _copy_library_files(destination: Path, architecture: str) -> None:
    from modeling_reavl.pipeline_reavl import PIPELINES_BY_ARCHITECTURE

    source = Path(__import__("modeling_reavl").__file__).parent
    names = LIBRARY_FILES + ((HANDLER_FILE,) if architecture in PIPELINES_BY_ARCHITECTURE else ())
    for name in names:
        shutil.copyfile(source / name, destination / name)


def _write_export(
    model,
    processor,
    architecture: str,
    index_dir: Path | None,
    model_tmp: Path,
    knowledge_tmp: Path | None,
    knowledge_repo_id: str | None,
    widget_examples: list[WidgetExample],
    card_options: dict[str, Any],
) -> None:
    from modeling_reavl.pipeline_reavl import custom_pipelines_config

    model.config.custom_pipelines = custom_pipelines_config(architecture)
    model.save_pretrained(model_tmp)
    processor.save_pretrained(model_tmp)
    _copy_library_files(model_tmp, architecture)

    knowledge_info: dict[str, Any] = {}
    if index_dir is not None:
        knowledge_info = _read_knowledge_info(index_dir)
        if knowledge_repo_id is not None:
            knowledge_info["repo_id"] = knowledge_repo_id
            inline = model_tmp / "knowledge"
            if inline.exists():
                shutil.rmtree(inline)
            # The index folder is already a dataset repo: Parquet shards, index.faiss, knowledge_config.json and a
            # dataset card whose `configs`/`data_files` metadata `load_dataset` reads (ReavlRetriever.save).
            shutil.copytree(index_dir, knowledge_tmp, dirs_exist_ok=True)
            _set_processor_knowledge(model_tmp / "processor_config.json", knowledge_repo_id)
        elif not (model_tmp / "knowledge" / "index.faiss").is_file():
            shutil.copytree(index_dir, model_tmp / "knowledge", dirs_exist_ok=True)

    widget_paths = []
    if widget_examples:
        (model_tmp / "examples").mkdir()
        for position, example in enumerate(widget_examples):
            relative = f"examples/widget-{position}.png"
            _open_image(example.image).save(model_tmp / relative, format="PNG")
            widget_paths.append(relative)
        _run_widget_examples(model, processor, widget_examples, architecture)
    readme = render_model_card(
        model, processor, architecture, knowledge_info, widget_examples, widget_paths, **card_options
    )
    (model_tmp / "README.md").write_text(readme, encoding="utf-8")
    problems = check_model_card(model_tmp / "README.md")
    if problems:
        raise ExportError("the rendered model card is invalid: " + "; ".join(problems))


def _publish(tmp: Path, target: Path, overwrite: bool) -> None:
    """Move a finished temporary folder to `target` with renames only (the old folder goes last)."""
    if not target.exists():
        tmp.rename(target)
        return
    if not overwrite:
        raise ExportError(f"{target} already exists; pass --overwrite to replace it")
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    trash.rmdir()
    target.rename(trash)
    try:
        tmp.rename(target)
    except BaseException:
        trash.rename(target)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def export_model(
    model_dir: str | Path,
    output_dir: str | Path,
    *,
    knowledge: str = "inline",
    knowledge_repo_id: str | None = None,
    eval_json: str | Path | None = None,
    widget_examples: list[WidgetExample | dict] | None = None,
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
    training_data: str | None = None,
    model_title: str | None = None,
    overwrite: bool = False,
    template_path: str | Path | None = None,
) -> ExportResult:
    """Write the Hub repo folder for the trained folder `model_dir` (see the module docstring).

    Args:
        model_dir: a saved REAVL head with its processor and knowledge index.
        output_dir: the repo folder to write; with `knowledge_repo_id`, `<output_dir>-knowledge` is written too.
        knowledge: `"inline"` (the index in `knowledge/`); ignored when `knowledge_repo_id` is given.
        knowledge_repo_id: publish the index as this dataset repo instead (`ORG/NAME`).
        eval_json: the evaluation JSON of `reavl evaluate` (full model and no-knowledge ablation) for the card.
        widget_examples: [`WidgetExample`]s (or dicts with `image`, `text`/`question`, `title`, ...) whose outputs
            are computed by this model and stored in the card's widget metadata.
        license, datasets, training_data, model_title: card metadata and text.
        overwrite: replace an existing `output_dir` (atomically: the old folder is removed after the new one is in
            place).
        template_path: the card template (default: `MODEL_CARD.md` at the project root).

    Raises:
        ExportError: bad input (see [`load_model_and_processor`]), an existing output, an invalid card, or an
            absolute path that would leak into the export.
    """
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    if knowledge not in ("inline",) and knowledge_repo_id is None:
        raise ExportError(f"knowledge must be 'inline' or a --knowledge-repo-id must be given, got {knowledge!r}")
    if knowledge_repo_id is not None and knowledge_repo_id.count("/") != 1:
        raise ExportError(f"knowledge repo id must look like ORG/NAME, got {knowledge_repo_id!r}")
    targets = [output_dir] + ([knowledge_folder_for(output_dir)] if knowledge_repo_id else [])
    existing = [str(target) for target in targets if target.exists()]
    if existing and not overwrite:
        raise ExportError(f"{', '.join(existing)} already exists; pass --overwrite to replace it")
    examples = [
        example if isinstance(example, WidgetExample) else _widget_from_dict(example)
        for example in widget_examples or []
    ]

    model, processor = load_model_and_processor(model_dir)
    architecture = type(model).__name__
    index_dir = _local_index_dir(model_dir, processor) if model.config.num_knowledge > 0 else None
    card_options = dict(
        eval_json=eval_json, license=license, datasets=datasets, training_data=training_data,
        model_title=model_title or f"REAVL {HEAD_DESCRIPTIONS.get(architecture, architecture)}",
        template_path=template_path,
    )

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    temporaries = [Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent)) for target in targets]
    try:
        model_tmp = temporaries[0]
        knowledge_tmp = temporaries[1] if knowledge_repo_id else None
        _write_export(model, processor, architecture, index_dir, model_tmp, knowledge_tmp, knowledge_repo_id,
                      examples, card_options)
        forbidden = _forbidden_paths(model_dir, output_dir, *temporaries)
        leaks = [hit for folder in temporaries for hit in find_absolute_paths(folder, forbidden)]
        if leaks:
            raise ExportError("absolute paths would be written into the export: " + "; ".join(leaks))
        for tmp, target in zip(reversed(temporaries), reversed(targets)):  # the model folder last
            _publish(tmp, target, overwrite)
    finally:
        for tmp in temporaries:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(path.relative_to(output_dir).as_posix() for path in output_dir.rglob("*") if path.is_file())
    return ExportResult(output_dir, targets[1] if knowledge_repo_id else None, files, examples)


def _widget_from_dict(example: dict) -> WidgetExample:
    text = example.get("text", example.get("question", example.get("sentence")))
    if example.get("image") is None or not (text or example.get("candidate_labels")):
        raise ExportError(f"a widget example needs an image and a question/sentence, got keys {sorted(example)}")
    return WidgetExample(
        image=example["image"], text=text or "", title=example.get("title"), mention=example.get("mention"),
        candidate_labels=example.get("candidate_labels"),
    )


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reavl export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="trained folder (model + processor + knowledge/)")
    parser.add_argument("--output", required=True, type=Path, help="repo folder to write")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--knowledge", choices=["inline"], default="inline", help="ship the index in knowledge/")
    group.add_argument("--knowledge-repo-id", help="ship the index as this dataset repo (writes <output>-knowledge/)")
    parser.add_argument("--eval-json", type=Path, help="evaluation JSON written by reavl evaluate")
    parser.add_argument("--widget-image", type=Path, action="append", default=[], help="widget image (repeatable)")
    parser.add_argument("--widget-question", action="append", default=[], help="its question or sentence (repeatable)")
    parser.add_argument("--widget-mention", action="append", default=[], help="its mention (entity linking)")
    parser.add_argument("--license", default="apache-2.0")
    parser.add_argument("--dataset", action="append", default=[], help="Hub id of a training dataset (repeatable)")
    parser.add_argument("--training-data", help="a paragraph on the training data for the card")
    parser.add_argument("--title", help="model title in the card")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if len(args.widget_image) != len(args.widget_question):
        print("reavl export: give one --widget-question per --widget-image", file=sys.stderr)
        return 2
    mentions = args.widget_mention + [None] * (len(args.widget_image) - len(args.widget_mention))
    examples = [
        WidgetExample(image=image, text=question, title=f"Example {position + 1}", mention=mention)
        for position, (image, question, mention) in enumerate(zip(args.widget_image, args.widget_question, mentions))
    ]
    try:
        result = export_model(
            args.model, args.output, knowledge=args.knowledge, knowledge_repo_id=args.knowledge_repo_id,
            eval_json=args.eval_json, widget_examples=examples, license=args.license, datasets=args.dataset or None,
            training_data=args.training_data, model_title=args.title, overwrite=args.overwrite,
        )
    except ExportError as error:
        print(f"reavl export: {error}", file=sys.stderr)
        return 1
    if args.json:
        knowledge = str(result.knowledge_dir) if result.knowledge_dir else None
        print(json.dumps({"output": str(result.output_dir), "knowledge": knowledge, "files": result.files}, indent=2))
        return 0
    print(f"exported {args.model} -> {result.output_dir} ({len(result.files)} files)")
    if result.knowledge_dir is not None:
        print(f"knowledge dataset folder: {result.knowledge_dir} "
              f"(push both with `reavl push {result.output_dir} --repo-id ORG/NAME`)")
    if not examples:
        print("no widget example given (--widget-image/--widget-question): the card has no widget")
    return 0


if __name__ == "__main__":
    sys.exit(main())
