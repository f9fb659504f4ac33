"""Errors of the generation engine.

InvalidRequest: the caller sent something the engine refuses (bad sampling values, a prompt longer than
the context window, image rows that do not match the <IMG_CONTEXT> positions, ...); the message names the
field and what is allowed. EngineError: the engine failed a request it had accepted (a step raised, or
the engine shut down); it is reported through RequestOutput.error, never raised into the caller's thread.
EngineBusy: raised at submit when the engine already holds max_pending requests (a bounded queue).
"""
from __future__ import annotations


class InvalidRequest(ValueError):
    """A request the engine refuses; the message says which field and what is allowed. `field` names it
    (a SamplingParams field, e.g. "top_p") where one field is at fault, so callers map it back to their
    own names (serving/contract.py: to the input tensor) without reading the message."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class EngineError(RuntimeError):
    """The engine could not finish an accepted request (a failed step, a shutdown)."""


class EngineBusy(EngineError):
    """Refused at submit: the engine already holds its maximum of unfinished requests (retry later)."""
