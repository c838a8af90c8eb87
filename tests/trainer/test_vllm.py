"""dqo.sample --engine vllm: the conversion of vLLM's outputs to rows and the sampling
parameters, against a stand-in ``vllm`` module (vLLM needs a GPU; the real run is a device
check)."""
import sys
import types
from types import SimpleNamespace as NS

import pytest

from dqo.decoding import DecodingConfig
from dqo.generation import label_samples
from dqo.tokenizer import char_tokenizer


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.SamplingParams = lambda **kw: NS(**kw)
    mod.TokensPrompt = lambda **kw: dict(kw)
    calls = []

    class LLM:
        def __init__(self, **kw):
            self.kw = kw

        def get_tokenizer(self):
            return char_tokenizer()

        def generate(self, prompts, params, use_tqdm=False):
            calls.append((prompts, params))
            return [NS(outputs=[completion([7, 8, 2], "stop"), completion([7, 8, 9, 10],
                                                                          "length")])
                    for _ in prompts]

    mod.LLM = LLM
    monkeypatch.setitem(sys.modules, "vllm", mod)
    return calls


def completion(ids, reason):
    return NS(token_ids=ids, finish_reason=reason,
              logprobs=[{t: NS(logprob=-0.1 * (i + 1)), 99: NS(logprob=-9.0)}
                        for i, t in enumerate(ids)])


def test_sampling_params_are_explicit_and_temperature_one_only(fake_vllm):
    from dqo.generation.vllm import sampling_params
    d = DecodingConfig(max_new_tokens=12, stop_ids=[2, 5])
    p = sampling_params(d, n=4, greedy=False)
    assert (p.n, p.temperature, p.top_p, p.top_k, p.max_tokens, p.stop_token_ids, p.logprobs,
            p.repetition_penalty) == (4, 1.0, 0.9, 16, 12, [2, 5], 0, 1.0)
    g = sampling_params(d, n=1, greedy=True)
    assert (g.temperature, g.top_p, g.top_k) == (0.0, 1.0, -1)
    assert sampling_params(DecodingConfig(top_k=0, stop_ids=[2]), 1, False).top_k == -1
    assert p.min_p == 0.0  # off unless asked for
    assert sampling_params(DecodingConfig(min_p=0.01, stop_ids=[2]), 1, False).min_p == 0.01
    assert sampling_params(DecodingConfig(min_p=0.01, stop_ids=[2]), 1, True).min_p == 0.0
    with pytest.raises(ValueError, match="temperature 1 only, got 0.7"):
        sampling_params(DecodingConfig(temperature=0.7, stop_ids=[2]), 1, False)


def test_vllm_outputs_become_the_hf_engines_rows(fake_vllm, tmp_path):
    from transformers import GenerationConfig

    from dqo.generation import generate
    from dqo.generation.vllm import VLLMEngine
    tok = char_tokenizer()
    GenerationConfig(eos_token_id=[tok.eos_token_id, 11]).save_pretrained(tmp_path)
    engine = VLLMEngine(str(tmp_path))
    assert engine.llm.kw["generation_config"] == "vllm"  # the checkpoint's defaults stay out
    (done, cut), = generate(engine, tok, ["1+2=?"], n=2, decoding=DecodingConfig(
        max_new_tokens=4))
    (prompts, params), = fake_vllm
    assert prompts[0]["prompt_token_ids"] == tok("1+2=?", add_special_tokens=False)["input_ids"]
    assert params.stop_token_ids == [tok.eos_token_id, 11]  # with the generation config's
    assert done.ids == [7, 8, 2] and done.finished and done.logp == pytest.approx([-.1, -.2, -.3])
    assert done.text == tok.decode([7, 8])  # the stop token is kept in the ids, not the text
    assert cut.ids == [7, 8, 9, 10] and not cut.finished and len(cut.logp) == 4
    rows = label_samples(["1+2=?"], ["3"], [[done, cut]], lambda t, a: [True] * len(t))
    assert [(r["finished"], r["reward"]) for r in rows] == [(True, 1.0), (False, 0.0)]
    assert all(len(r["response_ids"]) == len(r["behavior_logp"]) for r in rows)
