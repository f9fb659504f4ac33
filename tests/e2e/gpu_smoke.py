"""GPU smoke check (run by hand on the lent GPU, against a server already started on 127.0.0.1:8001/8000):
16 concurrent image chats stream to the end without errors; how many equal the bf16 reference is printed
(bf16 on different kernels may legitimately differ). Usage: PYTHONPATH=tests/e2e python tests/e2e/gpu_smoke.py"""
import threading
import time

import torch

from e2e_client import make_inputs, sse_chat, stream_chat
from test_ensemble import image_bytes


class Remote:  # the part of TritonServer the helpers use
    grpc_url, http_url = "127.0.0.1:8001", "http://127.0.0.1:8000"

    def is_running(self):
        return True

    def log_tail(self, n=40):
        return ""


def main():
    from internvl_serve import reference
    from internvl_serve.checkpoint import load_model
    from internvl_serve.tokenizer import load_tokenizer

    server, q = Remote(), "<image>\nDescribe the image."
    images = [image_bytes(100 + i) for i in range(16)]
    out = [None] * 16

    def one(i):
        out[i] = stream_chat(server, make_inputs(text_input=q, images=[images[i]], max_tokens=12, stream=True))

    start = time.time()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    print(f"16 streams in {time.time() - start:.2f}s")
    model = load_model("/tmp/tiny", dtype=torch.bfloat16, device="cuda", parts=("vision", "language"), progress=False)
    tok = load_tokenizer("/tmp/tiny")
    same = 0
    for i, answer in enumerate(out):
        assert answer.error is None and answer.finals == 1, answer
        ref = reference.chat(model, tok, reference.load_image(images[i]).cuda(), q, dict(max_new_tokens=12, do_sample=False))
        same += answer.text == ref
    print("answers equal to the bf16 reference:", same, "/ 16")
    print("sse status", sse_chat(server, {"text_input": "Hello", "max_tokens": 4})[0])


if __name__ == "__main__":
    main()
