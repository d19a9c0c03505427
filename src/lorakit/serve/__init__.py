"""`lorakit serve`: one base model, many adapters, over HTTP (FastAPI + uvicorn).

    engine = Engine("path/to/model", "path/to/adapters", max_resident=8)
    app = create_app(engine, Limits(api_key="..."))   # any ASGI server; `serve()` runs uvicorn
"""

import ipaddress
import sys

from . import listener
from .app import Limits, allowed_hosts_for, create_app
from .engine import Engine, ServeError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(model: str, adapters: str | None, *, host: str = "127.0.0.1", port: int = 8000,
          max_resident: int = 8, device: str = "cpu", dtype: str = "auto", wait_ms: float = 5.0,
          max_batch: int = 32, log_level: str = "info", continuous: bool = True, limits: Limits | None = None,
          max_queue: int = 256, max_adapter_bytes: int | None = 2 << 30, base_name: str | None = None,
          max_connections: int = 1024, header_timeout: float = 10.0) -> None:
    """Load the base once, register the adapters, and serve until interrupted (SIGINT/SIGTERM:
    requests still running get an error within a few seconds)."""
    limits = limits or Limits(allowed_hosts=allowed_hosts_for(host))
    if not is_loopback(host) and not limits.api_key:
        print(f"lorakit serve: WARNING: listening on {host} without --api-key: anyone who reaches this port can "
              "generate and load or unload adapters. Set --api-key (or LORAKIT_API_KEY).", file=sys.stderr, flush=True)
    engine = Engine(model, adapters, max_resident=max_resident, device=device, dtype=dtype,
                    wait_ms=wait_ms, max_batch=max_batch, continuous=continuous, max_queue=max_queue,
                    max_adapter_bytes=max_adapter_bytes, base_name=base_name)
    print(f"lorakit serve: {engine.base_name} ({engine.task}) with {len(engine.adapters())} adapters "
          f"{engine.adapters()[:8]}; at most {max_resident} resident; {'continuous' if continuous else 'static'} "
          f"batching; {'API key required' if limits.api_key else 'no API key'}; http://{host}:{port}", flush=True)
    if not engine.base_head:
        print("  the base's classification head is untrained: /v1/classify answers for the adapters, "
              "each with its own head and labels", flush=True)
    try:
        listener.run(create_app(engine, limits), host=host, port=port, log_level=log_level,
                 max_connections=max_connections, header_timeout=header_timeout)
    finally:
        engine.close()


__all__ = ["Engine", "Limits", "ServeError", "create_app", "serve"]
