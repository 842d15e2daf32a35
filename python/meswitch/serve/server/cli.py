"""Command line: ``meswitch serve``, the OpenAI-compatible server.

With no arguments it serves the bundled tiny family (compressed once into a cache,
``bundled.py``) with the bundled router; ``--base DIR --experts A.meswitch B.meswitch ...``
serves your own. It prints its progress and the URL, then serves until interrupted
(Ctrl-C or SIGTERM stop it cleanly: requests in flight get a few seconds to finish).

The server runs its engine on the CPU: experts live on disk and in host memory. The
multi-expert model has a CUDA device tier, but the engine is not verified on a CUDA device,
so ``--device-budget`` takes only 0; any other value is refused with a one-line error that
says why (no CUDA build or device, or the engine's CPU-only state).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from meswitch.arguments import UsageError, existing_dir, int_in, parse_size, positive_int, size
from meswitch.serve.engine.base_weights import DTYPE_NAMES

DESCRIPTION = """\
Serve the experts over an OpenAI-compatible HTTP API: /v1/chat/completions,
/v1/completions (both with streaming), /v1/models, /v1/experts (add or remove experts
while serving), /health and /metrics (Prometheus). Model names: each expert's, 'base'
(the base model alone) and 'auto' (the router picks the expert).

With no arguments it serves the bundled tiny family with the bundled router; its
experts are compressed once (2-bit) into the cache directory and reused later.
The server runs on the CPU: only --device-budget 0 is accepted.
"""


def _device_budget(text: str) -> int:
    """An argparse type: 0, or a size (refused later: there is no device tier)."""
    if text.strip() == "0":
        return 0
    return size(text)


def _port(text: str) -> int:
    return int_in(0, 65535)(text)


def _check_device_budget(budget: int) -> None:
    """Refuse a device budget: the model has a CUDA device tier, but the server runs the engine on the CPU."""
    if not budget:
        return
    from meswitch import cuda

    if not cuda.is_available():
        raise UsageError(f"--device-budget: the device tier needs a CUDA build and a CUDA device "
                         f"({cuda.unavailable_reason()}); give --device-budget 0, or leave it out, to serve "
                         "from host memory")
    raise UsageError("--device-budget: meswitch serve runs its engine on the CPU only in this version (the "
                     "engine is not verified on a CUDA device); give --device-budget 0, or leave it out")


def _run_serve(args: argparse.Namespace) -> int:
    from meswitch.serve.server.launch import bind, open_service, serve_until_stopped, url_of, uvicorn_server

    _check_device_budget(args.device_budget)
    if args.experts and args.base is None:
        raise UsageError("--experts needs --base (the base model they were compressed against)")
    sock = bind(args.host, args.port)  # a port in use fails here, before anything loads
    try:
        if args.base is None:
            from meswitch.serve.server.bundled import bundled_artifacts, cache_root

            cache = args.cache_dir or cache_root()
            print(f"serving the bundled tiny family (cache {cache})", flush=True)
            base, artifacts = bundled_artifacts(cache, report=_say)
        else:
            base, artifacts = args.base, args.experts or []
        service = open_service(base, artifacts, router=args.router, host_budget=args.host_budget,
                               kv_cache_bytes=args.kv_cache, max_running=args.max_running,
                               max_batch_tokens=args.max_batch_tokens, api_key=args.api_key, dtype=args.dtype,
                               report=_say)
        try:
            url = url_of(sock)
            models = [*service.experts, *(["auto"] if service.router is not None else []), "base"]
            _say(f"serving {', '.join(models)} at {url}/v1 "
                 f"(host budget {service.store.host_budget / 2**20:.0f} MiB"
                 f"{', API key required' if args.api_key else ''}); Ctrl-C stops")
            server = uvicorn_server(service.app, log_level=args.log_level, access_log=args.access_log)
            serve_until_stopped(server, sock)
        finally:
            service.close()
    finally:
        sock.close()
    _say("stopped")
    return 0


def _say(line: str) -> None:
    print(line, flush=True)


def register_cli(commands: Any) -> None:
    """Add ``serve`` to the ``meswitch`` subcommands."""
    serve = commands.add_parser(
        "serve", help="OpenAI-compatible server for the experts (default: the bundled family)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--base", type=existing_dir, help="base model directory (default: the bundled family)")
    serve.add_argument("--experts", nargs="+", type=existing_dir, metavar="NAME.meswitch",
                       help="expert artifacts to serve (with --base)")
    serve.add_argument("--router", type=existing_dir,
                       help="router directory for model 'auto' (default: the bundled router, when the "
                            "served experts include all it routes to)")
    serve.add_argument("--host", default=os.environ.get("MESWITCH_HOST", "127.0.0.1"),
                       help="address to listen on (default $MESWITCH_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=os.environ.get("MESWITCH_PORT", "8000"),
                       help="port, 0 = any free one (default $MESWITCH_PORT or 8000)")
    serve.add_argument("--host-budget", type=size, default=parse_size("8GB"), metavar="SIZE",
                       help="host memory for resident experts: bytes, or 512MB, 8GB, 1GiB ... (default 8GB)")
    serve.add_argument("--device-budget", type=_device_budget, default=0, metavar="SIZE",
                       help="GPU memory for experts' deltas: the server runs on the CPU, so only 0 is "
                            "accepted (a CUDA build and device are needed, and the engine is CPU-only)")
    serve.add_argument("--kv-cache", type=size, default=256 << 20, metavar="SIZE",
                       help="KV cache budget, keys and values in --dtype (default 256MiB)")
    serve.add_argument("--dtype", choices=("auto", *DTYPE_NAMES), default="auto",
                       help="dtype of the base's matrices and the KV cache; activations, norms and attention "
                            "scores are float32 whatever it is (default auto: the base checkpoint's own)")
    serve.add_argument("--max-running", type=positive_int, default=32,
                       help="sequences per forward at most (default 32)")
    serve.add_argument("--max-batch-tokens", type=positive_int, default=2048,
                       help="new tokens per forward at most (default 2048)")
    serve.add_argument("--api-key", default=os.environ.get("MESWITCH_API_KEY") or None,
                       help="require 'Authorization: Bearer KEY' on /v1 (default $MESWITCH_API_KEY; none)")
    serve.add_argument("--cache-dir", type=Path, default=None,
                       help="where the bundled family is compressed to (default $MESWITCH_CACHE_DIR, "
                            "$XDG_CACHE_HOME/meswitch or ~/.cache/meswitch)")
    serve.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                       help="uvicorn's log level (default warning)")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.set_defaults(func=_run_serve)


__all__ = ["register_cli"]
