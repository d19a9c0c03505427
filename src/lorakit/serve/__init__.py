"""`lorakit serve`: one base model, many adapters, over HTTP (FastAPI + uvicorn).

    engine = Engine("path/to/model", "path/to/adapters", max_resident=8)
    app = create_app(engine)   # any ASGI server; `serve()` runs uvicorn
"""

from .app import create_app
from .engine import Engine, ServeError


def serve(model: str, adapters: str | None, *, host: str = "127.0.0.1", port: int = 8000,
          max_resident: int = 8, device: str = "cpu", dtype: str = "auto", wait_ms: float = 5.0,
          max_batch: int = 32, log_level: str = "info", continuous: bool = True) -> None:
    """Load the base once, register the adapters, and serve until interrupted."""
    import uvicorn

    engine = Engine(model, adapters, max_resident=max_resident, device=device, dtype=dtype,
                    wait_ms=wait_ms, max_batch=max_batch, continuous=continuous)
    print(f"lorakit serve: {engine.base_name} ({engine.task}) with {len(engine.adapters())} adapters "
          f"{engine.adapters()[:8]}; at most {max_resident} resident; {'continuous' if continuous else 'static'} "
          f"batching; http://{host}:{port}", flush=True)
    if not engine.base_head:
        print("  the base's classification head is untrained: /v1/classify answers for the adapters, "
              "each with its own head and labels", flush=True)
    try:
        uvicorn.run(create_app(engine), host=host, port=port, log_level=log_level)
    finally:
        engine.close()


__all__ = ["Engine", "ServeError", "create_app", "serve"]
