import os

import torch

# Without a GPU the Triton kernels run in the interpreter; this must happen before any kernel
# module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_report_header(config):
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return [f"device: {dev}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}; "
            f"torch {torch.__version__}; DQO_TEST_SEED={os.environ.get('DQO_TEST_SEED', '0')}"]


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def tok():
    """The embedded default's character tokenizer (built in code, no download)."""
    from dqo.tokenizer import char_tokenizer
    return char_tokenizer()


@pytest.fixture
def policy(tok):
    """A tiny random Llama policy for ``tok`` (fresh weights for every test)."""
    from dqo.modeling import build_policy, tiny_config
    torch.manual_seed(0)
    return build_policy(tiny_config(tok, hidden_size=32, layers=2, heads=2))
