"""Damaged artifacts (issue 27 C): a flipped bit or a cut file in a checkpoint, a final/ model
or the reference log-prob cache is found when it is read back, never trained or evaluated on."""
import logging
import shutil
import subprocess

import pytest
import torch
from test_loop import train_args

from dqo import data as D
from dqo import manifest
from dqo.checkpoint import save_checkpoint
from dqo.engine import OptimConfig, TorchEngine
from dqo.errors import CheckpointError
from dqo.loop import train
from dqo.modeling import ValueModel, load_policy
from dqo.reference_logps import compute_ref_logps, ref_logps
from dqo.tasks import arithmetic

TENSOR = "model.layers.0.mlp.up_proj.weight"


def examples(tok, policy, n=16):
    rows = [dict(prompt=p.prompt, response=p.solution if i % 2 else "#### 1", reward=i % 2)
            for i, p in enumerate(arithmetic.make_problems(n, 7))]
    exs = [D.tokenize_row(D.check_row(r, "x"), tok) for r in rows]
    compute_ref_logps(policy, exs, tok.pad_token_id)
    return exs


def args_for(tmp_path, **kw):
    """test_loop's arguments, saving every step."""
    return train_args(tmp_path, **{"save_every": 1, **kw})


def flip_exponent(path, tensor: torch.Tensor) -> None:
    """Flip the top exponent bit of ``tensor``'s first fp32 element where its bytes lie in the
    file at ``path``: a weight of ~0.01 becomes ~1e36 (one bad bit on a disk or in RAM)."""
    data = bytearray(path.read_bytes())
    needle = tensor.detach().float().contiguous().numpy().tobytes()[:64]
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0, "the tensor's bytes, once in the file"
    data[at + 3] ^= 0x40
    path.write_bytes(bytes(data))


def run_two_steps(tok, policy, tmp_path, **kw):
    exs = examples(tok, policy)
    value = ValueModel.from_policy(policy)
    train(args_for(tmp_path, max_steps=2, **kw), tok, policy, value, exs)
    return exs, value


# ---- checkpoints -------------------------------------------------------------------------------


def test_every_checkpoint_has_a_manifest_that_sha256sum_checks(policy, tmp_path):
    path = save_checkpoint(tmp_path, 1, {"policy": TorchEngine(policy, OptimConfig())}, {})
    listed = manifest.read_manifest(path / manifest.MANIFEST)
    assert sorted(listed) == ["policy/engine.pt", "rng_state.pt", "trainer_state.json"]
    assert manifest.find_damage(path) == (True, None)
    if shutil.which("sha256sum"):  # the format coreutils reads
        subprocess.run(["sha256sum", "--quiet", "-c", manifest.MANIFEST], cwd=path, check=True)


def test_a_flipped_bit_in_a_checkpoint_names_the_file_and_the_last_intact_one(tok, policy,
                                                                               tmp_path):
    exs, value = run_two_steps(tok, policy, tmp_path)
    root = tmp_path / "run" / "checkpoints"
    engine_pt = root / "step-0000002" / "policy" / "engine.pt"
    flip_exponent(engine_pt, policy.state_dict()[TENSOR])
    with pytest.raises(CheckpointError) as err:
        train(args_for(tmp_path, max_steps=3, resume=True), tok, policy, value, exs)
    msg = str(err.value)
    assert f"{engine_pt}: sha256" in msg
    assert f"the last intact checkpoint is {root / 'step-0000001'}" in msg
    # the advice works: pointed at the intact step, the run resumes and finishes
    (root / "latest").write_text("step-0000001")
    train(args_for(tmp_path, max_steps=3, resume=True), tok, policy, value, exs)
    assert all(torch.isfinite(p).all() for p in policy.parameters())


def test_absurd_weights_in_a_checkpoint_without_a_manifest_are_refused(tok, policy, tmp_path,
                                                                      caplog):
    """A checkpoint written before manifests existed loads with a warning, and the weights
    are still checked: an exponent flip (a weight of 1e36) is an error naming the tensor."""
    exs, value = run_two_steps(tok, policy, tmp_path)
    step = tmp_path / "run" / "checkpoints" / "step-0000002"
    (step / manifest.MANIFEST).unlink()
    flip_exponent(step / "policy" / "engine.pt", policy.state_dict()[TENSOR])
    with pytest.raises(CheckpointError, match=rf"{step / 'policy'}: tensor \S*{TENSOR} holds a "
                                              r"weight of magnitude [\d.]+e\+\d\d"):
        train(args_for(tmp_path, max_steps=3, resume=True), tok, policy, value, exs)
    assert "has no MANIFEST.sha256" in caplog.text


