"""The pre-training entry point (training/pretrain.py) run for real on a tiny synthetic world, as open_clip tests its
training script: single process, `accelerate launch` with 2 CPU processes, exact resumption, learning, bad input.

The tiny model: ViT (30 px, patch 2, hidden 32, 2 layers) + BERT (hidden 32, 2 layers, the MiniLM WordPiece
vocabulary), one fusion layer. The world (tests/test_pretrain_data.py): 8 entities drawn as coloured shapes on 3
backgrounds, 2 captions per image naming the entity and the background, a KB of the 8 entities with relations, 8
related places and 16 namesakes that repeat the entities' names.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_reavl import ReavlConfig
from tests.conftest import PROJECT_ROOT, minilm_path
from tests.test_pretrain_data import write_world
from training.pretrain import (
    CheckpointMismatchError,
    PretrainingArguments,
    learning_rate_at,
    main,
    parse_arguments,
    run_pretraining,
)


TINY_CONFIG = dict(
    vision_config={"model_type": "vit", "image_size": 30, "patch_size": 2, "hidden_size": 32, "num_hidden_layers": 2,
                   "num_attention_heads": 2, "intermediate_size": 64},
    text_config={"model_type": "bert", "vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2,
                 "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128},
    num_fusion_layers=1, fusion_num_attention_heads=2, fusion_intermediate_size=64, num_knowledge=4,
    max_knowledge_length=24, projection_dim=32, retrieval_dim=32, num_kg_relations=8,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain_world")
    paths = write_world(root)
    ReavlConfig(**TINY_CONFIG).to_json_file(str(root / "config.json"))
    paths["config"] = root / "config.json"
    paths["root"] = root
    return paths


def common_arguments(world, **overrides) -> dict:
    arguments = dict(
        train_data=str(world["captions"]), knowledge=str(world["knowledge"]), config_json=str(world["config"]),
        tokenizer_name_or_path=str(minilm_path()), per_device_train_batch_size=8, learning_rate=1e-3,
        warmup_steps=2, logging_steps=1, report_to="none", disable_tqdm=True, eval_retrieval=False,
    )
    arguments.update(overrides)
    return arguments


def as_argv(arguments: dict) -> list[str]:
    return [item for name, value in arguments.items() for item in (f"--{name}", str(value))]


def assert_loads_as_hub_folder(final_dir: Path, tmp_path: Path):
    """The saved folder loads through the Auto classes with remote code, every weight intact (saving the loaded
    model again writes the same tensors)."""
    from transformers import AutoModelForPreTraining, AutoProcessor

    model = AutoModelForPreTraining.from_pretrained(final_dir, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(final_dir, trust_remote_code=True)
    model.save_pretrained(tmp_path / "round_trip")
    saved = load_file(str(final_dir / "model.safetensors"))
    again = load_file(str(tmp_path / "round_trip" / "model.safetensors"))
    assert saved.keys() == again.keys()
    assert all(torch.equal(again[name], tensor) for name, tensor in saved.items())
    return model, processor


# --------------------------------------------------------------------------------------------------------------------
# Smoke: the real entry points
# --------------------------------------------------------------------------------------------------------------------


def test_single_process_cli_run_skips_bad_image_and_saves_a_loadable_folder(world, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(world["root"], data, ignore=shutil.ignore_patterns("out*"))
    (data / "images" / "dravok_1.png").write_bytes(b"\x89PNG truncated")
    output_dir = tmp_path / "run"
    arguments = common_arguments(
        world, train_data=data / "captions.csv", output_dir=output_dir, max_steps=4, save_steps=4,
        index_refresh_steps=2, holdout_images=3, eval_retrieval=True,
    )
    with caplog.at_level(logging.INFO):
        assert main(as_argv(arguments)) == 0
    assert "skipped 1 unreadable image(s) (2 caption row(s))" in caplog.text
    results = json.loads((output_dir / "train_results.json").read_text())
    assert results["data"]["unreadable_images"] == 1 and results["train_pairs"] == 46 - 6
    assert results["step"] == 4 and set(results["losses"]) >= {
        "loss", "itc_loss", "knowledge_alignment_loss", "mlm_loss", "itm_loss", "kg_loss", "retriever_loss",
        "relevance_loss",
    }
    assert results["holdout_retrieval"]["after"]["images"] == 3
    assert 0.0 <= results["weak_positive_recall_at_k"]["after"] <= 1.0

    final_dir = output_dir / "final"
    model, processor = assert_loads_as_hub_folder(final_dir, tmp_path)
    assert model.config.kg_relations == ["located in", "neighbour of", "rival of"]
    # The final folder's index was refreshed with the final weights: it serves this model as it is.
    processor.retriever.check_compatible(model)
    assert len(processor.retriever) == 32
    # The final weights are the last step's (the checkpoint holds accelerate's in-memory parameter names).
    checkpoint_weights = load_file(str(output_dir / "checkpoints" / "step_000004" / "model.safetensors"))
    state = model.state_dict()
    assert checkpoint_weights.keys() == state.keys()
    assert all(torch.equal(state[name], tensor) for name, tensor in checkpoint_weights.items())


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(world, tmp_path):
    output_dir = tmp_path / "ddp"
    arguments = common_arguments(world, output_dir=output_dir, max_steps=3, save_steps=3, index_refresh_steps=2,
                                 per_device_train_batch_size=6)
    launcher = Path(sys.executable).with_name("accelerate")
    command = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "accelerate.commands.accelerate_cli"]
    # `--multi_gpu` is accelerate's multi-process (torchrun) launcher; with no GPU the script runs DDP on the CPU
    # over gloo. (`--cpu --num_processes 2` would start a single process: accelerate needs MPI for that.)
    command += ["launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "-m", "training.pretrain", *as_argv(arguments)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    completed = subprocess.run(command, cwd=PROJECT_ROOT, env=environment, capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = json.loads((output_dir / "train_results.json").read_text())
    assert results["num_processes"] == 2 and results["global_batch_size"] == 12 and results["step"] == 3
    state = json.loads((output_dir / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
    assert state["run_fingerprint"]["num_processes"] == "2"
    assert (output_dir / "checkpoints" / "step_000003" / "random_states_1.pkl").exists()
    model, processor = assert_loads_as_hub_folder(output_dir / "final", tmp_path)
    processor.retriever.check_compatible(model)


# --------------------------------------------------------------------------------------------------------------------
# Exact resumption, and refusal of a checkpoint of another configuration
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resumed_runs(world, tmp_path_factory):
    """An uninterrupted run of 6 steps, and one stopped after step 3 then resumed from `latest`. Index refreshes at
    steps 2 (before the stop), 4 and 6 (after it)."""
    root = tmp_path_factory.mktemp("resume")
    arguments = common_arguments(world, max_steps=6, save_steps=3, index_refresh_steps=2)
    torch.set_num_threads(1)
    uninterrupted = run_pretraining(output_dir=str(root / "uninterrupted"), **arguments)
    stopped = run_pretraining(output_dir=str(root / "interrupted"), stop_after_step=3, **arguments)
    resumed = run_pretraining(output_dir=str(root / "interrupted"), resume_from_checkpoint="latest", **arguments)
    return {"root": root, "arguments": arguments, "uninterrupted": uninterrupted, "stopped": stopped,
            "resumed": resumed}


@pytest.mark.slow
def test_resume_from_latest_matches_an_uninterrupted_run(resumed_runs):
    root = resumed_runs["root"]
    assert resumed_runs["stopped"]["stopped_early"] and resumed_runs["stopped"]["step"] == 3
    assert "final_dir" not in resumed_runs["stopped"] and resumed_runs["resumed"]["step"] == 6
    uninterrupted, resumed = resumed_runs["uninterrupted"]["history"], resumed_runs["resumed"]["history"]
    assert [entry["step"] for entry in resumed] == [1, 2, 3, 4, 5, 6]
    for expected, actual in zip(uninterrupted, resumed):
        for name in ("loss", "itc_loss", "knowledge_alignment_loss", "mlm_loss", "itm_loss", "kg_loss",
                     "retriever_loss", "relevance_loss", "recall", "gate_positive"):
            assert actual[name] == pytest.approx(expected[name], rel=1e-6, abs=1e-6), (expected["step"], name)
    expected_weights = load_file(str(root / "uninterrupted" / "final" / "model.safetensors"))
    actual_weights = load_file(str(root / "interrupted" / "final" / "model.safetensors"))
    worst = max((expected_weights[name] - actual_weights[name]).abs().max().item() for name in expected_weights)
    assert worst <= 1e-6, worst
    # The final indexes (refreshed from the final weights) agree too.
    from processing.retrieval_reavl import ReavlRetriever

    expected_index = ReavlRetriever.from_pretrained(root / "uninterrupted" / "final" / "knowledge").embeddings
    actual_index = ReavlRetriever.from_pretrained(root / "interrupted" / "final" / "knowledge").embeddings
    assert abs(expected_index - actual_index).max() <= 1e-5


@pytest.mark.slow
def test_checkpoint_of_another_configuration_refuses_to_resume(resumed_runs, capsys):
    output_dir = resumed_runs["root"] / "interrupted"
    arguments = {**resumed_runs["arguments"], "output_dir": str(output_dir), "resume_from_checkpoint": "latest"}
    with pytest.raises(CheckpointMismatchError) as error:
        run_pretraining(**{**arguments, "seed": 7, "per_device_train_batch_size": 4})
    message = str(error.value)
    assert "step_000006" in message and "another configuration" in message
    assert "seed (checkpoint '42', this run '7')" in message
    assert "per_device_train_batch_size (checkpoint '8', this run '4')" in message
    with pytest.raises(CheckpointMismatchError, match=r"model_config \(checkpoint"):
        run_pretraining(**{**arguments, "num_knowledge": 2})
    with pytest.raises(CheckpointMismatchError, match=r"index_negatives \(checkpoint '0', this run '-1'\)"):
        run_pretraining(**{**arguments, "index_negatives": -1})
    # Through the CLI: exit status 2 and the reason on stderr, nothing overwritten.
    before = sorted(path.name for path in (output_dir / "checkpoints").iterdir())
    assert main(as_argv({**arguments, "max_train_pairs": 40})) == 2
    assert "train_data (checkpoint" in capsys.readouterr().err
    assert sorted(path.name for path in (output_dir / "checkpoints").iterdir()) == before
    # A fresh start into a folder that holds checkpoints would mix two runs: refused unless asked for.
    with pytest.raises(ValueError, match="already holds checkpoints .*--overwrite_output_dir"):
        run_pretraining(**{**arguments, "resume_from_checkpoint": None})


# --------------------------------------------------------------------------------------------------------------------
# Learning, not just running
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_losses_fall_and_retriever_recall_rises(world, tmp_path):
    """100 steps on the 48 pairs, K=2 among 32 entries (each entity has 2 namesakes that repeat its name).

    Measured (one run, 1 thread): recall@2 of the weak positives 0.67 before -> 1.00 after; first-10 vs last-10 step
    means: loss 17.4 -> 12.1, ITC 2.08 -> 0.38, alignment 2.64 -> 0.93, MLM 10.2 -> 8.6, KG 2.77 -> 2.36, relevance
    0.80 -> 0.63, ITM 0.668 -> 0.636 (ITM only reaches its class prior, H(1/3) = 0.637, in this budget). The retriever
    loss (a KL to the gates' posterior) starts near 0 because its target starts uniform, and grows as the gates learn
    which entries are informative: it is checked to stay bounded, not to fall.
    """
    results = run_pretraining(output_dir=str(tmp_path / "learn"), **common_arguments(
        world, max_steps=100, warmup_steps=5, index_refresh_steps=10, save_steps=0, logging_steps=20,
        num_knowledge=2,
    ))
    losses = results["losses"]
    for name in ("loss", "itc_loss", "knowledge_alignment_loss", "mlm_loss", "kg_loss", "relevance_loss"):
        assert losses[name]["last_mean"] < 0.9 * losses[name]["first_mean"], (name, losses[name])
    assert losses["itm_loss"]["last_mean"] < losses["itm_loss"]["first_mean"]
    assert losses["retriever_loss"]["last_mean"] < 1.0
    recall = results["weak_positive_recall_at_k"]
    assert recall["k"] == 2 and recall["eval_pairs"] == 48
    assert recall["before"] <= 0.8 and recall["after"] >= 0.95, recall
    assert recall["after"] >= recall["before"] + 0.2
    gates = results["history"][-10:]
    assert sum(entry["gate_positive"] - entry["gate_other"] for entry in gates) > 0


# --------------------------------------------------------------------------------------------------------------------
# Ablation, arguments, schedule, bad input
# --------------------------------------------------------------------------------------------------------------------


def test_no_knowledge_ablation_builds_no_index(world, tmp_path):
    output_dir = tmp_path / "ablation"
    results = run_pretraining(output_dir=str(output_dir), **common_arguments(
        world, max_steps=2, save_steps=0, num_knowledge=0,
    ))
    assert results["num_knowledge"] == 0 and results["weak_positive_recall_at_k"]["before"] is None
    assert "knowledge_alignment_loss" not in results["losses"] and "kg_loss" not in results["losses"]
    assert {"itc_loss", "mlm_loss", "itm_loss"} <= set(results["losses"])
    assert not (output_dir / "knowledge").exists() and not (output_dir / "final" / "knowledge").exists()
    model, _ = assert_loads_as_hub_folder(output_dir / "final", tmp_path)
    assert model.config.num_knowledge == 0


def test_arguments_from_yaml_equal_the_command_line(world, tmp_path):
    arguments = common_arguments(world, output_dir=str(tmp_path / "out"), max_steps=5, freeze_vision_tower=True)
    config_file = tmp_path / "pretrain.yaml"
    config_file.write_text("".join(f"{name}: {json.dumps(value)}\n" for name, value in arguments.items()))
    assert parse_arguments([str(config_file)]) == parse_arguments(as_argv(arguments))
    model_args, data_args, training_args = parse_arguments(as_argv(arguments))
    assert model_args.freeze_vision_tower is True and training_args.max_steps == 5
    with pytest.raises(ValueError, match="exactly one model source"):
        parse_arguments(as_argv({**arguments, "model_name_or_path": "somewhere"}))


def test_learning_rate_warmup_then_cosine_to_the_floor():
    args = PretrainingArguments(output_dir="x", learning_rate=1e-3, warmup_steps=10, min_learning_rate_ratio=0.1)
    assert learning_rate_at(0, args, 110) == pytest.approx(1e-4)
    assert learning_rate_at(9, args, 110) == pytest.approx(1e-3)
    assert learning_rate_at(60, args, 110) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert learning_rate_at(110, args, 110) == pytest.approx(1e-4)
    rates = [learning_rate_at(step, args, 110) for step in range(10, 111)]
    assert all(later <= earlier for earlier, later in zip(rates, rates[1:]))


def test_missing_caption_column_is_named(world, tmp_path):
    with pytest.raises(ValueError, match=r"caption column 'text' not found .* \['image', 'caption'\]"):
        run_pretraining(output_dir=str(tmp_path / "bad"), **common_arguments(world, caption_column="text", max_steps=1))


def test_bf16_mixed_precision_on_cpu(world, tmp_path):
    results = run_pretraining(output_dir=str(tmp_path / "bf16"), **common_arguments(
        world, max_steps=2, save_steps=0, index_refresh_steps=1, mixed_precision="bf16",
    ))
    assert all(value["last"] == value["last"] and abs(value["last"]) < 1e4 for value in results["losses"].values())
    assert results["weak_positive_recall_at_k"]["after"] is not None


# --------------------------------------------------------------------------------------------------------------------
# Query-side retriever tuning (training/query_tuning.py)
# --------------------------------------------------------------------------------------------------------------------


def test_query_tuning_trains_image_lookup_and_leaves_the_knowledge_encoder_locked(world, tmp_path):
    """The same multi-task run with and without 150 query-tuning steps: the text tower (the knowledge encoder) is
    identical, the vision tower and the key projection moved, the image-only lookup improved, and the saved index
    matches the saved model's keys."""
    from processing import ReavlRetriever

    shared = dict(max_steps=10, save_steps=0, num_knowledge=2, image_augmentation=True, index_negatives=-1,
                  alignment_views=2, index_refresh_steps=5)
    plain = run_pretraining(output_dir=str(tmp_path / "plain"), **common_arguments(world, **shared))
    tuned = run_pretraining(output_dir=str(tmp_path / "tuned"), **common_arguments(
        world, **shared, query_tuning_steps=150, query_tuning_learning_rate=3e-3,
    ))
    assert "query_tuning" not in plain
    tuning = tuned["query_tuning"]
    assert tuning["steps"] == 150
    assert tuning["loss"]["last_mean"] < 0.8 * tuning["loss"]["first_mean"], tuning
    assert tuning["image_recall_at_1"]["last_mean"] > tuning["image_recall_at_1"]["first_mean"], tuning

    before = load_file(str(tmp_path / "plain" / "final" / "model.safetensors"))
    after = load_file(str(tmp_path / "tuned" / "final" / "model.safetensors"))
    text_tower = [name for name in before if name.startswith("reavl.text_model.")]
    assert text_tower and all(torch.equal(before[name], after[name]) for name in text_tower)
    assert not torch.equal(before["reavl.retrieval_head.key_weight"], after["reavl.retrieval_head.key_weight"])
    assert not torch.equal(before["reavl.retrieval_head.query_image_weight"],
                           after["reavl.retrieval_head.query_image_weight"])
    model, _ = assert_loads_as_hub_folder(tmp_path / "tuned" / "final", tmp_path)
    ReavlRetriever.from_pretrained(str(tmp_path / "tuned" / "final" / "knowledge")).check_compatible(model.reavl)


def test_alignment_views_need_image_augmentation(world, tmp_path):
    with pytest.raises(ValueError, match="alignment_views"):
        run_pretraining(output_dir=str(tmp_path / "bad"), **common_arguments(world, max_steps=1, alignment_views=2))
