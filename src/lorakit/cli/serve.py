"""`lorakit serve`: an OpenAI-compatible HTTP server for one base model and many adapters.

    lorakit serve --model PATH_OR_NAME --adapters DIR [--max-resident N] [--host H --port P]

Each subfolder of DIR that holds a PEFT adapter is served under the subfolder's name. With no
arguments it serves the embedded default base with the demo's adapters (trained first if missing).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="base model: a transformers folder or an embedded name (smollm2, minilm)")
    p.add_argument("--adapters", default=None, help="folder whose subfolders are PEFT adapters, served by folder name")
    p.add_argument("--max-resident", type=int, default=8, help="adapters kept in the bank's slots at once (LRU; default 8)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--dtype", default="auto", help="auto (as saved), float32, bfloat16, float16")
    p.add_argument("--wait-ms", type=float, default=5.0, help="dynamic batching window in milliseconds (default 5)")
    p.add_argument("--max-batch", type=int, default=32, help="most rows in one batch (default 32)")
    p.add_argument("--static-batching", action="store_true",
                   help="run each generation batch to its end before admitting new requests "
                        "(default: continuous batching, new requests join a running batch)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info")


def _default() -> tuple[str, str]:
    """The embedded default base and the demo's adapters, training them first if they are missing."""
    from lorakit.errors import LoraError

    try:
        from lorakit.cli import demo
    except ImportError:
        demo = None
    ensure = getattr(demo, "ensure_adapters", None)
    if ensure is None:
        raise LoraError("no default to serve: `lorakit demo` does not provide its adapters in this version; "
                        "pass --model PATH_OR_NAME --adapters DIR")
    model, adapters = ensure()
    return str(model), str(adapters)


def run(args: argparse.Namespace) -> int:
    import torch

    from lorakit.errors import LoraError
    from lorakit.serve import serve

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_resident < 1:
        raise LoraError(f"--max-resident must be at least 1, got {args.max_resident}")
    model, adapters = args.model, args.adapters
    if model is None:
        if adapters is not None:
            raise LoraError("--adapters needs --model (the base the adapters were trained on)")
        model, adapters = _default()
    serve(model, adapters, host=args.host, port=args.port, max_resident=args.max_resident, device=args.device,
          dtype=args.dtype, wait_ms=args.wait_ms, max_batch=args.max_batch, log_level=args.log_level,
          continuous=not args.static_batching)
    return 0
