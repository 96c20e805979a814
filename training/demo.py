"""`reavl demo`: the whole life of a REAVL model on a synthetic knowledge world, in minutes on a CPU.

    reavl demo [--output DIR] [--seed N] [--quick]

Stages (each writes its own folder under `--output`, so a failure keeps what finished):

    world/        the knowledge world: flags, knowledge base, captions, knowledge VQA, entity linking (entity-disjoint)
    init/         a fresh demo-size REAVL (ResNet vision tower, 2-layer BERT, WordPiece trained on the world's text),
                  its processor and the knowledge index built with its (untrained) knowledge encoder
    pretrain/     knowledge-aware pre-training with the Accelerate script (`training.pretrain`), index refreshes
    vqa/          knowledge VQA fine-tuned with Trainer on the train countries (`training.finetune`)
    entity-linking/  entity linking fine-tuned with Trainer on the train countries
    hub/          the exported Hub folder of the VQA model (`training.export`), reloaded in a fresh interpreter
    results.json  every metric, the ablation, chance levels, stage timings, the held-out answer with its evidence

The world is synthetic on purpose (see `training.knowledge_world`): the questions ask for attributes that no image
shows and no caption states, so a model can only answer them for held-out countries by retrieving the right entry
from the flag and reading it. The no-knowledge ablation (the same fine-tuned model with knowledge disabled) shows
what the image and question alone give: chance.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and schedules of one demo run. `full` targets < 10 minutes on 2 CPU cores, `quick` < 3."""

    num_entities: int
    caption_images_per_entity: int
    query_images_per_entity: int
    pretrain_epochs: float
    pretrain_batch_size: int
    pretrain_learning_rate: float
    index_refresh_steps: int
    query_tuning_steps: int
    query_tuning_learning_rate: float
    vqa_epochs: float
    entity_linking_epochs: float
    finetune_batch_size: int
    finetune_learning_rate: float
    hidden_size: int = 64
    num_knowledge: int = 3
    max_knowledge_length: int = 40

    @classmethod
    def full(cls) -> "DemoSettings":
        return cls(
            num_entities=240, caption_images_per_entity=8, query_images_per_entity=4, pretrain_epochs=12,
            pretrain_batch_size=32, pretrain_learning_rate=3e-3, index_refresh_steps=60, query_tuning_steps=3600,
            query_tuning_learning_rate=1e-2, vqa_epochs=3,
            entity_linking_epochs=3, finetune_batch_size=32, finetune_learning_rate=3e-3,
        )

    @classmethod
    def quick(cls) -> "DemoSettings":
        """The full settings on a quarter of the world, with the schedules that differ."""
        from dataclasses import replace

        return replace(
            cls.full(), num_entities=60, pretrain_epochs=10, index_refresh_steps=15, query_tuning_steps=800,
            # A quarter of the questions: smaller batches keep the number of VQA steps the copy pointer needs (a few
            # hundred) within the --quick budget.
            vqa_epochs=5, finetune_batch_size=16,
        )


class DemoStageError(RuntimeError):
    """A demo stage failed; the message names the stage and where its inputs are."""


def build_world_tokenizer(texts: list[str], output_dir: Path):
    """A BERT WordPiece tokenizer whose vocabulary is every word of the world's own text (no download), plus the
    single characters as fallback pieces: every invented name is one token.

    The vocabulary is built in Python and ordered by (frequency, word), not with the `tokenizers` trainer, whose
    tie-breaking varies between runs: the same seed must give the same token ids, hence the same metrics.
    """
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers
    from transformers import BertTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts = Counter(
        word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    )
    characters = sorted({character for word in counts for character in word})
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocabulary += characters + [f"##{character}" for character in characters]
    known = set(vocabulary)
    vocabulary += [word for word in sorted(counts, key=lambda word: (-counts[word], word)) if word not in known]
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(
        vocab={token: index for index, token in enumerate(vocabulary)}, do_lower_case=True, model_max_length=64
    )
    tokenizer.save_pretrained(output_dir)
    return tokenizer


