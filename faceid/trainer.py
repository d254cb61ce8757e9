"""The training run: `run(cfg, on_event) -> result` (imported from faceid.train as well; the
command line of a run is faceid.cli_train).

One loop serves both objectives (faceid.objectives). Per epoch: train; then, every eval_every
epochs (and not sooner than eval_every_min after the last time), evaluate on --val (and on
--pairs_file), rank by --best_metric, write backbone_best.pt / last.pt (at most every
save_every_min) / metrics.jsonl. The last epoch, and one a stop ends, are always evaluated and
saved. Checkpoints are written on a background thread while the next epoch trains, and an epoch's record
(metrics.jsonl, its `epoch` event) follows once they are on disk. Progress,
results and where the time went (setup, train, eval, checkpoint seconds) go out as events
(docs/CONTRACTS.md, section 1).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Callable, Literal, Optional, TypedDict

import numpy as np
import torch
from torch import nn

from faceid import events
from faceid.checkpoint import CheckpointWriter
from faceid.config import TrainConfig
from faceid.errors import ConfigError, FaceIDError
from faceid.evaluate import (
    autocast_ctx,
    cosine_scores,
    embed_store,
    score_protocol,
    score_sampled,
)
from faceid.imagestore import batch_images
from faceid.metrics import roc_points
from faceid.optimization import set_trunk_frozen, train_mode
from faceid.run_folder import append_metrics, write_roc
from faceid.run_state import (
    RunResult,
    checkpoint_dict,
    last_checkpoint_dict,
)
from faceid.runtime import DistEnv, resolve_amp, resolve_device
from faceid.trainer_setup import TrainerSetup

log = logging.getLogger("faceid.train")  # the training log lines keep the name they always had

EventSink = Callable[[dict[str, Any]], None]


class Split(TypedDict):
    """events.TimeSplit's fields, in seconds."""

    setup_s: float
    train_s: float
    eval_s: float
    checkpoint_s: float
    wall_s: float


