"""`internvl-chat`: chat with the served model from a terminal.

Interactive (default): streamed answers, commands /reset, /save FILE, /help, /quit; Ctrl-C during an
answer cancels its request, Ctrl-C or Ctrl-D at the prompt quits.
One-shot: `internvl-chat -q "question" --image x.png` prints the answer and exits (`-q -` reads the
question from stdin).

Exit status: 0 done, 1 server error, 2 bad usage or invalid request, 3 server unavailable or timed
out, 130 interrupted.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any, TextIO

from . import __version__
from .client import DEFAULT_TIMEOUT, DEFAULT_URL, Client
from .errors import InternVLError, InvalidInputError, RequestTimeoutError, ServerUnavailableError
from .generation import DECLARED
from .session import ChatSession

HELP_TEXT = "commands: /reset (forget the conversation), /save FILE, /help, /quit"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="internvl-chat",
        description="Chat with InternVL-Chat-V1-1 served by Triton (gRPC, streamed).",
        epilog=HELP_TEXT,
    )
    p.add_argument("--url", default=DEFAULT_URL, help=f"Triton gRPC address (default {DEFAULT_URL})")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="per-request deadline in seconds")
    p.add_argument("--model", default="internvl_chat", help="ensemble name (default internvl_chat)")
    p.add_argument("-q", "--question", help="one-shot: ask this, print the answer, exit ('-' reads stdin)")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an image (repeatable)")
    p.add_argument("--separate-images", action="store_true", help="one <image> per image (Image-1:, Image-2:, ...)")
    p.add_argument("--video", metavar="PATH", help="a video file; the server samples --num-segments frames")
    p.add_argument("--num-segments", type=int, default=8, help="frames sampled from the video (default 8)")
    g = p.add_argument_group("generation (the model card's generation_config)")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, help="sampling temperature; > 0 implies --do-sample, 0 is greedy")
    g.add_argument("--top-p", type=float, help="nucleus sampling, in (0, 1] (with sampling)")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens, 0 is off (with sampling)")
    g.add_argument("--stop", action="append", metavar="TEXT", help="extra stop string (repeatable)")
    for key, spec in DECLARED.items():  # the other card words, one flag each (generated declaration)
        if key not in OWN_FLAGS:
            _declared_flag(g, key, spec)
    p.add_argument("--load", metavar="FILE", help="continue a session saved with /save or --save")
    p.add_argument("--save", metavar="FILE", help="save the session after the one-shot answer")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


# Card words whose flags have rules of their own (sampling implies --do-sample; --stop repeats).
OWN_FLAGS = ("temperature", "top_p", "top_k", "stop")
_FLAG_TYPES = {"INT32": int, "UINT64": int, "FP32": float}


def _declared_flag(group: argparse._ArgumentGroup, key: str, spec: dict) -> None:
    """--<card word> for a declared generation input: its type, meaning and server default."""
    flag = "--" + key.replace("_", "-")
    if spec["datatype"] == "BOOL":
        group.add_argument(flag, action="store_true", default=None, help=spec["doc"])
    else:
        group.add_argument(flag, type=_FLAG_TYPES[spec["datatype"]],
                           help=f"{spec['doc']} (server default {spec['default']})")


def generation_config_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    cfg: dict[str, Any] = {key: getattr(args, key) for key in DECLARED
                           if key not in OWN_FLAGS and getattr(args, key) is not None}
    do_sample = args.do_sample
    if args.temperature is not None:
        if args.temperature > 0:
            do_sample = True
            cfg["temperature"] = args.temperature
        elif do_sample:
            raise ValueError("--temperature 0 is greedy decoding; it contradicts --do-sample")
    if do_sample:
        cfg["do_sample"] = True
        for key in ("top_p", "top_k"):
            if getattr(args, key) is not None:
                cfg[key] = getattr(args, key)
    elif args.top_p is not None or args.top_k is not None:
        raise ValueError("--top-p / --top-k need sampling: add --do-sample or a --temperature > 0")
    else:
        cfg["do_sample"] = False
    if args.stop:
        cfg["stop"] = list(args.stop)
    return cfg


def _error_exit(exc: BaseException, err: TextIO) -> int:
    print(f"internvl-chat: error: {exc}", file=err, flush=True)
    if isinstance(exc, (ServerUnavailableError, RequestTimeoutError)):
        return 3
    if isinstance(exc, (InvalidInputError, ValueError, TypeError, FileNotFoundError)):
        return 2
    return 1


def stream_answer(session: ChatSession, question: str, out: TextIO) -> None:
    for delta in session.ask_stream(question):
        out.write(delta)
        out.flush()
    out.write("\n")
    out.flush()


def run_one_shot(session: ChatSession, question: str, out: TextIO) -> None:
    stream_answer(session, question, out)


def run_interactive(session: ChatSession, out: TextIO, err: TextIO, url: str) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:  # pragma: no cover - not on every platform
        pass
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C cancels the answer also when the CLI was started with SIGINT ignored (from a
        # background job of a non-interactive shell, or a CI runner that starts its jobs that way)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    media = f"{len(session.images)} image(s)" if session.images else ("a video" if session.video else "no image")
    print(f"internvl-chat: {url}, {media}. {HELP_TEXT}", file=err, flush=True)
    while True:
        try:
            line = input("User: ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, arg = text.partition(" ")
            if command in ("/quit", "/exit"):
                return 0
            if command == "/reset":
                session.reset()
                print("[conversation reset]", file=err, flush=True)
            elif command == "/save":
                if not arg.strip():
                    print("usage: /save FILE", file=err, flush=True)
                    continue
                try:
                    session.save(arg.strip())
                    print(f"[saved to {arg.strip()}]", file=err, flush=True)
                except OSError as exc:
                    print(f"[could not save: {exc}]", file=err, flush=True)
            elif command == "/help":
                print(HELP_TEXT, file=err, flush=True)
            else:
                print(f"unknown command {command}; {HELP_TEXT}", file=err, flush=True)
            continue
        out.write("Assistant: ")
        out.flush()
        try:
            stream_answer(session, text, out)
        except KeyboardInterrupt:
            out.write("\n")
            print("[cancelled]", file=err, flush=True)
        except InternVLError as exc:
            out.write("\n")
            print(f"[error: {exc}]", file=err, flush=True)


def main(argv: list[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        generation_config = generation_config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    client = Client(args.url, timeout=args.timeout, model_name=args.model)
    try:
        if args.load:
            session = ChatSession.load(args.load, client)
            if args.image or args.video:
                parser.error("--load restores the session's media: do not combine it with --image/--video")
            session.generation_config = generation_config or session.generation_config
        else:
            session = ChatSession(
                client,
                images=args.image or None,
                video=args.video,
                num_segments=args.num_segments,
                separate_images=args.separate_images,
                generation_config=generation_config,
            )
        if args.question is None:
            return run_interactive(session, out, err, args.url)
        question = sys.stdin.read() if args.question == "-" else args.question
        if not question.strip():
            parser.error("the question is empty")
        run_one_shot(session, question.strip("\n") if args.question == "-" else question, out)
        if args.save:
            session.save(args.save)
        return 0
    except KeyboardInterrupt:
        out.write("\n")
        return 130
    except (InternVLError, ValueError, TypeError, OSError) as exc:
        return _error_exit(exc, err)
    finally:
        client.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