def demo_config(vocab_size: int, settings: DemoSettings, image_size: int):
    """A demo-size REAVL: a small ResNet (learns colour and layout fast from few images) and a 2-layer BERT."""
    from modeling_reavl import ReavlConfig

    hidden = settings.hidden_size
    return ReavlConfig(
        vision_config=dict(
            model_type="resnet", num_channels=3, embedding_size=32, hidden_sizes=[32, 64, hidden], depths=[1, 1, 1],
            downsample_in_first_stage=False, image_size=image_size,
        ),
        text_config=dict(
            model_type="bert", vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=2 * hidden, max_position_embeddings=64,
        ),
        num_fusion_layers=2, fusion_num_attention_heads=4, fusion_intermediate_size=2 * hidden, fusion_dropout=0.0,
        num_knowledge=settings.num_knowledge, max_knowledge_length=settings.max_knowledge_length,
        projection_dim=hidden, retrieval_dim=hidden, itm_max_examples=8, knowledge_alignment_loss_weight=2.0,
        # Trained from scratch: no pretrained text tower to protect, so the knowledge branch starts open (tanh(1)),
        # which lets masked-entity MLM learn to read the retrieved entries from the first steps.
        knowledge_gate_init=1.0,
    )


def _world_texts(world_dir: Path) -> list[str]:
    import csv

    texts = []
    for line in (world_dir / "knowledge.jsonl").read_text().splitlines():
        entry = json.loads(line)
        texts += [entry["title"], entry["text"], *entry.get("aliases", [])]
    with open(world_dir / "captions.csv", newline="") as handle:
        texts += [row["caption"] for row in csv.DictReader(handle)]
    for name in ("vqa_train.json", "vqa_test.json"):
        texts += [record["question"] for record in json.loads((world_dir / name).read_text())]
    for name in ("entity_linking_train.jsonl", "entity_linking_test.jsonl"):
        texts += [json.loads(line)["sentence"] for line in (world_dir / name).read_text().splitlines()]
    return texts


def stage_world(output: Path, seed: int, settings: DemoSettings) -> dict[str, Any]:
    from training.knowledge_world import generate_world

    world = generate_world(
        seed=seed,
        num_entities=settings.num_entities,
        images_per_entity=settings.caption_images_per_entity,
        query_images_per_entity=settings.query_images_per_entity,
    )
    world.write(output / "world")
    print(world.summary())
    return world.metadata()


def stage_init(output: Path, seed: int, settings: DemoSettings, image_size: int) -> Path:
    import torch
    from transformers import ViTImageProcessor

    from modeling_reavl import ReavlForPreTraining
    from processing import ReavlProcessor, build_knowledge_index, load_knowledge_base

    init_dir = output / "init"
    init_dir.mkdir(parents=True, exist_ok=True)
    world_dir = output / "world"
    tokenizer = build_world_tokenizer(_world_texts(world_dir), init_dir / "tokenizer")
    torch.manual_seed(seed)
    model = ReavlForPreTraining(demo_config(len(tokenizer), settings, image_size))
    image_processor = ViTImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )
    processor = ReavlProcessor(
        image_processor, tokenizer, num_knowledge=settings.num_knowledge,
        max_knowledge_length=settings.max_knowledge_length,
    )
    knowledge_base = load_knowledge_base(world_dir / "knowledge.jsonl")
    retriever = build_knowledge_index(model, processor, knowledge_base, init_dir / "knowledge")
    processor.set_knowledge(retriever)
    model.save_pretrained(init_dir)
    processor.save_pretrained(init_dir)
    return init_dir


def stage_pretrain(output: Path, seed: int, settings: DemoSettings) -> dict[str, Any]:
    from training.pretrain import run_pretraining

    world_dir = output / "world"
    return run_pretraining(
        model_name_or_path=str(output / "init"),
        train_data=str(world_dir / "captions.csv"),
        knowledge=str(world_dir / "knowledge.jsonl"),
        knowledge_index=str(output / "init" / "knowledge"),
        output_dir=str(output / "pretrain"),
        seed=seed,
        per_device_train_batch_size=settings.pretrain_batch_size,
        num_train_epochs=settings.pretrain_epochs,
        learning_rate=settings.pretrain_learning_rate,
        warmup_steps=20,
        weight_decay=0.01,
        index_refresh_steps=settings.index_refresh_steps,
        image_augmentation=True,
        # Every entry of the index competes in the alignment (cached keys), then cheap query-side tuning steps
        # with the knowledge encoder locked teach the image-only lookup (training.query_tuning).
        index_negatives=-1,
        query_tuning_steps=settings.query_tuning_steps,
        query_tuning_learning_rate=settings.query_tuning_learning_rate,
        save_steps=0,
        report_to="none",
        logging_steps=20,
    )


