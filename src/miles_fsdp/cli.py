"""`miles-fsdp <command> [--flags]`: one tyro config dataclass per command.

Each command lives in ``miles_fsdp.commands.<name>`` as a ``Config`` dataclass (its field
docstrings are the ``--help``) and ``main(cfg)``. Commands import lazily, so
``miles-fsdp generate --help`` does not load the trainer. A UserError (miles_fsdp.errors)
prints as one message and exits 1; any other exception keeps its traceback.
"""

from __future__ import annotations

import importlib
import sys

from miles_fsdp import threads
from miles_fsdp.errors import UserError

# command -> (module, config class, one-line summary)
COMMANDS = {
    "quickstart": ("miles_fsdp.commands.quickstart", "QuickstartConfig",
                   "SFT then RL on a synthetic task with a tiny model, on CPU, end to end"),
    "rl": ("miles_fsdp.commands.rl", "RLConfig", "RL training (GRPO family) with the in-process engine"),
    "sft": ("miles_fsdp.commands.sft", "SFTConfig", "supervised fine-tuning on prompt/response or chat data"),
    "generate": ("miles_fsdp.commands.generate", "GenerateConfig", "sample from a checkpoint"),
    "serve": ("miles_fsdp.commands.serve", "ServeConfig", "HTTP rollout server (OpenAI-compatible + native)"),
    "eval": ("miles_fsdp.commands.eval", "EvalCommandConfig", "evaluate a checkpoint on a prompt dataset"),
    "convert": ("miles_fsdp.commands.convert", "ConvertConfig", "export a training checkpoint to HF safetensors"),
    "train-draft": ("miles_fsdp.commands.train_draft", "TrainDraftConfig",
                    "train only the MTP draft of a checkpoint (SFT data or self-distillation), for speculation"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: miles-fsdp <command> [--help] [flags]", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, _, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"miles-fsdp: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, config_name, summary = COMMANDS[name]
    threads.configure_env()  # before the command imports torch: OpenMP reads it once, at load
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            print(f"miles-fsdp: command {name!r} is not available in this build", file=sys.stderr)
            return 2
        raise
    import tyro

    cfg = tyro.cli(getattr(module, config_name), args=rest, prog=f"miles-fsdp {name}", description=summary)
    if "torch" in sys.modules:
        threads.fit_torch_threads()
    try:
        result = module.main(cfg)
    except UserError as e:  # a bad file, setting or server: the message says what to fix; no traceback
        print(f"miles-fsdp {name}: error: {e}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
