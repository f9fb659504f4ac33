"""Locust load test of the `internvl_chat` ensemble over gRPC streaming (docs/loadtest.md).

    locust -f loadtest/locustfile.py --headless -u 8 -r 2 -t 2m --host grpc://127.0.0.1:8001 \\
        --csv results/run --html results/run.html --max-new-tokens 128

Each simulated user holds one `internvl_client.Client` and runs chats picked by weight
(--weight-text, --weight-image, --weight-images-combined, --weight-images-separate, --weight-video,
--weight-multi-round; the other workload options are in workload.py). Every streamed request is
reported to Locust under four request types, the request name being the chat kind:

    STREAM  the whole request (ms); a failure here when the request failed or its answer is malformed;
            "content size" = output tokens, so output tokens/s of the run = req/s x average size
    TTFT    time to the first text (ms)
    ITL     the request's mean inter-token latency (ms), one value per request
    TOK/S   the request's output tokens per second (the "response time" columns hold tokens/s)

Locust runs users as gevent greenlets over monkey-patched sockets and threads. gRPC's C core knows
nothing of that, so a blocking gRPC read would stall every user (a streaming read deadlocks outright):
`init_gevent()` below makes gRPC cooperate with gevent, and must run before any channel exists.
"""

from __future__ import annotations

import logging
import random

from locust import User, events, task  # imported first: Locust monkey-patches the standard library

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

from internvl_client import Client  # noqa: E402  (after init_gevent: no channel may exist before it)

from workload import (  # noqa: E402  (Locust puts this file's folder on sys.path)
    InFlight,
    Media,
    RequestResult,
    Workload,
    add_workload_arguments,
    load_media,
    parse_url,
    weights_from_options,
)

STREAM, TTFT, ITL, TOKENS_PER_S = "STREAM", "TTFT", "ITL", "TOK/S"
DEFAULT_HOST = "127.0.0.1:8001"

log = logging.getLogger("loadtest")
in_flight = InFlight()
_media: dict[tuple, Media] = {}


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    # on the parser itself, not a group: Locust's web UI lists only what its own add_argument saw
    add_workload_arguments(parser)
    parser.add_argument("--think-time", type=float, default=0.0, help="seconds a user waits between chats")


@events.init.add_listener
def _check_options(environment, **_kwargs) -> None:
    """Refuse a bad mix, bad options or unreadable media before any user starts (options edited in
    the web UI are checked when the users start: Locust logs the error of their on_start)."""
    options = environment.parsed_options
    if options is None:
        return
    try:
        Workload(options, media_for(options))  # checks the mix, the generation options and the media
        parse_url(options.host or DEFAULT_HOST)
    except (ValueError, OSError) as e:
        log.error("%s", e)
        raise SystemExit(2)
    log.info("mix %s", ", ".join(f"{k}={w:g}" for k, w in weights_from_options(options).items()))


@events.test_stop.add_listener
def _log_concurrency(environment, **_kwargs) -> None:
    users = getattr(environment.parsed_options, "num_users", None)
    log.info("peak concurrent streams: %d (users: %s)", in_flight.peak, users)


def media_for(options) -> Media:
    """The run's media, made (or read) once per set of media options and shared by every user."""
    key = (options.image_dir, options.num_images, options.image_size, options.video, options.video_frames)
    if key not in _media:
        _media[key] = load_media(options)
    return _media[key]


def report(environment, result: RequestResult) -> None:
    """Fire Locust's request event for each of the request's metrics (failures only on STREAM)."""
    fire = environment.events.request.fire
    fire(request_type=STREAM, name=result.kind, response_time=result.total_s * 1000.0,
         response_length=result.output_tokens, exception=result.error, context={})
    if result.error is not None:
        return
    fire(request_type=TTFT, name=result.kind, response_time=result.ttft_s * 1000.0, response_length=0,
         exception=None, context={})
    if result.itl_s is not None:
        fire(request_type=ITL, name=result.kind, response_time=result.itl_s * 1000.0, response_length=0,
             exception=None, context={})
    fire(request_type=TOKENS_PER_S, name=result.kind, response_time=result.tokens_per_s,
         response_length=result.output_tokens, exception=None, context={})


class ChatUser(User):
    """One client streaming chats back to back (plus --think-time seconds between them)."""

    host = DEFAULT_HOST

    def wait_time(self) -> float:
        return self.environment.parsed_options.think_time

    def on_start(self) -> None:
        options = self.environment.parsed_options
        url, ssl = parse_url(self.host or DEFAULT_HOST)
        # retries=0: a request that cannot connect is a failure to see, not to hide
        self.client = Client(url, timeout=options.request_timeout, retries=0, ssl=ssl)
        self.workload = Workload(options, media_for(options), rng=random.Random(), in_flight=in_flight)

    def on_stop(self) -> None:
        self.client.close()

    @task
    def chat(self) -> None:
        kind = self.workload.pick()
        for result in self.workload.run(self.client, kind):
            report(self.environment, result)