def stage_finetune(output: Path, seed: int, settings: DemoSettings, task: str) -> dict[str, Any]:
    from training.finetune import run_finetuning

    world_dir = output / "world"
    stem = "vqa" if task == "vqa" else "entity_linking"
    suffix = "json" if task == "vqa" else "jsonl"
    epochs = settings.vqa_epochs if task == "vqa" else settings.entity_linking_epochs
    return run_finetuning(
        task=task,
        model_name_or_path=str(output / "pretrain" / "final"),
        train_file=str(world_dir / f"{stem}_train.{suffix}"),
        validation_file=str(world_dir / f"{stem}_test.{suffix}"),
        image_root=str(world_dir),
        knowledge_base=str(world_dir / "knowledge.jsonl"),
        output_dir=str(output / ("vqa" if task == "vqa" else "entity-linking")),
        num_train_epochs=epochs,
        per_device_train_batch_size=settings.finetune_batch_size,
        per_device_eval_batch_size=64,
        learning_rate=settings.finetune_learning_rate,
        warmup_steps=10,
        weight_decay=0.01,
        seed=seed,
        data_seed=seed,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=20,
        report_to=[],
        eval_ablation=True,
        # The world's questions and mentions never name the country: retrieve from the flag. The encoders that
        # produced the index stay frozen, so the index stays exact and only fusion, gates and head learn.
        retrieval_query_modalities="image",
        freeze_encoders=True,
        use_cpu=True,
        dataloader_num_workers=0,
    )


