"""Triton adapter for internvl_serve.serving.llm.LLMService (decoupled).

execute() parses each request and submits it to the engine, then returns None; the engine thread
sends the responses through the request's response sender. Exactly one response per request carries
the FINAL flag: the last data response, or an error response (a refused request, or a failure after
the start). A request holding cancel_request_id and cancel_key is the cancellation side channel: it
aborts the running requests sent with that id and key (LLMService.cancel; docs/contract.md)."""
import json
import os
import sys
from pathlib import Path

import triton_python_backend_utils as pb_utils

try:
    import internvl_serve  # noqa: F401  (installed in the serving venv)
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from internvl_serve.serving.contract import LLM_INPUTS, response_arrays
from internvl_serve.engine.errors import EngineBusy
from internvl_serve.serving.device import instance_device
from internvl_serve.serving.heap import mmap_large_allocations
from internvl_serve.serving.llm import LLMService
from internvl_serve.serving.llm_engine import kv_sizing_text
from internvl_serve.serving.metrics import LLMExporter
from internvl_serve.serving.parsing import parse_cancel_key, parse_cancel_request, parse_llm_request
from internvl_serve.serving.preprocess import client_errors
from internvl_serve.serving.tensors import read_inputs

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonSink:
    """internvl_serve.serving.llm.ResponseSink over one request's response sender."""

    def __init__(self, sender):
        self.sender = sender

    def send(self, response, final):
        tensors = [pb_utils.Tensor(name, value) for name, value in response.items()]
        self.sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL if final else 0)

    def fail(self, message, code=None):  # pb_utils.TritonError exists only once the stub runs
        code = pb_utils.TritonError.INTERNAL if code is None else code
        self.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)), flags=FINAL)


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        device = instance_device(args, params.pop("device", "auto"))  # KIND_GPU: the instance's GPU
        self.service = LLMService(os.environ["INTERNVL_CHECKPOINT"], device=device, engine_options=params,
                                  log=pb_utils.Logger.log_info)
        self.client_errors = client_errors()
        if self.service.device.type == "cuda":  # image embeddings in; on the CPU the forward's temporaries suffer
            mmap_large_allocations()  # serving/heap.py
        info = self.service.engine_info["cache_info"]
        graphs = self.service.engine_info["graph_buckets"]
        sizing = kv_sizing_text(self.service.engine_info["kv_sizing"])  # how the pool was sized
        pb_utils.Logger.log_info(
            f"llm: {self.service.device} {self.service.dtype}; KV cache {info['num_blocks']} blocks x "
            f"{info['block_size']} tokens = {info['num_tokens']} tokens, {info['bytes'] / 2**30:.1f} GiB {info['dtype']}"
            f"{'; ' + sizing if sizing else ''}; decode CUDA graphs: {graphs or 'off'}; "
            f"tensor parallel: {len(self.service.devices)} ranks on {','.join(self.service.devices)}; "
            f"engine: {self.service.engine_where}, host threads {self.service.engine_info['host_threads']}")
        # internvl_* metrics on Triton's /metrics (docs/metrics.md): meters the engine thread
        self.metrics = LLMExporter(self.service, pb_utils, args, log=pb_utils.Logger.log_warn)

    def execute(self, requests):
        for request in requests:
            sink = TritonSink(request.get_response_sender())
            try:
                inputs = read_inputs(request.inputs(), LLM_INPUTS)  # shapes checked before any array
                cancel = parse_cancel_request(inputs)
                if cancel is not None:  # the cancellation side channel (LLMService.cancel)
                    aborted = self.service.cancel(*cancel)
                    sink.send(response_arrays("", "cancelled" if aborted else "not_found", 0, 0), final=True)
                    continue
                parsed = parse_llm_request(inputs)
                self.service.submit(parsed, sink, client_id=request.request_id(), cancel_key=parse_cancel_key(inputs))
            except self.client_errors as e:
                sink.fail(str(e), pb_utils.TritonError.INVALID_ARG)
            except EngineBusy as e:  # the bounded queue is full: retry later
                sink.fail(str(e), pb_utils.TritonError.UNAVAILABLE)
            except Exception as e:
                sink.fail(f"llm: {type(e).__name__}: {e}")
        return None

    def finalize(self):
        self.metrics.close()
        self.service.shutdown()
