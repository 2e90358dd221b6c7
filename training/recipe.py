"""The training recipe: every knob of `pacs-train fit`, with its default.

The defaults are the recipe that produced the bundled model; `training/README.md`
records them too. A recipe is written into each checkpoint and artifact so that
a result can be traced to exactly the settings that made it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

Optimizer = Literal["adamw", "sgd"]
Balance = Literal["loss", "sampler", "none"]


@dataclass(frozen=True)
class Recipe:
    """Hyperparameters of the two-phase transfer-learning recipe."""

    input_size: int = 160
    batch_size: int = 32
    # Phase 1 trains only the new head on frozen pretrained features. With
    # `--init random` there are no features worth freezing, so it is skipped.
    head_epochs: int = 2
    head_lr: float = 1e-3
    # Phase 2 trains the last `train_blocks` of MobileNetV2's 19 feature blocks
    # and the head (0: the whole network; pretrained initialisations only).
    train_blocks: int = 0
    epochs: int = 30
    lr: float = 5e-4
    optimizer: Optimizer = "adamw"
    weight_decay: float = 0.05
    momentum: float = 0.9
    # One-cycle schedule per phase: linear warm-up over this fraction, then cosine.
    warmup_fraction: float = 0.15
    label_smoothing: float = 0.1
    # No class balancing: weighting the loss by inverse class frequency made the
    # network call many normal slices benign (training/README.md, "none30").
    balance: Balance = "none"
    # Exponential moving average of the weights; evaluated and exported
    # instead of the raw weights because it is far steadier epoch to epoch.
    ema_decay: float = 0.99
    dropout: float = 0.2
    # Augmentation (see training.augment).
    rotate_degrees: float = 10.0
    scale_range: float = 0.12
    translate: float = 0.08
    flip: bool = True
    intensity: float = 0.1
    threshold_jitter: float = 0.1
    # Early stopping on validation macro-F1 (phase 2 epochs without improvement).
    patience: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.input_size < 32:
            raise ValueError(f"input_size must be >= 32, got {self.input_size}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")
        if self.epochs < 1 or self.head_epochs < 0:
            raise ValueError("epochs must be >= 1 and head_epochs >= 0")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be adamw or sgd, got {self.optimizer!r}")
        if self.balance not in ("loss", "sampler", "none"):
            raise ValueError(f"balance must be loss, sampler or none, got {self.balance!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Recipe:
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown recipe key(s): {', '.join(unknown)}")
        return cls(**values)
