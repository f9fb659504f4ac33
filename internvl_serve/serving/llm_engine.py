"""The llm engine as the `llm` model's parameters build it: `EngineOptions` (config.pbtxt's parameters,
checked), where the engine runs (engine_in_own_process, tensor_parallel_devices), and `build_engine`: the
checkpoint's language_model.* weights in a ModelRunner (beside the vision model's reserve on its GPU),
the LLMEngine, its EngineThread and its tensor-parallel workers; in the llm stub (serving/llm.LLMService)
or in the engine process (serving/engine_process.py). Also the load log's account of the KV cache's size.
Does not own: requests and responses (serving/llm.py), the engine itself (engine/).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from internvl_serve.engine.scheduler import SchedulerConfig
from internvl_serve.serving.device import set_host_threads
from internvl_serve.serving.encoder_activity import EncoderActivity, device_number


@dataclass(frozen=True)
class EngineOptions:
    """Engine knobs, from the llm model's config.pbtxt parameters (string values). None: the engine's
    default (num_blocks: sized from free GPU memory on CUDA, a fixed pool on CPU)."""

    block_size: int = 16
    num_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = SchedulerConfig.max_num_seqs
    max_num_batched_tokens: int = SchedulerConfig.max_num_batched_tokens  # (why 512: there)
    enable_prefix_caching: bool = True
    # tensor parallelism: the LLM split over this many ranks (processes), one device each; devices as
    # a comma list (empty: cuda:0..N-1 on CUDA, N CPU ranks on the CPU)
    tensor_parallel_size: int = 1
    tensor_parallel_devices: str = ""
    # requests running or queued in the engine at most; one more is refused at once (UNAVAILABLE,
    # "the server is busy") instead of waiting in an unbounded queue
    max_pending_requests: int = 1024
    # "int8": weight-only int8 projections of the LLM; "fp8": e4m3 weights and per-token activations
    # (FP8 tensor cores: H100) (engine/quantize.py); "": the model dtype
    quantization: str = ""
    # "fp8": the KV cache in e4m3 (half the bytes a decode step's attention reads, twice the tokens in the
    # same memory; values saturate at +-448, no scale: engine/kv_cache.py); "" or "auto": the model dtype
    kv_cache_dtype: str = ""
    # with quantization "fp8": its products on the FP8 tensor cores accumulate without periodic promotion
    # (Hopper's fast accumulation, as the vision encoder's fp8 does). Empty: on with quantization fp8.
    # H100: one layer's four projections -15 % of the matmul time at 32 rows, -25 % at 288, their error
    # against float64 the same (0.0375; bench/kernels_bench.py --only quantized); +2.5 % tok/s at 32
    # streams for the engine alone, +3.0 / +2.0 % through the server at 32 / 64 (2026-12-06)
    fp8_fast_accum: bool | None = None
    # with quantization "fp8": products of up to this many rows (decode batches) in the Triton W8A8 kernel
    # (kernels/fp8_linear.py scaled_product_triton) instead of torch._scaled_mm; 0: never; at most 64.
    # Empty: 64 with quantization fp8. H100 (2026-12-07): one layer's four projections 1.16-1.24x faster
    # than _scaled_mm at 2-64 rows (bench/kernels_bench.py --only w8a8); through the server +7.1 / +7.2 %
    # output tok/s at 32 streams and +3.0 / +3.4 % at 64 in two runs in opposite order
    # (bench/results/h100-2026-12-07b). Tiles tuned on the H100 only (int8_linear.scaled_config)
    fp8_triton_max_rows: int | None = None
    # overlap scheduling (engine.py): "true"/"false"; empty: on when the device is CUDA
    async_scheduling: bool | None = None
    # threads that detokenize and send responses (serving/response_path.py)
    response_senders: int = 4
    # the engine in a process of its own (serving/engine_process.py): its own interpreter lock, not the
    # stub's, which the response senders hold much of the time at many streams. Empty: on when the engine
    # is on one GPU (engine_in_own_process)
    engine_process: bool | None = None
    # encoder priority (engine.py EngineThread, serving/encoder_activity.py): while the vision model's
    # encoder runs on the engine's GPU, a step of decodes only waits for it, at most this many ms. 0: never
    # (the default: on an H100 it moved neither throughput nor TTFT beyond the run-to-run spread).
    encoder_priority_ms: float = 0.0
    # with encoder priority: the encoder counts as running for this many ms after each forward, so that a
    # queue of single-image forwards (vision max_batch_size 1) holds the decode through the gaps between
    # them (serving/encoder_activity.py). 0: only while a forward runs (the default; not yet measured)
    encoder_priority_linger_ms: float = 0.0
    # torch's CPU threads in the llm's processes: the stub, the engine process, tensor-parallel workers
    # (serving/device.py host_threads_for). Empty: one on a GPU, torch's default (one per core) on the CPU
    host_threads: int | None = None

    def __post_init__(self):
        from internvl_serve.engine.kv_cache import validate_kv_cache_dtype
        from internvl_serve.engine.quantize import validate_quantization

        object.__setattr__(self, "quantization", validate_quantization(self.quantization) or "")
        object.__setattr__(self, "kv_cache_dtype", validate_kv_cache_dtype(self.kv_cache_dtype))
        if self.fp8_fast_accum and self.quantization != "fp8":
            raise ValueError("parameter 'fp8_fast_accum': true needs quantization fp8 "
                             f"(quantization is {self.quantization!r})")
        if self.fp8_fast_accum is None:
            object.__setattr__(self, "fp8_fast_accum", self.quantization == "fp8")
        if self.fp8_triton_max_rows and self.quantization != "fp8":
            raise ValueError("parameter 'fp8_triton_max_rows' needs quantization fp8 "
                             f"(quantization is {self.quantization!r})")
        if self.fp8_triton_max_rows is None:
            from internvl_serve.kernels.int8_linear import TRITON_MAX_M
            object.__setattr__(self, "fp8_triton_max_rows", TRITON_MAX_M if self.quantization == "fp8" else 0)
        if self.max_num_batched_tokens < self.max_num_seqs:
            # the scheduler gives each running sequence's decode a token of the step's budget before it
            # admits another, so no more than max_num_batched_tokens ever run: a larger max_num_seqs would
            # be a silent cap
            raise ValueError(f"parameter 'max_num_batched_tokens' ({self.max_num_batched_tokens}) must be at least "
                             f"'max_num_seqs' ({self.max_num_seqs}): every running sequence's token fits in one step")

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> "EngineOptions":
        values = {}
        for f in dataclasses.fields(cls):
            raw = str(parameters.get(f.name, "")).strip()
            if not raw:
                continue
            try:
                if f.type in ("bool", "bool | None"):
                    if raw.lower() not in ("true", "false"):
                        raise ValueError
                    values[f.name] = raw.lower() == "true"
                elif f.type == "str":
                    values[f.name] = raw
                elif f.name == "gpu_memory_utilization":
                    values[f.name] = float(raw)
                    if not 0 < values[f.name] <= 1:
                        raise ValueError
                elif f.name == "fp8_triton_max_rows":
                    from internvl_serve.kernels.int8_linear import TRITON_MAX_M
                    values[f.name] = int(raw)
                    if not 0 <= values[f.name] <= TRITON_MAX_M:
                        raise ValueError
                elif f.name in ("encoder_priority_ms", "encoder_priority_linger_ms"):
                    values[f.name] = float(raw)
                    if not 0 <= values[f.name] <= 10_000:
                        raise ValueError
                else:
                    values[f.name] = int(raw)
                    if values[f.name] < 1:
                        raise ValueError
            except ValueError:
                raise ValueError(f"parameter {f.name!r}: {raw!r} is not a valid {f.type}") from None
        return cls(**values)


def engine_in_own_process(options: EngineOptions, device: torch.device) -> bool:
    """Whether the engine runs in a process of its own: as configured, or, left empty, when it runs on one
    GPU. H100, fp8, 32 / 64 streams: as fast or faster in every paired run and steadier (the engine waited
    for the GPU 63-81 % of its time, against 8-52 % in the stub); with tensor parallelism it ran only on
    the CPU, so there it stays opt-in."""
    if options.engine_process is not None:
        return options.engine_process
    return device.type == "cuda" and options.tensor_parallel_size == 1


def tensor_parallel_devices(device: torch.device, size: int, devices: str = "") -> list[str]:
    """The device of each rank: the given comma list, or cuda:i..i+N-1 from `device`'s index on CUDA,
    or N CPU ranks."""
    if devices.strip():
        out = [d.strip() for d in devices.split(",") if d.strip()]
        if len(out) != size:
            raise ValueError(f"tensor_parallel_devices {devices!r} names {len(out)} devices, "
                             f"tensor_parallel_size is {size}")
        return out
    if device.type == "cuda":
        first = device.index or 0
        if torch.cuda.device_count() < first + size:
            raise ValueError(f"tensor_parallel_size {size} from cuda:{first} needs {first + size} GPUs, "
                             f"torch sees {torch.cuda.device_count()}")
        return [f"cuda:{first + i}" for i in range(size)]
    return ["cpu"] * size


def kv_sizing_text(sizing: Mapping[str, int]) -> str:
    """The load log's account of how the KV cache was sized (ModelRunner.kv_sizing; empty: not sized
    from free memory): the device memory in use then against this process's own plus the vision
    reserve, which tells whether the vision model had loaded first."""
    if not sizing:
        return ""
    gib = {k: v / 2**30 for k, v in sizing.items()}
    return (f"sized with {gib['device_in_use']:.1f} of {gib['total']:.1f} GiB in use on the device "
            f"(own {gib['own']:.1f} + vision reserve {gib['reserved']:.1f}; activations {gib['activations']:.2f})")


def vision_reserve_bytes(config, dtype: torch.dtype) -> int:
    """GPU memory the vision model's instance takes on the same device: its weights (only the ViT
    blocks select_layer needs), activations of a batch of 8 images, and its CUDA context."""
    v = config.vision_config
    d, f = v.hidden_size, v.intermediate_size
    per_block = 3 * d * d + d * d + d + 2 * d * f + f + d + 4 * d       # qkv, proj, fc1/fc2, norms, ls
    embeddings = d * 3 * v.patch_size ** 2 + d + d + (v.num_patches + 1) * d
    c4 = d * int(round(1 / config.downsample_ratio)) ** 2
    llm_hidden = config.llm_config.hidden_size
    projector = 2 * c4 + c4 * llm_hidden + llm_hidden + llm_hidden * llm_hidden + llm_hidden
    params = config.num_vision_blocks_used * per_block + embeddings + projector
    element = torch.empty((), dtype=dtype).element_size()
    activations = 8 * (v.num_patches + 1) * f * element * 4
    return params * element + activations + 2**30


@dataclass
class BuiltEngine:
    """What build_engine made: the engine, the thread that runs it, the tensor-parallel workers (or None),
    and the encoder-activity record it reads (or None)."""

    engine: object
    thread: object
    workers: object = None
    encoder_activity: object = None

    def info(self) -> dict:
        """What the caller of an engine in another process needs: the limits a request is checked against
        (Request.validate's arguments), and the load facts the adapter logs."""
        engine, runner = self.engine, self.engine.runner
        graphs = runner.decode_graphs
        return {"limits": engine.request_limits(),
                "cache_info": runner.cache_info(), "graph_buckets": list(graphs.buckets) if graphs else None,
                "kv_sizing": dict(runner.kv_sizing), "host_threads": torch.get_num_threads()}

    def close(self, *, broken: bool = False) -> None:
        """After the thread stopped: the encoder record, the tensor-parallel workers."""
        if self.encoder_activity is not None:
            self.encoder_activity.close()
        if self.workers is not None:
            self.workers.close(None if broken else self.engine.runner)


def build_engine(checkpoint: str | Path, *, device: str, dtype: str, engine_options: Mapping[str, str] | None,
                 log: Callable[[str], None], on_worker_failure: Callable[[str], None]) -> BuiltEngine:
    """The llm engine of `checkpoint` on `device` with the llm model's parameters, running in an
    EngineThread: in the llm stub (LLMService) or in the engine process (serving/engine_process.py).
    dtype: a torch dtype's name ("bfloat16")."""
    from internvl_serve.checkpoint import load_state_dict
    from internvl_serve.config import InternVLChatConfig
    from internvl_serve.engine import EngineThread, LLMEngine, ModelRunner, SchedulerConfig
    from internvl_serve.engine.parallel import load_device
    from internvl_serve.tokenizer import load_tokenizer

    torch_dtype = getattr(torch, dtype)
    config = InternVLChatConfig.from_pretrained(checkpoint)
    options = EngineOptions.from_parameters(engine_options or {})
    set_host_threads(options.host_threads, device)
    runner_options = dict(block_size=options.block_size, num_blocks=options.num_blocks,
                          gpu_memory_utilization=options.gpu_memory_utilization,
                          max_num_batched_tokens=options.max_num_batched_tokens,
                          max_num_seqs=options.max_num_seqs, quantization=options.quantization or None,
                          kv_cache_dtype=options.kv_cache_dtype, fp8_fast_accum=options.fp8_fast_accum,
                          fp8_triton_max_rows=options.fp8_triton_max_rows)
    # Tensor parallelism: ranks 1..N-1 start first (they load their weights meanwhile); this process is
    # rank 0 on devices[0] and drives the engine.
    devices = tensor_parallel_devices(torch.device(device), options.tensor_parallel_size,
                                      options.tensor_parallel_devices)
    device0 = torch.device(devices[0])
    workers = None
    if len(devices) > 1:
        from internvl_serve.engine.tp_worker import start_workers
        workers = start_workers(checkpoint, devices=devices, dtype=dtype, runner_options=runner_options,
                                host_threads=options.host_threads, on_failure=on_worker_failure)
    state_dict = load_state_dict(checkpoint, prefixes=("language_model.",), dtype=torch_dtype,
                                 device=load_device(checkpoint, str(device0), len(devices)), progress=False)
    runner = ModelRunner(config, state_dict, device=device0, dtype=torch_dtype, **runner_options,
                         reserved_bytes=vision_reserve_bytes(config, torch_dtype) if device0.type == "cuda" else 0,
                         tp=workers.tp if workers else None)
    del state_dict  # the runner holds the weights now
    scheduler = SchedulerConfig(max_num_seqs=options.max_num_seqs,
                                max_num_batched_tokens=options.max_num_batched_tokens,
                                enable_prefix_caching=options.enable_prefix_caching,
                                async_scheduling=options.async_scheduling).validate()
    engine = LLMEngine(runner, tokenizer=load_tokenizer(checkpoint), scheduler_config=scheduler, detokenize=False)
    # encoder priority (opt-in): the vision model's forwards, read from the launcher's record
    encoder_activity = EncoderActivity.from_environment(log) if options.encoder_priority_ms > 0 else None
    encoder_busy = None if encoder_activity is None else functools.partial(
        encoder_activity.busy, [device_number(d) for d in devices],
        linger_ns=int(options.encoder_priority_linger_ms * 1e6))
    thread = EngineThread(engine, max_pending=options.max_pending_requests,
                          encoder_busy=encoder_busy, encoder_priority_s=options.encoder_priority_ms / 1000)
    return BuiltEngine(engine, thread, workers, encoder_activity)
