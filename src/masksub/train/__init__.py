"""The ``masksub train`` / ``masksub eval`` trainer: recipe YAML + config + one engine."""

from .config import Config, load
from .engine import Trainer, train

__all__ = ["Config", "Trainer", "load", "train"]
