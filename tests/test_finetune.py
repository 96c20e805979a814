"""Fine-tuning and evaluation of every REAVL head through `Trainer` (issue 5), on a tiny synthetic knowledge world.

A tiny pre-trained folder (ViT 30 px / patch 2 / hidden 32, BERT hidden 32 with the MiniLM tokenizer, 2 layers) with
its processor and knowledge index stands in for `reavl pretrain`'s output. Each head is fine-tuned for a few steps
(the loss must go down), evaluated with its metrics and the no-knowledge ablation, saved, and reloaded through its
Auto class with `trust_remote_code=True` in an interpreter that cannot import this project.

Torch runs single-threaded here: on a shared 2-core machine, intra-op threads fighting other processes make these
tiny models ~10x slower.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, ViTConfig, ViTImageProcessor

import modeling_reavl  # noqa: F401  (registers the Auto classes)
from modeling_reavl import ReavlConfig, ReavlModel
from processing.knowledge_index import build_knowledge_index
from processing.processing_reavl import ReavlProcessor
from tests.conftest import minilm_path
from tests.remote_code_helpers import run_isolated_json
from training.finetune import (
    ReavlTrainer,
    build_collator,
    parse_finetune_args,
    run_finetuning,
    task_model_class,
)
from training.knowledge_world import generate_world
from training.task_data import read_entity_linking


AUTO_CLASSES = {
    "vqa": "AutoModelForVisualQuestionAnswering",
    "entity-linking": "AutoModelForMultipleChoice",
    "retrieval": "AutoModelForZeroShotImageClassification",
    "classification": "AutoModelForSequenceClassification",
}
METRICS = {
    "vqa": ["accuracy", "knowledge_gate_mean"],
    "entity-linking": ["hits@1", "hits@5", "hits@10", "mrr", "retriever_hits@1", "retriever_mrr"],
    "retrieval": ["i2t_r@1", "i2t_r@5", "i2t_r@10", "t2i_r@1", "t2i_r@5", "t2i_r@10", "r_mean"],
    "classification": ["accuracy", "knowledge_gate_mean"],
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    paths = generate_world(seed=0, num_entities=24, images_per_entity=1, query_images_per_entity=1).write(root / "w")
    # SNLI-VE style pairs from the captions: the true caption entails, another country's caption contradicts.
    captions = [line.split(",", 1) for line in Path(paths["captions"]).read_text().splitlines()[1:]]
    rows = []
    for position, (image, caption) in enumerate(captions):
        other = captions[(position + 7) % len(captions)][1]
        rows.append({"pairID": f"p{position}a", "image": image, "sentence2": caption, "gold_label": "entailment"})
        rows.append({"pairID": f"p{position}b", "image": image, "sentence2": other, "gold_label": "contradiction"})
    paths["classification"] = Path(paths["root"]) / "snli_ve.jsonl"
    paths["classification"].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


@pytest.fixture(scope="module")
def pretrained(world, tokenizer, tmp_path_factory):
    """A tiny 'pre-trained' REAVL folder: model, processor and the world's knowledge index."""
    config = ReavlConfig(
        vision_config=ViTConfig(image_size=30, patch_size=2, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=37).to_dict(),
        text_config={"model_type": "bert", "vocab_size": tokenizer.vocab_size, "hidden_size": 32,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37,
                     "max_position_embeddings": 128},
        projection_dim=16, retrieval_dim=16, num_knowledge=3, max_knowledge_length=32, num_fusion_layers=1,
        fusion_num_attention_heads=4, fusion_intermediate_size=37, knowledge_gate_init=0.5,
    )
    torch.manual_seed(0)
    model = ReavlModel(config)
    processor = ReavlProcessor(image_processor=ViTImageProcessor(size={"height": 30, "width": 30}),
                               tokenizer=tokenizer)
    folder = tmp_path_factory.mktemp("pretrained") / "reavl"
    scratch = folder.parent / "index_scratch"
    processor.set_knowledge(build_knowledge_index(model, processor, str(world["knowledge"]), scratch, progress=False))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


DATA = {
    "vqa": ("vqa_train", "vqa_test"),
    "entity-linking": ("entity_linking_train", "entity_linking_test"),
    "retrieval": ("captions", "captions"),
    "classification": ("classification", "classification"),
}


@pytest.fixture(scope="module")
def finetuned(world, pretrained, tmp_path_factory):
    """`finetuned(task)`: fine-tune that head once per module (10 steps) and return (results, output folder)."""
    cache = {}

    def run(task):
        if task not in cache:
            output_dir = tmp_path_factory.mktemp("finetuned") / task
            train, validation = DATA[task]
            results = run_finetuning(
                task=task, model_name_or_path=str(pretrained), train_file=str(world[train]),
                validation_file=str(world[validation]), output_dir=str(output_dir), max_steps=10,
                per_device_train_batch_size=8, per_device_eval_batch_size=16, learning_rate=2e-3,
                warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
                dataloader_pin_memory=False,
                num_candidates=4, max_eval_samples=24,
            )
            cache[task] = (results, output_dir)
        return cache[task]

    return run


