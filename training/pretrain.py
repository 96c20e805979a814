# Copyright 2026 The REAVL authors. Licensed under the Apache License, Version 2.0.
"""Knowledge-aware pre-training of REAVL with Accelerate.

Launch (the same script, any number of processes; arguments can also come from one JSON or YAML file):

    # one process (CPU, or one GPU). The real Flickr8k run (EfficientNet-Lite0 locked + MiniLM-L6, Wikipedia vital KB):
    reavl pretrain --train_data ../shared/data/flickr8k/captions.csv --holdout_images 100 \
        --knowledge ../shared/data/wikipedia_vital --vision_model_path EFFNET_LITE0_DIR --text_model_path MINILM_DIR \
        --freeze_vision_tower True --num_knowledge 4 --max_knowledge_length 32 --max_text_length 32 \
        --per_device_train_batch_size 64 --max_steps 270 --learning_rate 1e-4 --warmup_steps 20 \
        --index_refresh_steps 90 --mixed_precision bf16 --dataloader_num_workers 6 --output_dir runs/flickr
    python -m training.pretrain ...same arguments...
    python -m training.pretrain pretrain.yaml            # every argument from a file

    # several processes or machines (DDP; FSDP/DeepSpeed through `accelerate config`)
    accelerate launch --multi_gpu --num_processes 2 -m training.pretrain ...same arguments...
    # On a host without a GPU the same command runs CPU DDP over gloo (the script asks accelerate for the CPU when
    # it is one of several processes and sees no accelerator). Note: `accelerate launch --num_processes 2 --cpu`
    # starts ONE process in accelerate 1.x unless MPI is set up (`--mpirun_hostfile`); torchrun works too:
    torchrun --nproc_per_node 2 -m training.pretrain ...same arguments...

    # resume exactly where a run stopped (same data order, RNG states, index embeddings and losses)
    python -m training.pretrain ...same arguments... --resume_from_checkpoint latest

    # in-process (the demo does this)
    from training.pretrain import run_pretraining
    results = run_pretraining(train_data=..., knowledge=..., config_json=..., tokenizer_name_or_path=...,
                              output_dir=..., max_steps=200)

Model source, one of: `--model_name_or_path` (a saved REAVL folder with model + processor), `--config_json` (a fresh
model from a `ReavlConfig` JSON; the tokenizer from `--tokenizer_name_or_path`), or `--vision_model_path` +
`--text_model_path` (pretrained towers, `ReavlModel.from_vision_text_pretrained`). Without a saved processor one is
built from the text tower's tokenizer and a `ViTImageProcessor` at the vision config's image size (mean = std = 0.5).

One optimizer step, per process and micro-batch (`PretrainingCollator` has already decoded images and tokens):

    1. query = model.reavl.get_query_embeddings(image, text)           # unimodal towers, no_grad, eval mode
    2. retrieved = retriever.retrieve(query, K)                          # one batched call
    3. log recall@K of the weak positives; force missing ones into the lowest-scored slots -> knowledge_labels
    4. kg_triples among the batch's entries; MLM masking (mention tokens first, 80/10/10)
    5. loss = sum_i weight_i * loss_i  (ITC+alignment, MLM, ITM, KG, retriever, relevance; weights from the config,
       overridable here); backward under `accelerator.accumulate`; clip; AdamW step with the learning rate below
    6. every `index_refresh_steps`: re-embed the knowledge index with the current knowledge encoder, each process
       embedding its shard of rows, shards gathered, every process installing the same full matrix

With `--index_negatives -1` the alignment also scores every index entry (cached embeddings, no gradient) as a
negative; `--alignment_views V` adds V augmented views per image whose image-only queries are aligned too. After the
last step, `--query_tuning_steps N` runs N cheap query-side tuning steps with the knowledge encoder locked
(`training/query_tuning.py`) before the final index refresh. A run stopped during that stage resumes from its last
multi-task checkpoint and repeats the tuning (seeded; unlike the multi-task resume, not tested for exact equality).

Learning rate at optimizer step `step` (written out, as nanoGPT does):

    step < warmup_steps:  learning_rate * (step + 1) / warmup_steps
    afterwards:           min_lr + 0.5 * (1 + cos(pi * progress)) * (learning_rate - min_lr),
                          progress = (step - warmup_steps) / (max_steps - warmup_steps),
                          min_lr = learning_rate * min_learning_rate_ratio

Output folder:

    output_dir/
      knowledge/                     the index built at start (or the one given by --knowledge_index)
      checkpoints/step_000500/       accelerator.save_state (model, optimizer, RNG states) + index_embeddings.npy +
                                     trainer_state.json (step, epoch, batches into the epoch, micro-batch counter,
                                     run fingerprint, index fingerprint, loss history); written to `.tmp` then renamed
      logs/                          tensorboard (--report_to tensorboard)
      final/                         save_pretrained of ReavlForPreTraining and of the processor, with the refreshed
                                     index in final/knowledge/: the folder `reavl export` / the Hub take as it is
      train_results.json             per-loss first/last values, retriever recall before/after, wall time, ...

A checkpoint records a fingerprint of the model config, the training data, the knowledge base, the seed, the batch
size, gradient accumulation and the number of processes; resuming with any of them changed is refused, naming what
differs (the data order, the RNG streams or the weights' meaning would not be those of the run that wrote it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from .augment import augment_pixel_values

from .data import (
    KnowledgeBatchBuilder,
    KnowledgeGraph,
    PretrainingCollator,
    load_image_text_pairs,
    open_image,
    prepare_pretraining_pairs,
    split_by_image,
    weak_positive_recall,
)


logger = logging.getLogger("training.pretrain")

LOSS_NAMES = (
    "loss",
    "itc_loss",
    "knowledge_alignment_loss",
    "mlm_loss",
    "itm_loss",
    "kg_loss",
    "retriever_loss",
    "relevance_loss",
)
LOSS_WEIGHT_NAMES = tuple(f"{name}_weight" for name in LOSS_NAMES[1:])
CHECKPOINT_STATE_FILE = "trainer_state.json"
CHECKPOINT_EMBEDDINGS_FILE = "index_embeddings.npy"


class CheckpointMismatchError(ValueError):
    """A checkpoint was written by another configuration and cannot resume this run."""


# --------------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    """Where the model and processor come from, and config values this run overrides."""

    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "A saved REAVL folder (model + processor), e.g. a previous run's final/."}
    )
    config_json: Optional[str] = field(
        default=None, metadata={"help": "A ReavlConfig JSON: train a fresh model of that shape."}
    )
    vision_model_path: Optional[str] = field(
        default=None, metadata={"help": "Pretrained vision tower folder (with --text_model_path)."}
    )
    text_model_path: Optional[str] = field(
        default=None, metadata={"help": "Pretrained text tower folder; also gives the tokenizer."}
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer for --config_json (default: --text_model_path)."}
    )
    num_fusion_layers: Optional[int] = field(
        default=None, metadata={"help": "Fusion layers of a fresh model (--config_json or the two tower paths)."}
    )
    num_knowledge: Optional[int] = field(
        default=None, metadata={"help": "Entries retrieved per pair (K); 0 = the no-knowledge ablation."}
    )
    max_knowledge_length: Optional[int] = field(default=None, metadata={"help": "Tokens kept per knowledge entry."})
    mlm_probability: Optional[float] = field(default=None, metadata={"help": "Share of caption tokens masked."})
    itc_loss_weight: Optional[float] = None
    knowledge_alignment_loss_weight: Optional[float] = None
    mlm_loss_weight: Optional[float] = None
    itm_loss_weight: Optional[float] = None
    kg_loss_weight: Optional[float] = None
    retriever_loss_weight: Optional[float] = None
    relevance_loss_weight: Optional[float] = None
    freeze_vision_tower: bool = field(
        default=False, metadata={"help": "Keep the vision tower's weights fixed (a locked pretrained backbone)."}
    )


@dataclass
class DataArguments:
    """Image-text pairs and the knowledge base."""

    train_data: str = field(
        default=None,
        metadata={"help": "CSV/JSONL of image,caption; an image folder with metadata.jsonl/csv; a saved dataset; "
                          "or a datasets name."},
    )
    image_column: str = "image"
    caption_column: str = "caption"
    data_split: str = field(default="train", metadata={"help": "Split of a DatasetDict / datasets name."})
    holdout_images: int = field(
        default=0, metadata={"help": "Distinct images held out of training (seeded, by image) for evaluation."}
    )
    max_train_pairs: Optional[int] = field(default=None, metadata={"help": "Use only the first N training pairs."})
    max_text_length: int = field(default=64, metadata={"help": "Caption tokens kept."})
    knowledge: Optional[str] = field(default=None, metadata={"help": "Knowledge base source (required when K > 0)."})
    knowledge_format: Optional[str] = field(
        default=None, metadata={"help": "Knowledge base format (default: inferred from the source)."}
    )
    knowledge_index: Optional[str] = field(
        default=None, metadata={"help": "An existing knowledge/ index folder of this KB (default: build one)."}
    )
    index_factory: str = field(default="Flat", metadata={"help": "faiss factory string of the index built."})
    recall_eval_pairs: int = field(
        default=256, metadata={"help": "Training pairs with weak positives on which retriever recall is measured."}
    )


@dataclass
class PretrainingArguments:
    """The loop: optimisation, index refresh, logging, checkpoints."""

    output_dir: str = field(default=None, metadata={"help": "Where checkpoints, logs, final/ and results go."})
    seed: int = 42
    per_device_train_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    max_steps: int = field(default=0, metadata={"help": "Optimizer steps; 0 = from num_train_epochs."})
    num_train_epochs: float = 1.0
    learning_rate: float = 1e-4
    min_learning_rate_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.05
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-6
    max_grad_norm: float = 1.0
    mixed_precision: Optional[str] = field(
        default=None, metadata={"help": "no|fp16|bf16 (default: accelerate's setting, else no)."}
    )
    index_refresh_steps: int = field(
        default=500, metadata={"help": "Re-embed the knowledge index every N steps (0: only at the end)."}
    )
    index_batch_size: int = 64
    logging_steps: int = 10
    save_steps: int = field(default=500, metadata={"help": "Checkpoint every N steps (0: no checkpoints)."})
    save_total_limit: Optional[int] = field(default=2, metadata={"help": "Checkpoints kept (oldest removed)."})
    resume_from_checkpoint: Optional[str] = field(
        default=None, metadata={"help": "'latest' (a fresh start when there is none) or a checkpoint folder."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start fresh in an output_dir that holds checkpoints (they are deleted)."}
    )
    stop_after_step: Optional[int] = field(
        default=None,
        metadata={"help": "Stop after this step as if interrupted (time-sliced jobs; resume with latest)."},
    )
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard|wandb|all|none"})
    dataloader_num_workers: int = 0
    eval_retrieval: bool = field(
        default=True, metadata={"help": "Image-text retrieval R@1/5/10 on the held-out images before and after."}
    )
    eval_batch_size: int = 64
    image_augmentation: bool = field(
        default=False,
        metadata={"help": "Random translation and brightness/contrast jitter of the training images (seeded per "
                          "micro-batch, so resume stays exact); for data with few images per entity."},
    )
    alignment_views: int = field(
        default=0,
        metadata={"help": "Extra augmented views of each image whose image-only queries are aligned to the pair's "
                          "weak positives (vision tower only, cheap); needs --image_augmentation."},
    )
    index_negatives: int = field(
        default=0,
        metadata={"help": "Cached index embeddings used as extra negatives of the knowledge alignment: 0 none, "
                          "-1 the whole index, n a random sample of n rows per batch."},
    )
    query_tuning_steps: int = field(
        default=0,
        metadata={"help": "After the multi-task steps: steps of query-side retriever tuning against the whole index "
                          "with the knowledge encoder locked (training.query_tuning); cheap steps that sharpen "
                          "image-only retrieval."},
    )
    query_tuning_learning_rate: Optional[float] = field(
        default=None, metadata={"help": "Learning rate of the query tuning (default: --learning_rate)."}
    )
    query_tuning_key_projection: bool = field(
        default=True, metadata={"help": "Query tuning also trains the key projection (the index is re-embedded)."}
    )
    disable_tqdm: bool = False
    use_cpu: bool = field(
        default=False,
        metadata={"help": "Train on the CPU even when an accelerator is present (a multi-process launch on a host "
                          "without one uses CPU DDP over gloo by itself)."},
    )


def _no_accelerator() -> bool:
    if hasattr(torch, "accelerator"):
        return not torch.accelerator.is_available()
    return not torch.cuda.is_available()


def parse_arguments(argv: list[str] | None = None):
    """(ModelArguments, DataArguments, PretrainingArguments) from the command line or one .json/.yaml file."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ModelArguments, DataArguments, PretrainingArguments))
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        arguments = parser.parse_json_file(argv[0])
    elif len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        arguments = parser.parse_yaml_file(argv[0])
    else:
        arguments = parser.parse_args_into_dataclasses(argv)
    return _check_arguments(*arguments)


