"""The training loop: one DeepSpeed engine + a method's external state, one ``step()``."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from meft_ds import checkpoint, ds_config, memory, reporting, run_dir
from meft_ds import dist as mdist
from meft_ds.config import TrainConfig
from meft_ds.data import IGNORE, BatchSchedule
from meft_ds.errors import UserError
from meft_ds.methods.base import Method


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens (labels != -100), in fp32.

    A micro-batch without answer tokens (all truncated away) gives 0 with zero
    gradients, not NaN."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=IGNORE, reduction="sum",
    )
    return total / (shift_labels != IGNORE).sum().clamp(min=1)


def grad_sq_norm(grads: list[torch.Tensor]) -> float:
    """Squared L2 norm of ``grads`` together (each summed in fp32)."""
    return float(sum(g.detach().float().pow(2).sum() for g in grads)) if grads else 0.0


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """The factor global clipping at ``max_norm`` applies to gradients of norm
    ``total_norm`` (``torch.nn.utils.clip_grad_norm_``'s; 1 when ``max_norm <= 0``)."""
    return min(1.0, max_norm / (total_norm + 1e-6)) if max_norm > 0 else 1.0


def world() -> tuple[int, int]:
    """(rank, world size)."""
    return mdist.rank(), mdist.world_size()


def sum_across_ranks(*values: float) -> list[float]:
    """Sum scalars over data-parallel ranks (one all-reduce)."""
    if world()[1] == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=mdist.comm_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


class Trainer:
    """Runs optimizer steps ``start..max_steps`` and writes metrics and checkpoints."""

    def __init__(
        self, cfg: TrainConfig, engine: Any, method: Method, schedule: BatchSchedule,
        device: torch.device, periodic_eval: Any = None, identity: dict | None = None,
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.method = method
        self.schedule = schedule
        self.device = device
        self.periodic_eval = periodic_eval
        self.identity = identity  # written with each checkpoint (run_dir.check_identity)
        self.rank, self.world_size = world()
        self.accum = engine.gradient_accumulation_steps()
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.metrics_path = self.out / "metrics.jsonl"
        self.step = 0
        self.clip = float(engine.gradient_clipping() or 0.0)
        self.reporter = reporting.Reporter()  # --report_to's, while fit() runs (rank 0)

    # --- state -------------------------------------------------------------------
    def client_state(self) -> dict[str, Any]:
        """What the engine checkpoint carries besides weights/optimizer/scheduler."""
        return {"step": self.step, "rng": checkpoint.rng_state(), "world_size": self.world_size,
                "train_batch_size": self.engine.train_batch_size(),
                "max_steps": self.cfg.max_steps, "schedule_steps": self._schedule_steps()}

    def _schedule_steps(self) -> int | None:
        """The steps the learning-rate schedule spans (``None``: no such schedule)."""
        steps = getattr(self.engine.lr_scheduler, "total_num_steps", None)
        return int(steps) if isinstance(steps, (int, float)) else None

    def resume(self) -> None:
        """Load the newest checkpoint and continue from its step with its RNG state.

        The data position is a count of global batches, so the global batch must stay the
        same; the world size may change (then every rank takes rank 0's RNG state, and
        dropout masks differ from an uninterrupted run's)."""
        state = checkpoint.load(self.engine, self.method, self.ckpt_root)
        self._check_batch(state)
        self.step = int(state["step"])
        ds_config.reapply_schedule(self.engine)
        self._check_length(state)
        checkpoint.set_rng_state(state["rng"])
        if self.rank == 0:
            run_dir.truncate_metrics(self.metrics_path, self.step)

    def _check_length(self, state: dict[str, Any]) -> None:
        """A schedule laid out over another number of steps is noted (the rates from here
        on differ); a --max_steps short of the checkpoint is refused before (runner)."""
        saved, now = state.get("schedule_steps"), self._schedule_steps()
        if saved is not None and now is not None and saved != now and self.rank == 0:
            print(f"note: the learning-rate schedule now spans {now} steps (the checkpoint's "
                  f"{saved}, --max_steps {state.get('max_steps')} -> {self.cfg.max_steps}); "
                  f"steps {self.step + 1} on follow the new schedule", flush=True)

    def _check_batch(self, state: dict[str, Any]) -> None:
        saved, now = state.get("train_batch_size"), self.engine.train_batch_size()
        ranks, micro = state.get("world_size"), self.engine.train_micro_batch_size_per_gpu()
        if saved is not None and saved != now:
            raise UserError(
                f"`resume`: the checkpoint trained on global batches of {saved} examples "
                f"({ranks} rank(s)); this run's is {now} (micro {micro} x "
                f"accumulation {self.accum} x {self.world_size} rank(s)): change `grad_accum` "
                "or `micro_batch_size` to keep it, or start a new run"
            )
        if ranks is not None and ranks != self.world_size and self.rank == 0:
            print(f"note: resuming a {ranks}-rank checkpoint on {self.world_size} rank(s): the "
                  "same data order; dropout masks differ from an uninterrupted run", flush=True)

    def save(self) -> Path:
        """Checkpoint now."""
        return checkpoint.save(
            self.engine, self.method, self.ckpt_root, self.step, self.client_state(),
            self.cfg.keep_checkpoints, self.identity,
        )

    # --- one step ----------------------------------------------------------------
    def _micro_step(self, accum_index: int, meter: memory.SavedTensorMeter) -> tuple[float, int]:
        index = BatchSchedule.index(self.step, accum_index, self.accum, self.rank, self.world_size)
        host = self.schedule.batch(index)
        batch = {k: v.to(self.device) for k, v in host.items()}
        self.method.before_forward(host)
        with meter.record():
            logits = self.method.forward(self.engine, batch["input_ids"], batch["attention_mask"])
            loss = lm_loss(logits, batch["labels"])
        self.method.before_backward()
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        pre_norm = self._clip_before_step() if boundary else None
        lr = self.engine.get_lr()[0]  # this step's; the scheduler moves on in step()
        self.engine.step()
        if boundary:
            self._step_lr = lr
            self._finish_step(pre_norm, lr)
        return float(loss.detach()), int(batch["attention_mask"].sum())

    def _plain_fp32(self) -> bool:
        eng = self.engine
        return not (eng.fp16_enabled() or eng.bfloat16_enabled() or eng.zero_optimization())

    def _clip_before_step(self) -> float | None:
        """In the plain fp32 path, clip engine and external gradients by one global norm.

        The engine's own clipping then sees a norm <= the limit and does nothing. Other
        paths keep gradients inside DeepSpeed's optimizer, which clips them by the
        engine's norm; the external gradients are then clipped by the global norm.
        """
        if not self._plain_fp32():
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        sq = grad_sq_norm(grads)
        total = math.sqrt(sq + self.method.external_grad_sq_norm())
        if self.clip > 0 and total > self.clip:
            scale = self.clip / (total + 1e-6)
            for g in grads:
                g.mul_(scale)
        return math.sqrt(sq)

    def _finish_step(self, engine_norm: float | None, lr: float) -> None:
        if engine_norm is None:
            norm = self.engine.get_global_grad_norm()
            engine_norm = float(norm) if norm is not None else 0.0
        total = math.sqrt(engine_norm**2 + self.method.external_grad_sq_norm())
        coef = clip_coefficient(total, self.clip)
        self._grad_norm = total
        self.method.after_engine_step(lr, coef)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step (all its micro-batches); returns the step's metrics."""
        self.engine.train()
        meter = memory.SavedTensorMeter().exclude_module(self.engine.module)
        start = time.perf_counter()
        losses, tokens = [], 0
        for a in range(self.accum):
            meter.reset()
            loss, n = self._micro_step(a, meter)
            losses.append(loss)
            tokens += n
        elapsed = time.perf_counter() - start
        lr = self._step_lr  # the rate this step applied (get_lr() is now the next step's)
        self.step += 1
        loss_sum, tokens = sum_across_ranks(sum(losses) / len(losses), tokens)
        record: dict[str, Any] = {
            "step": self.step,
            "loss": loss_sum / self.world_size,
            "lr": lr,
            "grad_norm": getattr(self, "_grad_norm", float("nan")),
            "tokens": int(tokens),  # answer and prompt tokens of all ranks
            "step_s": elapsed,
            "tokens_per_s": tokens / max(elapsed, 1e-9),
            "saved_activation_bytes": meter.total_bytes,
            **memory.snapshot(),
            **self.method.step_metrics(),
        }
        return record

    # --- the loop -----------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            with self.metrics_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            self.reporter.log(record)

    def fit(self) -> list[dict[str, Any]]:
        """Train until ``max_steps``; returns the metric records of this run."""
        if self.rank == 0:
            config = {"train": self.cfg.__dict__, "method": vars(self.method.options)}
            self.reporter = reporting.start(self.cfg.report_to, self.out, self.step, config)
        try:
            return self._fit()
        finally:
            self.reporter.close()
            self.reporter = reporting.Reporter()

    def _fit(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        history: list[dict[str, Any]] = []
        bar = tqdm(
            total=cfg.max_steps, initial=self.step, desc=f"train[{self.method.name}]",
            disable=not cfg.progress or self.rank != 0, dynamic_ncols=True,
        )
        if self.step == 0 and self.method.needs_calibration():
            # a new run: the method's state set from data (context routing's centres)
            self.engine.train()
            self.method.calibrate(self.engine, [
                self.schedule.batch(BatchSchedule.index(0, a, self.accum, self.rank,
                                                        self.world_size))
                for a in range(self.accum)])
        while self.step < cfg.max_steps:
            record = self.train_step()
            history.append(record)
            if self.step % cfg.log_steps == 0 or self.step == cfg.max_steps:
                self._log(record)
                if not cfg.progress and self.rank == 0:  # plain lines for non-interactive logs
                    print(f"step {self.step}/{cfg.max_steps} loss {record['loss']:.4f} "
                          f"lr {record['lr']:.3g} tok/s {record['tokens_per_s']:.0f} "
                          f"rss {record['rss_gib']:.1f}G", flush=True)
            bar.update(1)
            bar.set_postfix(
                loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                rss=f"{record['rss_gib']:.1f}G",
                **({"cuda": f"{record['cuda_peak_alloc_gib']:.1f}G"}
                   if "cuda_peak_alloc_gib" in record else {}),
            )
            if cfg.save_steps and self.step % cfg.save_steps == 0:
                self.save()
            if cfg.eval_steps and self.periodic_eval and self.step % cfg.eval_steps == 0:
                score = self.periodic_eval()
                self._log({"step": self.step, "periodic_eval": score})
                if self.rank == 0:
                    bar.write(f"step {self.step}: periodic evaluation {100 * score:.1f}%")
            if cfg.stop_after is not None and self.step >= cfg.stop_after:
                if cfg.stop_rank is None:
                    bar.close()
                    print(f"stopped after step {self.step} (--stop_after: no final checkpoint, "
                          "export or evaluation)", file=sys.stderr, flush=True)
                    os._exit(0)  # simulate a crash: no final checkpoint, export or evaluation
                if cfg.stop_rank == self.rank:
                    os._exit(1)  # one rank dies; the others must fail, not hang
        bar.close()
        return history
