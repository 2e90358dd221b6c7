"""The training loop: two-phase transfer learning with early stopping on macro-F1.

Shaped after torchvision's classification reference: `load_data`,
`train_one_epoch`, `evaluate` and `fit` (the `main` of `pacs-train fit`).
Phase 1 trains only the new head on frozen pretrained features; phase 2 the
whole network. The exponential moving average of the weights is evaluated on
the validation split after every epoch; the best epoch by validation macro-F1
is exported. A checkpoint after every epoch makes the run resumable.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as functional
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm  # type: ignore[import-untyped]

from models.predictor import resolve_device
from models.preprocessing import Preprocessing
from training.augment import augment_batch
from training.checkpoints import load_checkpoint, save_checkpoint
from training.datasets import SliceSet
from training.init import Initialisation, initialise
from training.layouts import Layout, TrainVal, load_train_val, scan
from training.metrics import classification_metrics
from training.recipe import Recipe
from training.window import MEASURED_CENTER, MEASURED_WIDTH


@dataclass(frozen=True)
class FitOptions:
    """Everything about a run that is not the recipe: where, on what, how long."""

    data: Path
    output: Path
    init: str = "imagenet"
    layout: Layout = "auto"
    window_center: float = MEASURED_CENTER
    window_width: float = MEASURED_WIDTH
    val_fraction: float = 0.2
    device: str = "auto"
    deterministic: bool = False
    resume: bool = False
    # Stop (and export the best epoch so far) once this much time has passed.
    max_minutes: float | None = None


@dataclass
class FitState:
    """What changes from epoch to epoch; saved in every checkpoint."""

    epoch: int = 0  # epochs completed, both phases together
    best_score: tuple[float, float] = (-1.0, -1.0)
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class FitResult:
    network: nn.Module
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    initialisation: Initialisation
    val_metrics: dict[str, Any]
    history: list[dict[str, Any]]
    data_summary: dict[str, dict[str, int]]
    best_epoch: int
    seconds: float


def seed_everything(seed: int, deterministic: bool) -> torch.Generator:
    """Seed every generator; `deterministic` also forbids non-deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def load_data(options: FitOptions, recipe: Recipe) -> tuple[TrainVal, Preprocessing]:
    preprocessing = Preprocessing(
        window_center=options.window_center,
        window_width=options.window_width,
        input_size=recipe.input_size,
    )
    folder = scan(options.data, options.layout)
    return load_train_val(folder, preprocessing, options.val_fraction, recipe.seed), preprocessing


def on_device(network: nn.Module, device: torch.device) -> nn.Module:
    """The network on `device`; channels-last on CUDA, the layout its inputs get there."""
    network = network.to(device)
    return network.to(memory_format=torch.channels_last) if device.type == "cuda" else network


def features_of(network: nn.Module) -> nn.Module:
    """MobileNetV2's feature extractor (everything but the classifier head)."""
    features = network.features
    if not isinstance(features, nn.Module):
        raise TypeError("the network has no `features` module")
    return features


def frozen_layers(
    network: nn.Module, phase: str, recipe: Recipe, initialisation: Initialisation
) -> nn.Module | None:
    """The layers a phase leaves untouched: all features in the head phase; in the
    full phase, with pretrained weights, all but the last `recipe.train_blocks`."""
    features = features_of(network)
    if phase == "head":
        return features
    if recipe.train_blocks and initialisation.pretrained:
        children = list(features.children())
        return nn.Sequential(*children[: max(0, len(children) - recipe.train_blocks)])
    return None


def class_weights(train: SliceSet) -> torch.Tensor:
    """Inverse class frequency, scaled so that the weights average to one."""
    counts = torch.bincount(train.labels, minlength=len(train.classes)).float()
    return counts.sum() / (len(train.classes) * counts.clamp(min=1))