def arguments_from_dict(values: dict[str, Any]):
    """The three argument dataclasses from one flat dict of field names (as `run_pretraining(**kwargs)` takes)."""
    from transformers import HfArgumentParser

    return _check_arguments(*HfArgumentParser((ModelArguments, DataArguments, PretrainingArguments)).parse_dict(values))


def _check_arguments(model_args: ModelArguments, data_args: DataArguments, training_args: PretrainingArguments):
    if not data_args.train_data:
        raise ValueError("--train_data is required")
    if not training_args.output_dir:
        raise ValueError("--output_dir is required")
    sources = [
        name for name, given in (
            ("--model_name_or_path", model_args.model_name_or_path),
            ("--config_json", model_args.config_json),
            ("--vision_model_path/--text_model_path", model_args.vision_model_path or model_args.text_model_path),
        ) if given
    ]
    if len(sources) != 1:
        raise ValueError(
            "give exactly one model source: --model_name_or_path, --config_json, or --vision_model_path with "
            f"--text_model_path (got {sources or 'none'})"
        )
    if bool(model_args.vision_model_path) != bool(model_args.text_model_path):
        raise ValueError("--vision_model_path and --text_model_path go together")
    if model_args.config_json and not model_args.tokenizer_name_or_path:
        raise ValueError("--config_json needs --tokenizer_name_or_path (the text tower's tokenizer)")
    if training_args.per_device_train_batch_size < 2:
        raise ValueError("per_device_train_batch_size must be >= 2 (contrastive and ITM losses need negatives)")
    if training_args.alignment_views < 0 or (training_args.alignment_views and not training_args.image_augmentation):
        raise ValueError(
            f"--alignment_views must be >= 0 and needs --image_augmentation, got alignment_views="
            f"{training_args.alignment_views}, image_augmentation={training_args.image_augmentation}"
        )
    if training_args.mixed_precision not in (None, "no", "fp16", "bf16"):
        raise ValueError(f"--mixed_precision must be no, fp16 or bf16, got {training_args.mixed_precision!r}")
    return model_args, data_args, training_args


