"""Fine-tune a REAVL task head with `Trainer`: knowledge VQA, entity linking, image-text retrieval, classification.

Launch (any `TrainingArguments` flag passes through, `--push_to_hub` included):

    reavl finetune --task vqa --model_name_or_path runs/pretrain --train_file world/vqa_train.json \
        --validation_file world/vqa_test.json --output_dir runs/vqa --num_train_epochs 5
    reavl finetune --task entity-linking --model_name_or_path runs/pretrain \
        --train_file ../shared/data/wikimel --validation_file ../shared/data/wikimel --validation_split test \
        --knowledge_base ../shared/data/wikimel --output_dir runs/wikimel --max_steps 500
    reavl finetune --task retrieval --model_name_or_path runs/pretrain --train_file data/captions.csv ...
    reavl finetune --task classification --model_name_or_path runs/pretrain --train_file snli_ve_train.jsonl ...

or in Python: `run_finetuning(task="vqa", model_name_or_path=..., train_file=..., output_dir=...) -> dict`.

`--model_name_or_path` is a REAVL folder (pre-trained, or a task model) with its `ReavlProcessor` beside it (or at
`--processor_name_or_path`); its knowledge index is the processor's `knowledge/`, or is built from
`--knowledge_base` with the model's own knowledge encoder. `--no_knowledge` fine-tunes (and evaluates) the
no-knowledge ablation; the final evaluation reports the full model and the ablation side by side.

Retrieval during fine-tuning (the design decision)
--------------------------------------------------
The knowledge encoder is the shared text tower, so fine-tuning moves the keys away from the index, which was embedded
with the encoder the run started from:

- **VQA and classification** attach the retriever to the model (`model.set_retriever`, as RAG does): `forward`
  retrieves `config.num_knowledge` entries with the *current* model's query (inside the training forward, no extra
  pass). The index keys are those of the last refresh; the scores that reach the model are recomputed from the live
  encoder (`retrieval_logits`), so only the choice of entries is stale.
- **Entity linking** needs the gold entity among the candidates during training, which neither the collator (it
  cannot run the model) nor the model can arrange, so [`ReavlTrainer`] does it: in `compute_loss` and
  `prediction_step` it computes the current model's query (no grad), retrieves `num_candidates` entries, and, in
  training only, replaces the last candidate with the gold entity when the retriever missed it; `labels` is the
  gold position (-100 at evaluation when the retriever missed it: that mention scores 0 in Hits@k and MRR).
- **Refresh** (ANCE-style): `--refresh_index_steps N` re-embeds the whole index with the current encoder every N
  optimizer steps (0: never during training), and a run resumed from a checkpoint re-embeds it before its first
  step (the index came with the starting model, the weights with the checkpoint). Independently, **every save re-embeds a stale index first**
  ([`ReavlTrainer.save_model`]), so each checkpoint and the final folder carry an index whose encoder fingerprint
  matches their weights (the retriever refuses a model whose fingerprint differs). A save therefore costs one pass
  of the knowledge encoder over the knowledge base: on large bases save rarely (`--save_strategy no`).
- Retrieval fine-tuning uses no knowledge (ITC); its saved index is still refreshed, so the folder stays loadable.
- `--freeze_encoders` trains only the fusion, gates and head: queries and keys keep their weights, the index stays
  exact throughout and is never re-embedded, and a step costs about a third (the cheap path on large bases).

Everything is saved to `output_dir` at the end: model (loads with its Auto class and `trust_remote_code=True`),
processor and re-embedded `knowledge/`, and `finetune_results.json` with the metrics.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments, set_seed

from .task_data import (
    TASKS,
    ClassificationCollator,
    EntityLinkingCollator,
    ReadOptions,
    RetrievalCollator,
    TaskDataset,
    VqaCollator,
    answer_vocabulary_coverage,
    build_answer_vocabulary,
    load_answer_vocabulary,
    read_task_data,
    vqa_metric_references,
)


logger = logging.getLogger(__name__)

# Hits@k cut-offs of entity linking; with fewer candidates than the largest, Hits@10 is Hits@K (noted in results).
ENTITY_LINKING_K_VALUES = (1, 5, 10)
RESULTS_FILE = "finetune_results.json"


def task_model_class(task: str):
    """The REAVL head of a task."""
    from modeling_reavl import (
        ReavlForEntityLinking,
        ReavlForImageTextClassification,
        ReavlForImageTextRetrieval,
        ReavlForQuestionAnswering,
    )

    classes = {
        "vqa": ReavlForQuestionAnswering,
        "entity-linking": ReavlForEntityLinking,
        "retrieval": ReavlForImageTextRetrieval,
        "classification": ReavlForImageTextClassification,
    }
    if task not in classes:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    return classes[task]


# --------------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    """Which model, processor and knowledge to start from."""

    model_name_or_path: str = field(
        metadata={"help": "REAVL folder (pre-trained or a task model) or Hub repo to start from."}
    )
    processor_name_or_path: str | None = field(
        default=None, metadata={"help": "ReavlProcessor folder; defaults to model_name_or_path."}
    )
    knowledge_base: str | None = field(
        default=None,
        metadata={"help": "Knowledge base to (re)build the index from with the model's knowledge encoder (any "
                          "format of processing.knowledge_base.load_knowledge_base); default: the processor's index."},
    )
    knowledge_base_format: str | None = field(default=None, metadata={"help": "Format of --knowledge_base."})
    index_factory: str = field(default="Flat", metadata={"help": "faiss factory string of a built index."})
    index_batch_size: int = field(default=64, metadata={"help": "Entries per batch when (re-)embedding the index."})
    num_knowledge: int | None = field(
        default=None, metadata={"help": "Override config.num_knowledge (entries retrieved per example)."}
    )
    retrieval_query_modalities: str | None = field(
        default=None,
        metadata={"help": "Override config.retrieval_query_modalities: image_text, image (questions that never name "
                          "what to look up) or text.", "choices": ["image_text", "image", "text"]},
    )
    freeze_encoders: bool = field(
        default=False,
        metadata={"help": "Train only the fusion, gates and task head: the vision and text towers (the text tower is "
                          "also the knowledge encoder) and the retrieval projections stay fixed, so the knowledge "
                          "index stays valid (no re-embedding) and a step costs about a third."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow remote code of a Hub model."})


@dataclass
class DataArguments:
    """Which task and data, how to read it, and the knowledge options of the run."""

    task: str = field(metadata={"help": "Task to fine-tune.", "choices": list(TASKS)})
    train_file: str | None = field(default=None, metadata={"help": "Training data file or folder."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation data file or folder."})
    train_split: str = field(default="train", metadata={"help": "Split of split-based formats (WikiMEL)."})
    validation_split: str = field(default="dev", metadata={"help": "Evaluation split of split-based formats."})
    data_format: str | None = field(
        default=None,
        metadata={"help": "Data format (okvqa, vqa, wikimel, jsonl, captions, snli-ve, nlvr2); inferred if unset."},
    )
    image_root: str | None = field(default=None, metadata={"help": "Folder image names are relative to."})
    missing_images: str | None = field(
        default=None,
        metadata={"help": "Missing image files: 'error', or 'placeholder' (blank image). Default: placeholder for "
                          "WikiMEL, error otherwise.", "choices": ["error", "placeholder"]},
    )
    on_invalid: str = field(
        default="raise",
        metadata={"help": "Bad records: 'raise' (ValueError listing their ids) or 'skip' (log the ids).",
                  "choices": ["raise", "skip"]},
    )
    verify_images: bool = field(default=True, metadata={"help": "Decode-check every image when reading."})
    answer_vocabulary: str | None = field(
        default=None,
        metadata={"help": "VQA answer vocabulary JSON ({answer: id} or a list); default: the model's id2label if "
                          "it is a VQA model, else built from the training answers."},
    )
    no_answer_copy: bool = field(
        default=False,
        metadata={"help": "VQA: a plain answer classifier, without copying answers from the retrieved entries."},
    )
    min_answer_count: int = field(
        default=1, metadata={"help": "Built vocabulary: answers given in at least this many training questions."}
    )
    labels: str | None = field(
        default=None, metadata={"help": "Classification class names, comma-separated (position = class id)."}
    )
    max_length: int = field(default=64, metadata={"help": "Text tokens kept per example."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training records."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation records."})
    num_candidates: int = field(
        default=10, metadata={"help": "Entity linking: candidates retrieved per mention (Hits@10 needs >= 10)."}
    )
    train_num_candidates: int | None = field(
        default=None,
        metadata={"help": "Entity linking: candidates per mention in training (default: num_candidates); each costs "
                          "one pass of the knowledge encoder over the entry."},
    )
    no_knowledge: bool = field(
        default=False, metadata={"help": "Ablation: fine-tune and evaluate with use_knowledge=False."}
    )
    refresh_index_steps: int = field(
        default=0, metadata={"help": "Re-embed the knowledge index every N steps (0: only when saving)."}
    )
    eval_ablation: bool = field(
        default=True, metadata={"help": "Final evaluation also without knowledge, beside the full model."}
    )


def parse_finetune_args(argv: Sequence[str] | None = None, **kwargs):
    """(ModelArguments, DataArguments, TrainingArguments) from command-line `argv` or from keyword arguments (each
    routed to the dataclass that has the field)."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments), prog="reavl finetune",
                              description="Fine-tune a REAVL task head with Trainer (see training/finetune.py).")
    if argv is not None:
        return parser.parse_args_into_dataclasses(list(argv))
    names = [{item.name for item in fields(cls)} for cls in (ModelArguments, DataArguments, TrainingArguments)]
    unknown = set(kwargs) - set().union(*names)
    if unknown:
        raise TypeError(f"run_finetuning got unknown argument(s) {sorted(unknown)}")
    groups = [{key: value for key, value in kwargs.items() if key in group} for group in names]
    return parser.parse_dict({**groups[0], **groups[1], **groups[2]})


