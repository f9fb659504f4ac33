"""The card's call, declared once for every SDK method that takes it.

Owns: `card_request(question, images, video, history, num_patches_list, generation_config,
num_segments)`, the one builder behind `Client` and `AsyncClient`'s `chat`, `generate`, `stream` and
`stream_chunks`, and `takes_card_arguments`, the decorator that gives those eight methods the card's
signature. The arguments, their order and their defaults are `request.build_request`'s: this module
only lets them be passed by position too, as the card's `model.chat(tokenizer, pixel_values, question,
generation_config, ...)` callers are used to.
Does not own: what the arguments become (request.py builds and validates the `ChatRequest`,
generation.py maps the card's generation words), the transports (client.py, aio.py).

A decorated method is written for a prepared `ChatRequest`:

    @takes_card_arguments
    def stream(self, request: ChatRequest) -> ChatStream: ...

and is called with the card's arguments: `client.stream("What is it?", images=["cat.png"])`.
The request is built when the method is called (sync methods, and `AsyncClient.stream`, which returns
an async iterator) or when the coroutine runs (`async def` methods), as before this module existed.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from .request import ChatRequest, build_request

# build_request's parameters, passable by position as well (same names, order and defaults).
CARD_SIGNATURE = inspect.Signature(
    [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in inspect.signature(build_request).parameters.values()]
)

Method = TypeVar("Method", bound=Callable[..., Any])


def card_request(*args: Any, **kwargs: Any) -> ChatRequest:
    """The card's arguments (as `Client.chat` takes them) -> a validated ChatRequest."""
    bound = CARD_SIGNATURE.bind(*args, **kwargs)  # TypeError naming the argument, as a plain call would
    return build_request(**bound.arguments)


def takes_card_arguments(method: Method) -> Method:
    """`method(self, request)` -> `method(self, question, images=None, ..., num_segments=8)`."""
    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def call_async(self: Any, *args: Any, **kwargs: Any) -> Any:
            return await method(self, card_request(*args, **kwargs))

        wrapper: Callable[..., Any] = call_async
    else:

        @functools.wraps(method)
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            return method(self, card_request(*args, **kwargs))

        wrapper = call
    self_parameter = next(iter(inspect.signature(method).parameters.values()))
    wrapper.__signature__ = CARD_SIGNATURE.replace(  # type: ignore[attr-defined]  # help() shows the card's call
        parameters=[self_parameter, *CARD_SIGNATURE.parameters.values()],
        return_annotation=inspect.signature(method).return_annotation,
    )
    return wrapper  # type: ignore[return-value]
