"""`reavl` console script: one sub-command per workflow, each a thin front over a module's `main(argv)`.

Sub-command modules are imported lazily so `reavl --help` stays fast and a missing optional dependency of one
workflow does not break the others.
"""

import importlib
import sys


COMMANDS = {
    "demo": ("training.demo", "the main job: knowledge world -> index -> pre-train -> fine-tune -> evaluate -> export"),
    "build-index": ("training.build_index", "embed a knowledge base and write a knowledge/ index folder"),
    "pretrain": ("training.pretrain", "knowledge-aware pre-training (single process; use accelerate launch to scale)"),
    "finetune": ("training.finetune", "fine-tune a task head with Trainer"),
    "evaluate": ("training.evaluate", "evaluate a model on a task, with the no-knowledge ablation"),
    "export": ("training.export", "turn a trained folder into a Hub repo folder"),
    "push": ("training.push", "upload an exported folder (and its knowledge dataset) to the Hub"),
    "ask": ("training.ask", "answer a question about an image and show the evidence"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: reavl <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "Run `reavl <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"reavl: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
