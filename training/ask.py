"""`reavl ask`: answer a question about an image with a REAVL question-answering folder and show the evidence.

```
reavl ask --model out/reavl-vqa --image flag.png --question "Which language is spoken in this country?"
reavl ask --model runs/vqa/final --image flag.png --question "..." --top-k 3 --json
```

`--model` is a trained folder or an export (model + processor + knowledge index). The answer comes from the same
`knowledge-vqa` pipeline the Hub repo serves; `--no-knowledge` runs the no-knowledge ablation for comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def ask(model_dir: str | Path, image, question: str, top_k: int = 5, use_knowledge: bool = True) -> dict:
    """`{"answers": [{answer, score}], "evidence": [{id, title, index, retrieval_score, gate}]}` for one question."""
    from modeling_reavl.pipeline_reavl import KnowledgeVQAPipeline
    from training.export import load_model_and_processor

    model, processor = load_model_and_processor(model_dir)
    if type(model).__name__ != "ReavlForQuestionAnswering":
        raise ValueError(
            f"{model_dir} holds a {type(model).__name__}; reavl ask needs a question-answering head "
            "(ReavlForQuestionAnswering, from `reavl finetune --task vqa`)"
        )
    pipe = KnowledgeVQAPipeline(model=model, processor=processor, device=-1)
    return pipe(str(image) if isinstance(image, Path) else image, question, top_k=top_k, use_knowledge=use_knowledge)


def format_result(result: dict) -> str:
    """The answers and the evidence as two aligned tables."""
    lines = ["answer                          score"]
    lines += [f"{item['answer'][:30]:<30}  {item['score']:.3f}" for item in result["answers"]]
    if result["evidence"]:
        lines += ["", "evidence (retrieved knowledge)      retrieval  gate", ]
        for entry in result["evidence"]:
            label = f"{entry['id']} {entry['title']}"[:34]
            lines.append(f"{label:<34}  {entry['retrieval_score']:>9.3f}  {entry['gate']:.3f}")
    else:
        lines += ["", "evidence: none (no knowledge used)"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reavl ask", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="question-answering folder (trained or exported)")
    parser.add_argument("--image", required=True, type=Path, help="image file")
    parser.add_argument("--question", required=True, help="the question")
    parser.add_argument("--top-k", type=int, default=5, help="answers to show (default 5)")
    parser.add_argument("--no-knowledge", action="store_true", help="answer without retrieval (the ablation)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.image.is_file():
        print(f"reavl ask: image {args.image} does not exist", file=sys.stderr)
        return 2
    if args.top_k < 1:
        print(f"reavl ask: --top-k must be >= 1, got {args.top_k}", file=sys.stderr)
        return 2
    try:
        result = ask(args.model, args.image, args.question, top_k=args.top_k, use_knowledge=not args.no_knowledge)
    except (ValueError, OSError) as error:
        print(f"reavl ask: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