# --------------------------------------------------------------------------------------------------------------------
# Learning rate, data order
# --------------------------------------------------------------------------------------------------------------------


def learning_rate_at(step: int, args: PretrainingArguments, max_steps: int) -> float:
    """Linear warmup to `learning_rate`, then cosine decay to `learning_rate * min_learning_rate_ratio`."""
    min_lr = args.learning_rate * args.min_learning_rate_ratio
    if step < args.warmup_steps:
        return args.learning_rate * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, max_steps - args.warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.learning_rate - min_lr)


class EpochShuffleSampler(Sampler[int]):
    """A permutation of the rows per epoch, from `seed` and the epoch only, so a resumed run sees the same order
    (accelerate shards its batches across processes and calls `set_epoch`)."""

    def __init__(self, num_rows: int, seed: int):
        self.num_rows = num_rows
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.num_rows, generator=generator).tolist())


# --------------------------------------------------------------------------------------------------------------------
# Model, processor, knowledge index
# --------------------------------------------------------------------------------------------------------------------


def _vision_image_size(vision_config) -> int:
    size = getattr(vision_config, "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[-1]
    if isinstance(size, int):
        return size
    pretrained_cfg = getattr(vision_config, "pretrained_cfg", None) or {}
    input_size = pretrained_cfg.get("input_size") or pretrained_cfg.get("test_input_size")
    return int(input_size[-1]) if input_size else 224


def _apply_config_overrides(config, model_args: ModelArguments) -> None:
    for name in ("num_knowledge", "max_knowledge_length", "mlm_probability", *LOSS_WEIGHT_NAMES):
        value = getattr(model_args, name)
        if value is not None:
            setattr(config, name, value)
    if config.num_knowledge < 0:
        raise ValueError(f"num_knowledge must be >= 0, got {config.num_knowledge}")


def load_model_and_processor(model_args: ModelArguments):
    """(ReavlForPreTraining, ReavlProcessor) from the chosen source, config overrides applied."""
    from transformers import AutoTokenizer

    try:  # transformers 5: the PIL backend needs no torchvision
        from transformers import ViTImageProcessorPil as ViTImageProcessor
    except ImportError:
        from transformers import ViTImageProcessor

    from modeling_reavl import ReavlConfig, ReavlForPreTraining, ReavlModel
    from processing.processing_reavl import ReavlProcessor

    processor = None
    architecture = {} if model_args.num_fusion_layers is None else {"num_fusion_layers": model_args.num_fusion_layers}
    if model_args.model_name_or_path:
        if architecture:
            raise ValueError("--num_fusion_layers shapes a fresh model; a saved model keeps its own")
        model = ReavlForPreTraining.from_pretrained(model_args.model_name_or_path)
        processor = ReavlProcessor.from_pretrained(model_args.model_name_or_path)
    elif model_args.config_json:
        config = ReavlConfig.from_json_file(model_args.config_json)
        for name, value in architecture.items():
            setattr(config, name, value)
        model = ReavlForPreTraining(config)
    else:
        base = ReavlModel.from_vision_text_pretrained(
            model_args.vision_model_path, model_args.text_model_path, **architecture
        )
        model = ReavlForPreTraining(base.config)
        model.reavl = base  # pretrained towers; REAVL's own layers and the heads freshly initialised
    _apply_config_overrides(model.config, model_args)
    if model_args.freeze_vision_tower:
        model.reavl.vision_model.requires_grad_(False)

    if processor is None:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path or model_args.text_model_path)
        if len(tokenizer) > model.config.text_config.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but the text tower's vocab_size is "
                f"{model.config.text_config.vocab_size}"
            )
        size = _vision_image_size(model.config.vision_config)
        image_processor = ViTImageProcessor(
            size={"height": size, "width": size}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
        )
        processor = ReavlProcessor(
            image_processor,
            tokenizer,
            num_knowledge=model.config.num_knowledge,
            max_knowledge_length=model.config.max_knowledge_length,
        )
    else:
        processor.num_knowledge = model.config.num_knowledge
        processor.max_knowledge_length = model.config.max_knowledge_length
    return model, processor