def batches(train: SliceSet, recipe: Recipe, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches for one epoch: shuffled, or drawn class-balanced with replacement."""
    count = len(train)
    if recipe.balance == "sampler":
        weights = class_weights(train)[train.labels]
        order = torch.multinomial(weights, count, replacement=True, generator=generator)
    else:
        order = torch.randperm(count, generator=generator)
    # Drop a last batch of one: batch norm cannot train on a single slice.
    for start in range(0, count, recipe.batch_size):
        chunk = order[start : start + recipe.batch_size]
        if len(chunk) > 1:
            yield chunk


def train_one_epoch(
    network: nn.Module,
    ema: AveragedModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    train: SliceSet,
    recipe: Recipe,
    preprocessing: Preprocessing,
    device: torch.device,
    generator: torch.Generator,
    frozen: nn.Module | None,
    description: str,
) -> float:
    """One pass over the training split; returns the mean training loss."""
    network.train()
    if frozen is not None:
        # Frozen layers keep their pretrained batch-norm statistics too.
        frozen.eval()
    weight = class_weights(train).to(device) if recipe.balance == "loss" else None
    total, seen = 0.0, 0
    cuda = device.type == "cuda"
    steps = math.ceil(len(train) / recipe.batch_size)
    for index in tqdm(
        batches(train, recipe, generator), total=steps, desc=description, leave=False
    ):
        inputs = augment_batch(train.inputs[index], recipe, preprocessing, generator).to(device)
        labels = train.labels[index].to(device)
        if cuda:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            logits = network(inputs)
        loss = functional.cross_entropy(
            logits.float(), labels, weight=weight, label_smoothing=recipe.label_smoothing
        )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        ema.update_parameters(network)
        total += float(loss.item()) * len(index)
        seen += len(index)
    return total / max(1, seen)


@torch.inference_mode()
def predict(
    network: nn.Module, data: SliceSet, device: torch.device, batch_size: int = 64
) -> np.ndarray:
    """Softmax probabilities (n, classes), in fp32 on every device, as the node computes them.

    Training runs under fp16 autocast on CUDA, but the epoch is selected and the
    metrics reported on fp32 outputs: fp16 moved validation probabilities by up to
    0.09 and balanced accuracy by up to 0.034 (12 runs on an H200), so fp16
    figures would not be the ones the node's model gives.
    """
    network.eval()
    outputs = []
    for start in range(0, len(data), batch_size):
        inputs = data.inputs[start : start + batch_size].to(device)
        if device.type == "cuda":
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        logits = network(inputs)
        outputs.append(torch.softmax(logits.float(), dim=1).cpu())
    return torch.cat(outputs).numpy().astype(np.float64)


def evaluate(network: nn.Module, data: SliceSet, device: torch.device) -> dict[str, Any]:
    """Metrics on `data` plus the mean cross-entropy as `loss`."""
    probabilities = predict(network, data, device)
    truth = data.labels.numpy()
    metrics = classification_metrics(truth, probabilities, data.classes)
    picked = probabilities[np.arange(len(truth)), truth]
    metrics["loss"] = float(-np.log(np.clip(picked, 1e-12, None)).mean())
    return metrics


@torch.no_grad()
def recalibrate_batch_norm(
    network: nn.Module, data: SliceSet, device: torch.device, batch_size: int
) -> None:
    """Recompute batch-norm statistics on the clean (unaugmented) training inputs.

    The running statistics gathered during training describe augmented
    inputs, and the moving average of weights has no statistics of its own;
    both differ measurably from what the network sees at inference. One
    forward pass over the training split in train mode (cumulative average)
    fixes that for a few seconds per epoch.
    """
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative average over all batches
    was_training = network.training
    network.train()
    for start in range(0, len(data), batch_size):
        inputs = data.inputs[start : start + batch_size].to(device)
        if inputs.shape[0] > 1:
            network(inputs)
    for module, momentum in zip(norms, saved, strict=True):
        module.momentum = momentum
    network.train(was_training)


def make_optimizer(
    parameters: list[nn.Parameter], recipe: Recipe, lr: float
) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            parameters,
            lr=lr,
            momentum=recipe.momentum,
            weight_decay=recipe.weight_decay,
            nesterov=True,
        )
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=recipe.weight_decay)


def phases(recipe: Recipe, initialisation: Initialisation) -> list[tuple[str, int, float]]:
    """(name, epochs, peak learning rate); no head phase on random features."""
    plan = [("head", recipe.head_epochs, recipe.head_lr)] if initialisation.pretrained else []
    plan.append(("full", recipe.epochs, recipe.lr))
    return [(name, epochs, lr) for name, epochs, lr in plan if epochs > 0]


@dataclass(frozen=True)
class Trained:
    network: nn.Module
    state: FitState


def train_network(
    network: nn.Module,
    initialisation: Initialisation,
    train: SliceSet,
    val: SliceSet | None,
    recipe: Recipe,
    preprocessing: Preprocessing,
    device: torch.device,
    generator: torch.Generator,
    *,
    output: Path | None = None,
    checkpoint: dict[str, Any] | None = None,
    deadline: float | None = None,
) -> Trained:
    """Both phases; with `val`, keep the epoch with the best validation macro-F1.

    Without `val` (cross-validation folds) nothing is selected: the final
    averaged weights are returned, so the held-out fold stays unseen.
    """
    average = get_ema_multi_avg_fn(recipe.ema_decay)  # type: ignore[no-untyped-call]
    ema = AveragedModel(network, multi_avg_fn=average, use_buffers=True)
    state = FitState()
    best_weights = _copy(ema.module)
    if checkpoint is not None:
        network.load_state_dict(checkpoint["network"])
        ema.load_state_dict(checkpoint["ema"])
        best_weights = checkpoint["best_weights"]
        state = FitState(
            epoch=int(checkpoint["epoch"]),
            best_score=(float(checkpoint["best_score"][0]), float(checkpoint["best_score"][1])),
            best_epoch=int(checkpoint["best_epoch"]),
            history=list(checkpoint["history"]),
        )
        generator.set_state(checkpoint["generator"])
        _restore_global_generators(checkpoint, device)
        print(f"resuming after epoch {state.epoch}")
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    steps_per_epoch = len(list(batches(train, recipe, torch.Generator().manual_seed(0))))
    first_epoch_of_phase = 0
    stop = False
    for phase, epochs, lr in phases(recipe, initialisation):
        frozen = frozen_layers(network, phase, recipe, initialisation)
        for parameter in network.parameters():
            parameter.requires_grad_(True)
        for parameter in frozen.parameters() if frozen is not None else []:
            parameter.requires_grad_(False)
        trainable = [p for p in network.parameters() if p.requires_grad]
        optimizer = make_optimizer(trainable, recipe, lr)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=lr,
            total_steps=epochs * steps_per_epoch,
            pct_start=recipe.warmup_fraction,
        )
        phase_end = first_epoch_of_phase + epochs
        resuming_here = first_epoch_of_phase <= state.epoch < phase_end
        if checkpoint is not None and resuming_here and checkpoint["phase"] == phase:
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            scaler.load_state_dict(checkpoint["scaler"])
        for epoch in tqdm(range(first_epoch_of_phase, phase_end), desc=phase, unit="epoch"):
            if epoch < state.epoch:
                continue
            epoch_start = time.monotonic()
            train_loss = train_one_epoch(
                network,
                ema,
                optimizer,
                scheduler,
                scaler,
                train,
                recipe,
                preprocessing,
                device,
                generator,
                frozen,
                f"epoch {epoch + 1}",
            )
            if frozen is None:
                # Frozen layers keep the statistics the trained head expects.
                recalibrate_batch_norm(ema.module, train, device, recipe.batch_size)
            row: dict[str, Any] = {"epoch": epoch + 1, "phase": phase, "train_loss": train_loss}
            improved = False
            if val is not None:
                metrics = evaluate(ema.module, val, device)
                score = (metrics["macro_f1"], metrics["balanced_accuracy"])
                improved = score > state.best_score
                if improved:
                    state.best_score, state.best_epoch = score, epoch
                    best_weights = _copy(ema.module)
                row.update(
                    val_loss=metrics["loss"],
                    val_accuracy=metrics["accuracy"],
                    val_balanced_accuracy=metrics["balanced_accuracy"],
                    val_macro_f1=metrics["macro_f1"],
                )
            row["lr"] = float(optimizer.param_groups[0]["lr"])
            row["seconds"] = time.monotonic() - epoch_start
            state.epoch = epoch + 1
            state.history.append(row)
            tqdm.write(_epoch_line(row) + (" *" if improved else ""))
            if output is not None:
                save_checkpoint(
                    output,
                    {
                        "epoch": state.epoch,
                        "phase": phase,
                        "network": network.state_dict(),
                        "ema": ema.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "generator": generator.get_state(),
                        **_global_generators(device),
                        "best_weights": best_weights,
                        "best_score": list(state.best_score),
                        "best_epoch": state.best_epoch,
                        "history": state.history,
                        "recipe": recipe.to_dict(),
                        "init": initialisation.to_dict(),
                    },
                )
            if val is not None and phase == "full" and epoch - state.best_epoch >= recipe.patience:
                print(f"early stop: no better validation macro-F1 for {recipe.patience} epochs")
                stop = True
            elif deadline is not None and time.monotonic() >= deadline:
                print("time limit reached: stopping after this epoch")
                stop = True
            if stop:
                break
        first_epoch_of_phase = phase_end
        if stop:
            break
    network.load_state_dict(best_weights if val is not None else _copy(ema.module))
    return Trained(network.eval(), state)


def _global_generators(device: torch.device) -> dict[str, Any]:
    """torch's global generators, which draw the dropout masks."""
    cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" else []
    return {"torch_rng": torch.get_rng_state(), "cuda_rng": cuda}


def _restore_global_generators(checkpoint: dict[str, Any], device: torch.device) -> None:
    if "torch_rng" not in checkpoint:  # written before pacs-train saved them
        print("the checkpoint holds no global generator state: the dropout masks will differ")
        return
    torch.set_rng_state(checkpoint["torch_rng"])
    if device.type == "cuda" and checkpoint["cuda_rng"]:
        torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])


