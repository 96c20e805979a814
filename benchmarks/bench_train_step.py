"""Pre-training step time: REAVL (K retrieved entries) vs the no-knowledge ablation (K=0) vs transformers'
`BlipForImageTextRetrieval` at matched tower sizes, measured in the same process, printed as ratios.

What one "step" is, for each model (forward + backward + AdamW step on one batch of B image-text pairs):

- REAVL: what `training/pretrain.py` does per micro-batch: retrieval queries from the unimodal towers (no_grad),
  one batched `ReavlRetriever.retrieve` over an exact faiss index, weak-positive forcing, KG triples, entity-span MLM
  masking (`KnowledgeBatchBuilder`), then `ReavlForPreTraining` with every loss (ITC + knowledge alignment, MLM, ITM
  with hard negatives, KG, retriever, relevance).
- REAVL K=0: the same script path without knowledge (ITC, MLM, ITM).
- BLIP: `BlipForImageTextRetrieval` with ITC (`use_itm_head=False`) and ITM (`use_itm_head=True`, one shuffled
  negative per pair), as its retrieval pre-training does; no MLM/LM head, so BLIP does less work per step.

Usage:

    python benchmarks/bench_train_step.py                     # tiny and small, 1 thread
    python benchmarks/bench_train_step.py --sizes small --steps 20 --threads 2 --json out.json

Timings are medians over `--steps` steps after `--warmup` steps. On a shared machine run it alone: the ratios are
what to read, the absolute times move with the load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {
    # towers: hidden, layers, heads, intermediate; images: size, patch; text / knowledge lengths
    "tiny": dict(hidden=32, layers=2, heads=2, intermediate=64, image_size=30, patch=2, batch=8, text_length=16,
                 knowledge_length=24, fusion_layers=1),
    "small": dict(hidden=256, layers=4, heads=4, intermediate=1024, image_size=96, patch=16, batch=16,
                  text_length=24, knowledge_length=48, fusion_layers=2),
}
VOCAB_SIZE = 30522
NUM_ENTRIES = 2000


def reavl_config(size: dict, num_knowledge: int):
    from modeling_reavl import ReavlConfig

    tower = dict(hidden_size=size["hidden"], num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                 intermediate_size=size["intermediate"])
    return ReavlConfig(
        vision_config={"model_type": "vit", "image_size": size["image_size"], "patch_size": size["patch"], **tower},
        text_config={"model_type": "bert", "vocab_size": VOCAB_SIZE, "max_position_embeddings": 128, **tower},
        num_fusion_layers=size["fusion_layers"], fusion_num_attention_heads=size["heads"],
        fusion_intermediate_size=size["intermediate"], num_knowledge=num_knowledge,
        max_knowledge_length=size["knowledge_length"], projection_dim=min(256, size["hidden"]),
        retrieval_dim=min(256, size["hidden"]), num_kg_relations=8,
    )


def blip_model(size: dict):
    from transformers import BlipConfig, BlipForImageTextRetrieval

    config = BlipConfig(
        vision_config=dict(hidden_size=size["hidden"], num_hidden_layers=size["layers"],
                           num_attention_heads=size["heads"], intermediate_size=size["intermediate"],
                           image_size=size["image_size"], patch_size=size["patch"]),
        # BLIP's text encoder interleaves cross-attention in every layer: `layers` text layers stand for REAVL's text
        # tower plus its fusion layers.
        text_config=dict(vocab_size=VOCAB_SIZE, hidden_size=size["hidden"], encoder_hidden_size=size["hidden"],
                         num_hidden_layers=size["layers"] + size["fusion_layers"],
                         num_attention_heads=size["heads"], intermediate_size=size["intermediate"],
                         max_position_embeddings=128, bos_token_id=101, sep_token_id=102, pad_token_id=0),
        projection_dim=min(256, size["hidden"]),
    )
    return BlipForImageTextRetrieval(config)


def fake_batch(size: dict, generator: torch.Generator) -> dict:
    batch, length = size["batch"], size["text_length"]
    input_ids = torch.randint(1000, VOCAB_SIZE, (batch, length), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = 101, 102
    entity_mask = torch.zeros(batch, length, dtype=torch.bool)
    entity_mask[:, 2:4] = True
    return {
        "pixel_values": torch.randn(batch, 3, size["image_size"], size["image_size"], generator=generator),
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "entity_token_mask": entity_mask,
        "positive_rows": torch.randint(0, NUM_ENTRIES, (batch, 1), generator=generator),
    }


def knowledge_setup(size: dict, model):
    """An exact index of NUM_ENTRIES random entries (token ids of the knowledge length), keys from the model."""
    from processing.knowledge_index import embed_knowledge_entries
    from processing.retrieval_reavl import ReavlRetriever
    from training.data import KnowledgeGraph

    import datasets

    rng = np.random.default_rng(0)
    lengths = rng.integers(size["knowledge_length"] // 2, size["knowledge_length"] + 1, NUM_ENTRIES)
    token_ids = [[101, *rng.integers(1000, VOCAB_SIZE, length - 2).tolist(), 102] for length in lengths]
    embeddings = embed_knowledge_entries(model, token_ids, batch_size=128)
    ids = [f"Q{row}" for row in range(NUM_ENTRIES)]
    triples = [[["related to", ids[(row + 1) % NUM_ENTRIES]]] for row in range(NUM_ENTRIES)]
    retriever = ReavlRetriever.from_embeddings(ids, ids, token_ids, embeddings, triples=triples,
                                               encoder_fingerprint=model.reavl.knowledge_encoder_fingerprint())
    knowledge_base = datasets.Dataset.from_dict({"id": ids, "triples": triples})
    return retriever, embeddings, KnowledgeGraph(knowledge_base)


def reavl_step_function(size: dict, num_knowledge: int, tokenizer):
    from modeling_reavl import ReavlForPreTraining
    from training.data import KnowledgeBatchBuilder

    torch.manual_seed(0)
    model = ReavlForPreTraining(reavl_config(size, num_knowledge)).train()
    retriever, graph = None, None
    if num_knowledge:
        retriever, embeddings, graph = knowledge_setup(size, model)
    builder = KnowledgeBatchBuilder(retriever, num_knowledge, tokenizer, 0.15, graph)
    if num_knowledge:
        builder.set_index_embeddings(embeddings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(batch: dict, seed: int) -> None:
        query = None
        if num_knowledge:
            model.eval()
            with torch.no_grad():
                query = model.reavl.get_query_embeddings(batch["pixel_values"], batch["input_ids"],
                                                         batch["attention_mask"])
            model.train()
        inputs, _ = builder(batch, query, seed)
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(parameter.numel() for parameter in model.parameters())


def blip_step_function(size: dict):
    torch.manual_seed(0)
    model = blip_model(size).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(batch: dict, seed: int) -> None:
        pixel_values, input_ids, attention_mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
        batch_size = input_ids.shape[0]
        similarity = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                           use_itm_head=False).itm_score  # (B, B) cosine similarities
        targets = torch.arange(batch_size)
        itc = (F.cross_entropy(similarity / 0.07, targets) + F.cross_entropy(similarity.t() / 0.07, targets)) / 2
        negatives = torch.roll(torch.arange(batch_size), 1)
        itm_logits = model(
            input_ids=torch.cat([input_ids, input_ids[negatives]]),
            pixel_values=torch.cat([pixel_values, pixel_values]),
            attention_mask=torch.cat([attention_mask, attention_mask[negatives]]),
            use_itm_head=True,
        ).itm_score
        itm = F.cross_entropy(itm_logits, torch.cat([torch.ones(batch_size), torch.zeros(batch_size)]).long())
        (itc + itm).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(parameter.numel() for parameter in model.parameters())


def time_steps(step, size: dict, warmup: int, steps: int) -> float:
    generator = torch.Generator().manual_seed(0)
    batches = [fake_batch(size, generator) for _ in range(4)]
    for index in range(warmup):
        step(batches[index % len(batches)], index)
    durations = []
    for index in range(steps):
        start = time.perf_counter()
        step(batches[index % len(batches)], warmup + index)
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=sorted(SIZES))
    parser.add_argument("--num_knowledge", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from tests.conftest import minilm_path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    results = {}
    for name in args.sizes:
        size = SIZES[name]
        candidates = {
            f"reavl_k{args.num_knowledge}": reavl_step_function(size, args.num_knowledge, tokenizer),
            "reavl_k0": reavl_step_function(size, 0, tokenizer),
            "blip_itr": blip_step_function(size),
        }
        timings = {key: time_steps(step, size, args.warmup, args.steps) for key, (step, _) in candidates.items()}
        parameters = {key: count for key, (_, count) in candidates.items()}
        reavl = f"reavl_k{args.num_knowledge}"
        results[name] = {
            "batch_size": size["batch"],
            "seconds_per_step": timings,
            "parameters": parameters,
            "ratio_reavl_vs_no_knowledge": timings[reavl] / timings["reavl_k0"],
            "ratio_reavl_vs_blip": timings[reavl] / timings["blip_itr"],
            "ratio_no_knowledge_vs_blip": timings["reavl_k0"] / timings["blip_itr"],
        }
        print(f"\n[{name}] batch {size['batch']}, hidden {size['hidden']}, {size['layers']} layers, "
              f"{size['image_size']}px/{size['patch']}, text {size['text_length']} tok, K={args.num_knowledge} x "
              f"{size['knowledge_length']} tok, {args.threads} thread(s), median of {args.steps} steps")
        for key in candidates:
            print(f"  {key:<10} {timings[key] * 1000:9.1f} ms/step  {parameters[key] / 1e6:7.2f} M params")
        print(f"  REAVL K={args.num_knowledge} / no-knowledge: {results[name]['ratio_reavl_vs_no_knowledge']:.2f}x   "
              f"REAVL / BLIP: {results[name]['ratio_reavl_vs_blip']:.2f}x   "
              f"no-knowledge / BLIP: {results[name]['ratio_no_knowledge_vs_blip']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