class KnowledgeIndexRefresher:
    """Re-embeds the knowledge index with the current knowledge encoder, sharded over processes (ANCE-style).

    Process `p` embeds rows `array_split(range(N), world)[p]` with `embed_knowledge_entries`; the shards are
    gathered in process order and every process installs the same full matrix with `retriever.update_embeddings`,
    so all processes search identical indexes. `embeddings` / `fingerprint` hold what is installed now (saved in
    checkpoints).
    """

    def __init__(self, accelerator, retriever, batch_size: int):
        self.accelerator = accelerator
        self.retriever = retriever
        self.batch_size = batch_size
        self.num_rows = len(retriever)
        self.embeddings: np.ndarray | None = None
        self.fingerprint: str | None = None

    def install(self, embeddings: np.ndarray, fingerprint: str) -> None:
        self.retriever.update_embeddings(embeddings, fingerprint)
        self.embeddings, self.fingerprint = embeddings, fingerprint

    @torch.no_grad()
    def refresh(self, model) -> np.ndarray:
        """Embed every row with `model` (the unwrapped ReavlForPreTraining) and install the result."""
        from accelerate.utils import gather_object

        from processing.knowledge_index import embed_knowledge_entries

        accelerator = self.accelerator
        shards = np.array_split(np.arange(self.num_rows), accelerator.num_processes)
        rows = shards[accelerator.process_index]
        was_training = model.training
        model.eval()
        with accelerator.autocast():
            local = embed_knowledge_entries(
                model, self.retriever.token_ids(rows), self.batch_size, pad_token_id=self.retriever.pad_token_id
            )
        model.train(was_training)
        local = np.asarray(local, dtype=np.float32).reshape(len(rows), -1)
        pieces = gather_object([local]) if accelerator.num_processes > 1 else [local]
        embeddings = np.concatenate(pieces, axis=0)
        self.install(embeddings, model.reavl.knowledge_encoder_fingerprint())
        return embeddings


# --------------------------------------------------------------------------------------------------------------------
# Run fingerprint and checkpoints
# --------------------------------------------------------------------------------------------------------------------

_VOLATILE_CONFIG_KEYS = {"transformers_version", "architectures", "auto_map", "dtype", "torch_dtype"}


def _stable_config(value):
    if isinstance(value, dict):
        return {
            str(key): _stable_config(item)
            for key, item in sorted(value.items(), key=lambda pair: str(pair[0]))
            if str(key) not in _VOLATILE_CONFIG_KEYS and not str(key).startswith("_")
        }
    if isinstance(value, (list, tuple)):
        return [_stable_config(item) for item in value]
    return value


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def run_fingerprint(config, train_dataset, knowledge_base, training_args, num_processes) -> dict[str, str]:
    """What a checkpoint must share with the run resuming it. Hashes for the large parts, values for the rest."""
    config_json = json.dumps(_stable_config(config.to_dict()), sort_keys=True, default=str)
    data_text = "\n".join(
        f"{Path(key).name}\t{caption}" for key, caption in zip(train_dataset["image_key"], train_dataset["caption"])
    )
    knowledge_text = "none"
    if knowledge_base is not None:
        knowledge_text = "\n".join(
            f"{entry_id}\t{title}\t{text}"
            for entry_id, title, text in zip(knowledge_base["id"], knowledge_base["title"], knowledge_base["text"])
        )
    return {
        "model_config": _sha(config_json),
        "train_data": _sha(data_text),
        "knowledge_base": _sha(knowledge_text),
        "seed": str(training_args.seed),
        "per_device_train_batch_size": str(training_args.per_device_train_batch_size),
        "gradient_accumulation_steps": str(training_args.gradient_accumulation_steps),
        "num_processes": str(num_processes),
        # What each step computes from the data: a resume under other values would not continue the same run.
        "image_augmentation": str(training_args.image_augmentation),
        "alignment_views": str(training_args.alignment_views),
        "index_negatives": str(training_args.index_negatives),
    }


def check_resumable(checkpoint: Path, state: dict, fingerprint: dict[str, str]) -> None:
    """Refuse (CheckpointMismatchError naming every difference) a checkpoint of another configuration."""
    saved = state.get("run_fingerprint")
    if not isinstance(saved, dict):
        raise CheckpointMismatchError(
            f"{checkpoint} has no run fingerprint in {CHECKPOINT_STATE_FILE}: not a checkpoint of this script"
        )
    differences = [
        f"{name} (checkpoint {saved.get(name)!r}, this run {value!r})"
        for name, value in fingerprint.items()
        if saved.get(name) != value
    ]
    if differences:
        raise CheckpointMismatchError(
            f"cannot resume from {checkpoint}: it was written by another configuration; different "
            + "; ".join(differences)
            + ". Resume with the checkpoint's settings, or start a fresh run in another --output_dir."
        )