def _copy(network: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in network.state_dict().items()}


def _epoch_line(row: dict[str, Any]) -> str:
    line = f"epoch {row['epoch']:3d} {row['phase']:4s} train_loss {row['train_loss']:.4f}"
    if "val_loss" in row:
        line += (
            f" val_loss {row['val_loss']:.4f} val_acc {row['val_accuracy']:.4f}"
            f" val_bal_acc {row['val_balanced_accuracy']:.4f}"
            f" val_macro_f1 {row['val_macro_f1']:.4f}"
        )
    return line + f" {row['seconds']:.1f}s/epoch"


def fit(options: FitOptions, recipe: Recipe) -> FitResult:
    """Load the data, train, select the best epoch on validation macro-F1."""
    started = time.monotonic()
    generator = seed_everything(recipe.seed, options.deterministic)
    device = torch.device(resolve_device(options.device))
    data, preprocessing = load_data(options, recipe)
    network, initialisation = initialise(options.init, len(data.train.classes), recipe.dropout)
    network = on_device(network, device)
    print(f"initialisation: {initialisation.source}; device: {device}")
    checkpoint = None
    if options.resume:
        checkpoint = load_checkpoint(options.output)
        _check_resumable(checkpoint, recipe, initialisation)
    deadline = None if options.max_minutes is None else started + 60 * options.max_minutes
    trained = train_network(
        network,
        initialisation,
        data.train,
        data.val,
        recipe,
        preprocessing,
        device,
        generator,
        output=options.output,
        checkpoint=checkpoint,
        deadline=deadline,
    )
    final = evaluate(trained.network, data.val, device)
    seconds = time.monotonic() - started
    best_epoch = trained.state.best_epoch + 1
    print(f"best epoch {best_epoch}; fit took {seconds / 60:.1f} minutes")
    (options.output / "history.json").write_text(json.dumps(trained.state.history, indent=2) + "\n")
    return FitResult(
        network=trained.network.cpu().eval(),
        classes=data.train.classes,
        preprocessing=preprocessing,
        initialisation=initialisation,
        val_metrics=final,
        history=trained.state.history,
        data_summary=data.summary,
        best_epoch=best_epoch,
        seconds=seconds,
    )


def _check_resumable(
    checkpoint: dict[str, Any], recipe: Recipe, initialisation: Initialisation
) -> None:
    if checkpoint.get("recipe") != recipe.to_dict():
        raise ValueError("the checkpoint was made with a different recipe; resume with the same")
    if checkpoint.get("init", {}).get("kind") != initialisation.kind:
        raise ValueError("the checkpoint was made with a different --init")
