"""Triton adapter: internvl_chat's interface, running its steps through BLS (see config.pbtxt).

Per request, a thread: preprocess (the client's inputs) -> vision (its pixel_values) -> llm (streamed,
decoupled BLS, sent with a cancel key of this model's own), whose responses internvl_serve.serving.relay
forwards, aborting that generation (and no other) on the llm's side channel as soon as this request is
cancelled (client gone). Refuses what internvl_chat refuses (request parameters, a bad cancel_key, and
the steps' own checks), with the ensemble's error prefix (relay.client_error)."""
import secrets
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

try:
    import internvl_serve  # noqa: F401  (installed in the serving venv)
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from internvl_serve.serving.contract import (CANCEL_INPUT, CANCEL_KEY, CHAT_INPUTS, ENSEMBLE_INPUTS,
                                             GENERATION_INPUTS, InvalidInput)
from internvl_serve.serving.parsing import check_request_parameters, parse_cancel_key
from internvl_serve.serving.relay import client_error, relay
from internvl_serve.serving.tensors import read_inputs

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
PREPROCESS_INPUTS = [s.name for s in (*CHAT_INPUTS, *GENERATION_INPUTS)]
LLM_PASSED = ["text_input", *(s.name for s in GENERATION_INPUTS)]


def _error(message, code=None):
    code = pb_utils.TritonError.INTERNAL if code is None else code
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    def initialize(self, args):
        self._threads = set()
        self._lock = threading.Lock()

    def execute(self, requests):
        for request in requests:
            try:  # shapes checked before any array (as every step does); parameters as the ensemble's preprocess
                arrays = read_inputs(request.inputs(), ENSEMBLE_INPUTS)
                check_request_parameters(request.parameters())
            except InvalidInput as e:
                _end(request.get_response_sender(), _error(client_error(str(e)), pb_utils.TritonError.INVALID_ARG))
                continue
            # copies: the request's own tensors are not ours once execute() returns
            inputs = {name: pb_utils.Tensor(name, np.array(array, copy=True)) for name, array in arrays.items()}
            thread = threading.Thread(target=self._run, args=(request.get_response_sender(), inputs,
                                      request.request_id()), daemon=True)
            with self._lock:
                self._threads.add(thread)
            thread.start()
        return None

    def _step(self, model, inputs, outputs):
        response = pb_utils.InferenceRequest(model_name=model, inputs=inputs,
                                             requested_output_names=outputs).exec()
        if response.has_error():
            raise _StepError(response.error())
        return [pb_utils.get_output_tensor_by_name(response, name) for name in outputs]

    def _run(self, sender, inputs, client_id):
        try:
            input_ids, pixel_values = self._step(
                "preprocess", [inputs[n] for n in PREPROCESS_INPUTS if n in inputs], ["input_ids", "pixel_values"])
            if sender.is_cancelled():
                _end(sender)
                return
            (image_embeds,) = self._step("vision", [pb_utils.Tensor("pixel_values", pixel_values.as_numpy())],
                                         ["image_embeds"])
            # the client's cancel_key is checked where the ensemble's llm step checks it, and not used:
            # this model cancels its llm request itself, with its own key
            parse_cancel_key({n: t.as_numpy() for n, t in inputs.items() if n == CANCEL_KEY.name})
            llm_id = client_id or f"bls-{uuid.uuid4().hex}"  # shown in the llm's log
            key = secrets.token_hex(16)  # this model's own: only it can cancel its llm request
            llm_inputs = [pb_utils.Tensor("input_ids", input_ids.as_numpy()),
                          pb_utils.Tensor("image_embeds", image_embeds.as_numpy()),
                          pb_utils.Tensor(CANCEL_KEY.name, np.array([key.encode()], dtype=object)),
                          *(inputs[n] for n in LLM_PASSED if n in inputs)]
            stream = pb_utils.InferenceRequest(model_name="llm", inputs=llm_inputs, request_id=llm_id,
                                               requested_output_names=["text_output", "finish_reason",
                                                                       "num_input_tokens", "num_output_tokens"]
                                               ).exec(decoupled=True)
            relay(self._data(stream),
                  send=lambda r, final: sender.send(pb_utils.InferenceResponse(r.output_tensors()),
                                                    flags=FINAL if final else 0),
                  is_cancelled=sender.is_cancelled,
                  cancel=lambda: self._cancel(llm_id, key),
                  finish=lambda: sender.send(flags=FINAL))
        except _StepError as e:
            _end(sender, _error(client_error(e.error.message()), e.error.code()))
        except InvalidInput as e:
            _end(sender, _error(client_error(str(e)), pb_utils.TritonError.INVALID_ARG))
        except Exception as e:  # noqa: BLE001
            _end(sender, _error(f"internvl_chat_bls: {type(e).__name__}: {e}"))
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    @staticmethod
    def _data(stream):
        """The llm's data responses; an error response ends the relay with that error."""
        for response in stream:
            if response.has_error():
                raise _StepError(response.error())
            if response.output_tensors():
                yield response

    @staticmethod
    def _cancel(llm_id, key):
        """The llm's side channel with this request's own key; True once the llm found the request."""
        pb_utils.Logger.log_info(f"internvl_chat_bls: the client of {llm_id} left; aborting its generation")
        request = pb_utils.InferenceRequest(
            model_name="llm", requested_output_names=["finish_reason"],
            inputs=[pb_utils.Tensor(CANCEL_INPUT, np.array([llm_id.encode()], dtype=object)),
                    pb_utils.Tensor(CANCEL_KEY.name, np.array([key.encode()], dtype=object))])
        found = False
        for response in request.exec(decoupled=True):
            if response.output_tensors():
                reason = pb_utils.get_output_tensor_by_name(response, "finish_reason").as_numpy()[0]
                found = found or reason == b"cancelled"
        return found

    def finalize(self):
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=10)


def _end(sender, response=None):
    """The request's final response (an error, or none); a sender that refuses it is already closed."""
    try:
        sender.send(response, flags=FINAL) if response is not None else sender.send(flags=FINAL)
    except Exception as e:  # noqa: BLE001
        pb_utils.Logger.log_warn(f"internvl_chat_bls: could not end a request: {e}")


class _StepError(Exception):
    def __init__(self, error):
        super().__init__(error.message())
        self.error = error
