"""Head-weight schedules (train.mtp_schedule): exact weights at their boundary steps, a
forward curriculum's head-1 stage equal to an n = 1 run, exact resume mid-schedule, and
one clear error for a bad setting."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

from bytelm import checkpoint as ckpt
from bytelm.config import load_config
from bytelm.errors import UserError
from bytelm.fileio import read_jsonl
from bytelm.mtp_schedule import head_weights
from bytelm.paths import config_path
from bytelm.shards import ShardDataset
from bytelm.train import train
from tests.killed_training import kill_and_resume

SMOKE = config_path("configs/smoke.yaml")


def train_cfg(n, *overrides, steps=100):
    return load_config(None, ["model.head_type=unembed", f"model.n_future={n}", f"train.steps={steps}", *overrides]).train


def weights_at(t, n, steps):
    return {s: head_weights(t, n, s) for s in steps}


def test_forward_and_reverse_stages_start_exactly_at_their_boundaries():
    # 100 steps, share 0.5: a span of 50 steps in 4 stages starting at 0, 12, 25, 37
    t = train_cfg(4, "train.mtp_schedule.kind=forward", "train.mtp_schedule.share=0.5")
    w = weights_at(t, 4, [0, 11, 12, 24, 25, 36, 37, 49, 50, 99])
    assert w[0] == w[11] == [1, 0, 0, 0]
    assert w[12] == w[24] == [1, 1, 0, 0]
    assert w[25] == w[36] == [1, 1, 1, 0]
    assert w[37] == w[49] == w[50] == w[99] == [1, 1, 1, 1]
    t = train_cfg(4, "train.mtp_schedule.kind=reverse", "train.mtp_schedule.share=0.5")
    w = weights_at(t, 4, [0, 11, 12, 25, 37, 50, 99])
    assert w[0] == w[11] == [1, 1, 1, 1] and w[12] == [1, 1, 1, 0] and w[25] == [1, 1, 0, 0]
    assert w[37] == w[50] == w[99] == [1, 0, 0, 0]
    # explicit stages, base weights and the extra heads' scale
    t = train_cfg(4, "train.mtp_schedule.kind=forward", "train.mtp_schedule.stages=[1,3]",
                  "train.loss_weights=[2.0,1.0,0.5,1.0]", "train.mtp_schedule.extra_scale=0.1")
    w = weights_at(t, 4, [0, 49, 50, 99])
    assert w[0] == w[49] == [2.0, 0.0, 0.0, 0.0]
    assert w[50] == w[99] == [2.0, 0.1, 0.05, 0.0]


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ramps_reach_their_stated_weights(kind):
    t = train_cfg(3, f"train.mtp_schedule.kind={kind}", "train.mtp_schedule.share=0.4", "train.mtp_schedule.start=1.0",
                  "train.mtp_schedule.end=0.3", "train.mtp_schedule.extra_scale=0.5")
    w = weights_at(t, 3, [0, 10, 20, 39, 40, 41, 99])
    assert w[0] == [1.0, 0.5, 0.5]
    assert w[20] == pytest.approx([1.0, 0.325, 0.325], abs=1e-15)  # halfway: (1 + 0.3) / 2 · 0.5, both ramps
    assert w[40] == w[41] == w[99] == [1.0, 0.15, 0.15]  # end · scale, exactly, from the span's end on
    quarter = 0.25 if kind == "linear" else (1 - math.cos(math.pi / 4)) / 2
    assert w[10][1] == pytest.approx((1.0 + (0.3 - 1.0) * quarter) * 0.5, abs=1e-15)
    assert w[0][1] > w[10][1] > w[20][1] > w[39][1] > w[40][1]
    t = train_cfg(3, "train.mtp_schedule.extra_scale=0.1")  # constant, Megatron's default factor
    assert head_weights(t, 3, 0) == head_weights(t, 3, 99) == [1.0, 0.1, 0.1]


@pytest.mark.parametrize("override,key", [
    ("train.mtp_schedule.stages=[1,2,5]", "train.mtp_schedule.stages"),  # more heads than the model's 4
    ("train.mtp_schedule.end=-0.1", "train.mtp_schedule.end"),
    ("train.loss_weights=[1.0,-1.0,1.0,1.0]", "train.loss_weights"),
    ("model.head_type=sequential model.n_future=1", "model.n_future"),
])
def test_bad_schedule_settings_are_one_clear_message(tmp_path, override, key):
    args = [sys.executable, "-m", "bytelm", "train", "--config", str(SMOKE), "--run-dir", str(tmp_path / "r"),
            "--set", "model.n_future=4", "--set", "train.mtp_schedule.kind=forward"]
    for o in override.split():
        args += ["--set", o]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 2
    assert key in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_other_bad_settings_name_their_key():
    for override, key in [("train.mtp_schedule.kind=warmup", "kind"), ("train.mtp_schedule.share=0", "share"),
                          ("train.mtp_schedule.extra_scale=-1", "extra_scale"), ("train.mtp_schedule.stages=[0]", "stages"),
                          ("train.mtp_schedule.start=-2", "start")]:
        with pytest.raises(UserError, match=f"train.mtp_schedule.{key}"):
            load_config(None, ["model.head_type=unembed", "model.n_future=2", "train.mtp_schedule.kind=linear", override])
    with pytest.raises(UserError, match="forward or reverse"):
        load_config(None, ["model.head_type=unembed", "model.n_future=2", "train.mtp_schedule.kind=linear", "train.mtp_schedule.stages=[1,2]"])


def rows(run_dir):
    return {r["step"]: r for r in read_jsonl(Path(run_dir) / "metrics.jsonl", appending=True) if "loss" in r}


def test_a_forward_curriculums_head_1_stage_is_an_n1_run(smoke_data, tmp_path):
    """4 unembed heads with stages [1, 4] over 8 steps, from the weights of an n = 1 model
    (its trunk and head 1; the other heads random): the training loop's steps 1-4 train
    head 1 alone and give the n = 1 model's losses on the same batches (float tolerance:
    the clipping norm sums more zeros); from step 5 every head trains."""
    import torch

    from bytelm.model import MTPTransformer
    from bytelm.train import StepSetup, lr_lambda, make_optimizer, optimizer_step

    cfg4 = load_config(SMOKE, [f"data.root={smoke_data}", "train.steps=8", "train.warmup_steps=2", "train.batch_size=8",
                               "model.n_future=4", "model.vocab_size=258", "train.mtp_schedule.kind=forward",
                               "train.mtp_schedule.stages=[1,4]"])
    cfg1 = load_config(SMOKE, [f"data.root={smoke_data}", "train.steps=8", "train.warmup_steps=2", "train.batch_size=8",
                               "model.vocab_size=258"])
    torch.manual_seed(0)
    m1, m4 = MTPTransformer(cfg1.model), MTPTransformer(cfg4.model)
    sd = m1.state_dict()
    sd4 = {**sd, "heads.output.weight": torch.cat([sd["heads.output.weight"], m4.heads.output.weight[258:].detach()])}
    m4.load_state_dict(sd4)
    train_ds = ShardDataset(smoke_data / "bytes" / "train")
    assert train_ds.n_windows(256, 1) == train_ds.n_windows(256, 4)  # the same batches for both
    runs = {}
    for name, cfg, model in (("n1", cfg1, m1), ("fwd", cfg4, m4)):
        opt = make_optimizer(model, cfg, torch.device("cpu"))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
        setup = StepSetup(model, opt, 8, "memory_efficient", cfg.train.grad_clip)
        runs[name] = []
        for step in range(8):
            x, y = train_ds.batch(step, 256, cfg.model.n_future, 8, 0)
            w = head_weights(cfg.train, cfg.model.n_future, step)
            runs[name].append((w, *optimizer_step(setup, x, y, w)))
            sched.step()
    for s in range(4):
        (w, loss, per_head, norm), (_, loss1, _, norm1) = runs["fwd"][s], runs["n1"][s]
        assert w == [1.0, 0.0, 0.0, 0.0]
        assert loss == pytest.approx(loss1, rel=1e-5) and per_head[0] == pytest.approx(loss1, rel=1e-5), s
        assert all(math.isnan(v) for v in per_head[1:])
        assert norm == pytest.approx(norm1, rel=1e-5)
    assert runs["n1"][1][1] != runs["n1"][0][1]  # the steps did train
    for s in range(4, 8):
        w, loss, per_head, _ = runs["fwd"][s]
        assert w == [1.0, 1.0, 1.0, 1.0] and not any(math.isnan(v) for v in per_head)
        assert loss > per_head[0] + 1  # the extra heads' losses count now
    assert runs["fwd"][4][2][0] == pytest.approx(runs["n1"][4][1], rel=1e-5)  # the weights step 5 starts from
    assert abs(runs["fwd"][5][2][0] - runs["n1"][5][1]) > 1e-4  # step 5 trained every head, head 1 differently


def test_the_loop_logs_the_weights_in_force_and_only_trained_heads_losses(smoke_data, tmp_path):
    common = [f"data.root={smoke_data}", "tracking.mlflow=false", "train.steps=4", "train.log_every=1",
              "train.eval_every=1000", "train.checkpoint_every=1000", "train.batch_size=4", "model.n_future=3",
              "train.mtp_schedule.kind=forward", "train.mtp_schedule.stages=[1,3]"]
    train(load_config(SMOKE, common), tmp_path / "run")
    r = rows(tmp_path / "run")
    assert [[r[s][f"mtp/weight/head_{i}"] for i in (1, 2, 3)] for s in (1, 2, 3, 4)] == [[1, 0, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1]]
    assert "loss/head_2" not in r[1] and "loss/head_2" not in r[2] and "loss/head_3" in r[3]
    assert r[1]["loss"] == r[1]["loss/head_1"]
    # a head left out keeps its place in the checkpoint
    model, _, _ = ckpt.load_model(tmp_path / "run")
    assert model.heads.output.weight.shape[0] == 3 * model.cfg.vocab_size


def test_exact_resume_mid_schedule_after_sigkill(smoke_data, tmp_path):
    """A cosine ramp (a new weight every step) with stages: a run killed with SIGKILL
    mid-ramp and restarted logs the same losses and weights as one never interrupted."""
    common = [f"data.root={smoke_data}", "tracking.mlflow=false", "train.steps=16", "train.log_every=1",
              "train.checkpoint_every=4", "train.eval_every=1000", "train.batch_size=8", "model.context=128",
              "model.n_future=3", "train.mtp_schedule.kind=cosine",
              "train.mtp_schedule.start=0.0", "train.mtp_schedule.end=0.8", "train.mtp_schedule.share=0.75",
              "train.mtp_schedule.extra_scale=0.5"]
    train(load_config(SMOKE, common), tmp_path / "straight")

    run = tmp_path / "killed"
    kill_and_resume(SMOKE, run, common, after=6, before=12)  # mid-ramp
    a, b = rows(tmp_path / "straight"), rows(run)
    assert sorted(a) == sorted(b) == list(range(1, 17))
    keys = ["loss", "mtp/weight/head_2", "mtp/weight/head_3"]
    assert [[a[s][k] for k in keys] for s in a] == [[b[s][k] for k in keys] for s in a]
    w2 = [a[s]["mtp/weight/head_2"] for s in range(1, 17)]
    assert w2[0] == 0.0 and w2[12:] == [0.4] * 4 and len(set(w2[:12])) == 12
