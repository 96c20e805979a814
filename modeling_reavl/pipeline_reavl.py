# Copyright 2026 The REAVL authors. Licensed under the Apache License, Version 2.0.
"""Pipelines over REAVL heads that show their evidence: `knowledge-vqa` and `multimodal-entity-linking`.

```python
>>> from transformers import pipeline
>>> pipe = pipeline(model="path/or/repo-id", trust_remote_code=True)  # task read from config.custom_pipelines
>>> result = pipe(image, "Which language is spoken in this country?", top_k=3)
>>> result["answers"][0]   # {"answer": "...", "score": 0.91}
>>> result["evidence"][0]  # {"id": "Q42", "title": "...", "index": 12, "retrieval_score": 0.63, "gate": 0.88}
```

Both pipelines get their processor (image processor + tokenizer + knowledge settings) with
`AutoProcessor.from_pretrained(model folder or repo, trust_remote_code=True)` when none is given, and attach its
retriever to the model, so the model retrieves its knowledge inside `forward` (as RAG does) and the pipeline maps
the retrieved index rows back to entry ids and titles.

This file is copied next to the weights by `reavl export` and loaded as remote code through the `custom_pipelines`
entry of `config.json` (see [`custom_pipelines_config`]): it imports only public names of installed packages.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import AutoProcessor, Pipeline
from transformers.image_utils import load_image


KNOWLEDGE_VQA_TASK = "knowledge-vqa"
ENTITY_LINKING_TASK = "multimodal-entity-linking"


def _check_text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _pack_inputs(first: Any, second: Any, keys: tuple[str, ...], extra: dict[str, Any] | None = None):
    """Turn the positional call forms into the dict(s) `preprocess` reads.

    `pipe(image, text)`, `pipe({"image": ..., "question": ...})`, `pipe([dict, dict])` and
    `pipe([image, image], [text, text])` are all accepted, as transformers' own multimodal pipelines do.
    """
    extra = extra or {}
    if isinstance(first, dict):
        return {**first, **extra}
    if isinstance(first, (list, tuple)):
        if second is None:
            if not all(isinstance(item, dict) for item in first):
                raise ValueError(f"a list of inputs must hold dicts with keys {keys}, or pass the texts as a 2nd list")
            return [{**item, **extra} for item in first]
        if not isinstance(second, (list, tuple)) or len(second) != len(first):
            raise ValueError(f"got {len(first)} images; pass as many {keys[1]}s as a list of the same length")
        return [{keys[0]: image, keys[1]: text, **extra} for image, text in zip(first, second)]
    return {keys[0]: first, keys[1]: second, **extra}


class _ReavlEvidencePipeline(Pipeline):
    """Shared plumbing: processor loading, retriever attachment, mapping index rows to entry ids and titles."""

    # The REAVL processor carries the tokenizer and the image processor; loading them separately would read the
    # same files twice. `None`: `pipeline()` loads the processor when the folder has one, `__init__` explains
    # what is missing when it has not.
    _load_processor = None
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False

    def __init__(self, model, processor=None, **kwargs):
        if processor is None:
            source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
            if not source:
                raise ValueError(
                    f"{type(self).__name__} needs the REAVL processor: pass processor=AutoProcessor.from_pretrained("
                    "folder, trust_remote_code=True) or load the model from a folder or Hub repo that holds one"
                )
            processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
        super().__init__(model=model, processor=processor, **kwargs)
        self.model.eval()
        attach_retriever(self.model, processor)

    @property
    def retriever(self):
        return getattr(self.model, "retriever", None)

    def _entry(self, row: int) -> tuple[str, str]:
        retriever = self.retriever
        return str(retriever.ids[row]), str(retriever.titles[row])

    def _load(self, inputs: dict[str, Any], timeout: float | None):
        if not isinstance(inputs, dict) or inputs.get("image") is None:
            raise ValueError(f"{self.task or type(self).__name__} needs an image (PIL image, path, URL or base64)")
        image = inputs["image"]
        return load_image(os.fspath(image) if isinstance(image, os.PathLike) else image, timeout=timeout)


def attach_retriever(model, processor) -> None:
    """Attach `processor.retriever` to `model` unless it already has one or runs without knowledge.

    Raises:
        ValueError: the processor has no knowledge index although the model retrieves (`num_knowledge > 0`); the
            message says how to give it one.
    """
    if getattr(model, "retriever", None) is not None or model.config.num_knowledge == 0:
        return
    try:
        retriever = processor.retriever
    except (OSError, ValueError) as error:
        raise ValueError(
            f"the REAVL processor could not load its knowledge index ({error}); the model retrieves "
            f"{model.config.num_knowledge} entries per example and needs it"
        ) from error
    if retriever is None:
        raise ValueError(
            "the REAVL processor has no knowledge index; set one with processor.set_knowledge(...) or export the "
            "model with `reavl export` (which ships the index)"
        )
    model.set_retriever(retriever)


class KnowledgeVQAPipeline(_ReavlEvidencePipeline):
    """Knowledge-based visual question answering with [`ReavlForQuestionAnswering`] (task `"knowledge-vqa"`).

    Call with an image (PIL image, local path, URL or base64 string) and a question:

    ```python
    >>> pipe(image, "What is the capital of this country?", top_k=3)
    {"answers": [{"answer": "...", "score": 0.82}, ...],
     "evidence": [{"id": "...", "title": "...", "index": 3, "retrieval_score": 0.71, "gate": 0.64}, ...]}
    ```

    Parameters: `top_k` (answers returned, default 5), `use_knowledge` (`False` runs the no-knowledge ablation,
    `evidence` is then empty), `timeout` (seconds to fetch a URL image). A list of inputs returns a list of results.

    Scores are per-answer sigmoid probabilities (the head is trained with binary cross-entropy on soft VQA
    targets, so they do not sum to 1); `gate` is how much the model let the entry into its reading, and
    `retrieval_score` the inner product of query and entry in the index.
    """

    def __call__(self, image, question: str | list[str] | None = None, **kwargs):
        return super().__call__(_pack_inputs(image, question, ("image", "question")), **kwargs)

    def _sanitize_parameters(self, top_k=None, use_knowledge=None, timeout=None, **kwargs):
        preprocess_params, forward_params, postprocess_params = {}, {}, {}
        if timeout is not None:
            preprocess_params["timeout"] = timeout
        if use_knowledge is not None:
            forward_params["use_knowledge"] = bool(use_knowledge)
        if top_k is not None:
            if int(top_k) < 1:
                raise ValueError(f"top_k must be >= 1, got {top_k}")
            postprocess_params["top_k"] = int(top_k)
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, inputs, timeout=None):
        image = self._load(inputs, timeout)
        question = _check_text(inputs.get("question"), "question")
        return self.processor(images=image, text=question, return_tensors="pt")

    def _forward(self, model_inputs, use_knowledge=True):
        outputs = self.model(**model_inputs, use_knowledge=use_knowledge)
        return {
            "logits": outputs.logits,
            "knowledge_indices": outputs.knowledge_indices,
            "knowledge_scores": outputs.knowledge_scores,
            "knowledge_gates": outputs.knowledge_gates,
        }

    def postprocess(self, model_outputs, top_k=5):
        probabilities = model_outputs["logits"][0].float().sigmoid()
        top_k = min(top_k, probabilities.shape[-1])
        scores, label_ids = probabilities.topk(top_k)
        id2label = self.model.config.id2label
        answers = [
            {"answer": id2label[label_id], "score": score}
            for score, label_id in zip(scores.tolist(), label_ids.tolist())
        ]
        return {"answers": answers, "evidence": self._evidence(model_outputs)}

    def _evidence(self, model_outputs) -> list[dict[str, Any]]:
        indices = model_outputs["knowledge_indices"]
        if indices is None or indices.shape[-1] == 0 or self.retriever is None:
            return []
        evidence = []
        scores = model_outputs["knowledge_scores"][0].tolist()
        gates = model_outputs["knowledge_gates"][0].tolist()
        for row, score, gate in zip(indices[0].tolist(), scores, gates):
            if row < 0:  # padding of an index with fewer rows than num_knowledge
                continue
            entry_id, title = self._entry(row)
            evidence.append({"id": entry_id, "title": title, "index": row, "retrieval_score": score, "gate": gate})
        return evidence


class EntityLinkingPipeline(_ReavlEvidencePipeline):
    """Multimodal entity linking with [`ReavlForEntityLinking`] (task `"multimodal-entity-linking"`).

    Call with an image, the sentence that mentions an entity and the mention (a substring of the sentence); the
    retriever proposes `config.num_knowledge` candidate entries and the head ranks them:

    ```python
    >>> pipe(image, "The flag of Veloria flies over the harbour.", mention="Veloria", top_k=3)
    [{"id": "E12", "title": "Veloria", "score": 0.93, "index": 11, "retrieval_score": 0.58}, ...]
    ```

    `score` is the softmax over the candidates; `mention=None` reads the whole sentence as the mention.
    """

    def __call__(self, image, sentence: str | list[str] | None = None, mention: str | None = None, **kwargs):
        extra = {"mention": mention} if mention is not None else None
        return super().__call__(_pack_inputs(image, sentence, ("image", "sentence"), extra), **kwargs)

    def _sanitize_parameters(self, top_k=None, timeout=None, **kwargs):
        preprocess_params, postprocess_params = {}, {}
        if timeout is not None:
            preprocess_params["timeout"] = timeout
        if top_k is not None:
            if int(top_k) < 1:
                raise ValueError(f"top_k must be >= 1, got {top_k}")
            postprocess_params["top_k"] = int(top_k)
        return preprocess_params, {}, postprocess_params

    def preprocess(self, inputs, timeout=None):
        image = self._load(inputs, timeout)
        sentence = _check_text(inputs.get("sentence", inputs.get("text")), "sentence")
        model_inputs = self.processor(images=image, text=sentence, return_tensors="pt")
        mention = inputs.get("mention")
        if mention is not None:
            model_inputs["mention_mask"] = self._mention_mask(sentence, _check_text(mention, "mention"), model_inputs)
        return model_inputs

    def _mention_mask(self, sentence: str, mention: str, model_inputs) -> torch.Tensor:
        """1 on the tokens of `input_ids` that overlap the mention's characters, from the tokenizer's offsets."""
        start = sentence.find(mention)
        if start < 0:
            start = sentence.casefold().find(mention.casefold())
        if start < 0:
            raise ValueError(f"mention {mention!r} does not occur in the sentence {sentence!r}")
        end = start + len(mention)
        input_ids = model_inputs["input_ids"]
        length = input_ids.shape[-1]
        encoding = self.processor.tokenizer(
            sentence, return_offsets_mapping=True, truncation=True, max_length=length
        )
        token_ids = encoding["input_ids"]
        if token_ids != input_ids[0, : len(token_ids)].tolist():
            raise ValueError(
                "the processor's tokenization of the sentence differs from its tokenizer's; cannot locate the mention"
            )
        mask = torch.zeros_like(input_ids)
        for position, (token_start, token_end) in enumerate(encoding["offset_mapping"]):
            if token_end > token_start and token_start < end and token_end > start:
                mask[0, position] = 1
        if not mask.any():
            raise ValueError(f"mention {mention!r} was truncated away (the text keeps {length} tokens)")
        return mask

    def _forward(self, model_inputs):
        outputs = self.model(**model_inputs)
        return {
            "logits": outputs.logits,
            "knowledge_indices": outputs.knowledge_indices,
            "knowledge_scores": outputs.knowledge_scores,
        }

    def postprocess(self, model_outputs, top_k=5):
        logits = model_outputs["logits"][0].float()
        rows = model_outputs["knowledge_indices"][0].tolist()
        retrieval_scores = model_outputs["knowledge_scores"][0].tolist()
        valid = torch.tensor([row >= 0 for row in rows])
        probabilities = logits.masked_fill(~valid, float("-inf")).softmax(dim=-1)
        ranked = []
        for position in probabilities.argsort(descending=True).tolist()[: min(top_k, int(valid.sum()))]:
            entry_id, title = self._entry(rows[position])
            ranked.append(
                {
                    "id": entry_id,
                    "title": title,
                    "score": probabilities[position].item(),
                    "index": rows[position],
                    "retrieval_score": retrieval_scores[position],
                }
            )
        return ranked


# Which pipeline serves which head, with the Auto class `pipeline()` loads the model through.
PIPELINES_BY_ARCHITECTURE = {
    "ReavlForQuestionAnswering": (KNOWLEDGE_VQA_TASK, KnowledgeVQAPipeline, "AutoModelForVisualQuestionAnswering"),
    "ReavlForEntityLinking": (ENTITY_LINKING_TASK, EntityLinkingPipeline, "AutoModelForMultipleChoice"),
}


def custom_pipelines_config(architecture: str) -> dict[str, dict[str, Any]]:
    """The `custom_pipelines` entry of `config.json` for a head, as `Pipeline.save_pretrained` writes it.

    `pipeline(model=folder, trust_remote_code=True)` reads it to infer the task (it must hold exactly one task)
    and to load `impl` (`"pipeline_reavl.<Class>"`, a file of the repo) as remote code. Heads without a REAVL
    pipeline get `{}`.
    """
    if architecture not in PIPELINES_BY_ARCHITECTURE:
        return {}
    task, pipeline_class, auto_class = PIPELINES_BY_ARCHITECTURE[architecture]
    return {task: {"impl": f"pipeline_reavl.{pipeline_class.__name__}", "pt": [auto_class], "type": "multimodal"}}


def register_pipelines() -> None:
    """Register both tasks with transformers' pipeline registry, so that in-process code can call
    `pipeline("knowledge-vqa", model=model, processor=processor)`. Loading from a folder needs no registration."""
    import transformers
    from transformers.pipelines import PIPELINE_REGISTRY

    for task, pipeline_class, auto_class in PIPELINES_BY_ARCHITECTURE.values():
        if task not in PIPELINE_REGISTRY.supported_tasks:
            PIPELINE_REGISTRY.register_pipeline(
                task, pipeline_class=pipeline_class, pt_model=getattr(transformers, auto_class), type="multimodal"
            )


__all__ = [
    "ENTITY_LINKING_TASK",
    "KNOWLEDGE_VQA_TASK",
    "EntityLinkingPipeline",
    "KnowledgeVQAPipeline",
    "attach_retriever",
    "custom_pipelines_config",
    "register_pipelines",
]
