"""The training loop: one loop for every vocabulary, head type and number of heads.

    bytelm train --config experiments/configs/smoke.yaml --run-dir runs/smoke [--set k=v ...]
    torchrun --nproc_per_node 4 -m bytelm train --config ... --run-dir ...

A run directory that already holds a checkpoint resumes from it: weights, optimizer,
scheduler, RNG states and the data position (the batch of step s depends only on the
seed and s, so resuming needs only the step). On CPU in float32 a run killed with SIGKILL
and restarted produces the same losses as one that was never interrupted
(tests/test_train.py).

Several GPUs: data parallel over torchrun's processes. `train.parallel=ddp` (default):
every process holds the whole model and gradients are averaged with one all-reduce per
optimizer step (after gradient accumulation and after every head's separate backward of
the memory-efficient loss — which is why this is not DistributedDataParallel: DDP's hooks
expect one backward per forward). `train.parallel=fsdp`: FSDP2 (`fully_shard`) shards
parameters, gradients and optimizer state; it reduce-scatters the gradients itself, and
checkpoints are gathered into the same unsharded files a single process writes, so a run
can resume under either. The global batch and the data order do not depend on the number
of GPUs.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from bytelm import checkpoint as ckpt
from bytelm.config import RunConfig, load_config, save_config, to_dict
from bytelm.errors import Stopped, UserError
from bytelm.loss import HeadStats, accumulate_head_stats, loss_and_backward
from bytelm.model import MTPTransformer
from bytelm.mtp_schedule import head_weights
from bytelm.shards import ShardDataset
from bytelm.units import PEAK_FLOPS



# ----------------------------------------------------------------------------- set-up


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    d = Dist(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        torch.cuda.set_device(d.local_rank)
    return d


def pick_device(cfg: RunConfig, d: Dist) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA GPU is visible")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def autocast_for(cfg: RunConfig, device: torch.device):
    """bf16 autocast on GPU (weights and optimizer stay fp32); fp32 on CPU."""
    use_bf16 = cfg.train.dtype == "bfloat16" or (cfg.train.dtype == "auto" and device.type == "cuda")
    if not use_bf16:
        return None
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def lr_lambda(cfg: RunConfig):
    """Linear warmup, then cosine decay to min_lr_ratio × peak at the last step."""
    t = cfg.train

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        span = max(1, t.steps - t.warmup_steps)
        progress = min(1.0, (step - t.warmup_steps) / span)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def compile_model(model: MTPTransformer) -> None:
    """torch.compile every transformer block in place, so parameter names (and
    checkpoints) stay unchanged and the memory-efficient loss can still call the trunk
    and each head separately. (Compiling the whole trunk as one graph measured the same
    step time on the H200: docs/benchmarks.md.)"""
    for block in list(model.blocks) + model.heads.units():
        block.compile()


def make_optimizer(model: MTPTransformer, cfg: RunConfig, device: torch.device) -> torch.optim.AdamW:
    # Weight decay on matrices only (not on norms' gains), as in nanoGPT.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), fused=device.type == "cuda")


# The model's methods the loss and the evaluation call instead of its forward: under FSDP
# they are registered as forward methods, so that the root's parameters (embedding,
# unembedding(s), final norm, linear heads' maps) are all-gathered around them.
FSDP_FORWARD_METHODS = ("trunk", "head_group", "head_logits", "head_depth")


def shard_model(model: MTPTransformer, device: torch.device, world: int) -> None:
    """FSDP2 in place: each transformer block (trunk and heads) is one unit, the root
    holds the rest. No MixedPrecisionPolicy: parameters are gathered in float32 and the
    bf16 autocast of the loop does the casting, exactly as without FSDP; gradients are
    reduce-scattered (averaged) in float32.

    The memory-efficient loss runs one backward per head group before the trunk's, and
    FSDP forgets its forward order after each backward, so the trunk's backward would
    gather each block only when it is reached: each trunk block prefetches the one
    before it explicitly."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (world,))
    for block in list(model.blocks) + model.heads.units():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for later, earlier in zip(model.blocks[1:], model.blocks[:-1]):
        later.set_modules_to_backward_prefetch([earlier])
    for name in FSDP_FORWARD_METHODS:
        register_fsdp_forward_method(model, name)


