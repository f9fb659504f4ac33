"""Triton-free, token-only generation engine with in-flight batching over a paged KV cache.

    sampling.py       SamplingParams (+ validate -> InvalidRequest)
    request.py        Request, RequestOutput, FinishReason
    errors.py         InvalidRequest, EngineError
    sequence.py       Sequence: per-request engine state (pure Python)
    block_manager.py  BlockAllocator: KV blocks, reference counts, prefix cache (pure Python)
    scheduler.py      Scheduler, SchedulerConfig, ScheduledBatch (pure Python)
    attention.py      paged attention: per-step metadata, KV write, the varlen kernel (CUDA) or reference SDPA
    llama.py          our LLaMA forward over the paged KV cache (same weights as HF)
    runner.py         ModelRunner: weights + KV tensors; runs one scheduled batch
    kv_cache.py       the KV cache's layout and size (blocks that fit after a profile forward)
    host_copy.py      to_device: a step's host inputs to the device through pinned memory (no wait)
    sampler.py        greedy / temperature / top-k / top-p / repetition penalty
    detokenizer.py    IncrementalDetokenizer: text deltas from the cumulative decode (the one strip)
    stopping.py       the end of an answer: StopChecker (stop tokens, length; the engine) and AnswerText
                      (text deltas, stop strings, the final flush; whoever detokenizes)
    engine.py         LLMEngine (add_request / abort / step), EngineThread
    fake_runner.py    FakeRunner: a torch-free stand-in model for scheduler and adapter tests

Imports of torch-heavy modules are lazy, so `from internvl_serve.engine import SamplingParams` stays light.
"""
from internvl_serve.engine.errors import EngineBusy, EngineError, InvalidRequest
from internvl_serve.engine.sampling import SamplingParams

_LAZY = {
    "Request": "request", "RequestOutput": "request", "FinishReason": "request",
    "BlockAllocator": "block_manager", "Sequence": "sequence", "SequenceStatus": "sequence",
    "Scheduler": "scheduler", "SchedulerConfig": "scheduler", "ScheduledBatch": "scheduler",
    "ScheduledSeq": "scheduler", "ModelRunner": "runner", "IncrementalDetokenizer": "detokenizer",
    "StopChecker": "stopping", "AnswerText": "stopping",
    "LLMEngine": "engine", "EngineThread": "engine", "FakeRunner": "fake_runner",
    "Llama": "llama", "LlamaArgs": "llama", "load_llama": "llama",
}

__all__ = ["EngineBusy", "EngineError", "InvalidRequest", "SamplingParams", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"internvl_serve.engine.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'internvl_serve.engine' has no attribute {name!r}")
