"""Triton adapter for internvl_serve.serving.preprocess.Preprocessor: request tensors -> input_ids
(T,) and pixel_values (1, N, 3, 448, 448), the latter views of the service's reused buffers (one per request
of an execute: Preprocessor's output_slot). A bad request (request parameters included: the contract has
none) gets INVALID_ARG with a message naming the input; the other requests of the same execute() are
unaffected. The limits come from config.pbtxt `parameters`; a bad value fails the load."""
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

from internvl_serve.serving.contract import CHAT_INPUTS, GENERATION_INPUTS, ServingLimits
from internvl_serve.serving.heap import cache_image_blocks, mmap_large_allocations
from internvl_serve.serving.parsing import check_request_parameters, parse_chat_request, parse_generation_request
from internvl_serve.serving.preprocess import Preprocessor, client_errors
from internvl_serve.serving.tensors import read_inputs


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        self.limits = ServingLimits.from_parameters(params)
        self.preprocessor = Preprocessor(os.environ["INTERNVL_CHECKPOINT"], self.limits)
        self.client_errors = client_errors()
        mmap_large_allocations()  # image buffers: no heap fragmentation (serving/heap.py)
        cache_image_blocks()  # ... and Pillow's image blocks reused, not faulted in anew per image

    def execute(self, requests):
        # each request's pixel values in its own reused buffer (Preprocessor's output_slot: no fresh mapping to
        # fault in per request, serving/heap.py), valid until the next execute; the python backend copies the
        # responses to shared memory right after execute returns (python_backend's Stub::ProcessReturnedResponses)
        return [self._one(request, slot) for slot, request in enumerate(requests)]

    def _one(self, request, slot):
        try:
            inputs = read_inputs(request.inputs(), CHAT_INPUTS + GENERATION_INPUTS)  # shapes first
            check_request_parameters(request.parameters())
            chat = parse_chat_request(inputs, self.limits)
            parse_generation_request(inputs, self.limits)  # fail before the vision model runs
            out = self.preprocessor(chat, output_slot=slot)
        except self.client_errors as e:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG))
        except Exception as e:
            error = pb_utils.TritonError(f"preprocess: {type(e).__name__}: {e}", pb_utils.TritonError.INTERNAL)
            return pb_utils.InferenceResponse(error=error)
        return pb_utils.InferenceResponse([pb_utils.Tensor("input_ids", out.input_ids),
                                           pb_utils.Tensor("pixel_values", out.pixel_values[np.newaxis])])
