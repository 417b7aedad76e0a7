"""`latentdiff serve`: a web page and AUTOMATIC1111's HTTP API (`/sdapi/v1/txt2img`, `img2img`, `progress`, …) on
one model, so that A1111 clients work unchanged.

    from latentdiff.serve import create_app, Engine
    app = create_app(Engine("emoji"))          # any ASGI server runs it; `latentdiff serve` runs uvicorn

Safe by default: it listens on 127.0.0.1 only; another host needs `allow_remote=True` (`--allow-remote`), and a
token (`--token`, or the environment variable LATENTDIFF_TOKEN) then guards every route."""

from __future__ import annotations

import ipaddress
import os

from .engine import Engine  # torch loads when an Engine is made, not here

TOKEN_ENV = "LATENTDIFF_TOKEN"


class MissingExtra(ImportError):
    exit_code = 2  # `latentdiff serve` prints the message alone, as for bad input


def _require_extra() -> None:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(f"latentdiff serve needs {' and '.join(missing)}: pip install 'latentdiff[serve]' "
                           "(or pip install fastapi uvicorn)")


def create_app(engine, queue_size: int = 16, token: str | None = None, max_body_bytes: int = 32 * 2**20):
    _require_extra()
    from .api import create_app as _create_app

    return _create_app(engine, queue_size, token, max_body_bytes)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse to listen beyond this machine unless asked to."""
    if not is_loopback(host) and not allow_remote:
        raise ValueError(f"--host {host} would let other machines reach the server; pass --allow-remote as well "
                         f"(and --token, or set {TOKEN_ENV}, so that only people with the token can use it)")


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = 7860, allow_remote: bool = False,
          token: str | None = None, queue_size: int = 16, max_upload_mb: float = 32) -> None:
    """Load the model, compile it for its native size, and serve until interrupted."""
    token = token or os.environ.get(TOKEN_ENV) or None
    check_host(host, allow_remote)
    _require_extra()
    import uvicorn

    engine = Engine(model)
    print(f"latentdiff serve: loaded {engine.title}; warming up at {engine.native_width}×{engine.native_height}")
    engine.warm_up()
    app = create_app(engine, queue_size, token, int(max_upload_mb * 2**20))
    if not is_loopback(host) and token is None:
        print(f"latentdiff serve: WARNING: listening on {host} without a token: anyone who can reach this port can "
              f"use it (--token or {TOKEN_ENV})")
    print(f"latentdiff serve: open http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/ "
          f"(A1111 API under /sdapi/v1)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
