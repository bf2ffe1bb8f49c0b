"""FSDP2 (`train.parallel=fsdp`) under torchrun: 2 gloo processes on CPU against one
process with the same global batch (as test_train's DDP test), and its checkpoints, which
must be the unsharded files a single process writes and resumes from (and vice versa)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bytelm.fileio import read_jsonl
import bytelm.loss
from bytelm import checkpoint as ckpt
from bytelm.config import load_config
from bytelm.errors import UserError
from bytelm.paths import config_path
from bytelm.train import train

SMOKE = config_path("configs/smoke.yaml")
# 8 steps, 2 accumulation steps of 4 sequences in one process, 1 of 4 per process in two.
COMMON = ["tracking.mlflow=false", "train.steps=8", "train.log_every=1", "train.eval_every=4", "train.checkpoint_every=4",
          "train.batch_size=8", "train.micro_batch_size=4", "model.context=128"]

# Runs `bytelm` with every head its own group of the memory-efficient loss, so that one
# micro-batch makes several backward passes (and FSDP gathers the root once per group).
ONE_HEAD_PER_GROUP = """
import sys
import bytelm.loss
bytelm.loss.LOGITS_PER_GROUP = 1
from bytelm.cli import main
main(sys.argv[1:])
"""


def rows(run_dir):
    return {r["step"]: r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "loss" in r}


def torchrun_fsdp(run_dir, overrides, script=None):
    """`torchrun --nproc_per_node 2 -m bytelm train ... train.parallel=fsdp` (or `script`)."""
    torchrun = Path(sys.executable).parent / "torchrun"
    # --standalone: torchrun binds a free port itself (a port picked here could be taken before it binds)
    cmd = [str(torchrun), "--nproc_per_node", "2", "--standalone"]
    cmd += [str(script)] if script else ["-m", "bytelm"]
    cmd += ["train", "--config", str(SMOKE), "--run-dir", str(run_dir)]
    for o in [*overrides, "train.parallel=fsdp"]:
        cmd += ["--set", o]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def assert_same_losses(a, b, steps):
    assert sorted(a) == sorted(b) == list(steps)
    for s in a:
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-6), s
        for h in (1, 2):
            assert b[s][f"loss/head_{h}"] == pytest.approx(a[s][f"loss/head_{h}"], rel=1e-6), (s, h)
        # the norm of the whole (sharded) gradient, before clipping (clipping is active: > 1)
        assert b[s]["grad_norm"] == pytest.approx(a[s]["grad_norm"], rel=1e-4), s


def only_checkpoint(src_run, step, dst_run):
    """A new run directory that holds only `src_run`'s checkpoint of `step`."""
    name = f"step_{step:07d}"
    shutil.copytree(ckpt.checkpoints_dir(src_run) / name, ckpt.checkpoints_dir(dst_run) / name)
    return dst_run


def test_fsdp_matches_one_process_and_checkpoints_move_between_them(smoke_data, tmp_path):
    """Same losses and gradient norms as one process with the same global batch; the
    FSDP checkpoint is the full model and optimizer, loads with load_model, and a single
    process resumes from it exactly — and FSDP resumes from a single process's."""
    common = [f"data.root={smoke_data}", *COMMON, "model.n_future=2"]
    train(load_config(SMOKE, common), tmp_path / "one")
    torchrun_fsdp(tmp_path / "fsdp", common)
    one, fsdp = rows(tmp_path / "one"), rows(tmp_path / "fsdp")
    assert_same_losses(one, fsdp, range(1, 9))
    assert one[1]["grad_norm"] > 1  # so the clipping (of DTensor gradients) was exercised
    assert json.loads((tmp_path / "fsdp" / "status.json").read_text())["status"] == "finished"

    # The checkpoint: unsharded, the same tensors (and optimizer layout) as one process's.
    model, tok, cfg = ckpt.load_model(tmp_path / "fsdp")
    ref, _, _ = ckpt.load_model(tmp_path / "one")
    assert cfg.train.parallel == "fsdp" and tok.kind == "bytes"
    a, b = ref.state_dict(), model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    for name in ("step_0000004", "step_0000008", "best"):
        o1 = torch.load(ckpt.checkpoints_dir(tmp_path / "one") / name / "optim.pt", weights_only=False)
        o2 = torch.load(ckpt.checkpoints_dir(tmp_path / "fsdp") / name / "optim.pt", weights_only=False)
        assert o2["optimizer"]["param_groups"] == o1["optimizer"]["param_groups"]
        assert o2["scheduler"] == o1["scheduler"]
        s1, s2 = o1["optimizer"]["state"], o2["optimizer"]["state"]
        assert sorted(s1) == sorted(s2)
        for i in s1:
            for k in s1[i]:
                torch.testing.assert_close(s2[i][k], s1[i][k], rtol=1e-4, atol=1e-6, msg=f"{name} {i} {k}")

    # FSDP's step-4 checkpoint, resumed by one process; one process's, resumed under FSDP.
    train(load_config(SMOKE, common), only_checkpoint(tmp_path / "fsdp", 4, tmp_path / "fsdp_then_one"))
    torchrun_fsdp(only_checkpoint(tmp_path / "one", 4, tmp_path / "one_then_fsdp"), common)
    for resumed in ("fsdp_then_one", "one_then_fsdp"):
        assert_same_losses({s: one[s] for s in range(5, 9)}, rows(tmp_path / resumed), range(5, 9))


@pytest.mark.parametrize("head_type", ["transformer", "sequential"])
def test_fsdp_with_head_blocks_and_one_backward_per_head(smoke_data, tmp_path, monkeypatch, head_type):
    """Transformer heads (each head block its own FSDP unit) with every head its own
    group of the memory-efficient loss (one backward per head, then the trunk's, each
    reduce-scattering; the root is gathered again for every head), and sequential heads
    (each module a unit; its backward comes after every head's, and reads the root's
    shared embedding): the same losses and validation as one process."""
    common = [f"data.root={smoke_data}", *COMMON, "train.steps=4", "train.eval_every=4", "model.n_future=2",
              "model.n_layers=4", f"model.head_type={head_type}"]
    monkeypatch.setattr(bytelm.loss, "LOGITS_PER_GROUP", 1)
    train(load_config(SMOKE, common), tmp_path / "one")
    script = tmp_path / "one_head_per_group.py"
    script.write_text(ONE_HEAD_PER_GROUP)
    torchrun_fsdp(tmp_path / "fsdp", common, script)
    assert_same_losses(rows(tmp_path / "one"), rows(tmp_path / "fsdp"), range(1, 5))
    val = [[r["val/bpb"] for r in read_jsonl(tmp_path / d / "metrics.jsonl") if "val/bpb" in r]
           for d in ("one", "fsdp")]
    assert len(val[0]) == 1 and val[1] == pytest.approx(val[0], rel=1e-6)


def test_parallel_key_is_checked():
    assert load_config(SMOKE, []).train.parallel == "ddp"
    with pytest.raises(UserError, match="train.parallel"):
        load_config(SMOKE, ["train.parallel=zero3"])