def stage_evaluate(output: Path, task: str) -> dict[str, Any]:
    from training.evaluate import evaluate_model

    world_dir = output / "world"
    model_dir = output / ("vqa" if task == "vqa" else "entity-linking")
    data = world_dir / ("vqa_test.json" if task == "vqa" else "entity_linking_test.jsonl")
    results = evaluate_model(task, model_dir, data, ablation=True, image_root=str(world_dir))
    (output / f"eval_{task}.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    return results


def _held_out_question(world_dir: Path) -> dict[str, Any]:
    return json.loads((world_dir / "vqa_test.json").read_text())[0]


def stage_export(output: Path) -> Path:
    from training.export import export_model

    world_dir = output / "world"
    question = _held_out_question(world_dir)
    export_model(
        output / "vqa",
        output / "hub",
        eval_json=output / "eval_vqa.json",
        widget_examples=[{"image": str(world_dir / question["image"]), "question": question["question"]}],
        training_data="the synthetic REAVL knowledge world generated by `reavl demo` (fictional countries and flags)",
        model_title="REAVL demo: knowledge VQA on a synthetic knowledge world",
        overwrite=True,
    )
    return output / "hub"


RELOAD_SCRIPT = r"""
import json, sys
from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline
hub, image_path, question = sys.argv[1], sys.argv[2], sys.argv[3]
for blocked in ("modeling_reavl", "processing", "training"):
    try:
        __import__(blocked)
    except ImportError:
        pass
    else:
        raise SystemExit(f"the project's package {blocked} is importable: the reload would not prove remote code")
base = AutoModel.from_pretrained(hub, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(hub, trust_remote_code=True)
pipe = pipeline(model=hub, trust_remote_code=True)
result = pipe(Image.open(image_path).convert("RGB"), question, top_k=3)
print(json.dumps({"base_model": type(base).__name__, "processor": type(processor).__name__,
                  "task": pipe.task, "result": result}))
"""


def stage_reload(output: Path) -> dict[str, Any]:
    """Load the export in a fresh interpreter in which the project's packages cannot be imported."""
    import tempfile

    world_dir = output / "world"
    question = _held_out_question(world_dir)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with tempfile.TemporaryDirectory() as scratch:
        # `-I` (isolated) keeps the current directory and user site off sys.path; the editable install's path
        # hook is removed by `-S` plus an explicit site-packages path, so only installed dependencies are visible.
        site_packages = [path for path in sys.path if path.endswith("site-packages")]
        code = (
            "import sys; sys.path[:] = [p for p in sys.path if not p.endswith('site-packages')] + "
            + repr(site_packages)
            + "\n"
            + RELOAD_SCRIPT
        )
        completed = subprocess.run(
            [sys.executable, "-I", "-S", "-c", code, str((output / "hub").resolve()),
             str((world_dir / question["image"]).resolve()), question["question"]],
            cwd=scratch, env=env, capture_output=True, text=True, timeout=600,
        )
    if completed.returncode != 0:
        raise DemoStageError(f"reloading the export in a fresh interpreter failed:\n{completed.stderr[-3000:]}")
    reloaded = json.loads(completed.stdout.strip().splitlines()[-1])
    reloaded["question"] = question
    return reloaded


def _metric(results: dict, variant: str, name: str) -> float | None:
    value = results.get(variant, {}).get(name)
    return None if value is None else float(value)


def results_table(results: dict[str, Any]) -> str:
    chance = results["world"]["chance"]
    rows = [("task (held-out countries)", "metric", "REAVL", "no knowledge", "chance")]
    vqa, el = results["evaluation"]["vqa"], results["evaluation"]["entity-linking"]
    # Entity linking ranks the retrieved candidates (the ablation by their titles alone): chance is 1 / candidates.
    num_candidates = int(el.get("full", {}).get("num_candidates") or 10)
    rows.append(("knowledge VQA", "accuracy", _metric(vqa, "full", "accuracy"),
                 _metric(vqa, "no_knowledge", "accuracy"), chance["uniform_overall"]))
    rows.append(("entity linking", "Hits@1", _metric(el, "full", "hits@1"),
                 _metric(el, "no_knowledge", "hits@1"), 1.0 / num_candidates))
    rows.append(("entity linking", "MRR", _metric(el, "full", "mrr"), _metric(el, "no_knowledge", "mrr"), None))
    widths = [max(len(_cell(row[column])) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(_cell(value).ljust(width) for value, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{100 * value:.1f}%"
    return str(value)


def _evidence_lines(reloaded: dict[str, Any]) -> str:
    result = reloaded["result"]
    question = reloaded["question"]
    lines = [f"held-out question: {question['question']}  (image {question['image']}, gold: {question['answers'][0]})"]
    for answer in result.get("answers", [])[:3]:
        lines.append(f"  answer {answer['answer']!r}  score {answer['score']:.3f}")
    for item in result.get("evidence", []):
        lines.append(
            f"  evidence {item['id']} {item['title']!r}  retrieval {item['retrieval_score']:.3f}  gate {item['gate']:.3f}"
        )
    return "\n".join(lines)


def run_demo(output: str | Path = "reavl_demo_output", seed: int = 0, quick: bool = False) -> dict[str, Any]:
    """Run every stage; returns the results (also written to `output/results.json`)."""
    import torch

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    settings = DemoSettings.quick() if quick else DemoSettings.full()
    # Small models on a few cores: one intra-op thread avoids oversubscription and makes runs repeatable.
    torch.set_num_threads(1)
    results: dict[str, Any] = {"seed": seed, "quick": quick, "settings": asdict(settings), "seconds": {}}
    start = time.time()

    def stage(name: str, function, *args):
        print(f"\n== {name} ==", flush=True)
        stage_start = time.time()
        try:
            value = function(*args)
        except Exception as error:  # noqa: BLE001 - report which stage failed, keep what finished
            raise DemoStageError(f"demo stage '{name}' failed: {type(error).__name__}: {error}") from error
        results["seconds"][name] = round(time.time() - stage_start, 1)
        return value

    results["world"] = stage("world", stage_world, output, seed, settings)
    stage("init", stage_init, output, seed, settings, results["world"]["image_size"])
    results["pretrain"] = stage("pretrain", stage_pretrain, output, seed, settings)
    results["finetune"] = {
        "vqa": stage("finetune vqa", stage_finetune, output, seed, settings, "vqa"),
        "entity-linking": stage("finetune entity linking", stage_finetune, output, seed, settings, "entity-linking"),
    }
    results["evaluation"] = {
        "vqa": stage("evaluate vqa", stage_evaluate, output, "vqa"),
        "entity-linking": stage("evaluate entity linking", stage_evaluate, output, "entity-linking"),
    }
    stage("export", stage_export, output)
    results["reload"] = stage("reload in a fresh interpreter", stage_reload, output)
    results["seconds"]["total"] = round(time.time() - start, 1)
    (output / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True, default=str))

    print("\n" + results_table(results))
    print("\n" + _evidence_lines(results["reload"]))
    print(f"\ntotal {results['seconds']['total']:.0f} s; results in {output / 'results.json'}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reavl demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="reavl_demo_output", help="folder for every stage's output")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and of every training run")
    parser.add_argument("--quick", action="store_true", help="a smaller world and shorter schedules (< 3 minutes)")
    args = parser.parse_args(argv)
    try:
        run_demo(args.output, seed=args.seed, quick=args.quick)
    except DemoStageError as error:
        print(f"\nreavl demo: {error}\nEarlier stages' outputs are kept in {args.output}.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
