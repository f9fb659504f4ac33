"""The benchmark-only random-weights folder: real keys and shapes, drawn on load, decodable greedy ids."""
import torch

from internvl_serve.checkpoint import find_weights, load_state_dict
from internvl_serve.random_weights import make_random_checkpoint


def test_random_checkpoint_has_the_real_keys_and_loads_deterministically(tiny_checkpoint, tmp_path):
    folder = make_random_checkpoint(tmp_path / "rand", tokenizer_from=tiny_checkpoint)
    files = find_weights(folder)
    assert files.format == "random"
    assert "language_model.lm_head.weight" in files.weight_map and "mlp1.3.weight" in files.weight_map
    assert len(files.weight_map) == 48 * 13 + 4 + 6 + 40 * 9 + 3    # ViT blocks, ViT embeddings, mlp1, LLM
    a = load_state_dict(folder, prefixes=("mlp1.",), dtype="float32", progress=False)
    b = load_state_dict(folder, prefixes=("mlp1.",), dtype="float32", progress=False)
    assert a["mlp1.1.weight"].shape == (5120, 12800) and torch.equal(a["mlp1.1.weight"], b["mlp1.1.weight"])
    assert 0.019 < float(a["mlp1.1.weight"].std()) < 0.021
    assert torch.all(a["mlp1.0.weight"] == 1) and torch.all(a["mlp1.1.bias"] == 0)


def test_lm_head_rows_past_the_tokenizer_are_zero(tiny_checkpoint, tmp_path):
    from internvl_serve.random_weights import RandomShard
    from internvl_serve.tokenizer import load_tokenizer
    folder = make_random_checkpoint(tmp_path / "rand", tokenizer_from=tiny_checkpoint)
    n = len(load_tokenizer(folder))
    head = RandomShard(folder).make("language_model.lm_head.weight", torch.bfloat16, "cpu")
    assert head.shape == (41840, 5120)
    assert torch.all(head[n:] == 0) and head[:n].abs().sum() > 0


def test_the_random_model_never_picks_a_silent_first_token(tiny_checkpoint, tmp_path):
    """The ids that give the detokenizer no text to send as an answer's first token (special, whitespace,
    byte pieces) have zero lm_head rows, as the ids past the tokenizer do: greedy decoding, whose best
    logit is > 0, picks words, so a streamed answer starts at its first token, as a real model's does."""
    import json

    from internvl_serve.engine.sampling import SamplingParams
    from internvl_serve.engine.stopping import AnswerText
    from internvl_serve.random_weights import MARKER, RandomShard
    from internvl_serve.tokenizer import load_tokenizer
    folder = make_random_checkpoint(tmp_path / "rand", tokenizer_from=tiny_checkpoint)
    tokenizer = load_tokenizer(folder)
    silent = json.loads((folder / MARKER).read_text())["silent_ids"]
    assert 0 < len(silent) < len(tokenizer) // 2
    for i in range(len(tokenizer)):
        assert (i in silent) == (AnswerText(tokenizer, SamplingParams()).update([i], None)[0] == ""), i
    assert tokenizer.eos_token_id in silent and tokenizer.convert_tokens_to_ids("<0x80>") in silent
    head = RandomShard(folder).make("language_model.lm_head.weight", torch.float32, "cpu")
    assert torch.all(head[silent] == 0)
    spoken = sorted(set(range(len(tokenizer))) - set(silent))
    assert bool((head[spoken].abs().sum(dim=1) > 0).all())
