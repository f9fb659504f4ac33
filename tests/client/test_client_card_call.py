"""The sync and asyncio SDKs take the card's arguments through one builder (card_call.py), with one
signature: build_request's (no server: the methods' signatures and the requests they build)."""

import inspect

import pytest

from internvl_client import AsyncClient, Client
from internvl_client.card_call import CARD_SIGNATURE, card_request
from internvl_client.request import build_request

CARD_METHODS = ("chat", "generate", "stream", "stream_chunks")


@pytest.mark.parametrize("cls", [Client, AsyncClient])
@pytest.mark.parametrize("name", CARD_METHODS)
def test_every_card_method_has_build_requests_arguments(cls, name):
    parameters = list(inspect.signature(getattr(cls, name)).parameters.values())
    assert [p.name for p in parameters] == ["self", *inspect.signature(build_request).parameters]
    assert parameters[1:] == list(CARD_SIGNATURE.parameters.values())
    defaults = {p.name: p.default for p in parameters[1:]}
    assert defaults == {name: p.default for name, p in inspect.signature(build_request).parameters.items()}
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in parameters)


def test_async_methods_stay_coroutines_and_streams_stay_plain_calls():
    assert inspect.iscoroutinefunction(AsyncClient.chat) and inspect.iscoroutinefunction(AsyncClient.generate)
    assert not inspect.iscoroutinefunction(AsyncClient.stream)
    assert not inspect.iscoroutinefunction(AsyncClient.stream_chunks)
    assert not any(inspect.iscoroutinefunction(getattr(Client, name)) for name in CARD_METHODS)


def test_positional_card_arguments_build_the_keyword_request():
    by_position = card_request("What?", None, b"mp4", [("q", "a")], None, dict(max_new_tokens=3), 4)
    by_name = build_request("What?", video=b"mp4", history=[("q", "a")], generation_config=dict(max_new_tokens=3),
                            num_segments=4)
    assert by_position == by_name
    assert by_position.num_segments == 4 and by_position.generation == {"max_tokens": 3}


def test_bad_card_calls_fail_before_anything_is_sent():
    client = Client("127.0.0.1:1")  # nothing listens there: nothing may be attempted
    with pytest.raises(TypeError, match="question"):
        client.stream()
    with pytest.raises(TypeError, match="too many positional arguments"):
        client.stream("q", None, None, None, None, None, 8, "extra")
    with pytest.raises(TypeError, match="colour"):
        client.stream_chunks("q", colour="red")
    with pytest.raises(ValueError, match="generation_config key 'max_length'"):
        client.stream("q", generation_config=dict(max_length=3))
    client.close()
