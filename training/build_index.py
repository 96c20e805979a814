"""`reavl build-index`: embed a knowledge base with a saved REAVL model and write its `knowledge/` index folder.

    reavl build-index --model out/model --knowledge kb.jsonl --output out/model/knowledge
    reavl build-index --model out/model --knowledge ../shared/data/wikimel --format wikimel \\
        --output out/wikimel-index --index-factory HNSW32 --batch-size 128

`--model` is a folder with a saved REAVL model (any REAVL class: the base model is used) and its processor (or at
least its tokenizer). Prints a progress bar while embedding and one summary line at the end (`--json` prints it as
JSON instead). Returns 0 on success, 2 on bad input (message on stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path


logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    from processing.knowledge_base import KNOWLEDGE_FORMATS

    parser = argparse.ArgumentParser(prog="reavl build-index", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="folder of a saved REAVL model and its processor/tokenizer")
    parser.add_argument("--knowledge", required=True, help="knowledge base: a file or folder load_knowledge_base reads")
    parser.add_argument("--output", required=True, help="index folder to write (replaced atomically if it exists)")
    parser.add_argument("--index-factory", default="Flat", help="faiss factory string: Flat, HNSW32, IVF1024,PQ32, ...")
    parser.add_argument("--format", default=None, choices=KNOWLEDGE_FORMATS, help="knowledge base format (default: inferred)")
    parser.add_argument("--batch-size", type=int, default=64, help="entries per forward pass")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per entry (default: the model's)")
    parser.add_argument("--device", default="cpu", help="torch device for the knowledge encoder")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    return parser


def load_model_and_tokenizer(model_dir: str | Path):
    """(base `ReavlModel` in eval mode, processor or tokenizer) from a saved folder, with the local classes."""
    from transformers import AutoModel, AutoProcessor, AutoTokenizer

    import modeling_reavl  # noqa: F401  (registers REAVL with the Auto classes)
    import processing  # noqa: F401  (registers ReavlProcessor with AutoProcessor)

    model = AutoModel.from_pretrained(model_dir)
    model = getattr(model, "reavl", model).eval()
    model_dir = Path(model_dir)
    if (model_dir / "processor_config.json").is_file():
        return model, AutoProcessor.from_pretrained(model_dir)
    return model, AutoTokenizer.from_pretrained(model_dir)


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from processing.knowledge_base import KnowledgeBaseError, load_knowledge_base
    from processing.knowledge_index import build_knowledge_index

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        model, processor_or_tokenizer = load_model_and_tokenizer(args.model)
        knowledge_base = load_knowledge_base(args.knowledge, format=args.format)
    except (OSError, KnowledgeBaseError, ValueError) as error:
        print(f"reavl build-index: {error}", file=sys.stderr)
        return 2
    model.to(args.device)
    start = time.perf_counter()
    try:
        retriever = build_knowledge_index(
            model, processor_or_tokenizer, knowledge_base, args.output, index_factory=args.index_factory,
            batch_size=args.batch_size, max_length=args.max_length, progress=True,
        )
    except ValueError as error:
        print(f"reavl build-index: {error}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    output = Path(args.output)
    summary = {
        "rows": len(retriever),
        "dim": retriever.dim,
        "index_factory": retriever.index_factory,
        "seconds": round(seconds, 2),
        "bytes": _folder_bytes(output),
        "output": str(output),
        "fingerprint": retriever.fingerprint,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"built knowledge index: {summary['rows']} rows, dim {summary['dim']}, {summary['index_factory']}, "
            f"{summary['seconds']:.1f} s, {summary['bytes'] / 1e6:.1f} MB ({summary['bytes']} bytes) -> {output}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
