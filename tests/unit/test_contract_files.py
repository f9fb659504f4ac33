"""The generation inputs are declared once (contract.GENERATION); every other copy is generated from the
declaration or checked against it here, so a consumer that drifts fails this file:
config.pbtxt input lists and ensemble maps, README / docs tables, the SDK's generated contract_inputs.py
(its request builder, card words and CLI flags), the gateway's OpenAI fields, the Node client's tensors,
and the engine's SamplingParams ranges and defaults."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

from internvl_serve.engine import InvalidRequest, SamplingParams
from internvl_serve.serving import contract as c
from internvl_serve.serving import contract_files
from internvl_serve.serving.parsing import parse_generation_request

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_VALUES = {"INT32": 3, "UINT64": 2**63 + 5, "FP32": 0.5, "BOOL": True}


def test_generated_files_equal_the_declaration():
    assert contract_files.stale_files() == [], f"run {contract_files.WRITE_COMMAND}"


def test_a_new_declared_input_makes_every_generated_copy_stale(monkeypatch):
    """The check can fail: one more declared input changes every generated file."""
    extra = c.GenerationInput("extra_knob", "INT32", 0, "a knob", openai="extra_knob", card="extra_knob")
    monkeypatch.setattr(c, "GENERATION", c.GENERATION + (extra,))
    monkeypatch.setattr(c, "GENERATION_INPUTS", c.GENERATION_INPUTS + extra.specs())
    monkeypatch.setattr(c, "ENSEMBLE_INPUTS", c.ENSEMBLE_INPUTS + extra.specs())
    assert sorted(contract_files.stale_files()) == sorted(contract_files.expected_files())


def test_the_configs_declare_every_generation_input_to_both_steps():
    text = (ROOT / "model_repository/internvl_chat/config.pbtxt").read_text()
    for spec in c.GENERATION_INPUTS:
        assert text.count(f'input_map {{ key: "{spec.name}" value: "{spec.name}" }}') == 2, spec.name
    for path in contract_files.CONFIG_BLOCKS:
        text = (ROOT / path).read_text()
        for spec in c.GENERATION_INPUTS:
            assert f'{{ name: "{spec.name}" data_type: {spec.config_type} ' in text, (path, spec.name)


# ---- the engine enforces the declared ranges and defaults ----------------------------------------------


def _params(g: c.GenerationInput, value) -> SamplingParams:
    kwargs = {g.field: value}
    if g.field == "min_tokens":
        kwargs["max_tokens"] = c.INT32_MAX  # min_tokens <= max_tokens
    return SamplingParams(**kwargs)


@pytest.mark.parametrize("g", [g for g in c.GENERATION if g.field], ids=lambda g: g.name)
def test_sampling_params_agree_with_the_declaration(g):
    default = SamplingParams()
    assert getattr(default, g.field) == g.default  # the same default on both sides
    if g.low is None and g.high is None:
        return
    step = 1 if g.datatype in ("INT32", "UINT64") else 1e-3
    if g.low_open:
        with pytest.raises(InvalidRequest) as e:
            _params(g, type(g.default)(g.low)).validate()
        assert e.value.field == g.field
    else:
        _params(g, type(g.default)(g.low)).validate()
    with pytest.raises(InvalidRequest) as e:
        _params(g, type(g.default)(g.low - step)).validate()
    assert e.value.field == g.field
    if g.high is not None:
        _params(g, type(g.default)(g.high)).validate()
    if g.high is not None and g.high != c.INT32_MAX:  # INT32's own limit: the wire cannot carry more
        with pytest.raises(InvalidRequest) as e:
            _params(g, type(g.default)(g.high + step)).validate()
        assert e.value.field == g.field


def test_every_sampling_field_has_a_declared_input():
    declared = {g.field for g in c.GENERATION if g.field}
    assert {f.name for f in dataclasses.fields(SamplingParams)} == declared | set(c.SERVER_SET_SAMPLING_FIELDS)
    assert not declared & set(c.SERVER_SET_SAMPLING_FIELDS)


# ---- parsing: each input (and alias) fills its field; errors carry the input ------------------------


def _tensor(g: c.GenerationInput, value):
    if g.datatype == "BYTES":
        return np.array([value.encode()], dtype=object)
    return np.array([value], dtype={"INT32": np.int32, "UINT64": np.uint64, "FP32": np.float32,
                                    "BOOL": np.bool_}[g.datatype])


@pytest.mark.parametrize("g", c.GENERATION, ids=lambda g: g.name)
def test_each_declared_input_and_alias_fills_its_field(g):
    for spec in g.specs():
        if g.datatype == "BYTES":
            value, expected = ("", ()) if g.only_empty else ("END", ("END",))
        else:
            value = expected = not g.default if g.datatype == "BOOL" else SAMPLE_VALUES[g.datatype]
        inputs = {spec.name: _tensor(g, value)}
        if g.name == "min_length":
            inputs["max_tokens"] = np.array([8], np.int32)
        request = parse_generation_request(inputs)
        if g.field:
            assert getattr(request.sampling, g.field) == pytest.approx(expected), spec.name
        elif not g.only_empty:
            assert getattr(request, g.name) == expected


@pytest.mark.parametrize("g", [g for g in c.GENERATION if g.low is not None and g.datatype != "UINT64"],
                         ids=lambda g: g.name)
def test_an_out_of_range_value_is_refused_naming_the_input(g):
    for spec in g.specs():
        value = g.low if g.low_open else g.low - 1
        with pytest.raises(c.InvalidInput) as e:
            parse_generation_request({spec.name: _tensor(g, value)})
        assert e.value.input == spec.name and str(e.value).startswith(f"input '{spec.name}'")


def test_errors_name_the_tensor_the_client_sent():
    with pytest.raises(c.InvalidInput) as e:
        parse_generation_request({"min_length": _tensor(c.GENERATION_BY_NAME["min_length"], 9),
                                    "max_tokens": np.array([4], np.int32)})
    assert (e.value.input, str(e.value)) == ("min_length", "input 'min_length': min_length (9) must be <= "
                                                           "max_tokens (4)")
    with pytest.raises(c.InvalidInput) as e:
        parse_generation_request({"seed": np.array([1], np.uint64), "random_seed": np.array([2], np.uint64)})
    assert (e.value.input, str(e.value)) == ("random_seed", "inputs 'seed' and 'random_seed' are the same "
                                                            "setting: send one of them")


def test_tensorrt_llm_empty_word_lists_are_accepted_and_bad_words_refused():
    empty = np.array([b""], dtype=object)
    request = parse_generation_request({"bad_words": empty, "stop_words": empty})
    assert request.sampling.stop == ()
    assert parse_generation_request({"stop_words": np.array([b"", b"END"], dtype=object)}).sampling.stop == ("END",)
    with pytest.raises(c.InvalidInput) as e:
        parse_generation_request({"bad_words": np.array([b"", b"damn"], dtype=object)})
    assert e.value.input == "bad_words"
    assert str(e.value) == ("input 'bad_words' is not supported by this server: send it empty (\"\") or leave "
                            "it out; got ['damn']")


# ---- the clients -------------------------------------------------------------------------------------


def test_the_sdk_builds_every_declared_input_by_its_card_word():
    from internvl_client import contract_inputs
    from internvl_client.generation import to_contract_inputs

    assert contract_inputs.INPUTS == {s.name: s.datatype for s in c.ENSEMBLE_INPUTS}
    for g in c.GENERATION:
        if g.card in (None, "stop", "temperature", "top_p", "top_k"):
            continue
        value = True if g.datatype == "BOOL" else SAMPLE_VALUES[g.datatype]
        assert to_contract_inputs({g.card: value}) == {g.name: value}, g.card


def test_the_cli_has_a_flag_for_every_card_word():
    from internvl_client.cli import build_parser, generation_config_from_args

    parser = build_parser()
    flags = {o for action in parser._actions for o in action.option_strings}
    for g in c.GENERATION:
        if g.card:
            assert "--" + g.card.replace("_", "-") in flags, g.card
    args = parser.parse_args(["--min-new-tokens", "4", "--seed", "5", "--ignore-eos"])
    assert generation_config_from_args(args) == {"min_new_tokens": 4, "seed": 5, "ignore_eos": True,
                                                 "do_sample": False}


def test_the_gateway_translates_every_declared_openai_field():
    from internvl_gateway.translate import generation_inputs

    for g in c.GENERATION:
        if not g.openai:
            continue
        if g.datatype == "BYTES":
            value, expected = ["END"], ["END"]
        else:
            value = expected = True if g.datatype == "BOOL" else SAMPLE_VALUES[g.datatype]
        assert generation_inputs({g.openai: value}) == {g.name: expected}, g.openai


def test_the_node_client_sends_declared_inputs_with_their_types():
    source = (ROOT / "clients/node/chat.js").read_text()
    kinds = {"bytes": "BYTES", "int32": "INT32", "fp32": "FP32", "bool": "BOOL", "uint64": "UINT64"}
    sent = re.findall(r"\b(\w+)Tensor\('(\w+)'", source)
    assert {"text_input", "max_tokens", "stream"} <= {name for _, name in sent}
    declared = {s.name: s.datatype for s in (*c.ENSEMBLE_INPUTS, c.CANCEL)}  # CANCEL: the llm's side channel
    for kind, name in sent:
        assert declared.get(name) == kinds[kind], f"chat.js sends {name!r} as {kind}"


def test_the_grpc_guard_lets_a_request_with_every_input_through():
    from internvl_serve.serving.grpc_checks import GuardPolicy

    assert GuardPolicy().max_inputs >= len(c.ENSEMBLE_INPUTS)
