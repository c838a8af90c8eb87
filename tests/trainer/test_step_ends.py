"""Step ends (where process rewards go) on the tokenizers of real models, built locally: the
end of every step is the token that completes its last character, from the tokenizer's offsets
(fast tokenizers) or from decoding growing prefixes (slow ones, sampled ids)."""
import json

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from dqo import data as D
from dqo.data.tokenize import _offset_ends

CORPUS = ["The cat sat on the mat, so 2 + 3 = 5 and 12 * 4 = 48.",
          "Hello world, the answer follows.\n#### 42", "Step 1: add the numbers\nStep 2: done",
          "We compute x = 3 then y = x + 1 = 4.\n\n#### 4"] * 20

ASCII_STEPS = ["The cat sat on the mat", "so 2 + 3 = 5", "", "  and 12 * 4 = 48 ", "#### 48"]
UNICODE_STEPS = ["Hello world, café au lait", "中文 is two characters 🙂 here", "",
                 "naïve ½ = 0.5", "#### 0.5"]


def _fast(tok: Tokenizer):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def sentencepiece_style():
    """Llama-2 / Mistral style: Metaspace pieces, a decoder that strips the leading space."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200,
                                                        special_tokens=["<unk>"]))
    return _fast(tok)


def byte_level():
    """Qwen / Llama-3 style: byte-level BPE, so a character outside its merges is several
    tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return _fast(tok)


def gemma_style():
    """Gemma style: SentencePiece BPE on the text with spaces as ▁ (no dummy prefix, no
    pre-tokenizer), byte fallback (<0xNN> tokens) for characters outside the vocabulary."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200,
                                                        special_tokens=["<unk>"]))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    return _fast(tok)


class Slow:
    """A tokenizer seen as a slow one (no offsets): the prefix-decoding path."""
    is_fast = False

    def __init__(self, tok):
        self.tok = tok

    def decode(self, *args, **kwargs):
        return self.tok.decode(*args, **kwargs)


def completing_token(tok, ids, text: str) -> int:
    """The first token whose decoded prefix holds all of ``text``: the one that completes
    ``text``'s last character."""
    return next(k for k in range(len(ids))
                if tok.decode(ids[:k + 1], skip_special_tokens=True).startswith(text))


@pytest.mark.parametrize("build,steps", [(sentencepiece_style, ASCII_STEPS),
                                         (byte_level, UNICODE_STEPS),
                                         (gemma_style, UNICODE_STEPS)])
@pytest.mark.parametrize("path", ["offsets", "prefix decoding"])
def test_step_ends_are_the_tokens_holding_each_steps_last_character(build, steps, path):
    tok = build()
    text = "\n".join(steps)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # the tokenizer round-trips the text: a fair test
    if build is not sentencepiece_style:  # the non-ASCII characters are split over tokens
        assert len(ids) > len(tok(text.encode("ascii", "ignore").decode(),
                                  add_special_tokens=False)["input_ids"])
    if path == "offsets":  # the tokenizer's own offsets are what is read
        assert _offset_ends(tok, text, ids) is not None
    ends = D.step_end_tokens(tok if path == "offsets" else Slow(tok), steps, ids)
    expected = [completing_token(tok, ids, "\n".join(steps[:i + 1])) if i else
                (completing_token(tok, ids, steps[0]) if steps[0] else 0)
                for i in range(len(steps))]
    assert ends == expected
    assert ends[-1] == len(ids) - 1
    for i, (s, e) in enumerate(zip(steps, ends)):  # each end token's text ends the step
        if s:
            assert tok.decode(ids[:e + 1]).endswith(s[-1]), (i, s, e)


def test_step_ends_of_sampled_ids_that_the_text_does_not_encode_to():
    """Ids that re-encoding the text does not give (a sampler's split): prefix decoding."""
    tok = byte_level()
    steps = ["the", "cat"]
    ids = [tok.convert_tokens_to_ids(c) for c in "the"] + tok("\ncat", add_special_tokens=False)[
        "input_ids"]
    assert ids != tok("the\ncat", add_special_tokens=False)["input_ids"]
    assert D.step_end_tokens(tok, steps, ids) == [2, len(ids) - 1]
