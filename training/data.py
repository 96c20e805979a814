# Copyright 2026 The REAVL authors. Licensed under the Apache License, Version 2.0.
"""Image-text pairs for REAVL pre-training, and the batch builder that adds knowledge to them.

Two stages, as open_clip keeps its data apart from the loop:

1. **Preparation**, once per run, on every process (cheap, deterministic):
   :func:`load_image_text_pairs` reads a CSV, JSON lines, an image folder with ``metadata.jsonl`` /
   ``metadata.csv`` (the ``datasets`` imagefolder convention) or any ``datasets`` dataset into one schema;
   :func:`prepare_pretraining_pairs` drops unreadable images (counted in the log) and weakly links every caption
   to knowledge-base entries by title/alias matching (:class:`~processing.mention_linker.MentionLinker`), keeping the
   linked rows (weak positives) and the mention character spans (for entity masking);
   :func:`split_by_image` holds out whole images, deterministically.

2. **Per batch**: :class:`PretrainingCollator` (in the ``DataLoader``) turns rows into pixel values, tokens, an
   entity-token mask (from the tokenizer's offset mapping) and padded weak-positive rows;
   :class:`KnowledgeBatchBuilder` (in the training loop, because it needs the model's retrieval queries) retrieves
   ``K`` entries per pair in one batched call, measures the retriever's recall of the weak positives, forces the
   missing weak positives into the lowest-scored slots, labels them, builds the KG triples among the retrieved
   entries and masks the text for MLM (entity mentions first, 80/10/10).

Schema of a prepared pair dataset (one row per caption):

==================  ===============================  ==================================================
column              type                             meaning
==================  ===============================  ==================================================
``image``           ``datasets.Image(decode=False)``  ``{"bytes", "path"}``; decoded in the collator
``caption``         ``str``                          the text
``image_key``       ``str``                          identifies the image (holdout split, evaluation)
``positive_rows``   ``list[int]``                    KB rows linked from the caption (weak positives)
``mention_spans``   ``list[[start, end]]``           character spans of the linked mentions
==================  ===============================  ==================================================
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import datasets
import numpy as np
import torch
from PIL import Image


logger = logging.getLogger(__name__)

__all__ = [
    "PAIR_FEATURES",
    "KnowledgeBatchBuilder",
    "KnowledgeGraph",
    "PretrainingCollator",
    "build_relation_vocabulary",
    "entity_token_mask",
    "force_weak_positives",
    "load_image_text_pairs",
    "mask_tokens_for_mlm",
    "open_image",
    "prepare_pretraining_pairs",
    "split_by_image",
    "weak_positive_recall",
]

PAIR_FEATURES = datasets.Features(
    {
        "image": datasets.Image(decode=False),
        "caption": datasets.Value("string"),
        "image_key": datasets.Value("string"),
    }
)

# Metadata files of the `datasets` imagefolder convention, in the order they are looked for.
_IMAGEFOLDER_METADATA = ("metadata.jsonl", "metadata.csv")
# Markers of a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`.
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
# How many offending files a log line lists.
_MAX_LISTED = 5


# --------------------------------------------------------------------------------------------------------------------
# Loading image-text pairs
# --------------------------------------------------------------------------------------------------------------------


def _require_column(role: str, name: str, column_names: Sequence[str], source: Any) -> None:
    if name not in column_names:
        raise ValueError(
            f"{role} column {name!r} not found in {source}; the columns that exist are {list(column_names)}. "
            f"Pass --{role}_column with one of them."
        )


def _resolve_image_path(value: str, base_dir: Path) -> str:
    """An image path from a CSV/JSONL file: absolute as given, else relative to the file's folder, else to its
    ``images/`` subfolder (Flickr8k's layout: ``captions.csv`` beside ``images/``)."""
    path = Path(value)
    if path.is_absolute():
        return str(path)
    for candidate in (base_dir / path, base_dir / "images" / path):
        if candidate.exists():
            return str(candidate)
    return str(base_dir / path)  # missing: counted as unreadable at preparation, with this path in the log


def _read_records(path: Path) -> list[dict]:
    """Rows of a CSV/TSV (header line) or JSON lines / JSON list file, values kept as read."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    raise ValueError(f"cannot read image-text pairs from {path}: expected a .csv, .tsv, .jsonl or .json file")


def _pairs_from_records(
    records: list[dict], base_dir: Path, image_column: str, caption_column: str, source: Any
) -> datasets.Dataset:
    column_names = list(records[0].keys()) if records else []
    _require_column("caption", caption_column, column_names, source)
    _require_column("image", image_column, column_names, source)
    paths = [_resolve_image_path(str(record[image_column]), base_dir) for record in records]
    captions = [str(record[caption_column] or "") for record in records]
    image_keys = [str(Path(path).resolve()) for path in paths]
    return datasets.Dataset.from_dict(
        {"image": paths, "caption": captions, "image_key": image_keys}, features=PAIR_FEATURES
    )


def _pairs_from_dataset(
    dataset: datasets.Dataset, image_column: str, caption_column: str, source: Any
) -> datasets.Dataset:
    _require_column("caption", caption_column, dataset.column_names, source)
    _require_column("image", image_column, dataset.column_names, source)
    dataset = dataset.select_columns([image_column, caption_column])
    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    images = dataset.with_format("arrow")[image_column].to_pylist() if len(dataset) else []
    captions = dataset[caption_column]
    values, keys = [], []
    for image in images:
        if isinstance(image, str):
            values.append({"bytes": None, "path": image})
            keys.append(image)
        elif isinstance(image, Mapping) and (image.get("bytes") or image.get("path")):
            values.append({"bytes": image.get("bytes"), "path": image.get("path")})
            keys.append(hashlib.sha1(image["bytes"]).hexdigest() if image.get("bytes") else image["path"])
        else:
            raise ValueError(
                f"image column {image_column!r} of {source} must hold paths or datasets.Image values, "
                f"got {type(image).__name__}"
            )
    return datasets.Dataset.from_dict(
        {"image": values, "caption": [str(caption or "") for caption in captions], "image_key": keys},
        features=PAIR_FEATURES,
    )


def load_image_text_pairs(
    source: str | Path | datasets.Dataset | datasets.DatasetDict,
    image_column: str = "image",
    caption_column: str = "caption",
    split: str = "train",
) -> datasets.Dataset:
    """Read image-text pairs into the pair schema (``image``, ``caption``, ``image_key``); images stay undecoded.

    Args:
        source: one of
            - a ``.csv``/``.tsv``/``.jsonl``/``.json`` file whose image paths are relative to the file's folder or to
              its ``images/`` subfolder (e.g. ``../shared/data/flickr8k/captions.csv``);
            - an image folder with ``metadata.jsonl`` or ``metadata.csv`` (image paths in ``file_name``, as the
              ``datasets`` imagefolder builder expects, unless ``image_column`` names another column);
            - a folder written by ``save_to_disk``, a ``datasets.Dataset`` or ``DatasetDict`` (``split`` picks), with
              an image column of paths or ``datasets.Image`` values;
            - otherwise a name given to ``datasets.load_dataset(source, split=split)``.
        image_column, caption_column: the columns holding the image and the text.

    Raises:
        ValueError: a column that does not exist (the message lists the columns that do), an unreadable source.
    """
    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise ValueError(f"split {split!r} not in the DatasetDict; its splits are {list(source)}")
        source = source[split]
    if isinstance(source, datasets.Dataset):
        return _pairs_from_dataset(source, image_column, caption_column, "the given dataset")

    path = Path(source)
    if path.is_file():
        return _pairs_from_records(_read_records(path), path.parent, image_column, caption_column, path)
    if path.is_dir():
        for name in _IMAGEFOLDER_METADATA:
            if (path / name).exists():
                records = _read_records(path / name)
                columns = list(records[0].keys()) if records else []
                if image_column not in columns and "file_name" in columns:
                    image_column = "file_name"
                return _pairs_from_records(records, path, image_column, caption_column, path / name)
        if any((path / marker).exists() for marker in _SAVED_DATASET_MARKERS):
            return load_image_text_pairs(datasets.load_from_disk(str(path)), image_column, caption_column, split)
        raise ValueError(
            f"cannot read image-text pairs from folder {path}: expected {' or '.join(_IMAGEFOLDER_METADATA)} "
            "(imagefolder convention) or a folder written by datasets' save_to_disk"
        )
    if path.suffix or path.is_absolute() or str(source).startswith("."):
        raise FileNotFoundError(f"image-text data {source} does not exist")
    return load_image_text_pairs(datasets.load_dataset(str(source), split=split), image_column, caption_column, split)


def open_image(value: Any) -> Image.Image:
    """An RGB PIL image from a ``{"bytes", "path"}`` dict, a path or a PIL image (fully decoded, so a truncated file
    fails here and not later)."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, Mapping):
        image = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    else:
        image = Image.open(value)
    image.load()
    return image.convert("RGB")


# --------------------------------------------------------------------------------------------------------------------
# Preparation: unreadable images, weak linking, holdout split
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class PairStatistics:
    """What preparation kept and dropped (logged, and written to ``train_results.json``)."""

    rows: int = 0
    images: int = 0
    unreadable_images: int = 0
    unreadable_rows: int = 0
    empty_captions: int = 0
    linked_rows: int = 0
    mentions: int = 0
    linked_entities: int = 0
    unreadable_examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def prepare_pretraining_pairs(
    pairs: datasets.Dataset,
    linker=None,
    check_images: bool = True,
) -> tuple[datasets.Dataset, PairStatistics]:
    """Drop unreadable images and empty captions (counted, logged), and weakly link captions to KB entries.

    Args:
        pairs: a dataset in the pair schema (:func:`load_image_text_pairs`).
        linker: a :class:`~processing.mention_linker.MentionLinker` over the KB (``None``: no linking, every caption
            gets empty ``positive_rows``/``mention_spans``).
        check_images: decode every distinct image once; unreadable ones (missing, corrupt, truncated) are skipped.

    Returns:
        The dataset with ``positive_rows`` and ``mention_spans`` added, and the statistics.
    """
    stats = PairStatistics()
    images = pairs.with_format("arrow")["image"].to_pylist() if len(pairs) else []
    keys = pairs["image_key"]
    captions = pairs["caption"]
    readable: dict[str, bool] = {}
    if check_images:
        for image, key in zip(images, keys):
            if key in readable:
                continue
            try:
                open_image(image)
                readable[key] = True
            except Exception as error:  # PIL raises several types (OSError, SyntaxError, ValueError, ...)
                readable[key] = False
                if len(stats.unreadable_examples) < _MAX_LISTED:
                    stats.unreadable_examples.append(f"{image.get('path') or key}: {type(error).__name__}: {error}")
    keep = []
    for row, (key, caption) in enumerate(zip(keys, captions)):
        if check_images and not readable[key]:
            stats.unreadable_rows += 1
        elif not caption.strip():
            stats.empty_captions += 1
        else:
            keep.append(row)
    stats.unreadable_images = sum(1 for ok in readable.values() if not ok)
    if stats.unreadable_images:
        logger.warning(
            "skipped %d unreadable image(s) (%d caption row(s)); first: %s",
            stats.unreadable_images, stats.unreadable_rows, "; ".join(stats.unreadable_examples),
        )
    if stats.empty_captions:
        logger.warning("skipped %d row(s) with an empty caption", stats.empty_captions)
    if len(keep) != len(pairs):
        pairs = pairs.select(keep)
        captions = [captions[row] for row in keep]

    positive_rows, mention_spans = [], []
    entities: set[int] = set()
    for caption in captions:
        mentions = linker.link(caption) if linker is not None else []
        rows = list(dict.fromkeys(mention.row_index for mention in mentions))  # unique, in text order
        positive_rows.append(rows)
        mention_spans.append([[mention.start_char, mention.end_char] for mention in mentions])
        stats.linked_rows += bool(rows)
        stats.mentions += len(mentions)
        entities.update(rows)
    pairs = pairs.add_column("positive_rows", positive_rows, feature=datasets.List(datasets.Value("int64")))
    pairs = pairs.add_column(
        "mention_spans", mention_spans, feature=datasets.List(datasets.List(datasets.Value("int64")))
    )
    stats.rows = len(pairs)
    stats.images = len(set(pairs["image_key"]))
    stats.linked_entities = len(entities)
    logger.info(
        "prepared %d pairs over %d images; %d captions (%.0f%%) linked to %d KB entries (%d mentions)",
        stats.rows, stats.images, stats.linked_rows, 100.0 * stats.linked_rows / max(stats.rows, 1),
        stats.linked_entities, stats.mentions,
    )
    return pairs, stats


def split_by_image(
    dataset: datasets.Dataset, holdout_images: int, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Hold out every caption of ``holdout_images`` distinct images, chosen by a seeded permutation of the sorted
    image keys (the same images for the same data and seed, whatever the row order). Returns (train, holdout)."""
    keys = dataset["image_key"]
    distinct = sorted(set(keys))
    if holdout_images < 0 or holdout_images >= len(distinct) and holdout_images > 0:
        raise ValueError(
            f"holdout_images={holdout_images} must be >= 0 and leave training images; the data has "
            f"{len(distinct)} distinct images"
        )
    order = np.random.default_rng(seed).permutation(len(distinct))
    held = {distinct[index] for index in order[:holdout_images]}
    train_rows = [row for row, key in enumerate(keys) if key not in held]
    holdout_rows = [row for row, key in enumerate(keys) if key in held]
    return dataset.select(train_rows), dataset.select(holdout_rows)


# --------------------------------------------------------------------------------------------------------------------
# Collation: images, tokens, entity-token mask, weak positives
# --------------------------------------------------------------------------------------------------------------------


def entity_token_mask(offset_mapping: torch.Tensor, spans: Sequence[Sequence[Sequence[int]]]) -> torch.Tensor:
    """``(batch, length)`` bool: tokens whose character range overlaps a mention span of their text.

    ``offset_mapping`` `(batch, length, 2)` comes from a fast tokenizer; special and padding tokens have the empty
    range ``(0, 0)`` and never match.
    """
    starts, ends = offset_mapping[..., 0], offset_mapping[..., 1]
    mask = torch.zeros(starts.shape, dtype=torch.bool)
    for row, row_spans in enumerate(spans):
        for span_start, span_end in row_spans:
            mask[row] |= (starts[row] < span_end) & (ends[row] > span_start) & (ends[row] > starts[row])
    return mask


def _pad_rows(rows: Sequence[Sequence[int]], width: int | None = None) -> torch.Tensor:
    width = max([len(row) for row in rows] + [1]) if width is None else width
    padded = torch.full((len(rows), width), -1, dtype=torch.long)
    for index, row in enumerate(rows):
        if row:
            padded[index, : len(row)] = torch.as_tensor(row[:width], dtype=torch.long)
    return padded


@dataclass
class PretrainingCollator:
    """Rows of a prepared pair dataset -> model-ready CPU tensors.

    Returns ``pixel_values`` `(B, 3, H, W)`, ``input_ids`` / ``attention_mask`` `(B, T)`, ``entity_token_mask``
    `(B, T)` (tokens of linked mentions) and ``positive_rows`` `(B, P)` (weak-positive KB rows, -1 padded).

    Args:
        image_processor: resizes and normalises images (the processor's image processor).
        tokenizer: a fast tokenizer (its offset mapping locates the mention tokens; a slow one disables entity
            masking, with a warning).
        max_length: captions are truncated to this many tokens.
    """

    image_processor: Any
    tokenizer: Any
    max_length: int = 64

    def __post_init__(self):
        if not getattr(self.tokenizer, "is_fast", False):
            logger.warning("tokenizer %s is not a fast tokenizer: no offset mapping, so entity-span masking is off "
                           "(random masking only)", type(self.tokenizer).__name__)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        images = [open_image(example["image"]) for example in examples]
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        fast = getattr(self.tokenizer, "is_fast", False)
        text = self.tokenizer(
            [example["caption"] for example in examples],
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_offsets_mapping=fast,
            return_tensors="pt",
        )
        spans = [example.get("mention_spans") or [] for example in examples]
        if fast:
            entity_mask = entity_token_mask(text["offset_mapping"], spans)
        else:
            entity_mask = torch.zeros_like(text["input_ids"], dtype=torch.bool)
        return {
            "pixel_values": pixel_values,
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "entity_token_mask": entity_mask,
            "positive_rows": _pad_rows([example.get("positive_rows") or [] for example in examples]),
        }


# --------------------------------------------------------------------------------------------------------------------
# Entity-span masking for knowledge-augmented MLM
# --------------------------------------------------------------------------------------------------------------------


def mask_tokens_for_mlm(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    entity_mask: torch.Tensor | None,
    special_token_ids: Sequence[int],
    mask_token_id: int,
    vocab_size: int,
    mlm_probability: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``ceil(mlm_probability * n)`` of each text's ``n`` maskable tokens, mention tokens first, then random
    others; replace 80% of the chosen by ``[MASK]``, 10% by a random token, keep 10% (BERT's rule).

    Mention tokens come first so the model has to recover the entity from the image and the retrieved knowledge;
    when a text has more mention tokens than the budget, a random subset of them is chosen.

    Returns:
        ``(mlm_input_ids, mlm_labels)``, both `(batch, length)`; labels are -100 on tokens not chosen.
    """
    special = torch.isin(input_ids, torch.as_tensor(list(special_token_ids), dtype=input_ids.dtype))
    maskable = attention_mask.bool() & ~special
    budget = torch.ceil(maskable.sum(dim=1).float() * mlm_probability).long()
    budget = torch.minimum(budget.clamp(min=1), maskable.sum(dim=1))
    # Priority: mention tokens in [1, 2), other maskable tokens in [0, 1), the rest never.
    priority = torch.rand(input_ids.shape, generator=generator)
    if entity_mask is not None:
        priority = priority + entity_mask.to(priority.dtype)
    priority = priority.masked_fill(~maskable, -1.0)
    order = priority.argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(input_ids.shape[1]).expand_as(order).contiguous())
    chosen = (rank < budget[:, None]) & maskable

    labels = input_ids.masked_fill(~chosen, -100)
    decision = torch.rand(input_ids.shape, generator=generator)
    random_tokens = torch.randint(vocab_size, input_ids.shape, generator=generator, dtype=input_ids.dtype)
    masked = input_ids.clone()
    masked[chosen & (decision < 0.8)] = mask_token_id
    replace = chosen & (decision >= 0.8) & (decision < 0.9)
    masked[replace] = random_tokens[replace]
    return masked, labels


# --------------------------------------------------------------------------------------------------------------------
# Knowledge graph: relation vocabulary and triples among retrieved entries
# --------------------------------------------------------------------------------------------------------------------


def build_relation_vocabulary(knowledge_base: datasets.Dataset, max_relations: int) -> list[str]:
    """The ``max_relations`` most frequent relations of the KB's triples (ties by name): relation id = position."""
    if "triples" not in knowledge_base.column_names:
        return []
    counts = Counter(
        triple[0] for triples in knowledge_base["triples"] for triple in triples or () if len(triple) == 2
    )
    return [name for name, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:max_relations]]


class KnowledgeGraph:
    """The KB's triples as ``head row -> [(relation id, tail row)]``, over a fixed relation vocabulary.

    Triples whose relation is outside the vocabulary or whose tail is not a KB entry are dropped (counted in
    ``dropped``).

    Args:
        knowledge_base: a KB dataset (``id``, ``triples`` columns).
        relations: the relation vocabulary (e.g. a loaded model's ``config.kg_relations``, so ids stay stable);
            ``None`` builds it from the KB with :func:`build_relation_vocabulary`.
        max_relations: the vocabulary cap (``config.num_kg_relations``) when building it.
    """

    def __init__(self, knowledge_base: datasets.Dataset, relations: Sequence[str] | None = None, max_relations: int = 64):
        self.relations = list(relations) if relations else build_relation_vocabulary(knowledge_base, max_relations)
        relation_id = {name: index for index, name in enumerate(self.relations)}
        row_of = {entry_id: row for row, entry_id in enumerate(knowledge_base["id"])}
        self.edges: dict[int, list[tuple[int, int]]] = {}
        self.num_triples = 0
        self.dropped = 0
        triples_column = knowledge_base["triples"] if "triples" in knowledge_base.column_names else []
        for head, triples in enumerate(triples_column):
            for triple in triples or ():
                if len(triple) != 2 or triple[0] not in relation_id or triple[1] not in row_of:
                    self.dropped += 1
                    continue
                self.edges.setdefault(head, []).append((relation_id[triple[0]], row_of[triple[1]]))
                self.num_triples += 1

    def __len__(self) -> int:
        return self.num_triples

    def batch_triples(self, knowledge_indices: torch.Tensor, max_triples_per_example: int = 32) -> torch.Tensor | None:
        """KG triples among a batch's retrieved entries, in the model's ``kg_triples`` layout.

        Args:
            knowledge_indices: `(B, K)` KB rows of the retrieved (and forced) entries.

        Returns:
            `(B, n, 3)` rows ``[head slot 0..K-1, relation id, tail slot 0..B*K-1]`` padded with -1, or ``None``
            when no triple has both ends in the batch. The tail slot is the first slot holding the tail entry in the
            same example, else the first in the batch.
        """
        if not self.edges:
            return None
        batch_size, num_entries = knowledge_indices.shape
        flat = knowledge_indices.reshape(-1).tolist()
        first_slot: dict[int, int] = {}
        for slot, row in enumerate(flat):
            first_slot.setdefault(row, slot)
        per_example: list[list[tuple[int, int, int]]] = []
        for example in range(batch_size):
            own = {}
            for slot in range(num_entries):
                own.setdefault(flat[example * num_entries + slot], example * num_entries + slot)
            triples = []
            for head_slot in range(num_entries):
                for relation, tail_row in self.edges.get(flat[example * num_entries + head_slot], ()):
                    tail_slot = own.get(tail_row, first_slot.get(tail_row))
                    if tail_slot is not None and len(triples) < max_triples_per_example:
                        triples.append((head_slot, relation, tail_slot))
            per_example.append(triples)
        width = max(len(triples) for triples in per_example)
        if width == 0:
            return None
        kg_triples = torch.full((batch_size, width, 3), -1, dtype=torch.long)
        for example, triples in enumerate(per_example):
            if triples:
                kg_triples[example, : len(triples)] = torch.as_tensor(triples, dtype=torch.long)
        return kg_triples


# --------------------------------------------------------------------------------------------------------------------
# Retrieval with weak-positive forcing
# --------------------------------------------------------------------------------------------------------------------


def weak_positive_recall(retrieved: torch.Tensor, positive_rows: torch.Tensor) -> tuple[float, int]:
    """Summed recall@K of the weak positives and the number of examples that have any.

    Per example with positives: ``|positives in retrieved| / min(|positives|, K)``.
    """
    positives = positive_rows >= 0
    has_positive = positives.any(dim=1)
    if not has_positive.any():
        return 0.0, 0
    found = ((positive_rows[:, :, None] == retrieved[:, None, :]).any(dim=2) & positives).sum(dim=1)
    wanted = positives.sum(dim=1).clamp(max=retrieved.shape[1]).clamp(min=1)
    recall = (found.clamp(max=retrieved.shape[1]).float() / wanted.float())[has_positive]
    return float(recall.sum()), int(has_positive.sum())


def force_weak_positives(
    indices: torch.Tensor, scores: torch.Tensor, positive_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Put every weak positive of an example among its ``K`` entries and label them.

    A positive missing from the retrieved entries replaces the lowest-scored non-positive slot (empty slots,
    index -1, count as lowest); when an example has more than ``K`` positives, its first ``K`` (text order) are kept.

    Args:
        indices: `(B, K)` retrieved KB rows; scores: `(B, K)` their retrieval scores;
        positive_rows: `(B, P)` weak-positive KB rows, -1 padded.

    Returns:
        ``(indices, knowledge_labels, num_forced)``: the new `(B, K)` rows, `(B, K)` long labels (1 = weak positive)
        and how many slots were replaced.
    """
    indices = indices.clone()
    num_entries = indices.shape[1]
    forced = 0
    for example in range(indices.shape[0]):
        positives = [row for row in dict.fromkeys(positive_rows[example].tolist()) if row >= 0][:num_entries]
        present = set(indices[example].tolist())
        missing = [row for row in positives if row not in present]
        if not missing:
            continue
        is_positive = torch.isin(indices[example], torch.as_tensor(positives, dtype=indices.dtype))
        slot_scores = scores[example].float().masked_fill(indices[example] < 0, float("-inf"))
        slot_scores = slot_scores.masked_fill(is_positive, float("inf"))
        replace_slots = slot_scores.argsort(stable=True)[: len(missing)]
        indices[example, replace_slots] = torch.as_tensor(missing, dtype=indices.dtype)
        forced += len(missing)
    labels = (indices[:, :, None] == positive_rows[:, None, :]).any(dim=2) & (indices >= 0)
    return indices, labels.long(), forced


class KnowledgeBatchBuilder:
    """Adds retrieved knowledge, weak-positive labels, KG triples and MLM masking to a collated batch.

    One batched ``retriever.retrieve(queries, K)`` call per batch; weak positives absent from the result are forced
    in (:func:`force_weak_positives`) and every slot is re-read with one ``retriever.get_entries`` call. The scores
    given to the model are ``query · key`` against the index embeddings this builder holds (the retriever's own
    scores for exact inner-product search, and a comparable score for the forced entries, which the index did not
    score): ``index_embeddings`` must be kept equal to the retriever's (set it at every refresh).

    Args:
        retriever: a ``ReavlRetriever`` (``None`` with ``num_knowledge=0``: the no-knowledge ablation).
        num_knowledge: ``K``.
        tokenizer: gives the ``[MASK]`` id, the special ids and the vocabulary size for MLM masking.
        mlm_probability: share of maskable tokens masked.
        knowledge_graph: a :class:`KnowledgeGraph` over the KB, or ``None`` (no KG loss).
        force_positives: force missing weak positives in (turn off to measure plain retrieval).
        index_negatives: cached index embeddings given to the model as extra alignment negatives
            (``negative_keys``): 0 none, -1 every row, ``n`` a seeded random sample of ``n`` rows per batch.
    """

    def __init__(
        self,
        retriever,
        num_knowledge: int,
        tokenizer,
        mlm_probability: float,
        knowledge_graph: KnowledgeGraph | None = None,
        force_positives: bool = True,
        max_triples_per_example: int = 32,
        index_negatives: int = 0,
    ):
        if num_knowledge > 0 and retriever is None:
            raise ValueError("num_knowledge > 0 needs a retriever")
        if tokenizer.mask_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no mask token; MLM needs one")
        self.retriever = retriever
        self.num_knowledge = num_knowledge
        self.knowledge_graph = knowledge_graph
        self.force_positives = force_positives
        self.max_triples_per_example = max_triples_per_example
        self.mask_token_id = tokenizer.mask_token_id
        self.special_token_ids = sorted(set(tokenizer.all_special_ids))
        self.vocab_size = len(tokenizer)
        self.mlm_probability = mlm_probability
        self.index_negatives = index_negatives
        self.index_embeddings: torch.Tensor | None = None

    def set_index_embeddings(self, embeddings) -> None:
        """The `(num_entries, retrieval_dim)` matrix the retriever currently searches."""
        self.index_embeddings = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)

    def __call__(
        self, batch: dict[str, torch.Tensor], query_embeddings: torch.Tensor | None, mask_seed: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Build the model inputs of one batch.

        Args:
            batch: a :class:`PretrainingCollator` batch (CPU or device tensors).
            query_embeddings: `(B, retrieval_dim)` retrieval queries of the batch (``None`` without knowledge).
            mask_seed: seeds the MLM masking, so a resumed run masks exactly as the uninterrupted one did.

        Returns:
            ``(inputs, stats)``: keyword arguments of ``ReavlForPreTraining.forward`` (CPU tensors), and
            ``recall_sum`` / ``recall_count`` (weak-positive recall@K before forcing) and ``forced``.
        """
        generator = torch.Generator().manual_seed(int(mask_seed) % (2**63))
        input_ids = batch["input_ids"].cpu()
        attention_mask = batch["attention_mask"].cpu()
        mlm_input_ids, mlm_labels = mask_tokens_for_mlm(
            input_ids, attention_mask, batch["entity_token_mask"].cpu(), self.special_token_ids,
            self.mask_token_id, self.vocab_size, self.mlm_probability, generator,
        )
        inputs = {
            "pixel_values": batch["pixel_values"],
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mlm_input_ids": mlm_input_ids,
            "mlm_labels": mlm_labels,
        }
        stats = {"recall_sum": 0.0, "recall_count": 0, "forced": 0}
        if self.num_knowledge == 0:
            return inputs, stats

        queries = query_embeddings.detach().float().cpu()
        retrieved = self.retriever.retrieve(queries, self.num_knowledge)
        indices = torch.as_tensor(np.asarray(retrieved["knowledge_indices"]), dtype=torch.long)
        positive_rows = batch["positive_rows"].cpu()
        stats["recall_sum"], stats["recall_count"] = weak_positive_recall(indices, positive_rows)
        if self.force_positives:
            scores = torch.as_tensor(np.asarray(retrieved["knowledge_scores"]), dtype=torch.float32)
            indices, labels, stats["forced"] = force_weak_positives(indices, scores, positive_rows)
        else:
            labels = ((indices[:, :, None] == positive_rows[:, None, :]).any(dim=2) & (indices >= 0)).long()
        if stats["forced"]:
            entry_ids, entry_mask = self.retriever.get_entries(indices.numpy())
        else:
            entry_ids, entry_mask = retrieved["knowledge_input_ids"], retrieved["knowledge_attention_mask"]
        if self.index_embeddings is None:
            raise RuntimeError("KnowledgeBatchBuilder.set_index_embeddings was never called")
        keys = self.index_embeddings[indices.clamp(min=0)]  # (B, K, R)
        scores = torch.einsum("br,bkr->bk", queries, keys).masked_fill(indices < 0, 0.0)
        inputs.update(
            knowledge_input_ids=torch.as_tensor(np.asarray(entry_ids), dtype=torch.long),
            knowledge_attention_mask=torch.as_tensor(np.asarray(entry_mask), dtype=torch.long),
            knowledge_scores=scores,
            knowledge_indices=indices,
            knowledge_labels=labels,
        )
        if self.index_negatives:
            num_rows = self.index_embeddings.shape[0]
            if self.index_negatives < 0 or self.index_negatives >= num_rows:
                rows = torch.arange(num_rows)
            else:
                rows = torch.randperm(num_rows, generator=generator)[: self.index_negatives]
            inputs.update(negative_keys=self.index_embeddings[rows], negative_key_indices=rows)
        if self.knowledge_graph is not None:
            kg_triples = self.knowledge_graph.batch_triples(indices, self.max_triples_per_example)
            if kg_triples is not None:
                inputs["kg_triples"] = kg_triples
        return inputs, stats
