"""TrainConfig: the one description of a training run.

The same model feeds three doors: the `faceid train` / `python -m faceid.train` flags (one flag per
field, same name), the `POST /jobs` body, and the `config` stored inside every checkpoint. Field
names and defaults follow the origin pipeline (`--batch_size 256`, `--img_size 224`,
`--best_metric acc`, ...); fields the origin left implicit (learning rate, optimizer, seed, ...)
are added with defaults that work.

A run never mutates its config: values derived from it (steps per epoch, warmup steps, the device
actually used) live in the trainer.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

BEST_METRICS = ("acc", "auc", "tar_1e-2", "tar_1e-3", "pairs_acc", "pairs_auc")

# Named presets: values measured to work for a use case. A preset fills only the fields that the
# caller did not set explicitly, so `--preset cpu-small --epochs 3` keeps epochs=3.
_CPU_SMALL: dict[str, Any] = {
    "train_mode": "arcface",
    "img_size": 56,
    "batch_size": 64,
    "optimizer": "adamw",
    "lr": 1e-3,
    "weight_decay": 5e-4,
    "scheduler": "cosine",
    "warmup_epochs": 1,
    "arcface_s": 32.0,
    "arcface_m": 0.3,
    "margin_warmup_epochs": 3,
    "balanced_sampling": False,
    "augment": "flip",
    "neck": "flat",
    "eval_flip": True,
    "eval_pairs": 20000,  # 10,000 negatives: FAR 1e-3 rests on 10 false accepts
    # the average of about the last 200 steps is evaluated and saved (bench/README.md, align_compare)
    "ema_decay": 0.995,
    "epochs": 10,
    "workers": 2,
}

PRESETS: dict[str, dict[str, Any]] = {
    # Small data, no pretrained trunk, a CPU: see docs/CLI.md "Training recipe" and bench/README.md.
    "cpu-small": _CPU_SMALL,
    # One GPU and small data: cpu-small at 112 px with a larger batch and more regularisation. First
    # figures, from an H200 before cpu-small took the weight average: these size, batch, dropout and
    # weight decay reached LFW fold-1 AUC 0.945 in a 3-minute job, cpu-small unchanged 0.923; not
    # tuned further yet. An epoch of a small set takes seconds on a GPU, so evaluations come at most
    # once a minute and last.pt at most every 5 minutes (bench/job_time.py measures the split).
    "gpu": {
        **_CPU_SMALL,
        "img_size": 112,
        "batch_size": 256,
        "weight_decay": 0.05,
        "dropout": 0.3,
        "augment": "light",
        "epochs": 30,
        "eval_every_min": 1.0,
        "save_every_min": 5.0,
        "workers": 8,
    },
    # Fine-tuning a FaceID model (init_from) on a few photos of each of your people: the settings
    # the base fixes (img_size, neck, align, ...) come from it. See docs/CLI.md "Fine-tuning".
    "finetune": {
        "train_mode": "arcface",
        "batch_size": 64,
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 5e-4,
        "scheduler": "cosine",
        "warmup_epochs": 0,
        "freeze_backbone_epochs": 2,
        "backbone_lr_scale": 0.1,
        "arcface_s": 32.0,
        "arcface_m": 0.3,
        "margin_warmup_epochs": 0,
        "augment": "flip",
        "eval_flip": True,
        "eval_pairs": 20000,
        "epochs": 10,
        "workers": 2,
    },
}


class TrainConfig(BaseModel):
    """Every knob of a training run. Unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)

    preset: Optional[Literal["cpu-small", "gpu", "finetune"]] = Field(
        None,
        description="named recipe that fills every field you do not set (cpu-small: ArcFace "
        "from scratch on small data on a CPU; gpu: the same on one GPU, at 112 px; finetune: a FaceID "
        "model given as init_from, on few photos per person)",
    )

    # --- data -------------------------------------------------------------------------------
    train: str = Field(
        "data/train", max_length=4096, description="training ImageFolder root: one sub-folder of images per identity"
    )
    val: str = Field(
        "data/val", max_length=4096, description="validation ImageFolder root (identities with >= 2 images are scored)"
    )
    pairs_file: Optional[str] = Field(
        None,
        max_length=4096,
        description="optional LFW pairs.txt-style protocol scored each epoch (10-fold accuracy, AUC); "
        "a relative path not found as given is taken inside --val; its images are looked up beside it, then "
        "under --val",
    )
    pairs_folds: Optional[list[int]] = Field(
        None, description="use only these 1-based folds of --pairs_file (default: all)"
    )
    ckpt_dir: str = Field(
        "models", max_length=4096, description="where backbone_best.pt, last.pt, metrics.jsonl and config.json go"
    )

    # --- objective --------------------------------------------------------------------------
    train_mode: Literal["pair", "arcface"] = Field(
        "pair",
        description="pair: BCE on scale_logits*cosine of sampled pairs; arcface: ArcFace "
        "classification over the training identities (recommended)",
    )
    arcface_s: float = Field(64.0, gt=0, le=1024, description="ArcFace logit scale s")
    arcface_m: float = Field(0.5, ge=0, lt=math.pi / 2, description="ArcFace additive angular margin m (radians)")
    easy_margin: bool = Field(False, description="ArcFace easy margin: apply m only where cos(theta) > 0")
    margin_warmup_epochs: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="raise the ArcFace margin linearly from 0 to arcface_m over "
        "this many epochs (0: full margin from the start)",
    )
    scale_logits: float = Field(10.0, gt=0, le=1024, description="pair mode: logit = scale_logits * cosine")
    pairs_per_epoch: int = Field(60000, ge=2, le=100_000_000, description="pair mode: balanced pairs drawn per epoch")

    # --- model ------------------------------------------------------------------------------
    embedding_size: int = Field(512, ge=2, le=8192, description="embedding dimension")
    pretrained: bool = Field(
        False, description="start the ResNet-50 trunk from ImageNet weights (torch cache or --pretrained_weights)"
    )
    pretrained_weights: Optional[str] = Field(
        None, max_length=4096, description="local ImageNet ResNet-50 state-dict file (implies --pretrained)"
    )
    init_from: Optional[str] = Field(
        None,
        max_length=4096,
        description="fine-tune a FaceID model: its trunk and embedding layer start "
        "the run, the objective is new (an ArcFace head for this run's people) (a backbone_best.pt on the "
        "command line, a succeeded job's id through the API)",
    )
    freeze_backbone_epochs: int = Field(
        0, ge=0, le=100_000, description="train only the embedding layer and head for this many first epochs"
    )
    img_size: int = Field(224, ge=32, le=1024, description="square input size in pixels")
    crop: float = Field(
        1.0,
        ge=0.3,
        le=1.0,
        description="centred square of each image kept before it "
        "is resized to img_size, as a fraction of its shorter side (1: all of it; about "
        "0.8 puts more pixels on the face of loosely framed photos like LFW's); the served "
        "model applies it too",
    )
    align: Literal["none", "arcface"] = Field(
        "arcface",
        description="how a photo becomes the model's input: arcface = find its largest face "
        "(MTCNN, five landmarks) and align it onto the ArcFace template scaled to img_size (images with "
        "no face are left out and listed in no_face.txt; detections are cached); none = the centred "
        "crop square, for faces that are already cropped. The served model prepares uploads the same way",
    )
    neck: Literal["gap", "flat"] = Field(
        "gap",
        description="what the embedding layer sees: gap = the trunk's 2048 channels averaged "
        "over the image (the origin's); flat = the whole last feature map flattened, keeping where "
        "each feature is (ArcFace's output E; 2048 x ceil(img_size/32)^2 inputs, so meant for small images)",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the embedding layer's input during training")

    # --- optimisation -----------------------------------------------------------------------
    epochs: int = Field(20, ge=1, le=100_000, description="training epochs")
    batch_size: int = Field(
        256, ge=2, le=65536, description="images per step (pairs per step in pair mode), per process"
    )
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="sgd (momentum 0.9, nesterov) or adamw")
    lr: float = Field(0.1, gt=0, le=10, description="peak learning rate of the head (backbone: lr * backbone_lr_scale)")
    weight_decay: float = Field(5e-4, ge=0, le=1, description="weight decay")
    backbone_lr_scale: float = Field(1.0, ge=0, le=100, description="backbone learning rate = lr * this")
    scheduler: Literal["cosine", "constant"] = Field(
        "cosine", description="learning-rate schedule after warmup (per step)"
    )
    warmup_epochs: float = Field(0.0, ge=0, le=100_000, description="linear per-step warmup length in epochs")
    clip_grad_norm: float = Field(0.0, ge=0, le=1e6, description="clip the gradient norm to this (0: off)")
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="label smoothing of the ArcFace cross-entropy (0: off; arcface mode only)"
    )
    ema_decay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="keep an exponential moving average of the weights, updated every step with this decay, "
        "and evaluate and save it instead of the raw weights (0: off; 0.999 averages about the last 1,000 steps)",
    )
    distill: Literal["none", "dlib"] = Field(
        "none",
        description="arcface: also train the embedding to reproduce a teacher network's descriptors of the "
        "training images (dlib: dlib's public-domain face recognition ResNet, an optional extra installed by "
        "pip install 'faceid[teacher]'; computed once per image and cached; the served model does not need it)",
    )
    distill_weight: float = Field(
        50.0,
        ge=0,
        le=1000,
        description="weight of the distillation loss (a cosine distance, at most 2) beside the ArcFace loss "
        "(with distill; the default is the best weight bench/align_compare.py measured: bench/README.md)",
    )
    balanced_sampling: bool = Field(
        False, description="arcface: draw identities uniformly, not images, so a few large identities do not dominate"
    )
    augment: Literal["none", "flip", "light"] = Field(
        "light",
        description="training augmentation: flip = random horizontal flip; light = flip + a "
        "random shift of up to 1/16 of the image",
    )

    # --- evaluation and selection -----------------------------------------------------------
    eval_pairs: int = Field(
        20000,
        ge=2,
        le=100_000_000,
        description="balanced validation pairs sampled (fixed seed, same pairs every epoch)",
    )
    eval_flip: bool = Field(False, description="embed each evaluation image with its mirror image and average")
    best_metric: Literal["acc", "auc", "tar_1e-2", "tar_1e-3", "pairs_acc", "pairs_auc"] = Field(
        "acc", description="metric that selects backbone_best.pt (pairs_*: needs --pairs_file)"
    )
    eval_every: int = Field(
        1,
        ge=1,
        le=100_000,
        description="evaluate (and choose backbone_best.pt) at the end of every this many epochs; the last "
        "epoch and one a stop or the time limit ends are always evaluated",
    )
    eval_every_min: float = Field(
        0.0,
        ge=0,
        le=1e6,
        description="and not sooner than this many minutes after the previous evaluation began (0: no "
        "wait); for epochs of seconds, as on a GPU",
    )
    save_every_min: float = Field(
        0.0,
        ge=0,
        le=1e6,
        description="write last.pt (for a resume) at an evaluation at most every this many minutes (0: at "
        "every evaluation); always at the end and on a stop. Checkpoints are written on a background "
        "thread while training goes on",
    )

    # --- runtime ----------------------------------------------------------------------------
    workers: int = Field(4, ge=0, le=256, description="image-decoding worker processes")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu")
    amp: Literal["auto", "off", "bf16", "fp16"] = Field(
        "auto",
        description="mixed precision: auto = bf16 on CPUs with native bf16 and on bf16 GPUs, "
        "fp16 + grad scaler on older GPUs, off elsewhere",
    )
    channels_last: bool = Field(True, description="channels_last memory format")
    compile_step: bool = Field(
        False,
        description="compile the network's training forward and backward with torch.compile (inductor; needs a C++ "
        "compiler on a CPU): the first step waits for the compilation, about a minute. For GPUs at small image "
        "sizes, where steps wait on kernel launches; on a CPU it measured no faster (bench/README.md, compile_speed)",
    )
    threads: int = Field(0, ge=0, le=1024, description="torch compute threads (0: all cores minus busy workers)")
    cache_images: Literal["auto", "on", "off"] = Field(
        "auto", description="decode every image once into memory (auto: when it fits in cache_max_gb)"
    )
    cache_max_gb: float = Field(4.0, ge=0, le=1024, description="memory budget for --cache_images auto")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="random seed")
    progress_step_pct: float = Field(1.0, gt=0, le=100, description="report progress every this percent of an epoch")
    max_steps_per_epoch: int = Field(
        0, ge=0, le=100_000_000, description="cap steps per epoch (0: no cap); for quick runs"
    )
    time_limit_min: float = Field(
        0.0,
        ge=0,
        le=1e6,
        description="stop training after this many minutes (0: no limit); the current epoch is cut short and evaluated",
    )
    fit_to_time_limit: bool = Field(
        True,
        description="with --time_limit_min: if the epochs would not finish in time, advance the "
        "lr schedule and the margin warm-up by the share of the limit used, so the cosine reaches 0 at "
        "the limit instead of being cut off (false: by steps only)",
    )
    resume: Optional[str] = Field(None, max_length=4096, description="resume from this last.pt")

    # --- distributed (torchrun) -------------------------------------------------------------
    nproc_per_node: int = Field(1, ge=1, le=1024, description="processes per node (>1 launches torchrun)")
    nnodes: int = Field(1, ge=1, le=100_000, description="number of nodes (torchrun)")
    node_rank: int = Field(0, ge=0, le=100_000, description="this node's rank (torchrun, static rendezvous)")
    rdzv_endpoint: Optional[str] = Field(None, max_length=512, description="torchrun rendezvous host:port")
    rdzv_id: Optional[str] = Field(None, max_length=256, description="torchrun rendezvous id")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            # Not a string (a list, an object: unhashable) or an unknown name: the field
            # validator reports it.
            preset = PRESETS.get(data["preset"]) if isinstance(data["preset"], str) else None
            if preset is not None:
                data = {**preset, **data}
        return data

    @model_validator(mode="before")
    @classmethod
    def _weights_imply_pretrained(cls, data: Any) -> Any:
        # The weights are loaded whenever a file is given; recording pretrained as true keeps the
        # stored config true to the run (configs stored before said false; they still load). The
        # command line refuses --no-pretrained with a file, which can only be a mistake there.
        if isinstance(data, dict) and data.get("pretrained_weights") is not None:
            data = {**data, "pretrained": True}
        return data

    @field_validator("*", mode="before")
    @classmethod
    def _strict_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        """Numbers must be numbers: pydantic would read true as 1 and "3" as 3, so a typo in a
        JSON body or --config file would run silently. Non-finite floats are named as such
        before a bound check says "less than or equal to 10" of a NaN."""
        assert info.field_name is not None  # a field validator always runs for a field
        tp = cls.model_fields[info.field_name].annotation
        if tp not in (int, float):
            return v
        word = "a whole number" if tp is int else "a number"
        if isinstance(v, bool):
            raise PydanticCustomError("number_type", f"must be {word}, not {str(v).lower()}")
        if isinstance(v, (str, bytes)):
            raise PydanticCustomError("number_type", f'must be {word}, not a string; write 3, not "3"')
        if tp is float and isinstance(v, float) and not math.isfinite(v):
            raise PydanticCustomError("finite_number", "must be a finite number")
        return v

    @field_validator("pairs_folds", mode="before")
    @classmethod
    def _fold_numbers(cls, v: Any) -> Any:
        if isinstance(v, list) and any(isinstance(f, (bool, str, bytes)) for f in v):
            raise PydanticCustomError("number_type", "folds are whole numbers, for example [1] or [1, 2]")
        return v

    @field_validator("pairs_folds")
    @classmethod
    def _folds(cls, v: Optional[list[int]], info: ValidationInfo) -> Optional[list[int]]:
        if v is not None:
            if not v or any(f < 1 or f > 1000 for f in v):
                raise ValueError("folds are 1-based numbers, for example [1] or [1, 2]")
            # pairs_file is validated first; absent from info.data when it was itself invalid
            if "pairs_file" in info.data and info.data["pairs_file"] is None:
                raise PydanticCustomError(
                    "folds_without_pairs_file",
                    "selects folds of pairs_file, which is "
                    "not set; set pairs_file (--pairs_file FILE) or leave pairs_folds out",
                )
            v = sorted(set(v))
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.best_metric.startswith("pairs_") and not self.pairs_file:
            raise ValueError(
                f"best_metric {self.best_metric!r} needs pairs_file; set pairs_file or "
                "choose acc, auc, tar_1e-2 or tar_1e-3"
            )
        if self.init_from is not None and self.uses_pretrained:
            raise ValueError(
                "init_from and pretrained both give the trunk its first weights; keep init_from "
                "(a FaceID model) or pretrained (ImageNet), not both"
            )
        if self.distill != "none" and self.train_mode != "arcface":
            raise ValueError(f"distill {self.distill!r} trains beside the ArcFace loss; set train_mode arcface")
        if self.freeze_backbone_epochs >= self.epochs and self.freeze_backbone_epochs > 0:
            raise ValueError(
                f"freeze_backbone_epochs ({self.freeze_backbone_epochs}) must be smaller than "
                f"epochs ({self.epochs}), or the backbone never trains"
            )
        return self

    @property
    def uses_pretrained(self) -> bool:
        return self.pretrained or self.pretrained_weights is not None

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
