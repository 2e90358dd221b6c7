"""Resumable training state, saved after every epoch and read with weights_only=True."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(folder: Path, state: dict[str, Any]) -> Path:
    """Write atomically, so a kill during the write leaves the previous checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHECKPOINT_NAME
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    partial.replace(path)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "network" not in state:
        raise ValueError(f"{path} is not a pacs-train checkpoint")
    return state
