"""The card's generation_config words -> the ensemble's inputs (no server)."""

import warnings

import pytest

from internvl_client import to_contract_inputs


def test_none_and_empty_send_nothing():
    assert to_contract_inputs(None) == {}
    assert to_contract_inputs({}) == {}


def test_card_example_is_greedy():
    # The card: generation_config = dict(max_new_tokens=1024, do_sample=False)
    assert to_contract_inputs(dict(max_new_tokens=1024, do_sample=False)) == {"max_tokens": 1024, "temperature": 0.0}


def test_do_sample_defaults_temperature_to_one():
    assert to_contract_inputs(dict(do_sample=True)) == {"temperature": 1.0}


def test_sampling_keys_pass_through_with_do_sample():
    got = to_contract_inputs(dict(do_sample=True, temperature=0.7, top_p=0.9, top_k=40, seed=7))
    assert got == {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 7}


def test_sampling_keys_without_do_sample_are_ignored_with_a_warning():
    # transformers' generate: do_sample defaults to False, temperature/top_p are then ignored (it warns).
    with pytest.warns(UserWarning, match="greedy"):
        got = to_contract_inputs(dict(temperature=0.7, top_p=0.5))
    assert got == {"temperature": 0.0}


def test_repetition_penalty_applies_to_greedy_too():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = to_contract_inputs(dict(do_sample=False, repetition_penalty=1.1))
    assert got == {"temperature": 0.0, "repetition_penalty": 1.1}


def test_stop_and_stop_words():
    assert to_contract_inputs(dict(stop="###")) == {"stop_words": ["###"]}
    assert to_contract_inputs(dict(stop=["a", "b"])) == {"stop_words": ["a", "b"]}
    assert to_contract_inputs(dict(stop_words=("x",))) == {"stop_words": ["x"]}
    with pytest.raises(ValueError, match="not both"):
        to_contract_inputs(dict(stop="a", stop_words=["b"]))
    with pytest.raises(ValueError, match="non-empty"):
        to_contract_inputs(dict(stop=[""]))


def test_num_beams_one_is_accepted_more_is_refused():
    assert to_contract_inputs(dict(num_beams=1, max_new_tokens=8)) == {"max_tokens": 8}
    with pytest.raises(ValueError, match="beam search"):
        to_contract_inputs(dict(num_beams=5))


@pytest.mark.parametrize("key", ["max_length", "min_length", "eos_token_id", "temprature", "length_penalty"])
def test_unknown_keys_raise_naming_the_key(key):
    with pytest.raises(ValueError, match=repr(key)):
        to_contract_inputs({key: 1})


@pytest.mark.parametrize(
    "cfg, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
        (dict(max_new_tokens=True), "max_new_tokens"),
        (dict(do_sample="yes"), "do_sample"),
        (dict(do_sample=True, temperature=0), "temperature"),
        (dict(do_sample=True, temperature=float("nan")), "temperature"),
        (dict(do_sample=True, top_p=0.0), "top_p"),
        (dict(do_sample=True, top_p=1.5), "top_p"),
        (dict(do_sample=True, top_k=-1), "top_k"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(seed=-1), "seed"),
        (dict(seed=2**64), "seed"),
        (dict(ignore_eos="no"), "ignore_eos"),
    ],
)
def test_invalid_values_raise(cfg, match):
    with pytest.raises(ValueError, match=match):
        to_contract_inputs(cfg)


def test_integral_float_max_new_tokens_is_accepted():
    assert to_contract_inputs(dict(max_new_tokens=64.0)) == {"max_tokens": 64}


def test_min_new_tokens_is_the_contracts_min_length():
    assert to_contract_inputs(dict(min_new_tokens=5, max_new_tokens=8)) == {"min_length": 5, "max_tokens": 8}
    with pytest.raises(ValueError, match=r"generation_config\['min_new_tokens'\] must be in \[0, 2147483647\]"):
        to_contract_inputs(dict(min_new_tokens=-1))


def test_ignore_eos():
    assert to_contract_inputs(dict(ignore_eos=True)) == {"ignore_eos": True}
    assert to_contract_inputs(dict(ignore_eos=False)) == {}


def test_not_a_dict():
    with pytest.raises(TypeError):
        to_contract_inputs([("max_new_tokens", 3)])
