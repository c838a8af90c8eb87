"""A run killed at any stage and resumed ends bit for bit where an uninterrupted run ends
(issue 15): `python -m dqo.train`'s embedded default, at toy sizes, is SIGKILLed from outside
during the warm-up; rerun with --resume, it is killed again during the first evaluation; and
so on through sampling, training and the final evaluation, until a last --resume completes.
Its offline data, final weights, metrics and printed accuracy are then compared with an
uninterrupted run's. (One chain of kills rather than one run per stage: each run is a fresh
process, whose imports are most of its time.)
"""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = float(os.environ.get("DQO_TEST_BUILD_TIMEOUT_S", "600"))

RUNNER = textwrap.dedent("""
    import json, logging, sys
    from dqo.pipeline import DefaultPipeline
    from dqo.configs import TrainConfig
    from dqo.runs import run_default
    from dqo.train import parse_args
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    # attention dropout: training draws random numbers, so a resume must restore the RNG
    pipe = DefaultPipeline(n_sft=64, n_offline=8, n_test=8, n_dev=8, samples_per_prompt=2,
                           sft_max_steps=6, max_new_tokens=10, hidden_size=32, layers=2,
                           attention_dropout=0.1)
    args = TrainConfig(**{**parse_args([]).__dict__, "out": sys.argv[1], "progress": False,
                        "batch_size": 4, "micro_batch": 2, "epochs": 1, "save_every": 1,
                        "eval_samples": 1, "resume": sys.argv[2] == "1"})
    print("RESULT " + json.dumps(run_default(args, pipe)), flush=True)
""")

# kill point -> what, seen on the run's stderr or in its directory, triggers the SIGKILL
KILL_POINTS = {
    "warm-up": "SFT warm-up of",
    "first evaluation": "warm-up stopped after",
    "sampling": "stage 2/4",
    "training": "checkpoints/latest",  # a file: the first checkpoint is written
    "final evaluation": "stage 4/4",
}


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT),
                                                         os.environ.get("PYTHONPATH", "")])}


def _run(out: Path, resume: bool) -> str:
    res = subprocess.run([sys.executable, "-c", RUNNER, str(out), "1" if resume else "0"],
                         env=_env(), capture_output=True, text=True, timeout=DEADLINE_S)
    assert res.returncode == 0, res.stderr[-3000:]
    (line,) = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    return line


def _run_and_kill(out: Path, marker: str, resume: bool) -> str:
    """Run until ``marker`` shows (in the log or as a file), SIGKILL; the log so far."""
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(out), "1" if resume else "0"],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    seen = threading.Event()

    log = []

    def watch():
        for line in proc.stderr:
            log.append(line)
            if marker in line:
                seen.set()
        seen.set()  # the run ended without the marker: the assertion below says so

    threading.Thread(target=watch, daemon=True).start()
    deadline = time.monotonic() + DEADLINE_S
    while not (seen.is_set() or (out / marker).exists()):
        assert time.monotonic() < deadline, f"no {marker!r} before the deadline"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f"the run ended before {marker!r}: nothing was killed"
    return "".join(log)


def _outcome(out: Path, result: str):
    weights = {part: load_file(out / "final" / part / "model.safetensors")
               for part in ("policy", "value")}
    metrics = [{k: v for k, v in json.loads(x).items() if k != "step_time"}
               for x in (out / "metrics.jsonl").read_text().splitlines()]
    return (out / "offline.jsonl").read_bytes(), weights, metrics, result


def test_killed_at_every_stage_resumes_bit_for_bit(tmp_path):
    straight = tmp_path / "straight"
    expected = _outcome(straight, _run(straight, resume=False))
    out = tmp_path / "killed"
    logs = [_run_and_kill(out, marker, resume=i > 0) for i, marker in
            enumerate(KILL_POINTS.values())]
    # the run after the kill in training went on from a checkpoint, not from step 0
    after_training = logs[list(KILL_POINTS).index("training") + 1]
    assert re.search(r"resumed from \S+step-\d+ at step [1-9]", after_training), after_training
    data, weights, metrics, result = _outcome(out, _run(out, resume=True))
    exp_data, exp_weights, exp_metrics, exp_result = expected
    assert data == exp_data
    assert result == exp_result
    assert metrics == exp_metrics
    for part in ("policy", "value"):
        assert weights[part].keys() == exp_weights[part].keys()
        for k, v in weights[part].items():
            assert torch.equal(v, exp_weights[part][k]), (part, k)