# --------------------------------------------------------------------------------------------------------------------
# Knowledge index helpers
# --------------------------------------------------------------------------------------------------------------------


def _base_model(model):
    """The `ReavlModel` inside a task head (or the model itself)."""
    return getattr(model, "reavl", model)


def processor_retriever(processor):
    """The processor's retriever, or None when it has no knowledge index."""
    if not getattr(processor, "knowledge_available", True):
        return None
    return processor.retriever


def freeze_encoders(model) -> int:
    """Freeze the unimodal towers, the knowledge encoder and the retrieval projections of a REAVL model (what the
    knowledge index's keys and the retrieval queries depend on). Returns the number of frozen parameters."""
    base = _base_model(model)
    modules = [base.vision_model, base.text_model, base.knowledge_model, base.retrieval_head]
    frozen = 0
    for module in modules:
        if module is None:
            continue
        for parameter in module.parameters():
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    return frozen


def build_index_for(model, processor, knowledge_base, index_factory: str = "Flat", batch_size: int = 64):
    """Embed `knowledge_base` (a loaded KB dataset) with the model's knowledge encoder and give the index to the
    processor (in memory; it is written to the output folder when the processor is saved)."""
    import tempfile

    from processing.knowledge_index import build_knowledge_index

    logger.info("Embedding the %d knowledge entries with the model's knowledge encoder", len(knowledge_base))
    with tempfile.TemporaryDirectory(prefix="reavl_knowledge_") as scratch:
        retriever = build_knowledge_index(model, processor, knowledge_base, Path(scratch) / "knowledge",
                                          index_factory=index_factory, batch_size=batch_size)
        retriever.embeddings  # in memory before the scratch folder goes
    processor.set_knowledge(retriever)
    return retriever


