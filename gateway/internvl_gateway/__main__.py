"""CLI: python -m internvl_gateway --triton 127.0.0.1:8001 --port 9000"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import DEFAULT_MODEL_NAME, GatewayConfig

API_KEY_ENV = "INTERNVL_GATEWAY_API_KEY"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m internvl_gateway",
                                description="OpenAI-compatible HTTP gateway in front of the internvl_chat Triton ensemble")
    p.add_argument("--triton", default="127.0.0.1:8001", help="Triton's gRPC address (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help="the model id clients use (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request before a 504")
    p.add_argument("--retries", type=int, default=2, help="reconnects while Triton is unreachable, before a 503")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image_url parts (default: only data: URLs); trusted clients only")
    p.add_argument("--remote-image-host", action="append", default=[], metavar="HOST",
                   help="with --allow-remote-images: fetch only from this host (repeatable)")
    p.add_argument("--system-messages", choices=("reject", "ignore"), default="reject",
                   help="what to do with system/developer messages (the template has no system turn)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                   help=f"require 'Authorization: Bearer <key>' on every route but /health (default: ${API_KEY_ENV}; "
                        "unset: no key). Prefer the variable: a flag shows in the process list")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import uvicorn

    from .app import create_app

    config = GatewayConfig(triton=args.triton, model_name=args.model_name, timeout_s=args.timeout,
                           retries=args.retries, allow_remote_images=args.allow_remote_images,
                           remote_image_hosts=tuple(args.remote_image_host), system_messages=args.system_messages,
                           api_key=args.api_key)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    print(f"internvl-gateway: http://{args.host}:{args.port}/v1 -> Triton gRPC {args.triton} "
          f"(model {args.model_name!r}; API key {'required' if args.api_key else 'off'})", file=sys.stderr, flush=True)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
