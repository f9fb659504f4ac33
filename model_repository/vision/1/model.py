"""Triton adapter for internvl_serve.serving.vision.VisionService (dynamic batching: one forward for
all the requests Triton hands over). Each request's pixel_values is (1, N, 3, 448, 448); its answer
is image_embeds (1, N * num_image_token, llm_hidden)."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

try:
    import internvl_serve  # noqa: F401  (installed in the serving venv)
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from internvl_serve.serving.metrics import VisionExporter
from internvl_serve.serving.device import instance_device
from internvl_serve.serving.heap import mmap_large_allocations
from internvl_serve.serving.vision import VisionService


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        params["device"] = instance_device(args, params.get("device", "auto"))  # KIND_GPU: the instance's GPU
        self.service = VisionService.from_parameters(os.environ["INTERNVL_CHECKPOINT"], params,
                                                    log=pb_utils.Logger.log_warn)
        pb_utils.Logger.log_info(f"vision: {self.service.device} {self.service.dtype}; compiled blocks: {self.service.compiled}")
        if self.service.device.type == "cuda":  # host buffers only; on the CPU the forward's temporaries suffer
            mmap_large_allocations()  # serving/heap.py
        # internvl_image_cache_* counters on Triton's /metrics (docs/metrics.md)
        self.metrics = VisionExporter(self.service, pb_utils, args, log=pb_utils.Logger.log_warn)

    def execute(self, requests):
        pixels = [pb_utils.get_input_tensor_by_name(r, "pixel_values").as_numpy() for r in requests]
        try:
            embeds = self.service.embed([p.reshape(-1, *p.shape[-3:]) for p in pixels])
        except Exception as e:  # one failed forward fails every request of the batch
            error = pb_utils.TritonError(f"vision: {type(e).__name__}: {e}", pb_utils.TritonError.INTERNAL)
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        self.metrics.update()  # never raises
        return [pb_utils.InferenceResponse([pb_utils.Tensor("image_embeds", e[np.newaxis])]) for e in embeds]

    def finalize(self):
        self.metrics.close()
