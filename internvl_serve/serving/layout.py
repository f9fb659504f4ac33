"""Layouts: a copy of the model repository whose config.pbtxt files place the models on GPUs and size
the preprocess model's instances to the machine.

The checked-in repository runs one instance of each model on the default device. For several GPUs the
launcher (`--gpus`, `--tensor-parallel-size`, `--llm-param`) writes a derived repository:

  data parallel   (--gpus 0,1,2,3)                     vision and llm: instance_group KIND_GPU on
                                                       those GPUs, one instance each; Triton spreads
                                                       requests over the instances
  tensor parallel (--gpus 0,1 --tensor-parallel-size 2) llm: one instance (rank 0 on GPU 0, workers on
                                                       the others, parameters tensor_parallel_*);
                                                       vision: one instance on the first GPU
  tensor parallel on the CPU (--tensor-parallel-size 2, no --gpus): N CPU ranks (tests)
  preprocess instances (--preprocess-instances N; default auto_preprocess_instances(): the repository's 2
                       below 12 CPU cores, one per 4 cores above, at most 8)
  vision batch         (--vision-max-batch-size N; default auto_vision_max_batch_size(): 1 where the
                       vision model runs on a GPU in bf16, else the repository's 8)

The model folders (`1/`) are symlinked, so the code is the checked-in code; only the configs differ.
Data and tensor parallelism together (several TP groups) is not supported.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc


REPOSITORY_PREPROCESS_INSTANCES = 2  # model_repository/preprocess/config.pbtxt
MAX_AUTO_PREPROCESS_INSTANCES = 8


def available_cpus(cgroup_cpu_max: str | Path = "/sys/fs/cgroup/cpu.max") -> int:
    """The cores this process may use: its CPU affinity, bounded by a cgroup v2 CPU quota (a container's
    CPU limit, which os.cpu_count() does not see), rounded down, at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path(cgroup_cpu_max).read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, int(quota) // int(period))
    except (OSError, ValueError):
        pass  # no cgroup v2 CPU controller here
    return max(1, cpus)


