"""Building a REAVL knowledge index: embed every knowledge-base entry with the model's knowledge encoder and write
the `knowledge/` folder that `ReavlRetriever` reads (layout in `processing/retrieval_reavl.py`).

```python
>>> from processing import build_knowledge_index, load_knowledge_base
>>> kb = load_knowledge_base("kb.jsonl")
>>> retriever = build_knowledge_index(model, processor, kb, "out/knowledge", index_factory="HNSW32")
>>> model.set_retriever(retriever)
```

Cost: the knowledge encoder runs once per entry. Entries are sorted by token length and padded per batch, so short
entries do not pay for long ones (on Wikipedia summaries at 64 tokens that is about 1.5x fewer token positions than
padding every batch to 64), under `torch.inference_mode` with dropout off.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from .knowledge_base import entry_to_text, id_to_title_map, load_knowledge_base, validate_knowledge_base
from .retrieval_reavl import ReavlRetriever


logger = logging.getLogger(__name__)

__all__ = ["build_knowledge_index", "embed_knowledge_entries", "knowledge_base_texts"]


def _base_model(model):
    """The `ReavlModel` inside a task model (`ReavlForX.reavl`), or the model itself."""
    return getattr(model, "reavl", model)


def embed_knowledge_entries(
    model,
    input_ids_list: Sequence[Sequence[int]],
    batch_size: int = 64,
    pad_token_id: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Retrieval keys of pre-tokenized entries, in the order given.

    Entries are embedded longest first in batches padded to their own longest entry, in eval mode under
    `torch.inference_mode` (the model's train/eval mode is restored after). Every entry's key is the same as when it
    is embedded alone (padding is masked), so shards embedded by different processes concatenate into one index.

    Args:
        model: a `ReavlModel` or a task model holding one at `.reavl`.
        input_ids_list: `num_entries` token id sequences (unpadded; lists, tuples or int arrays).
        batch_size: entries per forward pass.
        pad_token_id: padding value (masked out); defaults to the text config's `pad_token_id`, else 0.
        progress: show a progress bar.

    Returns:
        `(num_entries, retrieval_dim)` float32 array of L2-normalised keys.
    """
    base = _base_model(model)
    if pad_token_id is None:
        pad_token_id = getattr(base.config.knowledge_encoder_config, "pad_token_id", None) or 0
    num_entries = len(input_ids_list)
    embeddings = np.zeros((num_entries, base.config.retrieval_dim), dtype=np.float32)
    if num_entries == 0:
        return embeddings
    lengths = np.fromiter((len(tokens) for tokens in input_ids_list), dtype=np.int64, count=num_entries)
    if lengths.min() == 0:
        raise ValueError(f"entry {int(np.argmin(lengths))} has no tokens; every entry needs at least one")
    order = np.argsort(-lengths, kind="stable")  # longest first: a memory problem shows up in the first batch
    device = next(base.parameters()).device
    was_training = base.training
    base.eval()
    try:
        with torch.inference_mode(), tqdm(
            total=num_entries, desc="embedding knowledge", unit="entry", disable=not progress
        ) as bar:
            for start in range(0, num_entries, batch_size):
                rows = order[start : start + batch_size]
                length = int(lengths[rows].max())
                input_ids = np.full((len(rows), length), pad_token_id, dtype=np.int64)
                attention_mask = np.zeros((len(rows), length), dtype=np.int64)
                for slot, row in enumerate(rows.tolist()):
                    tokens = np.asarray(input_ids_list[row], dtype=np.int64)
                    input_ids[slot, : len(tokens)] = tokens
                    attention_mask[slot, : len(tokens)] = 1
                keys = base.get_knowledge_features(
                    torch.from_numpy(input_ids).to(device), torch.from_numpy(attention_mask).to(device)
                )
                embeddings[rows] = keys.float().cpu().numpy()
                bar.update(len(rows))
    finally:
        base.train(was_training)
    return embeddings


def knowledge_base_texts(knowledge_base: datasets.Dataset) -> list[str]:
    """The string each entry is encoded from (`entry_to_text`, triple tails shown by title)."""
    id_to_title = id_to_title_map(knowledge_base)
    table = knowledge_base.with_format("arrow")
    titles, texts = table["title"].to_pylist(), table["text"].to_pylist()
    triples = table["triples"].to_pylist() if "triples" in knowledge_base.column_names else [[]] * len(titles)
    return [
        entry_to_text(title, text, entry_triples or (), id_to_title)
        for title, text, entry_triples in zip(titles, texts, triples)
    ]


def build_knowledge_index(
    model,
    processor_or_tokenizer,
    knowledge_base: Any,
    output_dir: str | os.PathLike,
    index_factory: str = "Flat",
    batch_size: int = 64,
    max_length: int | None = None,
    progress: bool = True,
) -> ReavlRetriever:
    """Embed a knowledge base and write its index folder atomically (a failure leaves a previous index intact).

    Args:
        model: a `ReavlModel` or a task model holding one at `.reavl`; its knowledge encoder and key projection
            embed the entries, and its `knowledge_encoder_fingerprint()` is stored with the index.
        processor_or_tokenizer: a `ReavlProcessor` (its tokenizer is used) or a tokenizer.
        knowledge_base: a KB `datasets.Dataset`, or any source `load_knowledge_base` reads (path, list of dicts).
            It is validated: duplicate ids, empty texts, ... raise `KnowledgeBaseError` listing them.
        output_dir: the `knowledge/` folder to write (replaced if it exists).
        index_factory: faiss factory string: `"Flat"` (exact), `"HNSW32"`, `"IVF{lists},PQ{m}"` (lists clamped to
            the data), ...
        batch_size: entries per forward pass.
        max_length: tokens kept per entry; defaults to the model's `config.max_knowledge_length`.
        progress: show a progress bar while embedding.

    Returns:
        The `ReavlRetriever` over the written folder's content (in memory; ready for `model.set_retriever`).
    """
    base = _base_model(model)
    if isinstance(knowledge_base, datasets.Dataset):
        knowledge_base = validate_knowledge_base(knowledge_base)
    else:
        knowledge_base = load_knowledge_base(knowledge_base)
    if knowledge_base.num_rows == 0:
        raise ValueError("the knowledge base is empty; an index needs at least one entry")
    tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
    max_length = int(max_length or base.config.max_knowledge_length)

    texts = knowledge_base_texts(knowledge_base)
    input_ids = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    embeddings = embed_knowledge_entries(model, input_ids, batch_size, pad_token_id=pad_token_id, progress=progress)

    table = knowledge_base.with_format("arrow")
    columns = knowledge_base.column_names
    retriever = ReavlRetriever.from_embeddings(
        ids=table["id"].to_pylist(),
        titles=table["title"].to_pylist(),
        input_ids=input_ids,
        embeddings=embeddings,
        texts=table["text"].to_pylist(),
        aliases=table["aliases"].to_pylist() if "aliases" in columns else None,
        triples=table["triples"].to_pylist() if "triples" in columns else None,
        index_factory=index_factory,
        encoder_fingerprint=base.knowledge_encoder_fingerprint(),
        max_length=max_length,
        pad_token_id=pad_token_id,
    )
    retriever.save(output_dir)
    return retriever
