"""Replays the vision model's host-buffer pattern in one process and prints its RSS: does the heap fragment?

    python bench/malloc_replay.py                                  # glibc's default malloc settings
    MALLOC_MMAP_THRESHOLD_=1048576 python bench/malloc_replay.py   # the threshold serving/heap.py fixes in the stubs

Threads (like Triton's requests in one stub) each, per request: a float32 pixel batch of 1-8 tiles
(3x448x448, 2.4 MiB a tile), a float32 embedding output (256x5120, 5 MiB a tile), and for every tile not in
the LRU cache a bf16 embedding (2.5 MiB) stored there, the least recently used evicted past 409 entries
(the vision model's default 1 GiB cache). No model runs: only the allocations. CPU only, ~1 min.
"""
from __future__ import annotations

import argparse
import random
import threading
from collections import OrderedDict

import numpy as np
import torch


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def requests(seed: int, count: int, cache: OrderedDict, lock: threading.Lock, images: int, entries: int) -> None:
    rng = random.Random(seed)
    for _ in range(count):
        n = rng.choice([1, 1, 2, 2, 8])
        pixels = np.empty((n, 3, 448, 448), np.float32)
        pixels[:, 0, 0, 0] = 1  # touch: a page of each buffer is really there
        out = torch.empty((n, 256, 5120), dtype=torch.float32)
        out[:, 0, 0] = 1
        for _ in range(n):
            key = rng.randrange(images)
            with lock:
                hit = cache.get(key)
                if hit is not None:
                    cache.move_to_end(key)
            if hit is None:
                embedding = torch.empty((256, 5120), dtype=torch.bfloat16)
                embedding[0, 0] = 1
                with lock:
                    cache[key] = embedding.clone()
                    while len(cache) > entries:
                        cache.popitem(last=False)
        reply = out.numpy().copy()  # the response tensor handed to Triton
        del pixels, out, reply


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400, help="per thread and round")
    parser.add_argument("--images", type=int, default=1000, help="distinct images the requests draw from")
    parser.add_argument("--entries", type=int, default=409, help="cache entries (1 GiB of 2.5 MiB embeddings)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache: OrderedDict = OrderedDict()
    lock = threading.Lock()
    for r in range(args.rounds):
        threads = [threading.Thread(target=requests, args=(r * 100 + k, args.requests, cache, lock, args.images,
                                                           args.entries)) for k in range(args.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(f"round {r}: {(r + 1) * args.threads * args.requests} requests, RSS {rss_mib():.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
