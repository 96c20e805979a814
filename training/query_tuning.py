"""Query-side retriever tuning: the last stage of pre-training (`reavl pretrain --query_tuning_steps N`).

Multi-task pre-training teaches the knowledge encoder to give entries distinct keys, anchored by captions that name
what an image shows. What it learns slowly is the *image-only* lookup (a flag, a landmark, a product photo: the
question never names the entity), because each of its steps is expensive (text, knowledge and fusion passes) and
sees only the few entries retrieved for its batch. This stage, as RAG fine-tunes only its query encoder, locks the
knowledge encoder, embeds every entry once, and then trains what produces the queries, the vision tower and the
image part of the query, together with the key projection, against *every* entry of the index at each step:

    pooled = knowledge_encoder(entries)                      # once, locked
    keys   = normalize(pooled @ W_key.T)                     # every step, exact (W_key is trained)
    loss   = mean over queries q in {image only, image + caption} of
             multi-positive softmax cross-entropy of q @ keys.T / retrieval_temperature (weak positives of the pair)

A step costs one vision pass and one (locked) text pass over the captions, about 1/15 of a multi-task step for the
demo model, so thousands of steps fit where hundreds of multi-task ones did. The keys stay exact (recomputed from the
locked pooled vectors), and the caller re-embeds the index at the end, as after any pre-training.

Scope: every entry is a candidate at every step, so the KB's pooled vectors must fit in memory (`N x hidden` floats)
and `N x retrieval_dim` scores per query are computed; that suits KBs up to about 10^5 entries. With several
processes, gradients are averaged over processes by hand (the towers are called directly, not through DDP).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from modeling_reavl.modeling_reavl import multi_positive_contrastive_loss

from .augment import augment_pixel_values

logger = logging.getLogger(__name__)


def _positive_mask(positive_rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """`(B, P)` index rows (-1 padded) -> `(B, num_rows)` bool mask."""
    mask = torch.zeros(positive_rows.shape[0], num_rows, dtype=torch.bool, device=positive_rows.device)
    valid = positive_rows >= 0
    rows = torch.arange(positive_rows.shape[0], device=positive_rows.device)[:, None].expand_as(positive_rows)
    mask[rows[valid], positive_rows[valid]] = True
    return mask


@torch.no_grad()
def pooled_knowledge(model, retriever, batch_size: int, device) -> torch.Tensor:
    """Pooled knowledge-encoder states of every index row `(N, hidden)`, in eval mode."""
    base = model.reavl
    was_training = base.training
    base.eval()
    pieces = []
    for start in range(0, len(retriever), batch_size):
        ids, mask = retriever.get_entries(np.arange(start, min(start + batch_size, len(retriever))))
        _, pooled = base.encode_knowledge(ids.to(device), mask.to(device))
        pieces.append(pooled.float())
    base.train(was_training)
    return torch.cat(pieces)


def tune_retrieval_queries(
    accelerator,
    model,
    retriever,
    dataloader,
    num_steps: int,
    learning_rate: float,
    seed: int,
    image_augmentation: bool,
    train_vision_tower: bool = True,
    train_key_projection: bool = True,
    index_batch_size: int = 64,
    logging_steps: int = 100,
    disable_tqdm: bool = False,
) -> dict[str, Any]:
    """Run `num_steps` query-tuning steps on `model` (an unwrapped `ReavlForPreTraining`) in place.

    `dataloader` yields `PretrainingCollator` batches (with `positive_rows`); pairs without weak positives are
    skipped. Returns the loss and the image-only recall@1 over the whole index (training images) at the start and
    the end, and the wall time.
    """
    from tqdm.auto import tqdm

    base = model.reavl
    device = accelerator.device
    head = base.retrieval_head
    temperature = model.config.retrieval_temperature
    start_time = time.time()

    trainable = [head.query_image_weight]
    if train_key_projection:
        trainable.append(head.key_weight)
    if train_vision_tower:
        trainable += [parameter for parameter in base.vision_model.parameters()]
    previous_flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in trainable:
        parameter.requires_grad_(True)

    pooled = pooled_knowledge(model, retriever, index_batch_size, device)
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
    warmup = max(1, num_steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return learning_rate * (step + 1) / warmup
        progress = (step - warmup) / max(1, num_steps - warmup)
        return learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    history: list[dict[str, float]] = []
    progress = tqdm(total=num_steps, desc="query tuning", disable=not accelerator.is_local_main_process or disable_tqdm)
    step, epoch = 0, 0
    while step < num_steps:
        if hasattr(dataloader, "set_epoch"):
            dataloader.set_epoch(10_000 + epoch)  # a data order of its own, still seeded
        for batch in dataloader:
            if step >= num_steps:
                break
            has_positive = (batch["positive_rows"] >= 0).any(dim=1)
            if not has_positive.any():
                continue
            pixel_values = batch["pixel_values"][has_positive].to(device)
            if image_augmentation:
                pixel_values = augment_pixel_values(
                    pixel_values, seed=(seed * 1_000_003 + step) * 7877 + accelerator.process_index
                )
            positive = _positive_mask(batch["positive_rows"][has_positive].to(device), pooled.shape[0])
            base.vision_model.train(train_vision_tower)
            base.text_model.eval()
            # bf16 autocast as in pre-training; fp16 would need the accelerator's loss scaler, so it runs in fp32.
            precision = accelerator.autocast() if accelerator.mixed_precision == "bf16" else contextlib.nullcontext()
            with precision:
                _, image_pooled = base.encode_image(pixel_values)
                with torch.no_grad():
                    _, text_pooled = base.encode_text(
                        batch["input_ids"][has_positive].to(device), batch["attention_mask"][has_positive].to(device)
                    )
                keys = head.key(pooled)
                losses, recall = [], None
                for query in (head.query(None, image_pooled), head.query(text_pooled.detach(), image_pooled)):
                    logits = query.float() @ keys.float().t() / temperature
                    losses.append(multi_positive_contrastive_loss(logits, positive))
                    if recall is None:  # of the image-only query, over the whole index
                        recall = positive.gather(1, logits.argmax(dim=-1, keepdim=True)).float().mean()
                loss = torch.stack(losses).mean()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if accelerator.num_processes > 1:
                for parameter in trainable:
                    if parameter.grad is not None:
                        parameter.grad = accelerator.reduce(parameter.grad, reduction="mean")
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            step += 1
            history.append({"step": step, "loss": float(loss.detach()), "image_recall@1": float(recall)})
            progress.update(1)
            if step % logging_steps == 0 or step == num_steps:
                window = history[-logging_steps:]
                logger.info(
                    "query tuning step %d/%d loss=%.4g image_recall@1=%.3g lr=%.3g", step, num_steps,
                    np.mean([entry["loss"] for entry in window]),
                    np.mean([entry["image_recall@1"] for entry in window]), lr_at(step - 1),
                )
        epoch += 1
    progress.close()
    for parameter, flag in previous_flags.items():
        parameter.requires_grad_(flag)

    def _window_mean(entries, name):
        return float(np.mean([entry[name] for entry in entries])) if entries else None

    window = max(1, min(50, len(history) // 4))
    return {
        "steps": step,
        "learning_rate": learning_rate,
        "loss": {"first_mean": _window_mean(history[:window], "loss"), "last_mean": _window_mean(history[-window:], "loss")},
        "image_recall_at_1": {
            "first_mean": _window_mean(history[:window], "image_recall@1"),
            "last_mean": _window_mean(history[-window:], "image_recall@1"),
        },
        "wall_time_s": time.time() - start_time,
    }
