"""`lorakit serve`: an OpenAI-compatible HTTP server for one base model and many adapters.

    lorakit serve --model PATH_OR_NAME --adapters DIR [--max-resident N] [--host H --port P]

Each subfolder of DIR that holds a PEFT adapter is served under the subfolder's name. With no
arguments it serves the embedded default base with the demo's adapters (trained first if missing).
"""

from __future__ import annotations

import argparse

from lorakit.cli import demo
from lorakit.errors import LoraError
from lorakit.serve import Limits, allowed_hosts_for, serve
from lorakit.train.precision import DTYPES


DTYPE_ALIASES = DTYPES  # --precision's names for the torch dtypes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="base model: a transformers folder or an embedded name (smollm2, minilm)")
    p.add_argument("--served-model-name", default=None,
                   help="the base model's name in requests and /v1/models (default: --model as given)")
    p.add_argument("--adapters", default=None, help="folder whose subfolders are PEFT adapters, served by folder name")
    p.add_argument("--max-resident", type=int, default=8, help="adapters kept in the bank's slots at once (LRU; default 8)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--dtype", default="auto", type=lambda v: DTYPE_ALIASES.get(v, v),
                   choices=["auto", "float32", "bfloat16", "float16"],
                   help="the base's precision: auto (as saved), float32 (fp32), bfloat16 (bf16), float16 (fp16)")
    p.add_argument("--wait-ms", type=float, default=5.0, help="dynamic batching window in milliseconds (default 5)")
    p.add_argument("--max-batch", type=int, default=32, help="most rows in one batch (default 32)")
    p.add_argument("--static-batching", action="store_true",
                   help="run each generation batch to its end before admitting new requests "
                        "(default: continuous batching, new requests join a running batch)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info")
    g = p.add_argument_group("access and limits")
    g.add_argument("--api-key", default=None,
                   help="every endpoint but /health needs 'Authorization: Bearer KEY' (default: $LORAKIT_API_KEY; "
                        "none: open, and a warning when not bound to loopback)")
    g.add_argument("--admin-key", default=None,
                   help="POST/DELETE /v1/adapters need this key instead (default: $LORAKIT_ADMIN_KEY)")
    g.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host header names answered (default: the bound address and localhost; "
                        "'*' for any). Blocks DNS rebinding")
    g.add_argument("--max-queue", type=int, default=256, help="requests waiting for a batch before 429 (default 256)")
    g.add_argument("--max-connections", type=int, default=1024,
                   help="open connections at once; beyond, 503 (default 1024)")
    g.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection may take to send a request's headers (default 10)")
    g.add_argument("--max-body-bytes", type=int, default=4 << 20, help="largest request body (default 4 MiB)")
    g.add_argument("--max-pending-bytes", type=int, default=64 << 20,
                   help="request bodies still arriving, all connections together; beyond, 503 (default 64 MiB)")
    g.add_argument("--max-request-tokens", type=int, default=16384,
                   help="(prompt + max_tokens) x n summed over a request's prompts (default 16384)")
    g.add_argument("--max-prompt-chars", type=int, default=None,
                   help="characters per prompt (default 32 x the model's context, at least 4096)")
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take (default 600)")
    g.add_argument("--max-adapter-bytes", type=int, default=2 << 30, help="largest adapter weights file (default 2 GiB)")


def _default() -> tuple[str, str]:
    """The embedded default base and the demo's adapters, training them first if they are missing."""
    model, adapters = demo.ensure_adapters()
    return str(model), str(adapters)


def run(args: argparse.Namespace) -> int:
    import os

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_resident < 1:
        raise LoraError(f"--max-resident must be at least 1, got {args.max_resident}")
    for flag in ("max_queue", "max_body_bytes", "max_request_tokens", "max_adapter_bytes", "max_connections",
                 "max_pending_bytes"):
        if getattr(args, flag) < 1:
            raise LoraError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    for flag in ("request_timeout", "header_timeout"):
        if getattr(args, flag) <= 0:
            raise LoraError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.wait_ms < 0:
        raise LoraError(f"--wait-ms must be 0 or more, got {args.wait_ms}")
    hosts = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()] if args.allowed_hosts else None
    for flag, env in (("api_key", "LORAKIT_API_KEY"), ("admin_key", "LORAKIT_ADMIN_KEY")):
        key = getattr(args, flag) or os.environ.get(env) or ""
        if key and not (key.isascii() and key.isprintable() and " " not in key):
            raise LoraError(f"--{flag.replace('_', '-')} / {env}: use printable ASCII without spaces (what an "
                            "Authorization header can carry)")
    limits = Limits(api_key=args.api_key or os.environ.get("LORAKIT_API_KEY") or None,
                    admin_key=args.admin_key or os.environ.get("LORAKIT_ADMIN_KEY") or None,
                    allowed_hosts=allowed_hosts_for(args.host, hosts), max_body_bytes=args.max_body_bytes,
                    max_pending_bytes=args.max_pending_bytes,
                    max_request_tokens=args.max_request_tokens, max_prompt_chars=args.max_prompt_chars,
                    request_timeout=args.request_timeout)
    model, adapters = args.model, args.adapters
    if model is None:
        if adapters is not None:
            raise LoraError("--adapters needs --model (the base the adapters were trained on)")
        model, adapters = _default()
    serve(model, adapters, host=args.host, port=args.port, max_resident=args.max_resident, device=args.device,
          dtype=args.dtype, wait_ms=args.wait_ms, max_batch=args.max_batch, log_level=args.log_level,
          continuous=not args.static_batching, limits=limits, max_queue=args.max_queue,
          max_adapter_bytes=args.max_adapter_bytes, base_name=args.served_model_name,
          max_connections=args.max_connections, header_timeout=args.header_timeout)
    return 0
