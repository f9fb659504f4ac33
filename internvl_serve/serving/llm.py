"""The generation service behind the decoupled `llm` Triton model.

Owns: the engine thread (in-flight batching across requests), built by llm_engine.py in this process or
in the engine's own (engine_process.py); giving every request the end of answer of the
checkpoint's conversation template (prompt.py: its stop strings and stop token ids, in SamplingParams,
so the engine stops where the card's chat() stops); turning one request's RequestOutputs into the
responses its client sees (`ResponseStream`: text deltas or one whole text, the echo of text_input,
finish reasons, token counts; the text comes stripped from engine/stopping.AnswerText); the one way a
running request is cancelled: `cancel(request id, cancel key)`, which aborts it in the engine (its KV
blocks are freed at the next step) only when the key is the one the request was sent with, so a client
can cancel only its own requests. Engine requests are keyed by a server-unique id, never by a client's id alone.
Does not own: Triton (the adapter in model_repository/llm implements `ResponseSink` over a response
sender and turns side-channel requests into cancel()), the engine, or its options and building
(llm_engine.py).

The response path is off the engine thread (response_path.py): the engine runs token-only
(LLMEngine(detokenize=False): it ends a request on EOS, length or abort) and its callback only posts
each RequestOutput into the request's mailbox; sender threads turn them into text with the request's
engine/stopping.AnswerText (the same object the engine uses with detokenize=True: one decode per token,
stop strings, EOS never in the text, the final flush) and send, coalescing whatever piled up while a
client was slow into one response. When AnswerText finds a stop string, the request's final response
('stop', the text cut before the stop string, num_output_tokens counted at the token that completed it)
is sent at once and the engine is told to finish the sequence with 'stop' (EngineThread.abort(id,
"stop")); tokens it generated meanwhile are never sent. So answers are the same as when the engine
thread detokenizes (the rules are written once, in stopping.py), and a slow client never stalls a step.

Why no polling of is_cancelled(): in Triton 2.51 no client of this model's running step ever reports
cancelled — the ensemble does not pass a client's cancellation to it, nor does a BLS caller's
(python_backend r24.10 has no cancel() on a BLS response iterator) — so the owners cancel explicitly:
ensemble clients through the side channel, internvl_chat_bls (serving/relay.py) likewise with its own key.
"""
from __future__ import annotations

import functools
import hmac
import itertools
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Protocol

import numpy as np
import torch

from internvl_serve.serving.contract import FINISH_REASONS, LLMRequest, response_arrays
from internvl_serve.serving.device import default_dtype, resolve_device, set_host_threads
from internvl_serve.serving.llm_engine import (BuiltEngine, EngineOptions, build_engine, engine_in_own_process,
                                               tensor_parallel_devices)
from internvl_serve.serving.response_path import ResponsePath


class ResponseSink(Protocol):
    """Where one request's responses go (a Triton response sender in the adapter)."""

    def send(self, response: dict[str, np.ndarray], final: bool) -> None: ...

    def fail(self, message: str) -> None: ...  # a final error response


class ResponseStream:
    """One request's engine outputs -> response dicts (contract.OUTPUTS), or None when there is
    nothing to send yet.

    The deltas (stopping.AnswerText's) already concatenate to the card's `answer.split(stop)[0].strip()`
    (the one strip is in engine/detokenizer.py): they are passed on unchanged. stream=True: one response
    per non-empty delta and the final one; stream=False: one response with the whole text at the end.
    """

    def __init__(self, text_input: str, *, stream: bool, exclude_input_in_output: bool = True):
        self.stream = stream
        self._echo = "" if exclude_input_in_output else text_input
        self._parts: list[str] = []
        self.finished = False

    def add(self, text_delta: str, *, finished: bool, finish_reason: str | None, num_input_tokens: int,
            num_output_tokens: int) -> dict[str, np.ndarray] | None:
        if self.finished:
            raise RuntimeError("output after the final one")
        if self.stream:
            if not text_delta and not finished:
                return None
            text = text_delta
        else:
            self._parts.append(text_delta)
            if not finished:
                return None
            text = "".join(self._parts)
        text, self._echo = self._echo + text, ""
        self.finished = finished
        reason = FINISH_REASONS.get(finish_reason or "", finish_reason or "") if finished else ""
        return response_arrays(text, reason, num_input_tokens, num_output_tokens)


