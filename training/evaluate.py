"""`reavl evaluate`: every metric of a task for a REAVL model, with the no-knowledge ablation beside it.

    reavl evaluate --task vqa --model runs/vqa --data world/vqa_test.json --json results/vqa.json --ablation
    reavl evaluate --task entity-linking --model runs/wikimel --data ../shared/data/wikimel --split test --ablation

or in Python: `evaluate_model("vqa", "runs/vqa", "world/vqa_test.json", ablation=True) -> dict`.

The model folder holds the task model and its processor (with `knowledge/`), as `reavl finetune` saves them. The
ablation runs the same weights with `use_knowledge=False` (for entity linking: the same retrieved candidates, each
given by its title alone and scored without the retrieval score, the mention read without the entries' tokens).
Image-text retrieval uses no knowledge (ITC), so it has no ablation. Evaluation runs through `Trainer.evaluate` with the collators and metrics of
`training.finetune`, so fine-tuning and evaluation score alike.

(This module is `training.evaluate`; `import evaluate` anywhere in the project still means the installed
`evaluate` package, because imports are absolute.)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .finetune import (
    _entity_linking_note,
    _without_retriever_order,
    build_collator,
    build_compute_metrics,
    evaluation_arguments,
    make_trainer,
    processor_retriever,
    task_model_class,
)
from .task_data import TASKS, ReadOptions, read_task_data


logger = logging.getLogger(__name__)

# Trainer bookkeeping, not metrics of the model.
_RUNTIME_KEYS = ("runtime", "samples_per_second", "steps_per_second", "epoch", "model_preparation_time")


def _strip(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
    """`eval_hits@1` -> `hits@1`, without Trainer's timing entries (kept under `timing`)."""
    result, timing = {}, {}
    for key, value in metrics.items():
        name = key[len(prefix) + 1 :] if key.startswith(prefix + "_") else key
        (timing if name in _RUNTIME_KEYS else result)[name] = value
    result["timing"] = timing
    return result