def refresh_knowledge_index(model, processor, batch_size: int = 64) -> bool:
    """Re-embed the processor's index with the model's current knowledge encoder when its fingerprint changed.

    Returns True when it re-embedded. The retriever keeps its entries (pre-tokenized ids) and gets new keys.
    """
    from processing.knowledge_index import embed_knowledge_entries

    retriever = processor_retriever(processor)
    if retriever is None:
        return False
    base = _base_model(model)
    fingerprint = base.knowledge_encoder_fingerprint()
    if getattr(retriever, "fingerprint", None) == fingerprint:
        return False
    embeddings = embed_knowledge_entries(base, retriever.token_ids(), batch_size, pad_token_id=retriever.pad_token_id)
    retriever.update_embeddings(embeddings, fingerprint)
    logger.info("Re-embedded the knowledge index (%d entries) with encoder %s", len(retriever.ids), fingerprint)
    return True


# --------------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------------


class ReavlTrainer(Trainer):
    """`Trainer` for the REAVL heads: entity-linking candidates from the current model, a fresh index at every save.

    Args (beyond `Trainer`'s):
        candidate_retriever: the retriever entity-linking candidates come from (None for other tasks).
        num_candidates: candidates per mention at evaluation.
        train_num_candidates: candidates per mention in training (default: `num_candidates`).
        index_batch_size: entries per batch when a save re-embeds the index.
        prediction_keys: model output fields kept for `compute_metrics` (default: all).
    """

    def __init__(self, *args, candidate_retriever=None, num_candidates: int = 10,
                 train_num_candidates: int | None = None, index_batch_size: int = 64,
                 prediction_keys: Sequence[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # The heads' losses are per-batch means: Trainer must scale them for gradient accumulation itself.
        self.model_accepts_loss_kwargs = False
        self.candidate_retriever = candidate_retriever
        self.num_candidates = num_candidates
        self.train_num_candidates = train_num_candidates or num_candidates
        self.index_batch_size = index_batch_size
        self.prediction_keys = None if prediction_keys is None else tuple(prediction_keys)

    @torch.no_grad()
    def add_candidates(self, model, inputs: dict, force_gold: bool) -> dict:
        """Retrieve entity-linking candidates with the current model's query and set `labels` (gold position).

        `inputs["gold_knowledge_index"]` `(batch,)` is replaced by `knowledge_input_ids` / `knowledge_attention_mask`
        `(batch, K, L)`, `knowledge_indices` `(batch, K)` and `labels` `(batch,)`. With `force_gold` the gold entry
        takes the last slot when the retriever missed it.
        """
        inputs = dict(inputs)
        gold = inputs.pop("gold_knowledge_index")
        if self.candidate_retriever is None:
            raise ValueError("entity linking needs a knowledge index: the processor has none (pass --knowledge_base)")
        base = _base_model(self.accelerator.unwrap_model(model))
        device = inputs["input_ids"].device
        query = base.get_query_embeddings(inputs["pixel_values"], inputs["input_ids"], inputs.get("attention_mask"))
        num_candidates = self.train_num_candidates if force_gold else self.num_candidates
        retrieved = self.candidate_retriever.retrieve(query.detach().float().cpu(), num_candidates)
        indices = torch.as_tensor(retrieved["knowledge_indices"]).long().cpu().clone()
        gold = gold.long().cpu()
        hit = indices == gold[:, None]
        found = hit.any(dim=1)
        labels = torch.where(found, hit.float().argmax(dim=1), torch.full_like(gold, -100))
        entry_ids = torch.as_tensor(retrieved["knowledge_input_ids"])
        entry_mask = torch.as_tensor(retrieved["knowledge_attention_mask"])
        if force_gold and not found.all():
            missed = ~found
            indices[missed, -1] = gold[missed]
            labels[missed] = indices.shape[1] - 1
            entry_ids, entry_mask = self.candidate_retriever.get_entries(indices)
            entry_ids, entry_mask = torch.as_tensor(entry_ids), torch.as_tensor(entry_mask)
        if inputs.get("use_knowledge") is False:
            # The ablation ranks the retrieved *set*: candidates in index-row order, so that neither their order
            # nor the tie-breaking of a stable sort carries the retriever's ranking.
            order = indices.clamp(min=0).argsort(dim=1, stable=True)
            indices = indices.gather(1, order)
            labels = torch.where(labels >= 0, order.argsort(dim=1).gather(1, labels.clamp(min=0)[:, None])[:, 0], labels)
            entry_ids, entry_mask = self.title_entries(indices)
        inputs.update(
            knowledge_input_ids=entry_ids.to(device),
            knowledge_attention_mask=entry_mask.to(device),
            knowledge_indices=indices.to(device),
            labels=labels.to(device),
        )
        return inputs

    def title_entries(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The no-knowledge ablation of entity linking: each candidate is its title alone (no entry text), so the
        head can only link by what the image and mention say about the name."""
        titles = self.candidate_retriever.titles
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        flat = [titles[int(row)] if row >= 0 else "" for row in indices.reshape(-1).tolist()]
        encoded = tokenizer(flat, padding=True, truncation=True, max_length=32, return_tensors="pt")
        shape = (*indices.shape, encoded["input_ids"].shape[-1])
        mask = encoded["attention_mask"].reshape(shape)
        mask[indices < 0] = 0
        return encoded["input_ids"].reshape(shape), mask

    def _move(self, inputs: dict) -> dict:
        device = self.args.device
        return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "gold_knowledge_index" in inputs:
            inputs = self.add_candidates(model, inputs, force_gold=model.training)
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if "gold_knowledge_index" in inputs:  # before Trainer checks for labels
            inputs = self.add_candidates(model, self._move(inputs), force_gold=False)
        if ignore_keys is None and self.prediction_keys is not None:
            ignore_keys = [name for name in _ALL_OUTPUT_KEYS if name not in self.prediction_keys]
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def refresh_knowledge_index(self) -> bool:
        """Re-embed the processor's index when the encoder changed (see [`refresh_knowledge_index`])."""
        if self.processing_class is None:
            return False
        return refresh_knowledge_index(self.accelerator.unwrap_model(self.model), self.processing_class,
                                       self.index_batch_size)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save model and processor, re-embedding the knowledge index first when the encoder changed, so the saved
        folder's index matches its weights; the training arguments are written as JSON (no pickle in the folder)."""
        if self.args.should_save:
            self.refresh_knowledge_index()
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            # Trainer pickles its arguments next to the weights (nothing reads them back); a pushed repo gets JSON.
            folder = Path(output_dir if output_dir is not None else self.args.output_dir)
            (folder / "training_args.bin").unlink(missing_ok=True)
            (folder / "training_args.json").write_text(self.args.to_json_string() + "\n", encoding="utf-8")


_ALL_OUTPUT_KEYS = ("logits", "knowledge_indices", "knowledge_scores", "knowledge_gates", "logits_per_image",
                    "logits_per_text", "image_embeds", "text_embeds")


class KnowledgeIndexRefreshCallback(TrainerCallback):
    """Re-embed the knowledge index when training starts from weights it was not embedded with (a resumed
    checkpoint), and every `every_steps` optimizer steps (ANCE-style refresh; 0: never)."""

    def __init__(self, trainer: ReavlTrainer, every_steps: int = 0):
        self.trainer = trainer
        self.every_steps = every_steps

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:  # resumed: the weights are the checkpoint's, the index the starting model's
            self.trainer.refresh_knowledge_index()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.every_steps > 0 and state.global_step % self.every_steps == 0:
            self.trainer.refresh_knowledge_index()
        return control


# --------------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------------


def _output(predictions, position: int = 0):
    """One output field of `EvalPrediction.predictions` (a tuple when the model returned several)."""
    if isinstance(predictions, (tuple, list)):
        return np.asarray(predictions[position])
    if position != 0:
        raise ValueError("the evaluation returned a single output")
    return np.asarray(predictions)


def _gate_statistics(predictions, position: int) -> dict[str, float]:
    if not isinstance(predictions, (tuple, list)) or len(predictions) <= position:
        return {}
    gates = np.asarray(predictions[position])
    if gates.size == 0:
        return {}
    return {"knowledge_gate_mean": float(gates[gates >= 0].mean())}


def build_compute_metrics(task: str, dataset: TaskDataset, id2label: dict[int, str] | None = None,
                          retriever=None):
    """`compute_metrics` for `Trainer` over `dataset` (evaluated in order), through the shipped `evaluate` modules.

    - vqa: `accuracy` (official VQA accuracy against the human answers, or soft scores; `vqa_accuracy` module);
    - entity-linking: `hits@1/5/10`, `mrr` (`entity_linking` module) of the candidates ranked by the head's logits,
      `retriever_hits@1`, `retriever_mrr` of the retriever's own order, and `num_candidates`;
    - retrieval: `i2t_r@1/5/10`, `t2i_r@1/5/10`, `r_mean` (`retrieval_recall` module), over the unique images;
    - classification: `accuracy` (`classification_accuracy` module).
    VQA and classification add `knowledge_gate_mean` when knowledge was used.
    """
    from .metrics import image_text_retrieval_metrics, load_metric

    if task == "vqa":
        config_name, references = vqa_metric_references(dataset)
        metric = load_metric("vqa_accuracy", config_name=config_name)

        def compute_vqa(prediction):
            logits = _output(prediction.predictions, 0)
            answers = [id2label[int(index)] for index in logits.argmax(axis=-1)]
            result = metric.compute(predictions=answers, references=references[: len(answers)])
            return {**result, **_gate_statistics(prediction.predictions, 1)}

        return compute_vqa

    if task == "entity-linking":
        metric = load_metric("entity_linking")
        gold_ids = [record["entity_id"] for record in dataset]
        ids = np.asarray([str(entry_id) for entry_id in retriever.ids], dtype=object)

        def rankings(indices, order):
            ranked = []
            for row_indices, row_order in zip(indices, order):
                rows = row_indices[row_order]
                ranked.append([ids[row] for row in rows if row >= 0])
            return ranked

        def compute_entity_linking(prediction):
            logits = _output(prediction.predictions, 0)
            indices = _output(prediction.predictions, 1).astype(np.int64)
            references = gold_ids[: len(logits)]
            by_head = rankings(indices, np.argsort(-logits, axis=1, kind="stable"))
            by_retriever = rankings(indices, np.tile(np.arange(indices.shape[1]), (len(indices), 1)))
            result = metric.compute(predictions=by_head, references=references, k_values=ENTITY_LINKING_K_VALUES)
            retriever_result = metric.compute(predictions=by_retriever, references=references, k_values=(1,))
            result["retriever_hits@1"] = retriever_result["hits@1"]
            result["retriever_mrr"] = retriever_result["mrr"]
            result["num_candidates"] = int(indices.shape[1])
            return result

        return compute_entity_linking

    if task == "retrieval":
        image_paths = [record["image"] for record in dataset]

        def compute_retrieval(prediction):
            image_embeds = _output(prediction.predictions, 0)
            text_embeds = _output(prediction.predictions, 1)
            first_row, text_to_image = {}, []
            for row, path in enumerate(image_paths[: len(text_embeds)]):
                text_to_image.append(first_row.setdefault(path, len(first_row)))
            unique_rows = [image_paths.index(path) for path in first_row]
            similarity = image_embeds[unique_rows] @ text_embeds.T
            result = image_text_retrieval_metrics(similarity, text_to_image)
            result["num_images"] = len(unique_rows)
            result["num_texts"] = len(text_to_image)
            return result

        return compute_retrieval

    if task == "classification":
        metric = load_metric("classification_accuracy")
        label2id = {label: index for index, label in enumerate(dataset.labels)}
        references = [label2id[record["label"]] for record in dataset]

        def compute_classification(prediction):
            logits = _output(prediction.predictions, 0)
            predicted = logits.argmax(axis=-1).tolist()
            result = metric.compute(predictions=predicted, references=references[: len(predicted)])
            return {**result, **_gate_statistics(prediction.predictions, 1)}

        return compute_classification
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


PREDICTION_KEYS = {
    "vqa": ("logits", "knowledge_gates"),
    "entity-linking": ("logits", "knowledge_indices"),
    "retrieval": ("image_embeds", "text_embeds"),
    "classification": ("logits", "knowledge_gates"),
}


# --------------------------------------------------------------------------------------------------------------------
# Assembling a run (shared with `reavl evaluate`)
# --------------------------------------------------------------------------------------------------------------------


def build_collator(task: str, processor, max_length: int = 64, use_knowledge: bool = True, label2id=None,
                   labels: Sequence[str] = (), retriever=None):
    """The collator of a task (see `training.task_data`)."""
    if task == "vqa":
        return VqaCollator(processor, label2id, max_length=max_length, use_knowledge=use_knowledge)
    if task == "entity-linking":
        if retriever is None:
            raise ValueError("entity linking needs a knowledge index: the processor has none (pass --knowledge_base)")
        return EntityLinkingCollator(processor, retriever.index_of, max_length=max_length, use_knowledge=use_knowledge)
    if task == "retrieval":
        return RetrievalCollator(processor, max_length=max_length)
    return ClassificationCollator(processor, labels, max_length=max_length, use_knowledge=use_knowledge)


def label_names_for(task: str) -> list[str]:
    """`TrainingArguments.label_names` of a task (Trainer would guess QA span labels for the VQA head)."""
    return [] if task == "retrieval" else ["labels"]


def evaluation_arguments(output_dir: str | Path, batch_size: int = 32, **overrides) -> TrainingArguments:
    """`TrainingArguments` for evaluation only (no logging integrations, no saving)."""
    overrides.setdefault("dataloader_pin_memory", torch.cuda.is_available())
    return TrainingArguments(output_dir=str(output_dir), per_device_eval_batch_size=batch_size, report_to="none",
                             remove_unused_columns=False, save_strategy="no", **overrides)


def make_trainer(task: str, model, processor, training_args: TrainingArguments, collator, train_dataset=None,
                 eval_dataset=None, compute_metrics=None, retriever=None, num_candidates: int = 10,
                 train_num_candidates: int | None = None, index_batch_size: int = 64,
                 callbacks=None) -> ReavlTrainer:
    """A [`ReavlTrainer`] set up for `task`: label names, kept prediction fields, candidates for entity linking."""
    if training_args.label_names is None:
        training_args.label_names = label_names_for(task)
    training_args.remove_unused_columns = False  # the collators read the raw records
    return ReavlTrainer(
        model=model,
        args=training_args,
        data_collator=collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        compute_metrics=compute_metrics,
        candidate_retriever=retriever if task == "entity-linking" else None,
        num_candidates=num_candidates,
        train_num_candidates=train_num_candidates,
        index_batch_size=index_batch_size,
        prediction_keys=PREDICTION_KEYS[task],
        callbacks=callbacks,
    )


def _labels_from_config(config, task: str) -> dict[int, str] | None:
    """The model's own labels when it already is a head of `task` with real labels (not the LABEL_0 defaults)."""
    architectures = config.architectures or []
    if task_model_class(task).__name__ not in architectures:
        return None
    id2label = {int(index): label for index, label in (config.id2label or {}).items()}
    if not id2label or all(label == f"LABEL_{index}" for index, label in id2label.items()):
        return None
    return id2label


def _without_retriever_order(metrics: dict) -> dict:
    """The no-knowledge run gives entity-linking candidates in index order: its `retriever_*` figures would
    describe that order, not the retriever, so they are left out."""
    return {name: value for name, value in metrics.items() if "retriever_" not in name}


def _entity_linking_note(num_candidates: int) -> str | None:
    if num_candidates < max(ENTITY_LINKING_K_VALUES):
        return (f"only {num_candidates} candidates per mention: hits@{max(ENTITY_LINKING_K_VALUES)} equals "
                f"hits@{num_candidates} (raise --num_candidates to 10)")
    return None


def run_finetuning(model_args: ModelArguments | None = None, data_args: DataArguments | None = None,
                   training_args: TrainingArguments | None = None, **kwargs) -> dict[str, Any]:
    """Fine-tune a task head and save it with its processor and re-embedded knowledge index to `output_dir`.

    Pass the three argument dataclasses, or keyword arguments of any of their fields:

    ```python
    >>> results = run_finetuning(task="entity-linking", model_name_or_path="runs/pretrain",
    ...                          train_file="world/entity_linking_train.jsonl",
    ...                          validation_file="world/entity_linking_test.jsonl", output_dir="runs/el",
    ...                          num_train_epochs=3, per_device_train_batch_size=16)
    >>> results["eval"]["eval_hits@1"], results["eval_no_knowledge"]["eval_hits@1"]
    ```

    Returns:
        `{"output_dir", "task", "train": train metrics, "eval": final metrics of the full model (None without
        --validation_file), "eval_no_knowledge": the ablation's (None unless eval_ablation), "num_train",
        "num_eval", "num_labels", "notes"}`; also written to `output_dir/finetune_results.json`.
    """
    from processing.processing_reavl import ReavlProcessor

    if model_args is None or data_args is None or training_args is None:
        if model_args is not None or data_args is not None or training_args is not None:
            raise TypeError("pass all three argument dataclasses, or keyword arguments only")
        model_args, data_args, training_args = parse_finetune_args(**kwargs)
    elif kwargs:
        raise TypeError("pass the argument dataclasses or keyword arguments, not both")
    task = data_args.task
    if data_args.train_file is None:
        raise ValueError("run_finetuning needs train_file (--train_file)")
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    notes: list[str] = []

    processor = ReavlProcessor.from_pretrained(model_args.processor_name_or_path or model_args.model_name_or_path)
    model_class = task_model_class(task)
    retriever = None if model_args.knowledge_base else processor_retriever(processor)
    options = ReadOptions(
        image_root=data_args.image_root, format=data_args.data_format, on_invalid=data_args.on_invalid,
        missing_images=data_args.missing_images, verify_images=data_args.verify_images,
        labels=data_args.labels.split(",") if data_args.labels else None,
    )

    # Labels (answers / classes) come from the data when the model has none for this task.
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_args.model_name_or_path,
                                        trust_remote_code=model_args.trust_remote_code)
    config_overrides: dict[str, Any] = {}
    if model_args.num_knowledge is not None:
        config_overrides["num_knowledge"] = model_args.num_knowledge
    if model_args.retrieval_query_modalities is not None:
        config_overrides["retrieval_query_modalities"] = model_args.retrieval_query_modalities
    knowledge_base = None
    if model_args.knowledge_base:
        from processing.knowledge_base import load_knowledge_base

        knowledge_base = load_knowledge_base(model_args.knowledge_base, format=model_args.knowledge_base_format)
    if task == "entity-linking":
        if knowledge_base is None and retriever is None:
            raise ValueError("entity linking needs a knowledge index: the processor has none; pass --knowledge_base")
        options.knowledge_ids = knowledge_base["id"] if knowledge_base is not None else retriever.ids
    train_dataset = read_task_data(task, data_args.train_file, data_args.train_split, options)
    train_dataset = train_dataset.select(data_args.max_train_samples)
    if task == "classification" and options.labels is None:
        options.labels = train_dataset.labels
    eval_dataset = None
    if data_args.validation_file:
        eval_dataset = read_task_data(task, data_args.validation_file, data_args.validation_split, options)
        eval_dataset = eval_dataset.select(data_args.max_eval_samples)

    label2id = None
    if task == "vqa":
        if data_args.answer_vocabulary:
            label2id = load_answer_vocabulary(data_args.answer_vocabulary)
        else:
            known = _labels_from_config(config, task)
            label2id = ({label: index for index, label in known.items()} if known
                        else build_answer_vocabulary(train_dataset, min_count=data_args.min_answer_count))
        coverage = answer_vocabulary_coverage(eval_dataset or train_dataset, label2id)
        logger.info("Answer vocabulary: %d answers; covers %.1f%% of the %s questions (oracle accuracy %.3f)",
                    len(label2id), 100 * coverage["covered"], "evaluation" if eval_dataset else "training",
                    coverage["oracle_accuracy"])
        if coverage["covered"] < 0.5:
            notes.append(f"the answer vocabulary covers only {coverage['covered']:.1%} of the questions")
            logger.warning(notes[-1])
    elif task == "classification":
        label2id = {label: index for index, label in enumerate(train_dataset.labels)}
        config_overrides["classification_num_images"] = len(train_dataset[0]["images"])
    if label2id is not None:
        config_overrides["id2label"] = {index: label for label, index in label2id.items()}
        config_overrides["label2id"] = dict(label2id)
    if task == "vqa" and not data_args.no_answer_copy:
        # The answers' token ids let the VQA head copy an answer from a retrieved entry (see ReavlConfig).
        ordered = sorted(label2id.items(), key=lambda item: item[1])
        config_overrides["answer_token_ids"] = [
            processor.tokenizer(label, add_special_tokens=False)["input_ids"] or [processor.tokenizer.unk_token_id]
            for label, _ in ordered
        ]

    model = model_class.from_pretrained(model_args.model_name_or_path,
                                        trust_remote_code=model_args.trust_remote_code, **config_overrides)
    if model_args.freeze_encoders:
        logger.info("Froze %d encoder parameters; training the fusion, gates and head only", freeze_encoders(model))
    if knowledge_base is not None:
        retriever = build_index_for(model, processor, knowledge_base, model_args.index_factory,
                                    model_args.index_batch_size)
    use_knowledge = not data_args.no_knowledge
    if task in ("vqa", "classification") and model.config.num_knowledge > 0:
        if retriever is None:
            notes.append("the processor has no knowledge index: fine-tuning without knowledge")
            logger.warning(notes[-1])
        else:
            model.set_retriever(retriever)  # forward retrieves with the model being trained
    if task == "entity-linking":
        note = _entity_linking_note(data_args.num_candidates)
        if note:
            notes.append(note)
            logger.warning(note)

    collator = build_collator(task, processor, data_args.max_length, use_knowledge, label2id,
                              train_dataset.labels, retriever)
    id2label = {index: label for label, index in (label2id or {}).items()}
    compute_metrics = (build_compute_metrics(task, eval_dataset, id2label, retriever)
                       if eval_dataset is not None else None)
    trainer = make_trainer(task, model, processor, training_args, collator, train_dataset, eval_dataset,
                           compute_metrics, retriever, data_args.num_candidates, data_args.train_num_candidates,
                           model_args.index_batch_size)
    trainer.add_callback(KnowledgeIndexRefreshCallback(trainer, data_args.refresh_index_steps))

    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()  # re-embeds the index with the fine-tuned encoder, then saves model + processor
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_state()

    results: dict[str, Any] = {
        "output_dir": str(output_dir), "task": task, "train": train_result.metrics, "eval": None,
        "eval_no_knowledge": None, "num_train": len(train_dataset),
        "num_eval": len(eval_dataset) if eval_dataset is not None else 0,
        "num_labels": len(label2id) if label2id else None, "no_knowledge": data_args.no_knowledge, "notes": notes,
    }
    if eval_dataset is not None:
        results["eval"] = trainer.evaluate()
        trainer.log_metrics("eval", results["eval"])
        if data_args.eval_ablation and use_knowledge and task != "retrieval":
            trainer.data_collator = build_collator(task, processor, data_args.max_length, False, label2id,
                                                   train_dataset.labels, retriever)
            results["eval_no_knowledge"] = _without_retriever_order(
                trainer.evaluate(metric_key_prefix="eval_no_knowledge")
            )
            trainer.data_collator = collator
            trainer.log_metrics("eval_no_knowledge", results["eval_no_knowledge"])
    if training_args.should_save:
        (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message=f"REAVL fine-tuned for {task}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, training_args = parse_finetune_args(argv)
    results = run_finetuning(model_args, data_args, training_args)
    for name in ("eval", "eval_no_knowledge"):
        if results[name]:
            print(f"{name}: " + ", ".join(f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}"
                                          for key, value in results[name].items()))
    print(f"saved to {results['output_dir']}")
    return 0


__all__ = [
    "DataArguments",
    "KnowledgeIndexRefreshCallback",
    "ModelArguments",
    "ReavlTrainer",
    "build_collator",
    "build_compute_metrics",
    "freeze_encoders",
    "make_trainer",
    "parse_finetune_args",
    "refresh_knowledge_index",
    "run_finetuning",
    "task_model_class",
]


if __name__ == "__main__":
    sys.exit(main())