def test_a_checkpoint_without_a_manifest_resumes_with_one_warning(tok, policy, tmp_path,
                                                                   caplog):
    exs, value = run_two_steps(tok, policy, tmp_path)
    (tmp_path / "run" / "checkpoints" / "step-0000002" / manifest.MANIFEST).unlink()
    with caplog.at_level(logging.WARNING, logger="dqo.manifest"):
        train(args_for(tmp_path, max_steps=3, resume=True), tok, policy, value, exs)
    assert [r.getMessage() for r in caplog.records if r.name == "dqo.manifest"] == [
        f"checkpoint {tmp_path / 'run' / 'checkpoints' / 'step-0000002'} has no MANIFEST.sha256 "
        "(written before manifests existed?): not checked for damage"]


# ---- final/ models -----------------------------------------------------------------------------


def test_a_flipped_bit_in_a_final_model_is_refused_on_load(tok, policy, tmp_path):
    run_two_steps(tok, policy, tmp_path)
    final = tmp_path / "run" / "final"
    for name in ("policy", "value"):
        assert manifest.find_damage(final / name) == (True, None)
    load_policy(str(final / "policy"))  # intact: loads
    weights = final / "policy" / "model.safetensors"
    flip_exponent(weights, policy.state_dict()[TENSOR])
    with pytest.raises(CheckpointError, match=rf"{weights}: sha256.*if you edited it on purpose, "
                                              rf"delete {final / 'policy' / manifest.MANIFEST}"):
        load_policy(str(final / "policy"))
    # without the manifest (an older run): the weights check still refuses it
    (final / "policy" / manifest.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=rf"tensor {TENSOR} holds a weight of magnitude"):
        load_policy(str(final / "policy"))


def test_non_finite_weights_are_refused_naming_the_tensor():
    good = [("a", torch.ones(3)), ("ids", torch.arange(3))]
    manifest.check_weights(good, "x")
    with pytest.raises(CheckpointError, match=r"^m.pt: tensor b holds non-finite values"):
        manifest.check_weights(good + [("b", torch.tensor([1.0, float("nan")]))], "m.pt")
    with pytest.raises(CheckpointError, match=r"tensor c holds non-finite"):
        manifest.check_weights([("c", torch.tensor([float("-inf")], dtype=torch.bfloat16))], "m")


# ---- the reference log-prob cache --------------------------------------------------------------


@pytest.mark.parametrize("damage", ["flip", "truncate", "truncate-legacy"])
def test_a_damaged_reference_cache_is_recomputed_with_a_warning(tok, policy, tmp_path, caplog,
                                                                damage):
    exs = examples(tok, policy)
    first = ref_logps(policy, exs, tok.pad_token_id, cache_dir=str(tmp_path))
    [path] = tmp_path.glob("ref_logps-*.pt")
    assert (tmp_path / f"{path.name}.sha256").is_file()
    data = bytearray(path.read_bytes())
    if damage == "flip":  # one log-prob's exponent: the cache still loads, with a wrong value
        flip_exponent(path, torch.tensor(first[0]))
        assert torch.load(path, weights_only=True)[0][0] != first[0][0]
    else:
        path.write_bytes(bytes(data[:len(data) // 2]))
        if damage == "truncate-legacy":  # a cache written before the digests
            (tmp_path / f"{path.name}.sha256").unlink()
    with caplog.at_level(logging.WARNING):
        again = ref_logps(policy, exs, tok.pad_token_id, cache_dir=str(tmp_path))
    assert again == first
    assert "the cache is damaged, recomputing it" in caplog.text and str(path) in caplog.text
    assert path.read_bytes() == bytes(data)  # rewritten whole
    caplog.clear()
    ref_logps(policy, exs, tok.pad_token_id, cache_dir=str(tmp_path))
    assert "the cache is damaged" not in caplog.text