@pytest.mark.parametrize("task", list(DATA))
def test_finetuning_lowers_the_loss_reports_metrics_and_saves_a_consistent_folder(task, finetuned):
    results, output_dir = finetuned(task)
    state = json.loads((output_dir / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 10
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses

    for name in METRICS[task]:
        value = results["eval"][f"eval_{name}"]
        assert 0.0 <= value <= 1.0, (name, value)
    if task == "retrieval":
        assert results["eval_no_knowledge"] is None  # ITC reads no knowledge
    else:
        ablation = results["eval_no_knowledge"]
        # No knowledge was read: no gates; entity-linking candidates come in index order, so no retriever figures.
        not_in_ablation = {"knowledge_gate_mean", "retriever_hits@1", "retriever_mrr"}
        assert set(METRICS[task]) - not_in_ablation <= {key[len("eval_no_knowledge_"):] for key in ablation}
        assert not any(key[len("eval_no_knowledge_"):] in not_in_ablation for key in ablation), ablation
    if task == "entity-linking":
        assert results["eval"]["eval_num_candidates"] == 4
        assert any("hits@10 equals hits@4" in note for note in results["notes"])
    assert json.loads((output_dir / "finetune_results.json").read_text())["task"] == task
    assert not (output_dir / "training_args.bin").exists()  # no pickle in a folder that gets pushed
    assert json.loads((output_dir / "training_args.json").read_text())["max_steps"] == 10

    # The saved index was re-embedded with the fine-tuned encoder: the retriever accepts the saved model.
    model = task_model_class(task).from_pretrained(output_dir)
    processor = ReavlProcessor.from_pretrained(output_dir)
    retriever = processor.retriever
    retriever.check_compatible(model)
    config = json.loads((output_dir / "config.json").read_text())
    assert config["architectures"] == [task_model_class(task).__name__]
    assert AUTO_CLASSES[task] in config["auto_map"]
    if task == "vqa":
        assert len(config["id2label"]) == results["num_labels"] > 2


def test_index_is_re_embedded_because_fine_tuning_moved_the_encoder(finetuned, pretrained):
    _, output_dir = finetuned("vqa")
    before = ReavlProcessor.from_pretrained(pretrained).retriever
    after = ReavlProcessor.from_pretrained(output_dir).retriever
    assert before.ids == after.ids
    assert before.fingerprint != after.fingerprint
    assert not np.allclose(before.embeddings, after.embeddings)


def test_frozen_encoders_keep_the_index_valid_without_re_embedding(world, pretrained, tmp_path):
    output_dir = tmp_path / "el_frozen"
    results = run_finetuning(
        task="entity-linking", model_name_or_path=str(pretrained), train_file=str(world["entity_linking_train"]),
        output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=8, learning_rate=2e-3,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, freeze_encoders=True,
        dataloader_pin_memory=False,
        num_candidates=4,
    )
    before = ReavlModel.from_pretrained(pretrained)
    after = task_model_class("entity-linking").from_pretrained(output_dir)
    assert after.reavl.knowledge_encoder_fingerprint() == before.knowledge_encoder_fingerprint()
    saved = ReavlProcessor.from_pretrained(output_dir).retriever
    assert saved.fingerprint == ReavlProcessor.from_pretrained(pretrained).retriever.fingerprint
    saved.check_compatible(after)
    trained = [name for name, parameter in after.named_parameters()
               if not torch.equal(parameter, before.state_dict().get(name.removeprefix("reavl."), parameter))]
    assert trained and all(not name.startswith(("reavl.text_model", "reavl.vision_model", "reavl.retrieval_head"))
                           for name in trained)
    assert results["train"]["train_loss"] > 0


def test_saved_heads_reload_through_auto_classes_in_a_fresh_interpreter(finetuned, world, tmp_path):
    """Every fine-tuned folder loads with its Auto class + trust_remote_code where this project cannot be imported,
    and gives the same logits as in-process."""
    cases = {}
    for task in DATA:
        _, output_dir = finetuned(task)
        model = task_model_class(task).from_pretrained(output_dir).eval()
        processor = ReavlProcessor.from_pretrained(output_dir)
        generator = torch.Generator().manual_seed(1)
        inputs = {
            "pixel_values": torch.randn(2, 3, 30, 30, generator=generator),
            "input_ids": torch.tensor([[101, 2054, 2003, 2023, 102], [101, 2023, 2003, 102, 0]]),
            "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
        }
        if task in ("vqa", "entity-linking", "classification"):
            knowledge = processor.retriever.get_entries(torch.tensor([[0, 5, 9], [3, 4, 1]]))
            inputs["knowledge_input_ids"], inputs["knowledge_attention_mask"] = knowledge
        with torch.no_grad():
            outputs = model(**inputs)
        reference = outputs.logits_per_image if task == "retrieval" else outputs.logits
        save_file({**inputs, "reference": reference.contiguous()}, str(tmp_path / f"{task}.safetensors"))
        cases[task] = (str(output_dir), AUTO_CLASSES[task])

    result = run_isolated_json(
        f"""
        import torch, transformers
        from safetensors.torch import load_file
        cases = {cases!r}
        result = {{}}
        for task, (folder, auto_class) in cases.items():
            model = getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=True).eval()
            tensors = load_file(task + ".safetensors")
            reference = tensors.pop("reference")
            with torch.no_grad():
                outputs = model(**tensors)
            logits = outputs.logits_per_image if task == "retrieval" else outputs.logits
            result[task] = [type(model).__name__, type(model).__module__.split(".")[0],
                            float((logits - reference).abs().max())]
        emit(result)
        """,
        cwd=tmp_path,
    )
    for task, (class_name, module_root, difference) in result.items():
        assert class_name == task_model_class(task).__name__
        assert module_root == "transformers_modules"  # remote code, not this repository
        assert difference < 1e-5, (task, difference)


def test_entity_linking_forces_the_gold_entity_in_training_only(pretrained, world):
    model = task_model_class("entity-linking").from_pretrained(pretrained)
    processor = ReavlProcessor.from_pretrained(pretrained)
    retriever = processor.retriever
    records = read_entity_linking(world["entity_linking_train"], knowledge_ids=retriever.ids)
    collator = build_collator("entity-linking", processor, retriever=retriever)
    batch = collator(records.records[:12])
    gold = batch["gold_knowledge_index"].clone()
    assert [retriever.ids[row] for row in gold] == [record["entity_id"] for record in records.records[:12]]
    trainer = ReavlTrainer(model=model, args=parse_finetune_args(
        task="entity-linking", model_name_or_path="x", output_dir=str(pretrained.parent / "unused"),
        report_to="none")[2], candidate_retriever=retriever, num_candidates=2)

    evaluation = trainer.add_candidates(model, batch, force_gold=False)
    labels, indices = evaluation["labels"], evaluation["knowledge_indices"]
    assert evaluation["knowledge_input_ids"].shape[:2] == (12, 2) and "gold_knowledge_index" not in evaluation
    missed = labels == -100
    assert missed.any(), "2 candidates out of 60 entries should miss some gold entities"
    assert (indices[~missed, labels[~missed]] == gold[~missed]).all()
    assert not (indices[missed] == gold[missed, None]).any()

    training = trainer.add_candidates(model, batch, force_gold=True)
    labels, indices = training["labels"], training["knowledge_indices"]
    assert (labels >= 0).all() and (indices[torch.arange(12), labels] == gold).all()
    assert (labels[missed] == 1).all()  # the gold entity took the last slot
    expected_ids, _ = retriever.get_entries(indices)
    assert torch.equal(training["knowledge_input_ids"], expected_ids)


def test_cli_finetune_no_knowledge_and_evaluate_with_ablation(world, pretrained, finetuned, tmp_path, capsys):
    from training.cli import main

    output_dir = tmp_path / "el_no_knowledge"
    assert main(["finetune", "--task", "entity-linking", "--model_name_or_path", str(pretrained),
                 "--train_file", str(world["entity_linking_train"]), "--output_dir", str(output_dir),
                 "--max_steps", "2", "--per_device_train_batch_size", "8", "--no_knowledge", "--report_to", "none",
                 "--save_strategy", "no", "--disable_tqdm", "true", "--dataloader_pin_memory", "false"]) == 0
    saved = json.loads((output_dir / "finetune_results.json").read_text())
    assert saved["no_knowledge"] is True and saved["eval"] is None

    _, vqa_dir = finetuned("vqa")
    json_path = tmp_path / "results" / "vqa.json"
    assert main(["evaluate", "--task", "vqa", "--model", str(vqa_dir), "--data", str(world["vqa_test"]),
                 "--json", str(json_path), "--ablation", "--max_samples", "12"]) == 0
    table = capsys.readouterr().out
    assert "accuracy" in table and "no_knowledge" in table and "difference" in table
    results = json.loads(json_path.read_text())
    assert results["num_examples"] == 12
    for run in ("full", "no_knowledge"):
        assert 0.0 <= results[run]["accuracy"] <= 1.0 and "loss" in results[run]
    assert "knowledge_gate_mean" in results["full"] and "knowledge_gate_mean" not in results["no_knowledge"]


def test_training_arguments_pass_through_including_hub_flags():
    model_args, data_args, training_args = parse_finetune_args([
        "--task", "vqa", "--model_name_or_path", "m", "--output_dir", "o", "--push_to_hub", "--hub_model_id",
        "user/reavl-vqa", "--gradient_accumulation_steps", "4", "--no_knowledge", "--refresh_index_steps", "50",
    ])
    assert training_args.push_to_hub and training_args.hub_model_id == "user/reavl-vqa"
    assert training_args.gradient_accumulation_steps == 4
    assert data_args.no_knowledge and data_args.refresh_index_steps == 50
    with pytest.raises(TypeError, match="unknown argument"):
        parse_finetune_args(task="vqa", model_name_or_path="m", output_dir="o", learning_rat=1.0)


def test_training_evaluate_module_does_not_shadow_the_evaluate_package():
    import evaluate

    import training.evaluate

    assert training.evaluate is not evaluate and hasattr(evaluate, "load")
    assert callable(training.evaluate.evaluate_model)
