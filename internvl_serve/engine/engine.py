"""LLMEngine (token-only generation with in-flight batching) and EngineThread (serving loop).

    step() = schedule -> launch -> process the previous launch:
        batch = scheduler.schedule()              # decodes + prefill chunks within the token budget
        future = runner.launch(batch, inflight)   # queued on the device, returns at once
        scheduler.advance(batch)                  # computed counts; a pending token per sampling seq
        inflight.result() -> seq.resolve_pending  # the host waits here, for the PREVIOUS step only
        -> per new token: StopChecker (stop token / length), with detokenize=True AnswerText (text delta,
           stop string), RequestOutput

Overlap scheduling (SchedulerConfig.async_scheduling; default on when the runner is on CUDA): step N+1 is
scheduled and queued while step N runs; its decode inputs are step N's tokens, taken on the device
(runner.py). Tokens are processed one step late, and a sequence that finishes at step N (EOS, stop
string, length, abort) may already be in step N+1: that token is dropped (Scheduler.finish), its KV
slot freed with the sequence; a sequence whose pending tokens reach max_tokens is not scheduled again.
Outputs are identical to the synchronous loop (async_scheduling=False: each launch is processed at once).
The engine falls back to processing the running step before scheduling the next when a running
sequence uses repetition_penalty (the history must be on the host) or the runner cannot overlap
(tensor parallelism: its channel sends token ids from the host).

EngineThread owns an engine in a background thread: submit/abort are thread-safe and only queue work;
the thread steps while there is work and sleeps on a condition variable otherwise. A step that raises
fails the requests of that batch (RequestOutput.error), never the thread.

Does not own: Triton or request parsing (serving/), tokenization of prompts (prompt.py, tokenizer.py),
the rules of when an answer ends and its text (stopping.py: StopChecker, AnswerText, from the request's
SamplingParams; the engine applies them, the serving path applies AnswerText itself with detokenize=False).
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Callable

import numpy as np
import torch

from internvl_serve.content_key import content_key
from internvl_serve.engine.block_manager import BlockAllocator
from internvl_serve.engine.errors import EngineBusy, EngineError, InvalidRequest
from internvl_serve.engine.request import FinishReason, Request, RequestOutput
from internvl_serve.engine.scheduler import Scheduler, SchedulerConfig
from internvl_serve.engine.sequence import Sequence
from internvl_serve.engine.stopping import AnswerText, StopChecker

log = logging.getLogger(__name__)

IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"  # the card's image placeholder token (its id comes from the tokenizer)


def _image_context_id(tokenizer) -> int | None:
    if tokenizer is None or not hasattr(tokenizer, "convert_tokens_to_ids"):
        return None
    tid = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    if not isinstance(tid, int) or tid == getattr(tokenizer, "unk_token_id", None):
        return None
    return tid


def image_content_key(image_embeds: torch.Tensor) -> bytes:
    """The content key (internvl_serve/content_key.py) of image rows: their dtype, shape and bytes; for
    when the caller gives no image_hashes (on every image request's way in)."""
    rows = image_embeds.detach().to("cpu").contiguous()
    # (flat first: a tensor of 0 rows has strides no byte view takes)
    return content_key(f"image rows {rows.dtype}{tuple(rows.shape)}", rows.reshape(-1).view(torch.uint8).numpy())


def _image_keys(request: Request) -> list[bytes]:
    """Prefix-cache keys of the request's images: the given hashes, or one hash of all the rows."""
    if request.image_embeds is None:
        return []
    if request.image_hashes:
        return [hashlib.blake2b(h if isinstance(h, bytes) else h.encode(), digest_size=16).digest()
                for h in request.image_hashes]
    return [image_content_key(request.image_embeds)]


class LLMEngine:
    def __init__(self, runner, tokenizer=None, *, eos_token_id: int | None = None,
                 image_context_token_id: int | None = None, scheduler_config: SchedulerConfig | None = None,
                 detokenize: bool = True):
        """runner: a ModelRunner (or any object with its interface); tokenizer: decode(ids,
        skip_special_tokens=True) for text deltas (None: token ids only). eos_token_id (default: the
        runner's config, 2 '</s>') ends a request whose SamplingParams.stop_token_ids is None (the serving
        path always gives the template's); image_context_token_id defaults to the tokenizer's '<IMG_CONTEXT>'.
        detokenize=False: token ids only even with a tokenizer (no text deltas, no stop strings; stop
        tokens and length still end a request): the caller detokenizes off the engine thread with the same
        stopping.AnswerText (new_answer_text) and aborts a request whose text hits a stop string
        (abort(id, "stop"); serving/llm.py)."""
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id if eos_token_id is not None else getattr(runner, "eos_token_id", None)
        # the engine's end tokens (a request without its own stop_token_ids ends on them; stopping.py), and
        # the sampler masks them below a request's min_tokens
        self.end_token_ids = () if self.eos_token_id is None else (self.eos_token_id,)
        runner.end_token_ids = self.end_token_ids
        self.image_context_token_id = (image_context_token_id if image_context_token_id is not None
                                       else _image_context_id(tokenizer))
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self.allocator = BlockAllocator(runner.num_blocks, runner.block_size)
        self.scheduler = Scheduler(self.scheduler_config, self.allocator)
        self.max_model_len = min(runner.context_window, runner.num_blocks * runner.block_size)
        self._stops: dict[str, StopChecker] = {}
        self._texts: dict[str, AnswerText] = {}  # detokenize=True only
        self.detokenize = detokenize
        overlap = self.scheduler_config.async_scheduling
        if overlap is None:
            overlap = getattr(getattr(runner, "device", None), "type", "cpu") == "cuda"
        self.async_scheduling = bool(overlap) and hasattr(runner, "launch")
        self._inflight = None  # (batch, future) of the launched step whose tokens are not processed yet
        # counters for the metrics (read from other threads: each one float or int): steps launched, and
        # seconds the host waited for a step's tokens (the device still computing it)
        self.num_steps = 0
        self.device_wait_s = 0.0

    # -- requests ----------------------------------------------------------------------------------
    def request_limits(self) -> dict:
        """Request.validate's arguments for this engine (also what an engine in another process reports,
        so that its caller checks requests as the engine would)."""
        runner = self.runner
        return {"image_context_token_id": self.image_context_token_id, "vocab_size": runner.vocab_size,
                "hidden_size": runner.hidden_size, "context_window": runner.context_window,
                "cache_capacity": runner.num_blocks * runner.block_size,
                "max_abs_embed": torch.finfo(runner.dtype).max}

    def validate_request(self, request: Request):
        """Raise InvalidRequest if the engine cannot run `request` (no state changes; thread-safe)."""
        if not isinstance(request, Request):
            raise InvalidRequest(f"expected a Request, got {type(request).__name__}")
        positions = request.validate(**self.request_limits())
        if request.sampling.stop and self.tokenizer is None:
            raise InvalidRequest("stop strings need a tokenizer; this engine has none")
        return positions

    def add_request(self, request: Request, positions=None) -> None:
        """positions: what validate_request(request) returned, when the caller already checked it (the
        check of image rows reads all of them: EngineThread does it at submit, off the engine thread)."""
        if positions is None:
            positions = self.validate_request(request)
        if request.request_id in self._stops:
            raise InvalidRequest(f"request_id {request.request_id!r} is already running")
        keys = _image_keys(request) if self.scheduler_config.enable_prefix_caching else []
        if request.image_embeds is not None and not keys:
            keys = [request.request_id.encode()]  # prefix caching off: any unique key
        seq = Sequence(request, block_size=self.runner.block_size, max_len=self.max_model_len,
                       image_positions=positions, image_keys=keys)
        self.scheduler.add(seq)
        self._stops[request.request_id] = StopChecker(request.sampling, default_stop_token_ids=self.end_token_ids)
        text = self.new_answer_text(request.sampling) if self.detokenize else None
        if text is not None:
            self._texts[request.request_id] = text

    def new_answer_text(self, sampling) -> AnswerText | None:
        """The text half of one request's end (stopping.AnswerText; None without a tokenizer): the
        engine's own with detokenize=True, the response path's with detokenize=False."""
        return None if self.tokenizer is None else AnswerText(self.tokenizer, sampling)

    def abort(self, request_id: str, reason: FinishReason = "abort") -> None:
        """Finish the request at the next step (its blocks are freed then) with `reason`: 'abort', or
        'stop' when the caller found a stop string in its text (detokenize=False)."""
        self.scheduler.abort(request_id, reason)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    # -- one step ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs = [] if self._can_overlap() else self.finish_inflight()
        batch = self.scheduler.schedule()
        outputs += [self._final_output(seq, seq.finish_reason) for seq in batch.aborted]
        launched = None
        if batch.seqs:
            prev = self._inflight[1] if self._inflight is not None else None
            try:
                launched = (batch, self.runner.launch(batch, prev))
            except Exception as e:  # fail this batch's requests, keep the engine alive
                outputs += self._fail_batch(batch, e)
            else:
                self.scheduler.advance(batch)
                self.num_steps += 1
        if self._inflight is not None:
            outputs += self._process(*self._inflight)
        self._inflight = None
        if launched is not None:
            if self.async_scheduling:
                self._inflight = launched
            else:
                outputs += self._process(*launched)
        return outputs

    def finish_inflight(self) -> list[RequestOutput]:
        """Wait for the launched step and process its tokens (nothing when none is in flight)."""
        if self._inflight is None:
            return []
        inflight, self._inflight = self._inflight, None
        return self._process(*inflight)

    def next_step_decodes_only(self) -> bool:
        """Whether the next step would only decode: requests are running, none waits to be admitted and
        every running one has its prompt computed (no request's first token is in it)."""
        running = self.scheduler.running
        return (bool(running) and not self.scheduler.waiting
                and all(seq.num_tokens - seq.num_computed_tokens <= 1 for seq in running))

    def _can_overlap(self) -> bool:
        """Whether the next step may be built before the running one's tokens are on the host."""
        if not self.async_scheduling or not getattr(self.runner, "supports_overlap", True):
            return False
        return not any(seq.sampling.repetition_penalty != 1.0 for seq in self.scheduler.running)

    def _fail_batch(self, batch, e: Exception) -> list[RequestOutput]:
        log.exception("engine step failed")
        error = f"{type(e).__name__}: {e}"
        outputs = []
        for s in batch.seqs:
            if not s.seq.is_finished:
                self.scheduler.finish(s.seq, "abort")
                outputs.append(self._final_output(s.seq, "abort", error=error))
        return outputs

    def _process(self, batch, future) -> list[RequestOutput]:
        """The tokens of a launched step (waits for it): resolve each pending token, check the stops."""
        waited = time.perf_counter()
        try:
            sampled = future.result()
        except Exception as e:  # a device error surfaces here
            return self._fail_batch(batch, e)
        finally:
            self.device_wait_s += time.perf_counter() - waited
        outputs = []
        for s, token in zip(batch.seqs, sampled, strict=True):
            if token is None or s.seq.is_finished:
                continue  # finished after this step was launched: the token is never emitted
            s.seq.resolve_pending(token)
            outputs.append(self._on_token(s.seq, token))
            if not s.seq.is_finished:
                # a block completed by a token that ends the sequence is not cached (as without overlap:
                # that token's KV is written only by the step launched after it, then dropped)
                self.scheduler.register_blocks(s.seq)
        return outputs

    def _on_token(self, seq: Sequence, token: int) -> RequestOutput:
        reason = self._stops[seq.request_id].check(token, at_limit=seq.num_output_tokens >= seq.max_output_tokens)
        delta, text = "", self._texts.get(seq.request_id)
        if text is not None:
            delta, reason = text.update([token], reason)
        if reason is not None:
            self._finish(seq, reason)
        return RequestOutput(seq.request_id, [token], delta, reason is not None, reason, seq.prompt_len,
                             seq.num_output_tokens, seq.num_cached_tokens, first_scheduled=seq.first_scheduled)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.finish(seq, reason)
        self.runner.release(seq.request_id)
        self._stops.pop(seq.request_id, None)
        self._texts.pop(seq.request_id, None)

    def _final_output(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> RequestOutput:
        self.runner.release(seq.request_id)
        self._stops.pop(seq.request_id, None)
        self._texts.pop(seq.request_id, None)
        return RequestOutput(seq.request_id, [], "", True, reason, seq.prompt_len, seq.num_output_tokens,
                             seq.num_cached_tokens, error)

    def fail_all(self, error: str) -> list[RequestOutput]:
        """Finish every request with an error (after an unexpected failure, or at shutdown)."""
        self._inflight = None
        outputs = []
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self.scheduler.finish(seq, "abort")
            outputs.append(self._final_output(seq, "abort", error=error))
        return outputs

    # -- conveniences ------------------------------------------------------------------------------
    def generate(self, requests: list[Request]) -> dict[str, list[RequestOutput]]:
        """Run requests to completion (tests, offline use); outputs per request id."""
        results: dict[str, list[RequestOutput]] = {r.request_id: [] for r in requests}
        for r in requests:
            self.add_request(r)
        while self.has_unfinished():
            for out in self.step():
                results.setdefault(out.request_id, []).append(out)
        return results

    def stats(self) -> dict:
        a = self.allocator
        return {"num_running": self.scheduler.num_running, "num_waiting": self.scheduler.num_waiting,
                "num_free_blocks": a.num_free, "num_blocks": a.num_blocks, "num_cached_blocks": a.num_cached,
                "prefix_cache_queries": a.prefix_queries, "prefix_cache_hits": a.prefix_hits,
                "num_preemptions": self.scheduler.num_preemptions}


Callback = Callable[[RequestOutput], None]


class RequestCallbacks:
    """The output callbacks of accepted, unfinished requests (EngineThread's, and the engine process's
    stub side: serving/engine_process.py). admit() refuses a request id that is running and one past
    max_pending (EngineBusy: a burst far above capacity gets a clear error, not an unbounded queue);
    deliver() hands each output to its callback and forgets a request at its finished output; fail_all()
    ends every request still here with an error output. Thread-safe; callbacks run outside the lock."""

    def __init__(self, max_pending: int | None = None):
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._callbacks: dict[str, Callback] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._callbacks)

    def admit(self, request_id: str, callback: Callback) -> None:
        with self._lock:
            if request_id in self._callbacks:
                raise InvalidRequest(f"request_id {request_id!r} is already running")
            if self.max_pending is not None and len(self._callbacks) >= self.max_pending:
                raise EngineBusy(f"the server is busy: {len(self._callbacks)} requests are already running or "
                                 f"queued (max_pending_requests {self.max_pending}); retry later")
            self._callbacks[request_id] = callback

    def forget(self, request_id: str) -> bool:
        """Drop a request's callback without calling it; False when it was no longer here (delivered)."""
        with self._lock:
            return self._callbacks.pop(request_id, None) is not None

    def deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            with self._lock:
                callback = (self._callbacks.pop(out.request_id, None) if out.finished
                            else self._callbacks.get(out.request_id))
            if callback is not None:
                _call(callback, out)

    def fail_all(self, error: str) -> None:
        with self._lock:
            leftover, self._callbacks = list(self._callbacks.items()), {}
        for request_id, callback in leftover:
            _call(callback, RequestOutput(request_id, [], "", True, "abort", 0, 0, 0, error))


def _call(callback: Callback, output: RequestOutput) -> None:
    try:
        callback(output)
    except Exception:
        log.exception("callback of request %s raised", output.request_id)


class EngineThread:
    """A background thread that owns `engine`. submit()/abort() may be called from any thread;
    callbacks run on the engine thread (keep them short: hand the output to a queue or a sender).

    Encoder priority (encoder_busy, a check that a vision encoder on the engine's GPU runs a forward now:
    serving/encoder_activity.py): after each step, while the encoder runs and the next step would only
    decode, the thread finishes the step in flight, delivers its tokens and holds the next one back,
    until the encoder is done, new work comes in, or encoder_priority_s pass. A step with a prefill in it
    (a new request's first token) is never held. The hold ends when encoder_busy() turns false; it is
    read every ENCODER_POLL_S (another process sets it, so there is nothing to wait on)."""

    ENCODER_POLL_S = 0.0005

    def __init__(self, engine: LLMEngine, *, name: str = "llm-engine", start: bool = True,
                 max_pending: int | None = None, encoder_busy: Callable[[], bool] | None = None,
                 encoder_priority_s: float = 0.0):
        # max_pending: unfinished requests (running + waiting) at most (RequestCallbacks.admit)
        self.engine = engine
        self._encoder_busy = encoder_busy if encoder_priority_s > 0 else None
        self.encoder_priority_s = encoder_priority_s
        self.encoder_wait_s = 0.0  # steps held back for the encoder, in all (a counter for the metrics)
        # seconds the thread worked (admitting, stepping, delivering), in all: with engine.device_wait_s,
        # the share of it spent waiting for the device (near 1: the GPU sets the pace; low: the host does)
        self.busy_s = 0.0
        self._cv = threading.Condition()
        self._inbox: list[tuple[Request, np.ndarray]] = []  # with the prompt's image positions
        self._aborts: list[tuple[str, FinishReason]] = []
        self._callbacks = RequestCallbacks(max_pending)  # accepted and not yet finished
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        if start:
            self._thread.start()

    def submit(self, request: Request, callback: Callback, positions: np.ndarray | None = None) -> None:
        """Queue a request; raises InvalidRequest at once for one the engine refuses. positions: what
        validate_request(request) returned, when the caller checked it already (the engine process's stub)."""
        if positions is None:
            positions = self.engine.validate_request(request)
        if (request.image_embeds is not None and request.image_hashes is None
                and self.engine.scheduler_config.enable_prefix_caching):
            request.image_hashes = (image_content_key(request.image_embeds),)  # hashed here, off the engine thread
        with self._cv:
            if self._stopping:
                raise EngineError("the engine is shut down")
            self._callbacks.admit(request.request_id, callback)
            self._inbox.append((request, positions))
            self._cv.notify()

    def abort(self, request_id: str, reason: FinishReason = "abort") -> None:
        with self._cv:
            self._aborts.append((request_id, reason))
            self._cv.notify()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the thread; every unfinished request gets a final output with an error."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def num_unfinished(self) -> int:
        return len(self._callbacks)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        self._callbacks.deliver(outputs)

    def _outside_the_model(self, call: Callable[[], list[RequestOutput]]) -> list[RequestOutput]:
        """call() (a step, or finishing one); a bug outside the runner fails everyone, the thread goes on."""
        try:
            return call()
        except Exception as e:
            log.exception("engine step failed outside the model")
            return self.engine.fail_all(f"{type(e).__name__}: {e}")

    def _give_way_to_encoder(self) -> None:
        engine = self.engine
        if not engine.next_step_decodes_only() or not self._encoder_busy():
            return
        start = time.monotonic()
        self._deliver(self._outside_the_model(engine.finish_inflight))
        # the step just finished may have ended every request (only this thread changes the engine)
        if not engine.next_step_decodes_only():
            return
        deadline, held = start + self.encoder_priority_s, time.monotonic()
        while (self._encoder_busy() and time.monotonic() < deadline
               and not (self._inbox or self._aborts or self._stopping)):
            time.sleep(self.ENCODER_POLL_S)
        self.encoder_wait_s += time.monotonic() - held

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cv:
                while not (self._inbox or self._aborts or self._stopping or engine.has_unfinished()):
                    self._cv.wait()
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
                stopping = self._stopping
            if stopping:
                break
            started = time.perf_counter()
            failed = []
            for request, positions in inbox:
                try:
                    engine.add_request(request, positions)
                except Exception as e:
                    failed.append(RequestOutput(request.request_id, [], "", True, "abort",
                                                len(request.prompt_token_ids), 0, 0, f"{type(e).__name__}: {e}"))
            self._deliver(failed)
            for request_id, reason in aborts:
                engine.abort(request_id, reason)
            self._deliver(self._outside_the_model(engine.step))
            if self._encoder_busy is not None:
                held = self.encoder_wait_s
                self._give_way_to_encoder()
                started += self.encoder_wait_s - held  # a hold for the encoder is not work
            self.busy_s += time.perf_counter() - started
        # shutdown: everyone still here finishes with an error
        outputs = engine.fail_all("EngineError: the engine shut down")
        self._deliver(outputs)
        with self._cv:
            self._inbox = []
        self._callbacks.fail_all("EngineError: the engine shut down")