def _checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (renamed from .tmp, with a trainer state), oldest first."""
    root = _checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    complete = [
        path for path in root.glob("step_*")
        if path.is_dir() and not path.name.endswith(".tmp") and (path / CHECKPOINT_STATE_FILE).exists()
    ]
    return sorted(complete, key=lambda path: int(path.name.split("_")[1]))


def resolve_checkpoint(output_dir: Path, resume_from_checkpoint: str | None) -> Path | None:
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not (path / CHECKPOINT_STATE_FILE).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {CHECKPOINT_STATE_FILE} in it)")
    return path


def save_checkpoint(accelerator, output_dir: Path, step: int, state: dict, refresher, save_total_limit) -> Path:
    """`accelerator.save_state` + index embeddings + trainer state into step_XXXXXX.tmp, then an atomic rename."""
    final = _checkpoint_root(output_dir) / f"step_{step:06d}"
    temporary = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary), safe_serialization=True)
    if accelerator.is_main_process:
        if refresher is not None and refresher.embeddings is not None:
            np.save(temporary / CHECKPOINT_EMBEDDINGS_FILE, refresher.embeddings)
        state_path = temporary / CHECKPOINT_STATE_FILE
        with state_path.open("w") as handle:
            json.dump(state, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        if save_total_limit:
            for old in list_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# --------------------------------------------------------------------------------------------------------------------
# Evaluation helpers (retriever recall, image-text retrieval)
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_weak_positive_recall(model, retriever, dataset, collator, k: int, batch_size: int, device) -> float | None:
    """Mean recall@k of the weak positives over `dataset` (rows with positives), retrieval with the current model."""
    if retriever is None or k == 0 or len(dataset) == 0:
        return None
    model.eval()
    total, count = 0.0, 0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
        queries = model.reavl.get_query_embeddings(
            batch["pixel_values"].to(device), batch["input_ids"].to(device), batch["attention_mask"].to(device)
        )
        retrieved = retriever.retrieve(queries.float().cpu(), k)
        indices = torch.as_tensor(np.asarray(retrieved["knowledge_indices"]), dtype=torch.long)
        batch_total, batch_count = weak_positive_recall(indices, batch["positive_rows"])
        total, count = total + batch_total, count + batch_count
    return total / count if count else None


@torch.no_grad()
def evaluate_image_text_retrieval(model, dataset, processor, batch_size: int, device) -> dict | None:
    """ITC image->text and text->image R@1/5/10 over `dataset` (every caption of every distinct image)."""
    from training.metrics import image_text_retrieval_metrics

    if len(dataset) == 0:
        return None
    model.eval()
    keys = dataset["image_key"]
    first_row = {}
    for row, key in enumerate(keys):
        first_row.setdefault(key, row)
    image_order = list(first_row)
    image_position = {key: position for position, key in enumerate(image_order)}
    image_values = dataset.select(list(first_row.values())).with_format("arrow")["image"].to_pylist()
    image_embeds = []
    for start in range(0, len(image_values), batch_size):
        images = [open_image(value) for value in image_values[start : start + batch_size]]
        pixel_values = processor.image_processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        image_embeds.append(model.reavl.get_image_features(pixel_values).float().cpu())
    captions = dataset["caption"]
    text_embeds = []
    for start in range(0, len(captions), batch_size):
        text = processor.tokenizer(
            captions[start : start + batch_size], padding=True, truncation=True, max_length=64, return_tensors="pt"
        ).to(device)
        text_embeds.append(model.reavl.get_text_features(text["input_ids"], text["attention_mask"]).float().cpu())
    similarity = (torch.cat(image_embeds) @ torch.cat(text_embeds).t()).numpy()
    metrics = image_text_retrieval_metrics(similarity, [image_position[key] for key in keys])
    return {name: round(float(value), 4) for name, value in metrics.items()} | {
        "images": len(image_order), "texts": len(captions)
    }


# --------------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------------


class StepStatistics:
    """Sums over the micro-batches of one optimizer step on this process, reduced over processes once per step:
    each loss, the weak-positive recall before forcing, the mean gate of weak-positive and of other entries, the
    forced entries per pair."""

    names = (*LOSS_NAMES, "recall", "gate_positive", "gate_other", "forced_per_pair")

    def __init__(self):
        self.sums = torch.zeros(len(self.names), 2, dtype=torch.float64)  # (value sum, count) per name

    def _add(self, name: str, total: float, count: float) -> None:
        row = self.names.index(name)
        self.sums[row, 0] += total
        self.sums[row, 1] += count

    def add(self, outputs, inputs: dict, retrieval_stats: dict) -> None:
        for name in LOSS_NAMES:
            value = getattr(outputs, name)
            if value is not None:
                self._add(name, float(value.detach()), 1)
        self._add("recall", retrieval_stats["recall_sum"], retrieval_stats["recall_count"])
        self._add("forced_per_pair", retrieval_stats["forced"], len(inputs["input_ids"]))
        if "knowledge_labels" in inputs and outputs.knowledge_gates is not None:
            gates = outputs.knowledge_gates.detach().float().cpu()
            positive = inputs["knowledge_labels"].cpu().bool()
            self._add("gate_positive", float(gates[positive].sum()), float(positive.sum()))
            self._add("gate_other", float(gates[~positive].sum()), float((~positive).sum()))

    def reduce(self, accelerator) -> dict[str, float | None]:
        """Means over every process's micro-batches of this step (None where nothing was measured); resets."""
        totals = accelerator.reduce(self.sums.to(accelerator.device), reduction="sum").cpu()
        self.sums.zero_()
        return {
            name: float(total) / float(count) if count else None for name, (total, count) in zip(self.names, totals)
        }


def set_train_mode(model, freeze_vision_tower: bool) -> None:
    """Training mode, except a frozen (locked) vision tower, which stays in eval mode so that its normalisation
    statistics (BatchNorm in CNN backbones) stay those it was pretrained with."""
    model.train()
    if freeze_vision_tower:
        model.reavl.vision_model.eval()


