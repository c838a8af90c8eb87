"""dqo.sample and dqo.evaluate under a launcher: two CPU ranks (torchrun, gloo) share the
generation batches and give what one process gives (sample: the same bytes, also when resuming
one process's rows; evaluate: the same figures, printed once)."""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dqo import data as D
from dqo.data.partial import partial_dir
from dqo.tasks import arithmetic

ROOT = Path(__file__).resolve().parents[2]

# the grade depends on the prompt and the completion, so rows graded against the wrong prompt
# change the figures; DQO_TEST_FAIL_AT stops a run at that call (one call a prompt)
REWARDS = textwrap.dedent("""
    import os
    CALLS = [0]

    def parity(prompts, completions, **_):
        CALLS[0] += 1
        if os.environ.get("DQO_TEST_FAIL_AT") == str(CALLS[0]):
            raise ValueError("grader broke")
        return [float((len(p) + len(c)) % 2 == 0) for p, c in zip(prompts, completions)]
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def setup(tok, policy, tmp_path):
    policy.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    # 5 prompts x 3 samples in batches of 4: 4 batches that straddle prompts, an odd count
    D.write_jsonl(tmp_path / "prompts.jsonl", [dict(prompt=p.prompt, answer=p.answer)
                                               for p in arithmetic.make_problems(5, 3)])
    (tmp_path / "rewards.py").write_text(REWARDS)
    return tmp_path


def run(tmp_path, module, args, ranks=1, **env_extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # one thread in every process: the thread count decides a CPU run's last bits
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", **env_extra)
    launch = ([sys.executable] if ranks == 1 else
              [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_port", str(_free_port())])
    common = ["--model", str(tmp_path / "base"), "--reward-fn",
              f"{tmp_path / 'rewards.py'}:parity", "--generation-batch-size", "4",
              "--max-new-tokens", "12", "--seed", "3"]
    return subprocess.run([*launch, "-m", module, *common, *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)


def sample_args(tmp_path, out, *extra):
    # --n in a config file: torchrun's parser takes the flag for an abbreviation of its own
    (tmp_path / "n3.yaml").write_text("n: 3\n")
    return ["--prompts", str(tmp_path / "prompts.jsonl"), "--config", str(tmp_path / "n3.yaml"),
            "--out", str(out), *extra]


def test_two_ranks_sample_the_bytes_of_one_process_and_resume_its_rows(setup):
    one, two = setup / "one.jsonl", setup / "two.jsonl"
    res = run(setup, "dqo.sample", sample_args(setup, one))
    assert res.returncode == 0, res.stderr[-3000:]
    res = run(setup, "dqo.sample", sample_args(setup, two), ranks=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(one.read_text().splitlines()) == 15
    assert two.read_bytes() == one.read_bytes()
    assert not partial_dir(two).exists()
    assert res.stderr.count("wrote 15 responses") == 1  # rank 0 alone logs
    # one process stops at the third prompt's grading; two ranks resume its rows
    cut = setup / "cut.jsonl"
    res = run(setup, "dqo.sample", sample_args(setup, cut), DQO_TEST_FAIL_AT="3")
    assert res.returncode != 0 and "grader broke" in res.stderr
    kept = (partial_dir(cut) / "rows.jsonl").read_text().splitlines()
    assert 0 < len(kept) < 15
    res = run(setup, "dqo.sample", sample_args(setup, cut, "--resume"), ranks=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--resume: " in res.stderr
    assert cut.read_bytes() == one.read_bytes()


def test_two_ranks_evaluate_to_the_figures_of_one_process(setup):
    args = ["--data", str(setup / "prompts.jsonl"), "--samples", "3"]
    one = run(setup, "dqo.evaluate", args)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(setup, "dqo.evaluate", args, ranks=2)
    assert two.returncode == 0, two.stderr[-3000:]
    (line,) = [x for x in two.stdout.splitlines() if x.startswith("{")]  # rank 0 alone prints
    a, b = json.loads(one.stdout.strip().splitlines()[-1]), json.loads(line)
    assert a == b
    # figures that a response graded against the wrong prompt, or drawn from the wrong
    # generator, would change
    assert 0 < a["sampled_cut"] < 1 or 0 < a["sampled"] < 1, a


def test_vllm_under_a_launcher_is_a_usage_error(monkeypatch, capsys):
    from dqo import evaluate

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--model", str(ROOT), "--data", str(ROOT / "README.md"),
                       "--engine", "vllm", "--task", "arithmetic"])
    assert exc.value.code != 0
    assert "--engine vllm: runs in one process" in capsys.readouterr().err
