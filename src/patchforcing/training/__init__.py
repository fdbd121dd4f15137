"""Training: typed configs, the loop (EMA, exact resume, DDP), data order, process groups."""

from .config import ConfigError, ExperimentConfig, load_config, save_config
from .ema import EMA, ema_decay
from .trainer import NonFiniteLossError, Trainer, TrainingError, TrainResult, train

__all__ = [
    "ConfigError",
    "EMA",
    "ExperimentConfig",
    "NonFiniteLossError",
    "TrainResult",
    "Trainer",
    "TrainingError",
    "ema_decay",
    "load_config",
    "save_config",
    "train",
]
