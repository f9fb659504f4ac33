"""The demo's client half (scripts/demo.sh starts the server): wait until the server is ready, then
stream two chats over gRPC with the project's client SDK and print them as they arrive.

    python scripts/demo_chat.py --url 127.0.0.1:8001 [--server-pid PID] [--max-tokens 48]
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time

from internvl_client import Client


def demo_image() -> bytes:
    """A 448x448 PNG drawn here: a red disc and a yellow square on blue."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (448, 448), (30, 60, 160))
    draw = ImageDraw.Draw(image)
    draw.ellipse((60, 60, 240, 240), fill=(220, 30, 30))
    draw.rectangle((260, 250, 400, 390), fill=(240, 210, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def wait_ready(client: Client, server_pid: int | None, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not client.is_ready():
        if server_pid is not None:
            try:
                os.kill(server_pid, 0)
            except ProcessLookupError:
                sys.exit("demo: the server exited before it was ready (its log is printed above)")
        if time.monotonic() > deadline:
            sys.exit(f"demo: the server was not ready after {timeout_s:.0f}s")
        time.sleep(0.5)  # polling a remote readiness endpoint; nothing to wait on locally


def show(client: Client, title: str, question: str, **kwargs) -> None:
    print(f"\n=== {title}\nUser: {question}\nAssistant: ", end="", flush=True)
    stream = client.stream(question, **kwargs)
    with stream:
        for delta in stream:
            print(delta, end="", flush=True)
    r = stream.response
    print(f"\n[finish_reason={r.finish_reason}, prompt tokens={r.num_input_tokens}, "
          f"new tokens={r.num_output_tokens}]")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="127.0.0.1:8001")
    p.add_argument("--server-pid", type=int, default=None, help="stop waiting if this process dies")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--ready-timeout", type=float, default=900.0)
    args = p.parse_args()
    generation = dict(max_new_tokens=args.max_tokens, do_sample=False)
    with Client(args.url, timeout=600) as client:
        wait_ready(client, args.server_pid, args.ready_timeout)
        print(f"demo: server ready at {args.url} (with checkpoints/tiny the weights are random: "
              f"the answers are gibberish, but they are the reference implementation's gibberish)")
        show(client, "a text question", "Hello, who are you?", generation_config=generation)
        show(client, "a question about an image", "<image>\nPlease describe the image shortly.",
             images=[demo_image()], generation_config=generation)
    return 0


if __name__ == "__main__":
    sys.exit(main())
