"""Triton adapter for internvl_serve.serving.vision.VisionService (dynamic batching: one forward for
all the requests Triton hands over). Each request's pixel_values is (1, N, 3, 448, 448); its answer
is image_embeds (1, N * num_image_token, llm_hidden). A request above the ensemble's tile limit
(config.pbtxt max_images / max_frames), with non-finite pixels or with pixels that give non-finite
embeddings gets INVALID_ARG alone."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

try:
    import internvl_serve  # noqa: F401  (installed in the serving venv)
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from internvl_serve.serving.contract import InvalidInput, ServingLimits
from internvl_serve.serving.metrics import VisionExporter
from internvl_serve.serving.device import instance_device
from internvl_serve.serving.encoder_activity import EncoderActivity
from internvl_serve.serving.heap import mmap_large_allocations
from internvl_serve.serving.tensors import read_inputs
from internvl_serve.serving.vision import VISION_PIXEL_VALUES, NonFiniteEmbeddings, VisionService, request_tiles


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        params["device"] = instance_device(args, params.get("device", "auto"))  # KIND_GPU: the instance's GPU
        self.limits = ServingLimits.from_parameters(params)  # the ensemble's image and frame limits
        # the server's encoder-activity record (the launcher's): the llm engine gives each forward the GPU
        self.service = VisionService.from_parameters(os.environ["INTERNVL_CHECKPOINT"], params,
                                                    log=pb_utils.Logger.log_warn,
                                                    activity=EncoderActivity.from_environment(pb_utils.Logger.log_warn))
        pb_utils.Logger.log_info(f"vision: {self.service.device} {self.service.dtype}; compiled blocks: {self.service.compiled}; "
                                 f"host threads {torch.get_num_threads()}")
        if self.service.device.type == "cuda":  # host buffers only; on the CPU the forward's temporaries suffer
            mmap_large_allocations()  # serving/heap.py
        # internvl_image_cache_* counters on Triton's /metrics (docs/metrics.md)
        self.metrics = VisionExporter(self.service, pb_utils, args, log=pb_utils.Logger.log_warn)

    def execute(self, requests):
        responses, tiles, good = [None] * len(requests), [], []
        for i, request in enumerate(requests):  # a bad request is refused alone, before the batch runs
            try:
                arrays = read_inputs(request.inputs(), [VISION_PIXEL_VALUES], batched=True)
                tiles.append(request_tiles(arrays["pixel_values"], self.limits))
                good.append(i)
            except InvalidInput as e:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG))
        try:
            # views of the service's reused output buffer (no fresh host buffer per request, internvl_serve/hostbuf.py):
            # valid until the next embed; the python backend copies them to shm right after execute returns,
            # before its next execute (python_backend's Stub::ProcessReturnedResponses)
            embeds, refused = self.service.embed(tiles, reuse_output=True), ()
        except NonFiniteEmbeddings as e:  # those requests alone
            embeds, refused = e.embeds, e.requests
            not_finite = pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)
        except Exception as e:  # one failed forward fails every request of the batch
            error = pb_utils.TritonError(f"vision: {type(e).__name__}: {e}", pb_utils.TritonError.INTERNAL)
            embeds = None
        for j, i in enumerate(good):
            if embeds is None:
                responses[i] = pb_utils.InferenceResponse(error=error)
            elif j in refused:
                responses[i] = pb_utils.InferenceResponse(error=not_finite)
            else:
                responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor("image_embeds", embeds[j][np.newaxis])])
        self.metrics.update()  # never raises
        return responses

    def finalize(self):
        self.metrics.close()
        if self.service.encoder_slot is not None:
            self.service.encoder_slot.release()