def param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order `optimizer.state_dict()` numbers the parameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict, dict]:
    """Under FSDP: the whole (unsharded) model and optimizer state on the CPU of rank 0,
    empty dicts on the other ranks. A collective: every rank calls it. The optimizer state
    is numbered as a single process's `optimizer.state_dict()` numbers it, so the
    checkpoint is the one a single process writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=opts)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    if not optim_sd:
        return model_sd, optim_sd
    index = {n: i for i, n in enumerate(names)}
    return model_sd, {"state": {index[n]: s for n, s in optim_sd["state"].items()},
                      "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in optim_sd["param_groups"]]}


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict, names: list[str]) -> None:
    """Under FSDP: loads a full (single-process layout) optimizer state dict, sharding it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    by_name = {"state": {names[i]: s for i, s in saved["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def rank0_says(flag: bool, device: torch.device) -> bool:
    """Rank 0's value of `flag`, on every rank (for decisions every rank must share)."""
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, 0)
    return bool(t.item())


def all_reduce_grads(model: MTPTransformer, world: int) -> None:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


# The keys a resumed run may change: when and how it runs, not what it learns. Any other
# train.*/model.*/data.* key would be recorded in config.yaml while the restored optimizer,
# scheduler and RNG state go on with the old value.
RESUMABLE_KEYS = {
    "data.root", "train.steps", "train.micro_batch_size", "train.device", "train.dtype", "train.compile",
    "train.parallel", "train.log_every", "train.eval_every", "train.eval_batches", "train.checkpoint_every",
    "train.keep_last", "train.time_limit_s",
}


def check_resumable(saved: RunConfig, cfg: RunConfig, run_dir: Path) -> None:
    """Refuses to resume with a config that differs from the checkpoint's in a key that is
    not in RESUMABLE_KEYS (eval.* and tracking.* may change too), naming the keys."""
    from bytelm.config import flatten

    old = flatten({k: v for k, v in to_dict(saved).items() if k in ("data", "model", "train")})
    new = flatten({k: v for k, v in to_dict(cfg).items() if k in ("data", "model", "train")})
    if old.get("model.vocab_size") and not new.get("model.vocab_size"):
        new["model.vocab_size"] = old["model.vocab_size"]  # 0: taken from the data, as it was
    changed = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k) and k not in RESUMABLE_KEYS]
    if changed:
        diff = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed[:6])
        raise UserError(f"{run_dir} was trained with other values of {diff}{' ...' if len(changed) > 6 else ''}; "
                        "resume with the run's own config.yaml, or use a new --run-dir (resumable keys: docs/training.md)")


def open_data(cfg: RunConfig) -> tuple[ShardDataset, ShardDataset]:
    root = Path(cfg.data.root) / cfg.data.tokenizer
    for split in ("train", "val"):
        if not (root / split / "meta.json").is_file():
            raise UserError(f"no prepared {split} shards at {root / split} (run `bytelm prepare`, or set data.root)")
    return ShardDataset(root / "train"), ShardDataset(root / "val")


@dataclass
class StepSetup:
    """What an optimizer step uses besides the batch, fixed for the whole run.

    `micro`: sequences per micro-batch (the batch is accumulated over them); `autocast`:
    a context-manager factory (autocast_for), or None for float32; `world`: data-parallel
    processes; `sharded`: the model is FSDP's, which reduce-scatters the gradients itself
    (into sharded DTensor gradients, whose norm is the whole model's)."""

    model: MTPTransformer
    optimizer: torch.optim.Optimizer
    micro: int
    loss_mode: str
    grad_clip: float
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None
    world: int = 1
    compiled: bool = False
    sharded: bool = False


