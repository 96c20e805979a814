"""GPU checks: what the CPU test suite cannot show. Run on a machine with CUDA:

    python benchmarks/gpu_check.py [--json OUT]

1. Every pre-training loss on CUDA in float32 and under bf16 autocast: finite, bf16 within 5% of float32, and 30
   AdamW steps on a fixed batch halve the loss under bf16 autocast.
2. Train-step time of the demo-size model on CUDA against the same step on the CPU (ratio, same process), and of
   the no-knowledge ablation beside it.
3. The knowledge-VQA head: CUDA logits equal CPU logits (float32, atol 1e-4) after moving the same weights.

Prints one JSON object with every figure; exits non-zero when a check fails.
"""

import argparse
import json
import sys
import time

import torch

from modeling_reavl import ReavlConfig, ReavlForPreTraining, ReavlForQuestionAnswering


def demo_size_config(num_knowledge: int = 3) -> ReavlConfig:
    hidden = 64
    return ReavlConfig(
        vision_config=dict(
            model_type="resnet", num_channels=3, embedding_size=32, hidden_sizes=[32, 64, hidden], depths=[1, 1, 1],
            downsample_in_first_stage=False,
        ),
        text_config=dict(
            model_type="bert", vocab_size=2400, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=2 * hidden, max_position_embeddings=64,
        ),
        num_fusion_layers=2, fusion_num_attention_heads=4, fusion_intermediate_size=2 * hidden, fusion_dropout=0.0,
        num_knowledge=num_knowledge, max_knowledge_length=40, projection_dim=64, retrieval_dim=64,
        id2label={i: f"answer {i}" for i in range(50)},
    )


def pretraining_batch(config: ReavlConfig, device, batch_size=32, text_length=16, generator_seed=0):
    generator = torch.Generator().manual_seed(generator_seed)
    vocab = config.text_config.vocab_size
    num_knowledge, length = config.num_knowledge, config.max_knowledge_length
    input_ids = torch.randint(5, vocab, (batch_size, text_length), generator=generator)
    mlm_input_ids, mlm_labels = input_ids.clone(), torch.full_like(input_ids, -100)
    mlm_labels[:, 3], mlm_input_ids[:, 3] = input_ids[:, 3], 4
    batch = {
        "pixel_values": torch.randn(batch_size, 3, 32, 32, generator=generator),
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mlm_input_ids": mlm_input_ids,
        "mlm_labels": mlm_labels,
    }
    if num_knowledge:
        knowledge_labels = torch.zeros(batch_size, num_knowledge)
        knowledge_labels[:, 0] = 1
        batch.update(
            knowledge_input_ids=torch.randint(5, vocab, (batch_size, num_knowledge, length), generator=generator),
            knowledge_attention_mask=torch.ones(batch_size, num_knowledge, length, dtype=torch.long),
            knowledge_labels=knowledge_labels,
            kg_triples=torch.tensor([[[0, 1, 4]]] * batch_size),
        )
    return {name: tensor.to(device) for name, tensor in batch.items()}


def step_time(config, device, steps=10, autocast=False) -> float:
    torch.manual_seed(0)
    model = ReavlForPreTraining(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = pretraining_batch(config, device)

    def one_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(2):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    results, failures = {"device": torch.cuda.get_device_name(0)}, []

    # 1. losses in fp32 and bf16 autocast
    config = demo_size_config()
    torch.manual_seed(0)
    model = ReavlForPreTraining(config).to(cuda)
    batch = pretraining_batch(config, cuda)
    loss_names = ["itc_loss", "knowledge_alignment_loss", "mlm_loss", "itm_loss", "kg_loss", "retriever_loss",
                  "relevance_loss"]
    torch.manual_seed(1)
    fp32 = model(**batch)
    torch.manual_seed(1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = model(**batch)
    results["losses_fp32"] = {name: float(getattr(fp32, name)) for name in loss_names}
    results["losses_bf16"] = {name: float(getattr(bf16, name)) for name in loss_names}
    if not all(torch.isfinite(getattr(bf16, name)) for name in loss_names):
        failures.append("a bf16 loss is not finite")
    relative = abs(float(bf16.loss) - float(fp32.loss)) / abs(float(fp32.loss))
    results["bf16_vs_fp32_total_relative_difference"] = relative
    if relative > 0.05:
        failures.append(f"bf16 total loss differs from fp32 by {relative:.3f}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(30):
        torch.manual_seed(step)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    results["bf16_30_steps"] = [losses[0], losses[-1]]
    if not losses[-1] < 0.5 * losses[0]:
        failures.append(f"bf16 training did not halve the loss: {losses[0]:.3f} -> {losses[-1]:.3f}")

    # 2. step time, CUDA vs CPU, full model vs no-knowledge ablation
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results["step_seconds"] = {
        "cpu_full": step_time(config, cpu, steps=3),
        "cuda_full": step_time(config, cuda),
        "cuda_full_bf16": step_time(config, cuda, autocast=True),
        "cuda_no_knowledge": step_time(demo_size_config(num_knowledge=0), cuda),
    }
    seconds = results["step_seconds"]
    results["ratios"] = {
        "cpu_over_cuda": seconds["cpu_full"] / seconds["cuda_full"],
        "cuda_full_over_no_knowledge": seconds["cuda_full"] / seconds["cuda_no_knowledge"],
    }

    # 3. the VQA head gives the same logits on CUDA and CPU
    torch.manual_seed(0)
    qa = ReavlForQuestionAnswering(config).eval()
    qa_batch = {
        name: tensor for name, tensor in pretraining_batch(config, cpu, batch_size=4).items()
        if name in ("pixel_values", "input_ids", "attention_mask", "knowledge_input_ids", "knowledge_attention_mask")
    }
    with torch.no_grad():
        cpu_logits = qa(**qa_batch).logits
        cuda_logits = qa.to(cuda)(**{name: tensor.to(cuda) for name, tensor in qa_batch.items()}).logits.cpu()
    difference = (cpu_logits - cuda_logits).abs().max().item()
    results["qa_cuda_vs_cpu_max_abs_difference"] = difference
    if difference > 1e-4:
        failures.append(f"VQA logits differ between CUDA and CPU by {difference:.2e}")

    results["failures"] = failures
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
