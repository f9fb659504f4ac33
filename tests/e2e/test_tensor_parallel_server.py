"""The ensemble with the LLM split over two tensor-parallel ranks on the CPU (gloo), served by a real
tritonserver: the llm model's stub is rank 0 and starts rank 1 as its child process. Answers must be
exactly the model card's chat (the same oracle as test_ensemble.py), also for concurrent streams."""
from __future__ import annotations

import pytest

from internvl_serve.serving.launcher import TritonServer
from internvl_serve.serving.layout import Layout
from test_ensemble import assert_concurrent_answers, assert_text_and_image_answers, oracle  # noqa: F401  (oracle is a fixture)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("triton-tp") / "server.log"
    with TritonServer(tiny_checkpoint, log_file=log, exit_timeout_s=5, ready_timeout_s=300,
                      layout=Layout(tensor_parallel_size=2)) as s:
        yield s


def test_the_llm_runs_on_two_ranks(server):
    log = server.log_file.read_text()
    assert "tensor parallel: 2 ranks" in log, server.log_tail()


def test_text_and_image_answers_equal_the_card(server, oracle):  # noqa: F811
    assert_text_and_image_answers(server, oracle, 5)


def test_concurrent_streams_each_get_their_own_answer(server, oracle):  # noqa: F811
    assert_concurrent_answers(server, oracle)