def optimizer_step(s: StepSetup, x_all: torch.Tensor, y_all: torch.Tensor,
                   weights: list[float]) -> tuple[float, list[float], float]:
    """One optimizer step over this rank's share of the global batch, in micro-batches
    of `s.micro` sequences, with the heads' loss weights of this step (mtp_schedule).
    Returns (loss, per-head losses (nan for a head of weight 0), gradient norm before
    clipping).
    A non-finite gradient skips the update (the caller stops the run)."""
    accum = len(x_all) // s.micro
    device = next(s.model.parameters()).device
    losses = []
    for a in range(accum):
        x = x_all[a * s.micro : (a + 1) * s.micro].to(device, non_blocking=True)
        y = y_all[a * s.micro : (a + 1) * s.micro].to(device, non_blocking=True)
        losses.append(loss_and_backward(s.model, x, y, weights, s.loss_mode, 1.0 / accum,
                                        s.autocast() if s.autocast else None, s.compiled))
    if s.world > 1 and not s.sharded:
        all_reduce_grads(s.model, s.world)
    norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), s.grad_clip if s.grad_clip > 0 else float("inf"))
    grad_norm = float(norm.full_tensor() if s.sharded else norm)  # a DTensor under FSDP
    total = sum(l.total for l in losses) / accum
    per_head = [sum(l.per_head[i] for l in losses) / accum for i in range(len(weights))]
    if s.world > 1:  # the logged loss is that of the global batch, not of this rank's share
        both = torch.tensor([total, *per_head], dtype=torch.float64, device=device)
        dist.all_reduce(both)
        total, *per_head = (both / s.world).tolist()
    if math.isfinite(total) and math.isfinite(grad_norm):
        s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    return total, per_head, grad_norm


def window_head_losses(window: list[tuple[float, list[float]]], n: int) -> dict[str, float]:
    """Each head's mean loss over the steps of the logging window that trained it (a
    head a schedule left out, weight 0, has a nan loss for that step); a head no step of
    the window trained is left out."""
    out = {}
    for i in range(n):
        trained = [w[1][i] for w in window if not math.isnan(w[1][i])]
        if trained:
            out[f"loss/head_{i + 1}"] = float(np.mean(trained))
    return out


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: MTPTransformer, val: ShardDataset, cfg: RunConfig, device, autocast, micro: int) -> dict[str, float]:
    """Bits per byte, loss and top-1 accuracy of every head on the first
    `train.eval_batches` batches of the validation split (the same batches every time)."""
    model.eval()
    stats = HeadStats.zeros(cfg.model.n_future)
    lengths = torch.from_numpy(val.tokenizer.token_byte_lengths).to(device)
    for x, y in val.iter_eval_batches(cfg.model.context, cfg.model.n_future, micro, cfg.train.eval_batches):
        accumulate_head_stats(model, x.to(device), y.to(device), lengths, stats, autocast() if autocast else None)
    model.train()
    return stats.metrics("val")


# ----------------------------------------------------------------------------- the loop


