"""A tiny chat model on disk for the Trainer's tests and examples: a BPE tokenizer trained here
on a few sentences, with a ChatML chat template, and a Qwen2 model from a config (tied
embeddings by default). Nothing is downloaded. Two trainings of the tokenizer may break ties
between merges differently: tests read the saved one back."""
from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
CORPUS = ["What is 2 + 3? The answer is 5.", "What is 7 * 6? It is 42.",
          "You are a careful assistant. Answer briefly.", "system user assistant",
          "0 1 2 3 4 5 6 7 8 9 + - * = ? ."]


def chat_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    # an EOS that is not the end of turn (as Gemma's): a chat completion ends with the latter
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tiny_chat_model(path, *, tied: bool = True, hidden_size: int = 16, seed: int = 0):
    """Tokenizer and model saved in ``path``; returns the path."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = chat_tokenizer()
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        tie_word_embeddings=tied, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, max_position_embeddings=256))
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_model(tok, path, **kw):
    """A tiny random Llama policy (``dqo.modeling.tiny_config``'s options) for ``tok``, saved
    with it as a local model directory."""
    import torch

    from dqo.modeling import build_policy, tiny_config
    torch.manual_seed(0)
    build_policy(tiny_config(tok, **kw)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def train_tiny_run(tok, tmp, n_problems: int, *extra: str):
    """``python -m dqo.train`` for 2 steps on a tiny Llama saved in ``tmp/base``, with
    ``n_problems`` synthetic prompts (``tmp/prompts.jsonl``, with answers) and one response a
    prompt of alternating reward; ``extra``: more options. Returns (base, prompts, run)."""
    from dqo import data as D
    from dqo import train as train_cli
    from dqo.tasks import arithmetic

    base = save_model(tok, tmp / "base", hidden_size=16, layers=1, heads=1)
    probs = arithmetic.make_problems(n_problems, 9)
    prompts = tmp / "prompts.jsonl"
    D.write_jsonl(prompts, [dict(prompt=p.prompt, answer=p.answer) for p in probs])
    data = tmp / "data.jsonl"
    # mixed rewards: with every reward 1 the value head's start (the mean return) fits every
    # return exactly, and the first steps have no gradient at all
    D.write_jsonl(data, [dict(prompt=p.prompt, response=f"#### {p.answer}", reward=float(i % 2))
                         for i, p in enumerate(probs)])
    out = tmp / "run"
    train_cli.main(["--model", str(base), "--data", str(data), "--task", "arithmetic",
                    "--max-steps", "2", "--batch-size", "4", "--micro-batch", "4", "--lr", "1e-2",
                    "--engine", "torch", "--out", str(out), "--no-progress", *extra])
    return base, prompts, out