def evaluate_model(
    task: str,
    model_dir: str | Path,
    data_path: str | Path,
    ablation: bool = False,
    split: str | None = None,
    data_format: str | None = None,
    image_root: str | None = None,
    missing_images: str | None = None,
    on_invalid: str = "raise",
    verify_images: bool = True,
    max_samples: int | None = None,
    batch_size: int = 32,
    max_length: int = 64,
    num_candidates: int = 10,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Evaluate `model_dir` on `data_path` for `task`; with `ablation`, again with knowledge disabled.

    Returns:
        `{"task", "model", "data", "split", "num_examples", "skipped", "full": {metric: value, ..., "timing": {...}},
        "no_knowledge": same or None, "notes": [...]}`. Metric names are those of
        [`training.finetune.build_compute_metrics`] plus `loss`.
    """
    from processing.processing_reavl import ReavlProcessor

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    model_dir = Path(model_dir)
    processor = ReavlProcessor.from_pretrained(str(model_dir))
    model = task_model_class(task).from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    model.eval()
    notes: list[str] = []
    retriever = processor_retriever(processor) if task != "retrieval" else None
    if retriever is not None:
        retriever.check_compatible(model)
    if task == "entity-linking" and retriever is None:
        raise ValueError(f"{model_dir} has no knowledge index (knowledge/): entity linking ranks its entries")
    if task in ("vqa", "classification") and model.config.num_knowledge > 0:
        if retriever is None:
            notes.append(f"{model_dir} has no knowledge index: the full model runs without knowledge")
        else:
            model.set_retriever(retriever)

    id2label = {int(index): label for index, label in model.config.id2label.items()}
    labels = [id2label[index] for index in sorted(id2label)] if task == "classification" else None
    options = ReadOptions(image_root=image_root, format=data_format, on_invalid=on_invalid,
                          missing_images=missing_images, verify_images=verify_images, labels=labels,
                          knowledge_ids=retriever.ids if task == "entity-linking" else None)
    if split is None and task == "entity-linking":
        split = "test"
    dataset = read_task_data(task, data_path, split, options).select(max_samples)
    if task == "vqa":
        from .task_data import answer_vocabulary_coverage

        coverage = answer_vocabulary_coverage(dataset, {label: index for index, label in id2label.items()})
        if coverage["covered"] < 0.5:
            notes.append(f"the model's answer vocabulary covers only {coverage['covered']:.1%} of the questions")
    if task == "classification" and len(dataset[0]["images"]) != model.config.classification_num_images:
        raise ValueError(f"{data_path} has {len(dataset[0]['images'])} image(s) per example but the model takes "
                         f"{model.config.classification_num_images}")
    if task == "entity-linking":
        note = _entity_linking_note(num_candidates)
        if note:
            notes.append(note)
    label2id = {label: index for index, label in id2label.items()} if task == "vqa" else None
    compute_metrics = build_compute_metrics(task, dataset, id2label, retriever)

    runs = {"full": True, "no_knowledge": False} if ablation and task != "retrieval" else {"full": True}
    if ablation and task == "retrieval":
        notes.append("image-text retrieval uses no knowledge (ITC): no ablation")
    results: dict[str, Any] = {
        "task": task, "model": str(model_dir), "data": str(data_path), "split": split, "num_examples": len(dataset),
        "skipped": [list(item) for item in dataset.skipped], "full": None, "no_knowledge": None, "notes": notes,
    }
    with tempfile.TemporaryDirectory(prefix="reavl_evaluate_") as scratch:
        for name, use_knowledge in runs.items():
            collator = build_collator(task, processor, max_length, use_knowledge, label2id, labels or (), retriever)
            trainer = make_trainer(task, model, processor, evaluation_arguments(scratch, batch_size), collator,
                                   compute_metrics=compute_metrics, retriever=retriever,
                                   num_candidates=num_candidates)
            metrics = _strip(trainer.evaluate(dataset, metric_key_prefix="eval"), "eval")
            results[name] = metrics if use_knowledge else _without_retriever_order(metrics)
    return results


def format_table(results: dict[str, Any]) -> str:
    """The metrics as a text table: one row per metric, columns full model / no knowledge / difference."""
    full, ablation = results["full"], results.get("no_knowledge")
    names = [name for name in full if name != "timing"]
    header = ["metric", "full"] + (["no_knowledge", "difference"] if ablation else [])
    rows = []
    for name in names:
        row = [name, _fmt(full[name])]
        if ablation:
            other = ablation.get(name)
            difference = full[name] - other if isinstance(other, (int, float)) and isinstance(full[name], (int, float)) \
                else None
            row += [_fmt(other), _fmt(difference, signed=True)]
        rows.append(row)
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = [f"{results['task']} | {results['model']} | {results['data']}"
             + (f" ({results['split']})" if results.get("split") else "") + f" | {results['num_examples']} examples"]
    lines.append("  ".join(cell.ljust(width) for cell, width in zip(header, widths)))
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines += [f"note: {note}" for note in results.get("notes", [])]
    return "\n".join(lines)


def _fmt(value, signed: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:+.4f}" if signed else f"{value:.4f}"
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reavl evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--model", required=True, help="folder of the task model and its processor")
    parser.add_argument("--data", required=True, help="evaluation data file or folder")
    parser.add_argument("--json", help="write every metric as JSON to this file")
    parser.add_argument("--ablation", action="store_true", help="also evaluate with knowledge disabled")
    parser.add_argument("--split", help="split of split-based formats (WikiMEL: train/dev/test; default test)")
    parser.add_argument("--data_format", help="data format; inferred when unset")
    parser.add_argument("--image_root", help="folder image names are relative to")
    parser.add_argument("--missing_images", choices=["error", "placeholder"])
    parser.add_argument("--on_invalid", choices=["raise", "skip"], default="raise")
    parser.add_argument("--no_verify_images", action="store_true", help="skip decode-checking images when reading")
    parser.add_argument("--max_samples", type=int)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--num_candidates", type=int, default=10, help="entity linking: candidates per mention")
    parser.add_argument("--trust_remote_code", action="store_true")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    results = evaluate_model(
        args.task, args.model, args.data, ablation=args.ablation, split=args.split, data_format=args.data_format,
        image_root=args.image_root, missing_images=args.missing_images, on_invalid=args.on_invalid,
        verify_images=not args.no_verify_images, max_samples=args.max_samples, batch_size=args.batch_size,
        max_length=args.max_length, num_candidates=args.num_candidates, trust_remote_code=args.trust_remote_code,
    )
    print(format_table(results))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        temporary.replace(path)
        print(f"wrote {path}")
    return 0


__all__ = ["evaluate_model", "format_table", "main"]


if __name__ == "__main__":
    sys.exit(main())