class StopSignals:
    """SIGTERM and SIGINT ask the loop to stop after the step it is in (checkpointed, the
    run marked stopped: resumable); a second one stops at once. Installed only in the main
    thread, and the previous handlers come back on `restore()`."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on any rank, on every rank."""
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def train(cfg: RunConfig, run_dir: Path, *, parent_run_id: str | None = None, tags: dict | None = None,
          started: float | None = None) -> dict:
    """Trains (or resumes) the run in run_dir. `started`: the wall time train.time_limit_s
    counts from (the command's start; default: this call)."""
    started = started or time.time()
    d = init_distributed()
    device = pick_device(cfg, d)
    train_ds, val_ds = open_data(cfg)
    tok = train_ds.tokenizer
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tok.vocab_size
    elif cfg.model.vocab_size < tok.vocab_size:
        raise UserError(f"config key 'model.vocab_size': {cfg.model.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
    t, m = cfg.train, cfg.model
    micro = t.micro_batch_size or t.batch_size // d.world
    if t.batch_size % (micro * d.world):
        raise UserError(f"config key 'train.batch_size': {t.batch_size} is not a multiple of micro_batch_size {micro} × {d.world} processes")
    accum = t.batch_size // (micro * d.world)

    run_dir = Path(run_dir)
    start = ckpt.list_checkpoints(run_dir)
    if start:  # resuming: the model must be the one the checkpoint holds
        check_resumable(ckpt.load_config(start[-1]), cfg, run_dir)

    torch.manual_seed(t.seed)
    model = MTPTransformer(m).to(device)
    if start:  # the full weights, into every rank's full model (sharded below under FSDP)
        ckpt.load_weights(model, start[-1])
    compiled = t.compile == "true" or (t.compile == "auto" and device.type == "cuda")
    if compiled:
        compile_model(model)
    fsdp = t.parallel == "fsdp" and d.world > 1
    if fsdp:
        shard_model(model, device, d.world)
    optimizer = make_optimizer(model, cfg, device)
    names = param_names(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    # train_s: wall seconds the run has trained, over all its starts (compilation, evaluations
    # and checkpoints included), for the GPU-time a study reports
    state = {"step": 0, "best_val_bpb": float("inf"), "tokens_seen": 0, "bytes_seen": 0, "train_s": 0.0}
    if start:
        # Under FSDP the full state stays on the CPU until it is sharded onto the GPU.
        opt_state = ckpt.load_state_file(start[-1], "optim.pt", map_location="cpu" if fsdp else device)
        if fsdp:
            load_full_optimizer_state(model, optimizer, opt_state["optimizer"], names)
        else:
            optimizer.load_state_dict(opt_state["optimizer"])
        scheduler.load_state_dict(opt_state["scheduler"])
        ckpt.set_rng_state(ckpt.load_state_file(start[-1], "rng.pt"))
        state.update(ckpt.read_state(start[-1]))
        state.pop("tokenizer", None)
    autocast = autocast_for(cfg, device)
    step_setup = StepSetup(model, optimizer, micro, t.loss_mode, t.grad_clip, autocast, d.world, compiled, fsdp)

    counts = model.param_counts()
    flops_tok = model.flops_per_token(m.context)
    byte_lengths = torch.from_numpy(tok.token_byte_lengths)
    peak = peak_flops(device)

    tracker = None
    if d.main:
        from bytelm.tracking import Tracker

        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        name = cfg.tracking.run_name or run_dir.name
        tracker = Tracker(run_dir, to_dict(cfg), experiment=cfg.tracking.experiment, run_name=name,
                          use_mlflow=cfg.tracking.mlflow, tags=tags, parent_run_id=parent_run_id)
        tracker.rewind(state["step"])
        tracker.set_status("running", step=state["step"])
        if state["step"] == 0:
            tracker.log_metrics({f"model/{k}": v for k, v in counts.items()}
                                | {"model/flops_per_token": flops_tok,
                                   "model/flops_per_token_head1": model.flops_per_token(m.context, n_heads=1)}, step=0)

    saved_step = state["step"] if start else None  # of the newest step checkpoint

    def save(name: str) -> None:
        """Called by every rank; rank 0 writes. Under FSDP every rank takes part in
        gathering the full state first."""
        nonlocal saved_step
        if name.startswith("step_"):
            saved_step = state["step"]
        if fsdp:
            model_sd, optim_sd = full_state_dicts(model, optimizer, names)
            if d.main:
                ckpt.save_checkpoint(run_dir, name, model_sd, cfg, tok, state, optim_sd, scheduler)
        elif d.main:
            ckpt.save_checkpoint(run_dir, name, model, cfg, tok, state, optimizer, scheduler)

    from tqdm import tqdm

    bar = tqdm(total=t.steps, initial=state["step"], disable=not d.main, desc=run_dir.name, dynamic_ncols=True)
    last_tick = time.time()
    window: list[tuple[float, list[float]]] = []
    tic, window_tokens, window_bytes = time.time(), 0, 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    last_val: dict[str, float] = {}
    signals = StopSignals()
    try:
        while state["step"] < t.steps:
            step = state["step"]
            x_all, y_all = train_ds.batch(step, m.context, m.n_future, t.batch_size, t.seed, d.rank, d.world)
            weights = head_weights(t, m.n_future, step)
            total, per_head, grad_norm = optimizer_step(step_setup, x_all, y_all, weights)
            if not math.isfinite(total) or not math.isfinite(grad_norm):
                raise FloatingPointError(f"non-finite loss ({total}) or gradient norm ({grad_norm}) at step {step}")
            scheduler.step()

            step_tokens = t.batch_size * m.context
            step_bytes = int(byte_lengths[x_all].sum()) * d.world  # this rank's share × ranks
            state["step"] = step + 1
            now = time.time()
            state["train_s"] += now - last_tick
            last_tick = now
            state["tokens_seen"] += step_tokens
            state["bytes_seen"] += step_bytes
            window.append((total, per_head))
            window_tokens += step_tokens
            window_bytes += step_bytes
            bar.update(1)

            if d.main and (state["step"] % t.log_every == 0 or state["step"] == t.steps):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = max(time.time() - tic, 1e-9)
                row = {
                    "loss": float(np.mean([w[0] for w in window])),
                    **window_head_losses(window, m.n_future),
                    **{f"mtp/weight/head_{i + 1}": w for i, w in enumerate(weights)},
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "tokens_per_s": window_tokens / dt,
                    "bytes_per_s": window_bytes / dt,
                    "train/tokens_seen": state["tokens_seen"],
                    "train/bytes_seen": state["bytes_seen"],
                    "train/flops": state["tokens_seen"] * flops_tok,
                    "train/wall_s": state["train_s"],
                }
                if device.type == "cuda":
                    row["train/gpu_s"] = state["train_s"] * d.world
                if peak:
                    row["mfu"] = flops_tok * window_tokens / dt / (peak * d.world)
                if device.type == "cuda":
                    row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                tracker.log_metrics(row, state["step"])
                bar.set_postfix_str(progress_text(row, m.n_future))
                window, window_tokens, window_bytes, tic = [], 0, 0, time.time()

            done = state["step"] == t.steps
            out_of_time = t.time_limit_s > 0 and time.time() - started > t.time_limit_s
            if t.time_limit_s > 0 and d.world > 1:  # every rank stops at the same step
                out_of_time = rank0_says(out_of_time, device)
            if state["step"] % t.eval_every == 0 or done or out_of_time:
                metrics = evaluate(model, val_ds, cfg, device, autocast, micro)
                last_val = metrics
                if d.main:
                    # with the bytes seen, so that validation curves of byte and BPE runs share an x-axis
                    tracker.log_metrics({**metrics, "train/bytes_seen": state["bytes_seen"]}
                                        | ({"summary/val_bpb": metrics["val/bpb"]} if done or out_of_time else {}),
                                        state["step"])
                better = metrics["val/bpb"] < state["best_val_bpb"]
                if fsdp:  # saving is a collective there: every rank must agree
                    better = rank0_says(better, device)
                if better:
                    state["best_val_bpb"] = metrics["val/bpb"]
                    save("best")
            if state["step"] % t.checkpoint_every == 0 or done or out_of_time:
                save(f"step_{state['step']:07d}")
                if d.main:
                    ckpt.prune_checkpoints(run_dir, t.keep_last)
            if out_of_time:
                break
            asked_to_stop = signals.signum is not None
            if d.world > 1:  # every rank stops at the same step
                asked_to_stop = any_rank(asked_to_stop, device)
            if asked_to_stop:
                if saved_step != state["step"]:  # the steps since the last checkpoint are kept
                    save(f"step_{state['step']:07d}")
                    if d.main:
                        ckpt.prune_checkpoints(run_dir, t.keep_last)
                name = signal.Signals(signals.signum or signal.SIGTERM).name
                raise Stopped(signals.signum or signal.SIGTERM,
                              f"stopped by {name} at step {state['step']} of {t.steps}, checkpointed in "
                              f"{ckpt.checkpoints_dir(run_dir)}; the same command resumes it")
    except BaseException as e:
        if tracker is not None:
            status = ("stopped" if isinstance(e, Stopped) else "killed" if isinstance(e, KeyboardInterrupt)
                      else "failed")
            tracker.set_status(status, error=f"{type(e).__name__}: {e}", step=state["step"])
        if isinstance(e, FloatingPointError):
            raise UserError(f"{e}; the run stopped, its last good checkpoint is kept in {run_dir / 'checkpoints'}") from None
        raise
    finally:
        signals.restore()
        bar.close()
        if d.world > 1:
            dist.destroy_process_group()
    result = {"step": state["step"], "best_val_bpb": state["best_val_bpb"]}
    if tracker is not None:
        status = "finished" if state["step"] >= t.steps else "stopped"
        from bytelm.fileio import read_jsonl
        from bytelm.run_plots import val_bpb_by_head

        plot = val_bpb_by_head(read_jsonl(tracker.metrics_path), m.n_future, run_dir / "plots" / "val_bpb_by_head.png")
        if plot:
            tracker.log_artifact(plot, "plots")
        tracker.set_status(status, step=state["step"])
        print(final_summary(run_dir, status, state["step"], t.steps, last_val, m.n_future, tracker), flush=True)
        tracker.close()
    return result


def progress_text(row: dict, n_future: int) -> str:
    """The progress bar's text: the loss says what it sums (8 heads' sum looks like a
    diverged run when read as one head's)."""
    heads = f" = sum of {n_future} heads, head 1 {row['loss/head_1']:.3f}" if n_future > 1 else ""
    return f"loss {row['loss']:.3f}{heads} (nats/token), {row['bytes_per_s']:.3g} bytes/s"


def final_summary(run_dir: Path, status: str, step: int, steps: int, val: dict, n_future: int, tracker) -> str:
    """What a run ends with on the console: validation bits per byte of every head, the
    checkpoint and the MLflow run."""
    lines = [f"\n{run_dir.name}: {status} at step {step} of {steps}"]
    if val:
        bpb = "  ".join(f"{h}: {val[f'val/bpb/head_{h}']:.3f}" for h in range(1, n_future + 1))
        lines.append(f"  validation bits per byte by head  {bpb}")
    last = ckpt.list_checkpoints(run_dir)
    lines.append(f"  checkpoint  {last[-1] if last else 'none'}"
                 + (f" (best validation: {run_dir / 'checkpoints' / 'best'})" if (run_dir / "checkpoints" / "best").is_dir()
                    else ""))
    if tracker.run_id:
        from bytelm.tracking import read_mlflow_json

        info = read_mlflow_json(run_dir) or {}
        lines.append(f"  MLflow run  {tracker.run_id} (experiment id {info.get('experiment_id')}, "
                     f"store {info.get('tracking_uri')})")
    else:
        lines.append(f"  MLflow run  none (tracking.mlflow=false): `bytelm track import {run_dir}` logs it")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def add_arguments(p) -> None:
    p.add_argument("--config", help="YAML config (defaults: bytelm/config.py)")
    p.add_argument("--run-dir", required=True, help="run directory; resumes from its latest checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable (e.g. model.n_future=8)")
    p.add_argument("--parent-run-id", help="MLflow parent run (sweeps)")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="MLflow tag, repeatable")


def main(args) -> int:
    from bytelm.cli import STARTED

    from bytelm.folderlock import lock_folder

    cfg = load_config(args.config, args.set)
    bad = [t for t in args.tag if "=" not in t or not t.split("=", 1)[0].strip()]
    if bad:
        raise UserError(f"--tag takes KEY=VALUE, got {bad[0]!r}")
    tags = dict(t.split("=", 1) for t in args.tag)
    if args.parent_run_id and cfg.tracking.mlflow:
        from bytelm.tracking import check_parent_run, mlflow_client

        check_parent_run(mlflow_client(), args.parent_run_id)
    # One process trains into a run directory at a time (rank 0 holds the lock for the job).
    held = lock_folder(args.run_dir, "bytelm train") if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        train(cfg, Path(args.run_dir), parent_run_id=args.parent_run_id, tags=tags, started=STARTED)
    finally:
        if held is not None:
            held.release()
    return 0