def auto_preprocess_instances(cpus: int | None = None) -> int | None:
    """Preprocess instances for a machine with `cpus` cores (default: available_cpus()): one per 4 cores,
    at most 8; None (the repository's 2) where that is not more. Each instance is a process decoding one
    request's images at a time (~15 ms for a new 448 PNG): a burst of 32 new images waits up to ~240 ms
    for the last with 2 instances, ~120 ms with 4 (the H100 machines here have 16 cores)."""
    n = min(MAX_AUTO_PREPROCESS_INSTANCES, (cpus if cpus is not None else available_cpus()) // 4)
    return n if n > REPOSITORY_PREPROCESS_INSTANCES else None


def auto_vision_max_batch_size(vision_parameters: dict[str, str], gpus: tuple[int, ...] = ()) -> int | None:
    """The vision model's max_batch_size where the layout does not set it: 1 where it runs on a GPU
    (`gpus`, or its `device` parameter: cuda, or auto with a GPU torch sees) in the model dtype; None
    (the repository's 8) on the CPU, where a forward over several images costs less per image, and with
    `quantization=fp8`, whose encoder gains from batches (16.5 against 21.6 ms per image at 8 and 1 on an
    H100).

    Why 1 on a GPU in bf16: every image of a call waits for the whole call, and a bf16 image costs ~22 ms
    at 1 or 8 images. H100, 32 streams with a new image per request, two runs each against the 8 on the
    same machine (bench/results/h100-2026-12-07e and -07f): TTFT p50 / mean 361 / 529 and 309 / 472 ms
    against 706-709 / 745-773 and 530 / 733, output tok/s +0.3 to +1.1 % and +0.5 %; at 64 streams (one
    run) 322 / 744 against 490-574 / 885-938 ms, tok/s -1.5 %; ITL p95 at 32 streams 57 against 36 ms
    (decode steps wait behind more, smaller forwards)."""
    from internvl_serve.serving.device import resolve_device

    device = vision_parameters.get("device", "auto")
    on_gpu = bool(gpus) or device.startswith("cuda") or (device == "auto" and resolve_device().type == "cuda")
    return 1 if on_gpu and vision_parameters.get("quantization", "") != "fp8" else None


@dataclass(frozen=True)
class Layout:
    gpus: tuple[int, ...] = ()
    tensor_parallel_size: int = 1
    llm_parameters: dict[str, str] = field(default_factory=dict)      # overrides of llm's parameters
    vision_parameters: dict[str, str] = field(default_factory=dict)
    preprocess_instances: int | None = None  # None: auto_preprocess_instances()
    # requests (each with its image's tiles) the vision model's dynamic batcher gathers into one call at
    # most (its max_batch_size); None: auto_vision_max_batch_size() (vision_batch_cap). Fewer: in a burst
    # of new images the first come out sooner (every image of a call waits for the whole call), at the
    # cost per image of smaller forwards (the fp8 encoder's: 22.0 ms at 1 image against 16.3 at 8 on an
    # H100; bf16 ~22 either way)
    vision_max_batch_size: int | None = None

    def validate(self) -> "Layout":
        if self.preprocess_instances is not None and self.preprocess_instances < 1:
            raise ValueError(f"preprocess_instances must be >= 1, got {self.preprocess_instances}")
        if self.vision_max_batch_size is not None and self.vision_max_batch_size < 1:
            raise ValueError(f"vision_max_batch_size must be >= 1, got {self.vision_max_batch_size}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if len(set(self.gpus)) != len(self.gpus) or any(g < 0 for g in self.gpus):
            raise ValueError(f"gpus must be distinct GPU indices >= 0, got {list(self.gpus)}")
        if self.gpus and self.tensor_parallel_size > 1 and len(self.gpus) != self.tensor_parallel_size:
            raise ValueError(f"tensor parallelism over {self.tensor_parallel_size} GPUs needs exactly that many "
                             f"--gpus, got {list(self.gpus)} (several tensor-parallel groups are not supported)")
        return self

    @property
    def is_default(self) -> bool:
        return not (self.gpus or self.tensor_parallel_size > 1 or self.llm_parameters or self.vision_parameters
                    or self.preprocess_count is not None or self.vision_batch_cap is not None)

    @property
    def preprocess_count(self) -> int | None:
        """The preprocess model's instances under this layout; None: the repository's own."""
        return self.preprocess_instances if self.preprocess_instances is not None else auto_preprocess_instances()

    @property
    def vision_batch_cap(self) -> int | None:
        """The vision model's max_batch_size under this layout; None: the repository's own."""
        if self.vision_max_batch_size is not None:
            return self.vision_max_batch_size
        return auto_vision_max_batch_size(self.vision_parameters, self.gpus)


def read_config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def _set_parameters(config: mc.ModelConfig, values: dict[str, str]) -> None:
    for key, value in values.items():
        if key not in config.parameters:
            raise ValueError(f"model {config.name!r} has no parameter {key!r} "
                             f"(known: {', '.join(sorted(config.parameters))})")
        config.parameters[key].string_value = str(value)


def _on_gpus(config: mc.ModelConfig, gpus: tuple[int, ...]) -> None:
    del config.instance_group[:]
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=1, gpus=list(gpus))


def apply_layout(name: str, config: mc.ModelConfig, layout: Layout) -> mc.ModelConfig:
    """The config of model `name` under `layout` (a modified copy)."""
    out = mc.ModelConfig()
    out.CopyFrom(config)
    tp = layout.tensor_parallel_size
    if name == "llm":
        if tp > 1:
            params = {"tensor_parallel_size": str(tp)}
            if layout.gpus:
                params["device"] = f"cuda:{layout.gpus[0]}"
                params["tensor_parallel_devices"] = ",".join(f"cuda:{g}" for g in layout.gpus)
            _set_parameters(out, params)
        elif layout.gpus:
            _on_gpus(out, layout.gpus)
        _set_parameters(out, layout.llm_parameters)
    elif name == "preprocess" and layout.preprocess_count is not None:
        for group in out.instance_group:
            group.count = layout.preprocess_count
    elif name == "vision":
        if layout.gpus:
            _on_gpus(out, layout.gpus[:1] if tp > 1 else layout.gpus)
        _set_parameters(out, layout.vision_parameters)
        cap = layout.vision_batch_cap
        if cap is not None:
            out.max_batch_size = cap
    return out


def write_model_repository(source: str | Path, destination: str | Path, layout: Layout) -> Path:
    """Write `source` (a model repository) under `layout` into `destination` (replaced if it exists)."""
    layout.validate()
    source, destination = Path(source).resolve(), Path(destination)
    if destination.exists():
        shutil.rmtree(destination)
    destination.mkdir(parents=True)
    for model in sorted(p for p in source.iterdir() if (p / "config.pbtxt").is_file()):
        target = destination / model.name
        target.mkdir()
        config = apply_layout(model.name, read_config(model / "config.pbtxt"), layout)
        (target / "config.pbtxt").write_text(
            f"# generated by internvl_serve.serving.layout from {model / 'config.pbtxt'}\n"
            + text_format.MessageToString(config))
        for version in (p for p in model.iterdir() if p.is_dir()):
            (target / version.name).symlink_to(version, target_is_directory=True)
    return destination


def parse_key_values(items: list[str] | None) -> dict[str, str]:
    """['key=value', ...] -> dict (the launcher's --llm-param / --vision-param)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out
