"""Content keys of large host buffers for the caches: a tile's pixel values (the vision model's embedding
cache, serving/vision.py) and an image's embedding rows (the llm's KV prefix cache, engine/engine.py).

A key is SHA-256 over a header (what the bytes are: dtype, shape) and the SHA-256 digests of the buffer's
1 MiB chunks, which a few threads hash at once (hashlib releases the GIL). Each service hashes on its
request path, one request after another (the llm's execute thread, a vision instance), so the time of one
hash is added to every request behind it: one V1-1 image's float32 rows (5 MB) took 4.3 ms in one thread
and 3.0 ms in this form on a 2-core machine. Every key has the same form, whatever the size, so two
different buffers get the same key only through a SHA-256 collision: the cache entries of one client
cannot be reached with other content by another.

Owns: the key's form and its thread pool. Does not own: what is keyed or where keys are kept.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

CHUNK_BYTES = 1 << 20
_FORM = b"internvl-content-key/1\0"
# its threads start on first use: a process that never hashes a multi-chunk buffer has none
_pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="content-key")


def _chunk_digest(chunk: memoryview) -> bytes:
    return hashlib.sha256(chunk).digest()


def content_key(header: str, data) -> bytes:
    """The 32-byte key of `data` (a C-contiguous buffer: a numpy array, bytes) described by `header`."""
    view = memoryview(data).cast("B")
    size = len(view)
    chunks = [view[i:i + CHUNK_BYTES] for i in range(0, size, CHUNK_BYTES)]
    digests = _pool.map(_chunk_digest, chunks) if len(chunks) > 1 else map(_chunk_digest, chunks)
    head = header.encode()
    outer = hashlib.sha256(_FORM + len(head).to_bytes(8, "little") + head + size.to_bytes(8, "little"))
    for digest in digests:
        outer.update(digest)
    return outer.digest()
