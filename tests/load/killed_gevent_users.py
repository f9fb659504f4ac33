"""Run by test_locust.py: gevent users (as Locust runs them) whose requests fail at once are killed at
random moments, ROUNDS times, and their Clients closed, the way Locust stops its users at the run-time
limit. Prints how many tritonclient clients the garbage collector would still close (none may be left:
one closed by the collector at the interpreter's exit can make gRPC's gevent support wait forever), then
exits: a hang here is what the test guards against."""

import gc
import random
import sys

from gevent import monkey

monkey.patch_all()

import gevent  # noqa: E402
import grpc.experimental.gevent as grpc_gevent  # noqa: E402

grpc_gevent.init_gevent()

import tritonclient.grpc as grpcclient  # noqa: E402

from internvl_client import Client, InternVLError  # noqa: E402

ROUNDS, USERS = 12, 2
BROKEN_IMAGE = b"this is not an image"


def user(client: Client, failures: list[int]) -> None:
    while True:
        try:
            client.chat("Describe the image.", images=[BROKEN_IMAGE], generation_config=dict(max_new_tokens=4))
        except InternVLError:
            failures[0] += 1
        gevent.sleep(0.01)


def closed_when_collected(obj: object) -> bool:
    """tritonclient's `__del__` closes its client (again, unless the SDK's transport was closed already)."""
    return isinstance(obj, grpcclient.InferenceServerClient) and not getattr(obj, "_closed", False)


def main(url: str) -> None:
    rng = random.Random(0)
    failures = [0]
    for _ in range(ROUNDS):
        clients = [Client(url, retries=0) for _ in range(USERS)]
        users = [gevent.spawn(user, client, failures) for client in clients]
        gevent.sleep(0.2 + 0.3 * rng.random())
        for greenlet in users:
            greenlet.kill(block=True)  # Locust's stop: GreenletExit wherever the user waits
        for client in clients:
            client.close()  # Locust's on_stop
    # including clients that are only garbage in reference cycles by now (a request's traceback)
    left = sum(closed_when_collected(obj) for obj in gc.get_objects())
    print(f"requests failed: {failures[0]}; clients left to the garbage collector: {left}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