def _setup_logging(accelerator) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO,
    )
    if not accelerator.is_main_process:
        for name in ("training", "processing"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _summarise_history(history: list[dict], window: int = 10) -> dict:
    summary = {}
    for name in LOSS_NAMES:
        values = [entry[name] for entry in history if entry.get(name) is not None]
        if values:
            summary[name] = {
                "first": values[0],
                "last": values[-1],
                "first_mean": float(np.mean(values[:window])),
                "last_mean": float(np.mean(values[-window:])),
            }
    return summary


def run_pretraining(
    model_args: ModelArguments | None = None,
    data_args: DataArguments | None = None,
    training_args: PretrainingArguments | None = None,
    **overrides,
) -> dict:
    """Pre-train REAVL; returns (and writes to `output_dir/train_results.json`) the run's results.

    Pass the three argument dataclasses, or any of their fields as keyword arguments
    (`run_pretraining(train_data=..., knowledge=..., config_json=..., output_dir=..., max_steps=100)`).
    """
    if model_args is None or data_args is None or training_args is None:
        given = {}
        for arguments in (model_args, data_args, training_args):
            if arguments is not None:
                given.update(asdict(arguments))
        model_args, data_args, training_args = arguments_from_dict({**given, **overrides})
    elif overrides:
        raise TypeError("pass either the argument dataclasses or keyword overrides, not both")
    try:
        return _run_pretraining(model_args, data_args, training_args)
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            # accelerate keeps its state in process-wide singletons: forget it, so that a later in-process call (the
            # demo trains the model and its no-knowledge ablation) may choose other settings (mixed precision, ...).
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()


def _run_pretraining(
    model_args: ModelArguments, data_args: DataArguments, training_args: PretrainingArguments
) -> dict:
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    from processing.knowledge_base import load_knowledge_base
    from processing.mention_linker import MentionLinker

    start_time = time.time()
    output_dir = Path(training_args.output_dir)
    report_to = None if training_args.report_to in ("none", "", None) else training_args.report_to
    # `accelerate launch --multi_gpu` / torchrun on a host without an accelerator: DDP over gloo on the CPU
    # (accelerate's `--cpu` launcher starts a single process unless it is given an MPI hostfile).
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=training_args.use_cpu or (multi_process and _no_accelerator()),
        gradient_accumulation_steps=training_args.gradient_accumulation_steps,
        mixed_precision=training_args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        rng_types=[],  # data order comes from EpochShuffleSampler; no hidden RNG synchronisation
    )
    _setup_logging(accelerator)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in _checkpoint_root(output_dir).glob("step_*.tmp"):  # a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()

    # ---- model, processor ------------------------------------------------------------------------------------------
    set_seed(training_args.seed)  # identical initial weights on every process
    model, processor = load_model_and_processor(model_args)
    config = model.config
    num_knowledge = config.num_knowledge
    tokenizer = processor.tokenizer

    # ---- knowledge base, relation vocabulary, weak linking ---------------------------------------------------------
    knowledge_base, linker, knowledge_graph = None, None, None
    if data_args.knowledge:
        knowledge_base = load_knowledge_base(data_args.knowledge, format=data_args.knowledge_format)
        linker = MentionLinker.from_knowledge_base(knowledge_base)
        knowledge_graph = KnowledgeGraph(knowledge_base, config.kg_relations, config.num_kg_relations)
        config.kg_relations = knowledge_graph.relations
        logger.info(
            "knowledge base: %d entries, %d triples over %d relations (%d dropped: relation outside the vocabulary "
            "or tail not in the KB)",
            len(knowledge_base), len(knowledge_graph), len(knowledge_graph.relations), knowledge_graph.dropped,
        )
        if len(knowledge_graph) == 0:
            knowledge_graph = None
            logger.info("no usable KB triples: the KG relational-reasoning loss is off")
    elif num_knowledge > 0:
        raise ValueError(
            f"num_knowledge={num_knowledge} needs a knowledge base: pass --knowledge (or --num_knowledge 0 for the "
            "no-knowledge ablation)"
        )

    # ---- image-text pairs ------------------------------------------------------------------------------------------
    pairs = load_image_text_pairs(
        data_args.train_data, data_args.image_column, data_args.caption_column, data_args.data_split
    )
    pairs, data_stats = prepare_pretraining_pairs(pairs, linker)
    train_dataset, holdout_dataset = split_by_image(pairs, data_args.holdout_images, training_args.seed)
    if data_args.max_train_pairs:
        train_dataset = train_dataset.select(range(min(data_args.max_train_pairs, len(train_dataset))))
    logger.info("training on %d pairs; %d pairs of %d held-out images",
                len(train_dataset), len(holdout_dataset), data_args.holdout_images)
    collator = PretrainingCollator(processor.image_processor, tokenizer, data_args.max_text_length)

    # ---- resume? (checked before any expensive work) ---------------------------------------------------------------
    fingerprint = run_fingerprint(config, train_dataset, knowledge_base, training_args, accelerator.num_processes)
    checkpoint = resolve_checkpoint(output_dir, training_args.resume_from_checkpoint)
    resume_state = None
    if checkpoint is not None:
        resume_state = json.loads((checkpoint / CHECKPOINT_STATE_FILE).read_text())
        check_resumable(checkpoint, resume_state, fingerprint)
        logger.info("resuming from %s (step %d)", checkpoint, resume_state["step"])
    elif training_args.resume_from_checkpoint == "latest":
        logger.info("no checkpoint in %s: starting fresh", _checkpoint_root(output_dir))
    elif list_checkpoints(output_dir):
        # A fresh run would mix its checkpoints with another run's, and `latest` could later pick the wrong one.
        if not training_args.overwrite_output_dir:
            raise ValueError(
                f"{output_dir} already holds checkpoints ({list_checkpoints(output_dir)[-1].name}); pass "
                "--resume_from_checkpoint latest to continue that run, or --overwrite_output_dir to start afresh"
            )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(_checkpoint_root(output_dir))
        accelerator.wait_for_everyone()

    # ---- knowledge index -------------------------------------------------------------------------------------------
    retriever, refresher = None, None
    if num_knowledge > 0:
        from processing.knowledge_index import build_knowledge_index
        from processing.retrieval_reavl import ReavlRetriever

        index_dir = Path(data_args.knowledge_index) if data_args.knowledge_index else output_dir / "knowledge"
        if not data_args.knowledge_index and not (resume_state and index_dir.exists()):
            if accelerator.is_main_process:
                logger.info("building the knowledge index of %d entries in %s", len(knowledge_base), index_dir)
                build_knowledge_index(
                    model, processor, knowledge_base, str(index_dir), index_factory=data_args.index_factory,
                    batch_size=training_args.index_batch_size, progress=not training_args.disable_tqdm,
                )
            accelerator.wait_for_everyone()
        retriever = ReavlRetriever.from_pretrained(str(index_dir))
        processor.set_knowledge(retriever)
        refresher = KnowledgeIndexRefresher(accelerator, retriever, training_args.index_batch_size)
        if refresher.num_rows != len(knowledge_base):
            raise ValueError(
                f"the knowledge index in {index_dir} has {refresher.num_rows} rows but the knowledge base "
                f"{data_args.knowledge} has {len(knowledge_base)}; rebuild the index from this knowledge base"
            )
        if resume_state is None:
            try:
                retriever.check_compatible(model)
                refresher.embeddings, refresher.fingerprint = retriever.embeddings, retriever.fingerprint
            except ValueError as mismatch:  # e.g. a given index embedded by another encoder
                logger.info("re-embedding the knowledge index with this model's knowledge encoder (%s)", mismatch)
                refresher.refresh(model)

    builder = KnowledgeBatchBuilder(
        retriever, num_knowledge, tokenizer, config.mlm_probability, knowledge_graph,
        index_negatives=training_args.index_negatives,
    )
    if refresher is not None and refresher.embeddings is not None:
        builder.set_index_embeddings(refresher.embeddings)

    # ---- optimizer, data loader, prepare ---------------------------------------------------------------------------
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": training_args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=training_args.learning_rate,
        betas=(training_args.adam_beta1, training_args.adam_beta2),
        eps=training_args.adam_epsilon,
    )
    train_dataloader = DataLoader(
        train_dataset,
        batch_size=training_args.per_device_train_batch_size,
        sampler=EpochShuffleSampler(len(train_dataset), training_args.seed),
        collate_fn=collator,
        drop_last=True,  # constant batch shapes: every contrastive step sees the same number of negatives
        num_workers=training_args.dataloader_num_workers,
        # The loader's own generator: creating an iterator must not draw from the global RNG (exact resume).
        generator=torch.Generator().manual_seed(training_args.seed),
    )
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    unwrapped = accelerator.unwrap_model(model)
    if len(train_dataloader) == 0:
        raise ValueError(
            f"{len(train_dataset)} training pairs make no full batch of {training_args.per_device_train_batch_size} "
            f"x {accelerator.num_processes} processes"
        )
    steps_per_epoch = max(1, math.ceil(len(train_dataloader) / training_args.gradient_accumulation_steps))
    max_steps = training_args.max_steps or max(1, math.ceil(training_args.num_train_epochs * steps_per_epoch))
    global_batch = (
        training_args.per_device_train_batch_size * accelerator.num_processes * training_args.gradient_accumulation_steps
    )

    # ---- evaluation before training (fresh runs; a resumed run keeps the figures of its start) ---------------------
    recall_eval = train_dataset.filter(lambda row: len(row) > 0, input_columns="positive_rows")
    recall_eval = recall_eval.select(range(min(data_args.recall_eval_pairs, len(recall_eval))))
    if resume_state is None:
        results_before = {"recall": None, "holdout_retrieval": None}
        if accelerator.is_main_process:
            results_before["recall"] = evaluate_weak_positive_recall(
                unwrapped, retriever, recall_eval, collator, num_knowledge, training_args.eval_batch_size,
                accelerator.device,
            )
            if training_args.eval_retrieval and len(holdout_dataset):
                results_before["holdout_retrieval"] = evaluate_image_text_retrieval(
                    unwrapped, holdout_dataset, processor, training_args.eval_batch_size, accelerator.device
                )
            logger.info("before training: weak-positive recall@%d %s; held-out retrieval %s",
                        num_knowledge, results_before["recall"], results_before["holdout_retrieval"])
        history: list[dict] = []
        step, epoch, batches_into_epoch, micro_batch = 0, 0, 0, 0
    else:
        results_before = resume_state["results_before"]
        history = resume_state["history"]
        step, epoch = resume_state["step"], resume_state["epoch"]
        batches_into_epoch, micro_batch = resume_state["batches_into_epoch"], resume_state["micro_batch"]

    if report_to:
        tracker_config = {
            key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for arguments in (model_args, data_args, training_args) for key, value in asdict(arguments).items()
        }
        accelerator.init_trackers("reavl_pretrain", config=tracker_config)

    # ---- resume: weights, optimizer, RNG states, index embeddings (last, so nothing draws from the RNG after) -----
    if resume_state is not None:
        if refresher is not None:
            embeddings = np.load(checkpoint / CHECKPOINT_EMBEDDINGS_FILE, allow_pickle=False)
            refresher.install(embeddings, resume_state["index_fingerprint"])
            builder.set_index_embeddings(embeddings)
        accelerator.load_state(str(checkpoint))
    else:
        set_seed(training_args.seed, device_specific=True)  # different dropout/ITM sampling streams per process

    logger.info(
        "training: %d steps (%d per epoch), global batch %d (%d x %d processes x %d accumulation), K=%d, "
        "index refresh every %s steps",
        max_steps, steps_per_epoch, global_batch, training_args.per_device_train_batch_size,
        accelerator.num_processes, training_args.gradient_accumulation_steps, num_knowledge,
        training_args.index_refresh_steps or "never (end only)",
    )
    progress = tqdm(
        total=max_steps, initial=step, desc="pretrain",
        disable=not accelerator.is_local_main_process or training_args.disable_tqdm,
    )
    step_statistics = StepStatistics()
    step_start, data_time = time.perf_counter(), 0.0
    stopped_early = False

    freeze_vision = model_args.freeze_vision_tower
    while step < max_steps and not stopped_early:
        train_dataloader.set_epoch(epoch)
        loader = (
            accelerator.skip_first_batches(train_dataloader, batches_into_epoch)
            if batches_into_epoch else train_dataloader
        )
        wait_start = time.perf_counter()
        for batch in loader:
            data_time += time.perf_counter() - wait_start
            batches_into_epoch += 1
            micro_batch += 1
            if training_args.image_augmentation:
                augment_seed = (training_args.seed * 1_000_003 + micro_batch) * 1013 + accelerator.process_index
                original = batch["pixel_values"]
                batch["pixel_values"] = augment_pixel_values(original, seed=augment_seed)
                if training_args.alignment_views:
                    batch["view_pixel_values"] = torch.stack(
                        [
                            augment_pixel_values(original, seed=augment_seed + 7919 * view)
                            for view in range(1, training_args.alignment_views + 1)
                        ],
                        dim=1,
                    )
            with accelerator.accumulate(model):
                query = None
                set_train_mode(unwrapped, freeze_vision)  # evaluation and index refreshes leave eval mode behind
                if num_knowledge > 0:
                    unwrapped.eval()  # retrieval as at inference: no dropout in the query
                    with torch.no_grad(), accelerator.autocast():
                        query = unwrapped.reavl.get_query_embeddings(
                            batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
                        )
                set_train_mode(unwrapped, freeze_vision)
                mask_seed = (training_args.seed * 1_000_003 + micro_batch) * 1009 + accelerator.process_index
                inputs, retrieval_stats = builder(batch, query, mask_seed)
                if "view_pixel_values" in batch and "knowledge_labels" in inputs:
                    inputs["view_pixel_values"] = batch["view_pixel_values"]
                inputs = {name: value.to(accelerator.device) for name, value in inputs.items()}
                outputs = model(**inputs)
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and training_args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), training_args.max_grad_norm)
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate_at(step, training_args, max_steps)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            step_statistics.add(outputs, inputs, retrieval_stats)
            if not accelerator.sync_gradients:
                wait_start = time.perf_counter()
                continue

            # ---- an optimizer step is complete ---------------------------------------------------------------------
            step += 1
            entry = {"step": step, "lr": learning_rate_at(step - 1, training_args, max_steps)}
            entry.update(step_statistics.reduce(accelerator))
            elapsed = time.perf_counter() - step_start
            entry["samples_per_second"] = global_batch / elapsed if elapsed > 0 else None
            entry["data_time"] = data_time
            history.append(entry)

            if num_knowledge > 0 and training_args.index_refresh_steps and step % training_args.index_refresh_steps == 0:
                builder.set_index_embeddings(refresher.refresh(unwrapped))

            progress.update(1)
            progress.set_postfix(
                loss=f"{entry['loss']:.3f}", samples_s=f"{entry['samples_per_second']:.1f}",
                data_s=f"{data_time:.2f}",
            )
            if step % training_args.logging_steps == 0 or step == max_steps:
                window = history[-training_args.logging_steps:]
                logged = {}
                for name in [*LOSS_NAMES, "recall", "gate_positive", "gate_other", "forced_per_pair",
                             "samples_per_second", "data_time"]:
                    values = [item[name] for item in window if item.get(name) is not None]
                    if values:
                        logged[f"train/{name}"] = float(np.mean(values))
                logged["train/lr"] = entry["lr"]
                logged["train/epoch"] = epoch
                if report_to:
                    accelerator.log(logged, step=step)
                logger.info(
                    "step %d/%d %s", step, max_steps,
                    " ".join(f"{key.split('/')[1]}={value:.4g}" for key, value in logged.items()),
                )

            if training_args.save_steps and step % training_args.save_steps == 0:
                trainer_state = {
                    "step": step,
                    "epoch": epoch,
                    "batches_into_epoch": batches_into_epoch,
                    "micro_batch": micro_batch,
                    "run_fingerprint": fingerprint,
                    "index_fingerprint": refresher.fingerprint if refresher is not None else None,
                    "results_before": results_before,
                    "history": history,
                }
                path = save_checkpoint(
                    accelerator, output_dir, step, trainer_state, refresher, training_args.save_total_limit
                )
                logger.info("saved checkpoint %s", path)

            step_start, data_time = time.perf_counter(), 0.0
            if training_args.stop_after_step is not None and step >= training_args.stop_after_step:
                stopped_early = step < max_steps
                break
            if step >= max_steps:
                break
            wait_start = time.perf_counter()
        else:
            epoch, batches_into_epoch = epoch + 1, 0
    progress.close()

    results: dict[str, Any] = {
        "step": step,
        "max_steps": max_steps,
        "stopped_early": stopped_early,
        "num_processes": accelerator.num_processes,
        "global_batch_size": global_batch,
        "num_knowledge": num_knowledge,
        "train_pairs": len(train_dataset),
        "holdout_pairs": len(holdout_dataset),
        "data": data_stats.as_dict(),
        "losses": _summarise_history(history),
    }
    if stopped_early:
        logger.info("stopped after step %d of %d (--stop_after_step); resume with --resume_from_checkpoint latest",
                    step, max_steps)
        results["wall_time_s"] = time.time() - start_time
        results["history"] = history
        accelerator.end_training()
        return results

    # ---- query-side retriever tuning (knowledge encoder locked), then the final index refresh ------------------------
    if training_args.query_tuning_steps and retriever is not None:
        from .query_tuning import tune_retrieval_queries

        results["query_tuning"] = tune_retrieval_queries(
            accelerator, unwrapped, retriever, train_dataloader, training_args.query_tuning_steps,
            training_args.query_tuning_learning_rate or training_args.learning_rate, training_args.seed,
            training_args.image_augmentation, train_vision_tower=not model_args.freeze_vision_tower,
            train_key_projection=training_args.query_tuning_key_projection,
            index_batch_size=training_args.index_batch_size, logging_steps=training_args.logging_steps * 5,
            disable_tqdm=training_args.disable_tqdm,
        )

    # ---- end: final index refresh, evaluation, save ----------------------------------------------------------------
    if refresher is not None:
        builder.set_index_embeddings(refresher.refresh(unwrapped))
    results_after = {"recall": None, "holdout_retrieval": None}
    final_dir = output_dir / "final"
    if accelerator.is_main_process:
        results_after["recall"] = evaluate_weak_positive_recall(
            unwrapped, retriever, recall_eval, collator, num_knowledge, training_args.eval_batch_size,
            accelerator.device,
        )
        if training_args.eval_retrieval and len(holdout_dataset):
            results_after["holdout_retrieval"] = evaluate_image_text_retrieval(
                unwrapped, holdout_dataset, processor, training_args.eval_batch_size, accelerator.device
            )
        logger.info("after training: weak-positive recall@%d %s; held-out retrieval %s",
                    num_knowledge, results_after["recall"], results_after["holdout_retrieval"])
        unwrapped.save_pretrained(str(final_dir))
        processor.save_pretrained(str(final_dir))
    accelerator.wait_for_everyone()

    training_recall = [entry["recall"] for entry in history if entry.get("recall") is not None]
    results.update(
        {
            "final_dir": str(final_dir),
            "weak_positive_recall_at_k": {
                "k": num_knowledge,
                "eval_pairs": len(recall_eval),
                "before": results_before["recall"],
                "after": results_after["recall"],
            },
            "training_recall_before_forcing": {
                "first": training_recall[0] if training_recall else None,
                "last": training_recall[-1] if training_recall else None,
            },
            "holdout_retrieval": {
                "before": results_before["holdout_retrieval"],
                "after": results_after["holdout_retrieval"],
            },
            "wall_time_s": time.time() - start_time,
            "history": history,
        }
    )
    if accelerator.is_main_process:
        (output_dir / "train_results.json").write_text(json.dumps(results, indent=1))
        logger.info("wrote %s and %s", final_dir, output_dir / "train_results.json")
    accelerator.end_training()
    return results


def main(argv: list[str] | None = None) -> int:
    try:
        model_args, data_args, training_args = parse_arguments(argv)
        run_pretraining(model_args, data_args, training_args)
    except (CheckpointMismatchError, FileNotFoundError) as error:
        print(f"reavl pretrain: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
