"""internvl_serve/content_key.py: the key's form (one form for every size), and that a multi-chunk buffer's
chunks are hashed on the pool's threads."""
import hashlib
import threading

import numpy as np
import pytest

from internvl_serve import content_key as ck


def expected_key(header: str, data: bytes) -> bytes:
    """The form written out: SHA-256(form, header length, header, size, chunk digests...)."""
    head = header.encode()
    outer = hashlib.sha256(b"internvl-content-key/1\0" + len(head).to_bytes(8, "little") + head
                           + len(data).to_bytes(8, "little"))
    for i in range(0, len(data), ck.CHUNK_BYTES):
        outer.update(hashlib.sha256(data[i:i + ck.CHUNK_BYTES]).digest())
    return outer.digest()


@pytest.mark.parametrize("size", [0, 1, ck.CHUNK_BYTES - 1, ck.CHUNK_BYTES, ck.CHUNK_BYTES + 1,
                                  256 * 5120 * 4])  # the last: one V1-1 image's float32 rows
def test_key_has_one_form_at_every_size(size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    assert ck.content_key("h", data) == expected_key("h", data)
    assert ck.content_key("h", data) != hashlib.sha256(data).digest()  # never the plain hash of the bytes


def test_key_depends_on_every_chunk_and_the_header():
    data = np.zeros(3 * ck.CHUNK_BYTES + 5, np.uint8)
    keys = {ck.content_key("h", data)}
    for at in (0, ck.CHUNK_BYTES, 2 * ck.CHUNK_BYTES + 7, data.size - 1):  # one bit in each chunk
        changed = data.copy()
        changed[at] ^= 1
        keys.add(ck.content_key("h", changed))
    keys.add(ck.content_key("h2", data))                                  # same bytes, other description
    keys.add(ck.content_key("h", data[:-1]))                              # one byte shorter
    assert len(keys) == 7


def test_chunks_of_a_large_buffer_are_hashed_on_the_pool(monkeypatch):
    seen = []

    def recording_digest(chunk):
        seen.append(threading.current_thread().name)
        return hashlib.sha256(chunk).digest()

    monkeypatch.setattr(ck, "_chunk_digest", recording_digest)
    data = bytes(5 * ck.CHUNK_BYTES)
    assert ck.content_key("h", data) == expected_key("h", data)
    assert len(seen) == 5 and all(name.startswith("content-key") for name in seen)
    seen.clear()
    ck.content_key("h", bytes(ck.CHUNK_BYTES))                            # one chunk: hashed in the caller
    assert seen == [threading.current_thread().name]


def test_a_non_contiguous_buffer_is_refused():
    with pytest.raises((TypeError, ValueError)):
        ck.content_key("h", np.zeros((4, 4), np.float32)[:, ::2])


def test_image_rows_keys_take_any_row_count_and_tell_shapes_and_values_apart():
    """The engine's key of image rows (engine.image_content_key): 0 rows included (a direct client may send
    them), and rows of other shape, dtype or values get other keys."""
    import torch

    from internvl_serve.engine.engine import image_content_key

    rows = torch.arange(24, dtype=torch.float32).reshape(3, 8)
    keys = {image_content_key(x) for x in (torch.zeros(0, 8), torch.zeros(0, 4), rows, rows.clone().reshape(4, 6),
                                           rows.to(torch.bfloat16), rows + 1)}
    assert len(keys) == 6
    assert image_content_key(rows) == image_content_key(rows.clone())
