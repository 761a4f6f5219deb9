"""The `hogwild` command line: one entry point, a subcommand per process.

Each subcommand lives in its own module with a `main(argv) -> int`; importing is lazy so that
`hogwild operator` never imports torch and `hogwild worker` never imports kopf.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "demo": ("hogwild.local.demo", "generate a tiny model, serve it locally, teach it a fact through /train"),
    "serve": ("hogwild.local.serve", "run vLLM with the plugin plus the training worker as local processes"),
    "vllm": ("hogwild.vllm_plugin.launch", "start vLLM's OpenAI server with the plugin (container command)"),
    "worker": ("hogwild.worker.main", "run the training worker (sidecar command)"),
    "operator": ("hogwild.operator.main", "run the Kubernetes operator"),
    "tiny-model": (
        "hogwild.testing.tiny_model",
        "write a tiny random model with a locally trained tokenizer",
    ),
}


def usage() -> str:
    lines = ["usage: hogwild <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"hogwild: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
