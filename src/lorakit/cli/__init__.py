"""The `lorakit` command line. Each subcommand lives in its own module (lorakit.cli.<name>) with
`add_arguments(parser)` and `run(args) -> int`; only the chosen one is imported, so `lorakit
--help` stays fast and heavy libraries load only when a command needs them."""

from __future__ import annotations

import argparse
import importlib
import sys

from lorakit.errors import LoraError

COMMANDS = {
    "demo": "the main job on the embedded default (no arguments, nothing downloaded)",
    "train": "fine-tune a model with LoRA on your data, write a PEFT adapter",
    "serve": "serve a base model and many adapters over HTTP (OpenAI-compatible)",
    "inspect": "show an adapter's config, ranks and the spectrum of its updates",
}


EXTRAS = {"demo": "train", "train": "train", "serve": "serve", "inspect": "train"}  # pip extras per command


def _available() -> dict[str, str]:
    out = {}
    for name, help_text in COMMANDS.items():
        if importlib.util.find_spec(f"lorakit.cli.{name}") is not None:
            out[name] = help_text
    return out


def quiet_third_party_logs() -> None:
    """Installed libraries (torchao through transformers' imports, torch's pytree) log import-time
    warnings that say nothing about the user's command."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_third_party_logs()
    commands = _available()
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA for PyTorch, PEFT-compatible.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = argv[0] if argv and argv[0] in commands else None
    module = None
    for name, help_text in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            try:
                module = importlib.import_module(f"lorakit.cli.{name}")
            except ImportError as e:  # an optional dependency of this command: say what to install
                extra = EXTRAS.get(name, "train")
                print(f"lorakit {name}: needs {e.name or e} (pip install 'lorakit[{extra}]')", file=sys.stderr)
                return 2
            module.add_arguments(p)
    args = parser.parse_args(argv)
    if args.command is None or module is None:
        parser.print_help()
        return 2
    try:
        return int(module.run(args) or 0)
    except LoraError as e:
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