@dataclass
class _Active:
    """One request in flight. Its sink is touched only by the sender thread that holds its mailbox
    (response_path.py: one at a time), so a send that blocks holds no lock; `lock` guards the flags.
    Once the final response is sent (`closed`), the sink is never touched again (Triton 2.51's Python
    backend frees the response factory on the final response). `client_id` and `cancel_key` are what
    a cancellation must present."""

    sink: ResponseSink
    stream: ResponseStream
    client_id: str = ""
    cancel_key: str | None = None
    text: object = None  # stopping.AnswerText of this request (sender threads only)
    cancelled: bool = False
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class LLMService:
    """submit(request_id, LLMRequest, sink) -> responses flow to sink from the engine thread (in this
    process, or with engine_process in the engine process: serving/engine_process.py)."""

    def __init__(self, checkpoint: str | Path, *, device: str = "auto", dtype: torch.dtype | None = None,
                 engine_options: Mapping[str, str] | None = None, log: Callable[[str], None] | None = None):
        from internvl_serve.config import InternVLChatConfig
        from internvl_serve.engine.stopping import AnswerText
        from internvl_serve.prompt import get_template
        from internvl_serve.tokenizer import load_tokenizer

        self.device = resolve_device(device)
        self.dtype = dtype or default_dtype(self.device)
        self.config = InternVLChatConfig.from_pretrained(checkpoint)
        self.tokenizer = load_tokenizer(checkpoint)
        # the end of an answer, as the card's chat(): the template's stop strings and stop token ids
        self.stop, self.stop_token_ids = get_template(
            self.config.template, self.config.system_message).end_of_answer(self.tokenizer)
        self._log = log or (lambda message: None)
        options = EngineOptions.from_parameters(engine_options or {})
        set_host_threads(options.host_threads, self.device)  # this process's (an engine process sets its own)
        self.devices = tensor_parallel_devices(self.device, options.tensor_parallel_size,
                                               options.tensor_parallel_devices)
        self.device = torch.device(self.devices[0])
        self._broken: str | None = None
        self._answer_text = functools.partial(AnswerText, self.tokenizer)
        self.responses = ResponsePath(num_senders=options.response_senders)
        spec = dict(device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
                    engine_options=dict(engine_options or {}))
        self.built: BuiltEngine | None = None
        if engine_in_own_process(options, self.device):
            from internvl_serve.serving.engine_process import EngineProcess

            self.thread = EngineProcess({"checkpoint": str(checkpoint), **spec},
                                        max_pending=options.max_pending_requests, on_broken=self._on_worker_failure)
            self.engine = self.thread.engine  # its state, as last reported (the metrics read it)
            info, self.engine_where = self.thread.info, f"its own process (pid {self.thread.process.pid})"
        else:
            self.built = build_engine(checkpoint, **spec, log=self._log, on_worker_failure=self._on_worker_failure)
            self.engine, self.thread = self.built.engine, self.built.thread
            info, self.engine_where = self.built.info(), "a thread of the llm stub"
        self.engine_info = {k: v for k, v in info.items() if k != "limits"}  # what the adapter's load log tells
        self._active: dict[str, _Active] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()

    def submit(self, request: LLMRequest, sink: ResponseSink, *, client_id: str = "",
               cancel_key: str | None = None) -> str:
        """Queue the request; returns its engine id ("<client id>#<n>", unique in this server, shown in
        the log). Raises the engine's InvalidRequest for a request it refuses. cancel(client_id,
        cancel_key) aborts it; without a key (or an id) it cannot be cancelled by name."""
        from internvl_serve.engine import Request
        from internvl_serve.engine.host_copy import page_locked, travel_dtype

        if self._broken:
            raise RuntimeError(self._broken)

        request_id = f"{client_id}#{next(self._ids)}"
        gen = request.generation
        sampling = gen.sampling.ending_with(self.stop, self.stop_token_ids)  # the template's end of answer
        active = _Active(sink, ResponseStream(request.text_input, stream=gen.stream,
                                              exclude_input_in_output=gen.exclude_input_in_output),
                         client_id=client_id, cancel_key=cancel_key,
                         text=self._answer_text(sampling))
        embeds = None
        if request.image_embeds is not None and len(request.image_embeds):  # (0 rows: no image)
            # in the engine's dtype and page-locked here, on the caller's thread, not the engine's
            embeds = torch.from_numpy(np.ascontiguousarray(request.image_embeds))
            if self.built is not None:  # (an engine process gets them in its dtype and pins its own copy)
                embeds = page_locked(embeds, self.device, travel_dtype(embeds.dtype, self.dtype))
        engine_request = Request(request_id=request_id, prompt_token_ids=request.input_ids.tolist(),
                                 image_embeds=embeds, sampling=sampling)
        with self._lock:
            self._active[request_id] = active
        self.responses.open(request_id, functools.partial(self._on_outputs, request_id, active))
        try:
            self.thread.submit(engine_request, lambda output: self.responses.post(request_id, output))
        except Exception:
            with self._lock:
                self._active.pop(request_id, None)
            self.responses.close(request_id)
            raise
        return request_id

    def _on_outputs(self, request_id: str, active: _Active, outputs: list) -> bool:
        """A sender thread: the outputs that piled up for `request_id`, in order -> one response (two
        when an error ends them: the text before it, then the error). True when the request is done."""
        if not active.closed:
            self._respond(request_id, active, outputs)
        return active.closed

    def _close(self, request_id: str, active: _Active) -> None:
        """The next response is the final one: forget the request first (num_active is 0 once a client
        has its final response)."""
        with active.lock:
            active.closed = True
        with self._lock:
            self._active.pop(request_id, None)

    def _respond(self, request_id: str, active: _Active, outputs: list) -> None:
        text, finished, reason, last, error = "", False, None, outputs[-1], None
        try:
            for output in outputs:
                if output.error is not None:  # the engine (or a tensor-parallel worker) failed it
                    error = output.error
                    break
                delta, reason = active.text.update(output.new_token_ids,
                                                   output.finish_reason if output.finished else None)
                finished = output.finished or reason is not None
                text, last = text + delta, output
                if finished:
                    if not output.finished:  # a stop string: the engine still runs it
                        self.thread.abort(request_id, "stop")
                    break
            response = active.stream.add(text, finished=finished, finish_reason=reason,
                                         num_input_tokens=last.num_prompt_tokens,
                                         num_output_tokens=last.num_output_tokens)
            if finished:
                self._close(request_id, active)
            if response is not None:
                active.sink.send(response, final=finished)
            if error is not None and not active.closed:
                self._close(request_id, active)
                self._fail(active.sink, error if error.startswith("llm: ") else f"llm: generation failed: {error}")
        except Exception as e:  # the response could not be built or sent: end the request
            if not active.closed:
                self._close(request_id, active)
                self._fail(active.sink, f"llm: {type(e).__name__}: {e}")
            if not finished:
                self.thread.abort(request_id)

    @staticmethod
    def _fail(sink: ResponseSink, message: str) -> None:
        try:
            sink.fail(message)
        except Exception:
            pass

    def cancel(self, client_id: str, cancel_key: str) -> int:
        """Abort the running requests sent with this client request id and this cancel key; how many.

        Owned: the key is the secret the sender sent with its request, so a client that uses another
        client's request id (by chance or on purpose) cancels nothing of that client's. Called by the
        adapter for the side channel (a `cancel_request_id` + `cancel_key` request to this model)."""
        if not client_id or not cancel_key:
            return 0
        with self._lock:
            matches = [(rid, a) for rid, a in self._active.items()
                       if a.client_id == client_id and a.cancel_key is not None
                       and hmac.compare_digest(a.cancel_key.encode(), cancel_key.encode())]
        aborted = 0
        for request_id, a in matches:
            with a.lock:
                if a.closed or a.cancelled:
                    continue
                a.cancelled = True
            self._log(f"llm: request {request_id} cancelled by the client; aborting it")
            self.thread.abort(request_id)
            aborted += 1
        return aborted

    @property
    def num_active(self) -> int:
        with self._lock:
            return len(self._active)

    def _on_worker_failure(self, message: str) -> None:
        """A tensor-parallel worker died: no step can complete any more. Fail every open request and
        refuse new ones with the reason (the server must be restarted)."""
        self._broken = f"llm: {message}; the generation model cannot continue, restart the server"
        self._log(self._broken)
        from internvl_serve.engine import RequestOutput

        with self._lock:
            request_ids = list(self._active)
        for request_id in request_ids:  # after what is queued, on the sender threads (they own the sinks)
            self.responses.post(request_id, RequestOutput(request_id, [], "", True, "abort", 0, 0, 0,
                                                          error=self._broken))

    def shutdown(self) -> None:
        """Stop the engine; requests still running get a final error response (every output already
        produced is delivered first)."""
        self.thread.shutdown()
        self.responses.shutdown()
        if self.built is not None:
            self.built.close(broken=bool(self._broken))