class Trainer(TrainerSetup):
    """Holds everything of one run; `fit()` runs it."""

    def __init__(
        self, cfg: TrainConfig, on_event: Optional[EventSink] = None, stop: Optional[threading.Event] = None
    ) -> None:
        self.cfg = cfg
        self.emit_fn = on_event
        self.stop = stop or threading.Event()
        self.dist = DistEnv.from_env(cfg.device)
        self.device = resolve_device(cfg.device, self.dist)
        self.amp_dtype = resolve_amp(cfg.amp, self.device)
        self.ckpt_dir = Path(cfg.ckpt_dir)
        self._emit_lock = threading.Lock()  # the checkpoint writer's thread emits too
        # seconds of this process so far: TimeSplit's setup, train, eval and checkpoint
        self._times = dict.fromkeys(("setup", "train", "eval", "checkpoint"), 0.0)
        self._t0 = time.time()
        self._first_step_s: Optional[float] = None  # how long this process's first step took
        self._writer: Optional[CheckpointWriter] = None

    # -- events ----------------------------------------------------------------------------
    def emit(self, event: events.Event) -> None:
        if self.dist.is_main and self.emit_fn is not None:
            with self._emit_lock:
                self.emit_fn(event.to_json())

    def time_split(self) -> "Split":
        """TimeSplit's fields: this process's seconds so far."""
        t = {k: round(v, 2) for k, v in self._times.items()}
        return Split(
            setup_s=t["setup"],
            train_s=t["train"],
            eval_s=t["eval"],
            checkpoint_s=t["checkpoint"],
            wall_s=round(time.time() - self._t0, 2),
        )

    def _pace(self, step: int) -> float:
        """How far the schedule (lr, margin warm-up) is, in steps. By steps, unless a time limit
        (with fit_to_time_limit) is used up faster than the steps: then the steps left when this
        run started are spread over the time limit, so the cosine ends at the limit."""
        if not self._time_share:
            return float(step)
        first = self._first_step
        return max(float(step), first + self._time_share * (self.total_steps - first))

    # -- the loop --------------------------------------------------------------------------
    def fit(self) -> RunResult:
        t0 = self._t0 = time.time()
        self.setup()
        cfg, st = self.cfg, self.state
        self.emit(
            events.Start(
                epochs=cfg.epochs,
                steps_per_epoch=self.steps_per_epoch,
                device=str(self.device),
                amp=str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off",
                world_size=self.dist.world_size,
                start_epoch=st.epoch + 1,
                train_images=len(self.train_folder),
                train_identities=self.train_folder.num_identities,
                val_images=len(self.val_folder),
                skipped_images=len(self.train_folder.skipped) + len(self.val_folder.skipped),
                no_face_images=len(self.train_folder.no_face) + len(self.val_folder.no_face),
                config=cfg.to_json_dict(),
            )
        )
        deadline = t0 + cfg.time_limit_min * 60 if cfg.time_limit_min else math.inf
        # The schedule's clock starts with the first step (after decoding), the limit's with fit().
        self._clock = (time.time(), deadline) if cfg.fit_to_time_limit and cfg.time_limit_min else None
        self._times["setup"] = time.time() - t0
        # The evaluation and last.pt cadence: epochs and times of the previous ones (the first
        # counts from the start of training)
        self._last_eval = (st.epoch, time.time())
        self._last_saved = time.time()
        if self.dist.is_main:
            self._writer = CheckpointWriter()
        stopped = False
        ddp = None
        try:
            for epoch in range(st.epoch + 1, cfg.epochs + 1):
                frozen = epoch <= cfg.freeze_backbone_epochs
                set_trunk_frozen(self.model, frozen)
                ddp = self.dist.wrap(self.trainee, self.device, key=frozen, ddp=ddp)
                t_epoch = time.time()
                loss, stopped, steps = self._train_epoch(epoch, frozen, self._compiled(ddp), deadline)
                self._count_training(time.time() - t_epoch)
                # Stopped before its last step, the epoch is evaluated and saved as it is, and
                # last.pt says how far it got: a resume trains its remaining steps, not the next epoch.
                complete = steps >= self.steps_per_epoch
                st.epoch, st.partial_steps = (epoch, 0) if complete else (epoch - 1, steps)
                final = stopped or epoch == cfg.epochs
                if self._evaluation_due(epoch, final):
                    self._end_epoch(epoch, loss, t_epoch, steps, final)
                if stopped:
                    break
            if self._writer is not None:  # every checkpoint in place before the run reports its end
                t = time.time()
                self._writer.wait()
                self._times["checkpoint"] += time.time() - t
            return self._finish(stopped)
        finally:
            if self._writer is not None:
                self._writer.close()

    def _compiled(self, module: nn.Module) -> Callable[..., torch.Tensor]:
        """What the steps run: `module`, or with compile_step its torch.compile, made once per
        module (freezing or unfreezing the trunk makes a new one, and a new compilation)."""
        if not self.cfg.compile_step:
            return module
        if getattr(self, "_compiled_for", None) is not module:
            self._compiled_for, self._compiled_net = module, torch.compile(module)
        return self._compiled_net

    def _count_training(self, seconds: float) -> None:
        """Add an epoch's seconds to train, except this process's first step, which is setup
        (cuDNN's kernel search on a GPU, the first batch's decoding, memory pools)."""
        self._times["train"] += seconds
        if self._first_step_s is not None:
            self._times["train"] -= self._first_step_s
            self._times["setup"] += self._first_step_s
            self._first_step_s = 0.0

    def _evaluation_due(self, epoch: int, final: bool) -> bool:
        """Whether `epoch` is evaluated: the last one and a stopped one always; otherwise once
        eval_every epochs and eval_every_min minutes have passed since the previous evaluation.
        Every process agrees (the first's clock could differ from another's by a hair)."""
        cfg = self.cfg
        last_epoch, last_time = self._last_eval
        due = final or (epoch - last_epoch >= cfg.eval_every and time.time() - last_time >= cfg.eval_every_min * 60)
        return bool(self.dist.max([1.0 if due else 0.0])[0] > 0)

    def _train_epoch(
        self, epoch: int, frozen: bool, net: Callable[..., torch.Tensor], deadline: float
    ) -> tuple[float, bool, int]:
        """Train one epoch (its steps after those a resumed run already trained); returns the mean
        loss, whether a stop ended it, and how many of its steps are now trained."""
        cfg, st = self.cfg, self.state
        rng = np.random.default_rng([cfg.seed, epoch])  # same batches on every rank: shard below
        batches = self.objective.epoch_batches(rng)[self.dist.rank :: self.dist.world_size]
        batches = batches[: self.steps_per_epoch]
        skip = st.partial_steps if epoch == st.epoch + 1 else 0  # the same batches as before the stop
        i = skip
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch * 10 + self.dist.rank)
        train_mode(self.model, frozen)
        report_every = max(1, round(self.steps_per_epoch * cfg.progress_step_pct / 100))
        loss_sum, n_loss, seen, t_start = 0.0, 0, 0, time.time()
        stopped = False
        images = batch_images(
            self.train_store,
            [b.indices for b in batches[skip:]],
            workers=cfg.workers,
            pin_memory=self.device.type == "cuda",
        )
        for i, (batch, raw) in enumerate(zip(batches[skip:], images), start=skip + 1):
            epochs_done = (epoch - 1) + (i - 1) / len(batches)
            if self._time_share:
                epochs_done = max(epochs_done, self._pace(st.global_step) / self.steps_per_epoch)
            self.objective.set_progress(epochs_done)
            x = self.train_tf(raw, gen)
            y = batch.target.to(self.device, non_blocking=True)
            try:
                with autocast_ctx(self.device, self.amp_dtype):
                    loss = net(x, y)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
            except Exception as e:
                if cfg.compile_step and self._first_step_s is None:  # the compilation itself failed
                    first = (str(e).strip().splitlines() or [""])[0][:300]
                    raise ConfigError(
                        f"compile_step: torch.compile could not compile the training step ({type(e).__name__}: "
                        f"{first}); on a CPU it needs a C++ compiler (apt-get install g++), or set compile_step false"
                    ) from e
                raise
            if cfg.clip_grad_norm > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.trainee.parameters(), cfg.clip_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self._first_step_s is None:  # this process's first step: setup, not training
                self._first_step_s = time.time() - t_start
            if self._writer is not None:  # a checkpoint that could not be written ends the run now
                self._writer.check()
            # One collective per step: a stop on any rank, and the time share every rank's
            # schedule uses (the same value on all, so their learning rates agree).
            now = time.time()
            share = 0.0
            if self._clock is not None:
                start, end = self._clock
                share = min(1.0, (now - start) / max(1e-9, end - start))
            stop_flag, share = self.dist.max([1.0 if self.stop.is_set() or now > deadline else 0.0, share])
            self._time_share = share
            stop_now = stop_flag > 0
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            st.global_step += 1
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise FaceIDError(
                    f"training diverged at epoch {epoch} step {i} (loss {lv}); lower --lr, "
                    "set --clip_grad_norm 1.0, or use --preset cpu-small"
                )
            loss_sum += lv
            n_loss += 1
            seen += len(batch.indices)
            if i % report_every == 0 or i == len(batches) or stop_now:
                self._progress(epoch, i, len(batches), loss_sum / n_loss, seen, t_start, skip)
            if stop_now:
                stopped = True
                break
        return loss_sum / max(1, n_loss), stopped, (self.steps_per_epoch if i >= len(batches) else i)

    def _progress(
        self, epoch: int, step: int, steps: int, loss: float, seen: int, t_start: float, skipped: int = 0
    ) -> None:
        cfg = self.cfg
        elapsed = max(1e-9, time.time() - t_start)
        done = (epoch - 1) * steps + step
        total = cfg.epochs * steps
        rate_steps = max(1, step - skipped) / elapsed
        percent, eta = 100.0 * done / total, (total - done) / rate_steps
        if self._clock is not None:  # a time limit ends the run first: say so
            percent = max(percent, 100.0 * self._time_share)
            eta = min(eta, max(0.0, self._clock[1] - time.time()))
        self.emit(
            events.Progress(
                epoch=epoch,
                epochs=cfg.epochs,
                step=step,
                steps=steps,
                percent=round(percent, 2),
                loss=round(loss, 5),
                images_per_s=round(seen * self.dist.world_size / elapsed, 2),
                lr=self.optimizer.param_groups[1]["lr"],
                eta_s=round(eta, 1),
            )
        )

    def evaluate(self) -> dict[str, Any]:
        """Metrics of the current model on --val (and --pairs_file)."""
        cfg = self.cfg
        bs = max(cfg.batch_size, 64)
        emb = embed_store(
            self.eval_model, self.val_store, self.eval_tf, batch_size=bs, amp_dtype=self.amp_dtype, flip=cfg.eval_flip
        )
        metrics = score_sampled(emb, self.eval_pairs)
        # the curve behind those figures, written as roc.json when the epoch is the best
        self.last_roc = roc_points(cosine_scores(emb, self.eval_pairs.ia, self.eval_pairs.ib), self.eval_pairs.y)
        if self.protocol is not None:
            store, ia, ib, labels, folds = self.protocol
            in_val = self._protocol_in_val
            rest = np.flatnonzero(in_val < 0)
            pemb = np.empty((len(in_val), emb.shape[1]), np.float32)
            pemb[in_val >= 0] = emb[in_val[in_val >= 0]]
            if len(rest):
                pemb[rest] = embed_store(
                    self.eval_model,
                    store,
                    self.eval_tf,
                    batch_size=bs,
                    amp_dtype=self.amp_dtype,
                    flip=cfg.eval_flip,
                    indices=rest,
                )
            metrics.update(score_protocol(pemb, ia, ib, labels, folds))
        return metrics

    def _end_epoch(self, epoch: int, train_loss: float, t_epoch: float, steps: int, final: bool) -> None:
        """Evaluate the model of `epoch`, write backbone_best.pt if it is the best so far and
        last.pt when due (`final`: always), and report the epoch's record."""
        cfg, st = self.cfg, self.state
        self._last_eval = (epoch, time.time())
        if self.dist.is_main:
            t_eval = time.time()
            metrics = self.evaluate()
            t_files = time.time()
            self._times["eval"] += t_files - t_eval
            value = float(metrics[cfg.best_metric])
            is_best = value > st.best_value
            # `complete` false: a stop ended the epoch after `epoch_steps` of its steps (trained
            # since the start of the epoch, before and after any resume)
            record = {
                "epoch": epoch,
                "global_step": st.global_step,
                "train_loss": round(train_loss, 6),
                "lr": self.optimizer.param_groups[1]["lr"],
                **metrics,
                "margin": getattr(getattr(self.objective, "head", None), "m", None),
                "complete": steps >= self.steps_per_epoch,
                "epoch_steps": steps,
            }
            if is_best:
                st.best_epoch, st.best_value = epoch, value
                self._write(checkpoint_dict(cfg, self.eval_model, epoch, record), "best", "backbone_best.pt", epoch)
                write_roc(self.ckpt_dir, epoch, self.last_roc, metrics)
            record.update(is_best=is_best, best_epoch=st.best_epoch, best_value=st.best_value)
            st.history.append(record)
            if final or time.time() - self._last_saved >= cfg.save_every_min * 60:
                self._save_last(epoch, record)
            self._times["checkpoint"] += time.time() - t_files
            # reported once the epoch's checkpoints are on disk: a record never names a best epoch
            # whose backbone_best.pt was not written
            assert self._writer is not None
            self._writer.then(
                functools.partial(self._report, dict(record), round(time.time() - t_epoch, 2), self.time_split())
            )
            log.info(
                "epoch %d/%d loss %.4f acc %.4f th %.3f auc %.4f tar@1e-2 %.4f tar@1e-3 %.4f%s%s",
                epoch,
                cfg.epochs,
                train_loss,
                metrics["acc"],
                metrics["th"],
                metrics["auc"],
                metrics["tar_1e-2"],
                metrics["tar_1e-3"],
                f" pairs_acc {metrics['pairs_acc']:.4f}" if "pairs_acc" in metrics else "",
                ""
                if record["complete"]
                else f" (stopped after {steps} of its {self.steps_per_epoch} steps; a resume trains the rest)",
            )
        self.dist.barrier()

    def _report(self, record: dict[str, Any], epoch_s: float, split: Split) -> None:
        append_metrics(self.ckpt_dir, record)
        self.emit(events.EpochEnd(**record, epoch_time_s=epoch_s, **split))

    def _write(self, ck: dict[str, Any], kind: Literal["best", "last"], name: str, epoch: int) -> None:
        """Hand `ck` to the checkpoint writer; its Checkpoint event goes out once the file is in place."""
        path = self.ckpt_dir / name
        assert self._writer is not None  # the first process's, made by fit()
        self._writer.submit(ck, path, lambda: self.emit(events.Checkpoint(kind=kind, path=str(path), epoch=epoch)))

    def _save_last(self, epoch: int, record: dict[str, Any]) -> None:
        ck = last_checkpoint_dict(
            self.cfg,
            self.model,
            epoch,
            record,
            head=getattr(self.objective, "head", None),
            projection=getattr(self.objective, "projection", None),
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            state=self.state,
            plan=self._epoch_plan(),
            ema=self.ema,
        )
        self._write(ck, "last", "last.pt", epoch)
        self._last_saved = time.time()

    def _finish(self, stopped: bool) -> RunResult:
        result = RunResult.of(self.state, self.cfg.best_metric, self.ckpt_dir, stopped)
        split = self.time_split()
        log.info(
            "time: setup %.0f s, train %.0f s (%.0f%% of %.0f s), eval %.0f s, checkpoints %.0f s",
            split["setup_s"],
            split["train_s"],
            100 * split["train_s"] / max(1e-9, split["wall_s"]),
            split["wall_s"],
            split["eval_s"],
            split["checkpoint_s"],
        )
        self.emit(
            events.Finished(
                best_epoch=result.best_epoch,
                best_metric=result.best_metric,
                best_value=result.best_value,
                best_checkpoint=result.best_checkpoint,
                thresholds=result.thresholds,
                stopped_early=stopped,
                **split,
            )
        )
        return result


def run(cfg: TrainConfig, on_event: Optional[EventSink] = None, stop: Optional[threading.Event] = None) -> RunResult:
    """Train with `cfg`; events go to `on_event`; setting `stop` ends the run after the current step
    (the epoch is still evaluated and last.pt written)."""
    trainer = Trainer(cfg, on_event, stop)
    try:
        return trainer.fit()
    finally:
        trainer.dist.close()
