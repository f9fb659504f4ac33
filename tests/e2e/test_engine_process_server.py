"""The ensemble with the llm engine in a process of its own (`--llm-param engine_process=true`,
serving/engine_process.py), served by a real tritonserver: the llm stub starts the engine process, answers
are exactly the model card's chat (the same oracle as test_ensemble.py), also for concurrent streams; a
cancel on the side channel aborts the generation in the engine process; the engine's metrics come from it."""
from __future__ import annotations

import re
import pytest

from e2e_client import metric, wait_for
from internvl_serve.serving.launcher import TritonServer
from internvl_serve.serving.layout import Layout
from test_ensemble import (ask, assert_answer, assert_concurrent_answers, assert_text_and_image_answers,  # noqa: F401
                           cancel_on_the_side_channel, oracle, start_and_cancel)  # (oracle is a fixture)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("triton-engine-process") / "server.log"
    with TritonServer(tiny_checkpoint, log_file=log, exit_timeout_s=5, ready_timeout_s=300,
                      layout=Layout(llm_parameters={"engine_process": "true"})) as s:
        yield s


def test_the_engine_runs_in_its_own_process(server):
    found = re.search(r"engine: its own process \(pid (\d+)\)", server.log_file.read_text())
    assert found, server.log_tail()
    assert int(found.group(1)) not in server.stub_processes()  # not the llm stub itself


def test_text_and_image_answers_equal_the_card(server, oracle):  # noqa: F811
    assert_text_and_image_answers(server, oracle, 6)


def test_concurrent_streams_each_get_their_own_answer(server, oracle):  # noqa: F811
    assert_concurrent_answers(server, oracle)


def test_the_cancel_side_channel_aborts_a_generation_in_the_engine_process(server):
    start_and_cancel(server, "ep-cancelled", max_tokens=1000, direct=True)
    assert cancel_on_the_side_channel(server, "ep-cancelled") == "cancelled"
    wait_for(server, lambda: re.search(r"request ep-cancelled#\d+ cancelled by the client", server.log_tail(400))
             is not None, timeout_s=120, what="the llm model to log the abort")
    # the engine process freed its blocks: the KV gauge it reports returns to 0
    wait_for(server, lambda: metric(server, "internvl_kv_cache_blocks_used") == 0, timeout_s=120,
             what="the KV blocks to be free")


def test_the_engine_counters_come_from_the_engine_process(server, oracle):  # noqa: F811
    assert_answer(ask(server, "Count the steps."), oracle("Count the steps."))
    wait_for(server, lambda: (metric(server, "internvl_engine_steps_total") or 0) > 0, timeout_s=120,
             what="the engine's step counter")
    assert (metric(server, "internvl_kv_cache_blocks_total") or 0) > 0
