"""The setup of a training run in named steps (faceid.trainer's Trainer inherits them): seeds,
the ckpt_dir, the folders, the network, the images, the pairs protocol, the objective and
optimizer, the transforms, a resume, and the run's first files."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from faceid import events
from faceid.checkpoint import load_checkpoint
from faceid.config import TrainConfig
from faceid.data import BatchTransform, IdentityFolder
from faceid.evaluate import (
    EvalPairs,
    same_files,
)
from faceid.imagestore import load_images
from faceid.model import EmbeddingNet, build_model
from faceid.objectives import Trainee, build_objective
from faceid.optimization import build_optimizer, lr_lambda
from faceid.run_data import load_options, load_protocol_images, scan_run_folders
from faceid.run_folder import prepare_ckpt_dir, start_files
from faceid.run_state import (
    RunState,
    check_resumable,
    restore_weights,
    resumed_state,
)
from faceid.runtime import DistEnv, set_threads
from faceid.teacher import teacher_vectors
from faceid.teacher_files import check_teacher

log = logging.getLogger("faceid.train")  # the training log lines keep the name they always had

EventSink = Callable[[dict[str, Any]], None]


ParamList = Union[tuple[torch.Tensor, ...], list[torch.Tensor]]


def ema_update(decay: float) -> Callable[[ParamList, ParamList, Union[torch.Tensor, int]], None]:
    """AveragedModel's update for --ema_decay: the plain mean of the weights seen so far until
    1 / (1 - decay) steps have been averaged, then the exponential average with `decay`. A fixed
    decay from the first step would keep the random initial weights in the average of a short run
    (0.995^240 = 30 % of it after 240 steps)."""

    def update(averaged: ParamList, current: ParamList, n_averaged: Union[torch.Tensor, int]) -> None:
        keep = min(decay, 1.0 - 1.0 / (float(n_averaged) + 1.0))
        if averaged and torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - keep)
        else:  # counters (BatchNorm's num_batches_tracked): the current value
            for a, c in zip(averaged, current):
                a.copy_(c)

    return update


class TrainerSetup:
    """The setup steps of `faceid.trainer.Trainer`, which holds the attributes they fill."""

    # set by Trainer.__init__
    cfg: TrainConfig
    dist: DistEnv
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    ckpt_dir: Path

    def emit(self, event: events.Event) -> None:
        raise NotImplementedError  # Trainer's

    def _pace(self, step: int) -> float:
        raise NotImplementedError  # Trainer's

    # -- setup -----------------------------------------------------------------------------
    def setup(self) -> None:
        """Load data, build the model and optimizer (and resume); `fit()` calls it if needed."""
        if getattr(self, "_ready", False):
            return
        self._setup()
        self._ready = True

    def _setup(self) -> None:
        """The run's parts, in this order: seeds, the ckpt_dir, the folders listed, the network
        (before any image is decoded, so missing weights stop the run at once), the images, the
        pairs protocol, compute threads, the objective and optimizer, then a resume and the run's
        first files."""
        self._seed_and_tune()
        check_teacher(self.cfg.distill)  # before any image is decoded
        if self.dist.is_main:
            prepare_ckpt_dir(self.ckpt_dir)
        train, val = scan_run_folders(self.cfg)
        model = self._build_network()
        self._load_data(train, val)
        self._load_protocol()
        set_threads(self.cfg, self.device, cached=self.train_store.cached is not None)
        self._build_trainee(model)
        self._build_optimization()
        self._build_transforms()
        self.state = RunState()
        if self.cfg.resume:
            self._resume(self.cfg.resume)
        if self.dist.is_main:
            self._start_files()

    def _seed_and_tune(self) -> None:
        """Seed torch (each rank its own stream) and let a GPU use TF32 and cuDNN's autotuner."""
        torch.manual_seed(self.cfg.seed + self.dist.rank)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True

    def _build_network(self) -> EmbeddingNet:
        """The embedding network: with --pretrained its ImageNet trunk, with --init_from (unless
        resuming: last.pt holds the fine-tuned weights already) the base model's weights."""
        cfg = self.cfg
        model = build_model(
            embedding_size=cfg.embedding_size,
            pretrained=cfg.pretrained,
            pretrained_weights=cfg.pretrained_weights,
            neck=cfg.neck,
            img_size=cfg.img_size,
            dropout=cfg.dropout,
        )
        if cfg.init_from and not cfg.resume:
            from faceid.finetune import load_base

            base = load_base(model, cfg)
            log.info(
                "fine-tuning %s (epoch %s, %s)",
                cfg.init_from,
                base["epoch"],
                ", ".join(
                    f"{k} {v:.4f}"
                    for k, v in base["metrics"].items()
                    if k in ("auc", "acc", "tar_1e-3") and isinstance(v, (int, float))
                ),
            )
        return model

    def _load_options(self, evaluated: bool = False) -> dict[str, Any]:
        """load_images' arguments. Only rank 0 evaluates: for images only evaluation uses
        (`evaluated`), the other ranks check the headers, not decode them."""
        return load_options(self.cfg, self.device, cache="off" if evaluated and not self.dist.is_main else None)

    def _load_data(self, train: IdentityFolder, val: IdentityFolder) -> None:
        """Decode (or check) the --train and --val images, and sample the fixed evaluation pairs."""
        cfg = self.cfg
        self.train_folder, self.train_store = load_images(
            train,
            cfg.img_size,
            what="--train",
            min_identities=2,
            progress=self._faces_progress("--train"),
            **self._load_options(),
        )
        self.val_folder, self.val_store = load_images(
            val,
            cfg.img_size,
            what="--val",
            min_identities=2,
            progress=self._faces_progress("--val"),
            min_per_identity=2,
            **self._load_options(evaluated=True),
        )
        self.eval_pairs = EvalPairs.sample(self.val_folder, cfg.eval_pairs, cfg.seed)

    def _load_protocol(self) -> None:
        """With --pairs_file: its pairs, and its images decoded (those without a face unaligned)."""
        self.protocol, self._protocol_folder = None, None
        if not self.cfg.pairs_file:
            return
        folder, self.protocol = load_protocol_images(
            self.cfg, self._faces_progress("--pairs_file"), **self._load_options(evaluated=True)
        )
        # Images that --val holds too (the same files) are embedded once, with --val's.
        self._protocol_in_val = same_files(list(folder.paths), list(self.val_folder.paths))
        self._protocol_folder = folder

    def _build_trainee(self, model: EmbeddingNet) -> None:
        """The objective (its head sized for --train's people) around the network, on the device."""
        cfg = self.cfg
        teacher = None
        if cfg.distill != "none":
            # the first process computes what the cache lacks; the others then read it (on another
            # host with a cache of its own they compute it too)
            if not self.dist.is_main:
                self.dist.barrier()
            teacher = teacher_vectors(
                list(self.train_folder.paths),
                cfg.distill,
                load_options(cfg, self.device)["detector"],
                workers=cfg.workers,
                progress=self._faces_progress(f"--train ({cfg.distill} descriptors)"),
                what="--train",
            )
            if self.dist.is_main:
                self.dist.barrier()
        objective = build_objective(cfg, self.train_folder.labels, self.train_folder.num_identities, teacher)
        self.trainee = Trainee(model, objective).to(self.device)
        if cfg.channels_last:
            self.trainee.to(memory_format=torch.channels_last)
        self.model = self.trainee.model
        self.objective = self.trainee.objective

    def _build_optimization(self) -> None:
        """Optimizer, the epoch's steps (this rank's share, at most --max_steps_per_epoch), the
        learning-rate schedule and the fp16 gradient scaler."""
        cfg = self.cfg
        self.optimizer = build_optimizer(cfg, self.trainee)
        n_batches = len(self.objective.epoch_batches(np.random.default_rng(0)))
        self.steps_per_epoch = max(1, n_batches // self.dist.world_size)
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self._time_share, self._first_step = 0.0, 0
        # (when the schedule's clock started, the time limit's deadline) under --fit_to_time_limit
        self._clock: Optional[tuple[float, float]] = None
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg, self.steps_per_epoch, self._pace)
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        # --ema_decay: a moving average of the network's weights (and batch-norm statistics),
        # updated after every step; it is what is evaluated and saved as backbone_best.pt
        self.ema: Optional[AveragedModel] = None
        if cfg.ema_decay > 0:
            self.ema = AveragedModel(self.model, multi_avg_fn=ema_update(cfg.ema_decay), use_buffers=True)

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are evaluated and saved as the best: the moving average with
        --ema_decay, else the network itself."""
        return self.ema.module if self.ema is not None else self.model

    def _build_transforms(self) -> None:
        """Batch transforms on the device: augmenting for training, plain for evaluation."""
        cfg = self.cfg
        self.train_tf = BatchTransform(
            self.device, augment=cfg.augment != "none", shift=cfg.augment == "light", channels_last=cfg.channels_last
        )
        self.eval_tf = BatchTransform(self.device, augment=False, channels_last=cfg.channels_last)

    def _faces_progress(self, what: str):
        """The progress callback of face detection in `what`'s images: `faces` events."""

        def report(done: int, total: int) -> None:
            self.emit(events.Faces(what=what, done=done, total=total))

        return report

    def _start_files(self) -> None:
        """config.json, no_face.txt and a fresh metrics.jsonl in ckpt_dir (faceid.run_folder)."""
        start_files(
            self.ckpt_dir,
            self.cfg,
            (("train", self.train_folder), ("val", self.val_folder), ("pairs_file", self._protocol_folder)),
        )

    def _resume(self, path: str) -> None:
        """Go on from the last.pt at `path`: refused if it does not fit this run (faceid.run_state)."""
        ck = load_checkpoint(path, map_location=self.device)
        check_resumable(ck, path, self.cfg, self.train_folder.num_identities)
        restore_weights(
            ck,
            model=self.model,
            head=getattr(self.objective, "head", None),
            projection=getattr(self.objective, "projection", None),
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
        )
        if self.ema is not None:  # the average goes on; a last.pt without one starts it from its weights
            saved = ck.get("ema")
            self.ema.module.load_state_dict(saved["model"] if saved else self.model.state_dict())
            self.ema.n_averaged.fill_(saved["n_averaged"] if saved else 1)
        self.state = resumed_state(ck, path, self._epoch_plan())
        self._first_step = self.state.global_step
        log.info(
            "resumed from %s at epoch %d%s",
            path,
            self.state.epoch + 1,
            f", step {self.state.partial_steps + 1}" if self.state.partial_steps else "",
        )

    def _epoch_plan(self) -> dict[str, int]:
        """How this run divides an epoch into steps (last.pt keeps it: a resume with another plan
        cannot go on inside a stopped epoch)."""
        return {"steps": self.steps_per_epoch, "world_size": self.dist.world_size}
