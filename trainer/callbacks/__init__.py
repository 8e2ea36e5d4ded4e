"""Everything the Learner does besides looping: one small module per callback."""

from trainer.callbacks.checkpoint import (
    CHECKPOINT_VERSION,
    CheckpointCallback,
    CheckpointError,
    checkpoint_state,
    load_checkpoint,
    restore,
    save_checkpoint,
)
from trainer.callbacks.core import (
    EVENTS,
    Callback,
    CallbackError,
    CancelBatch,
    CancelEpoch,
    CancelException,
    CancelFit,
    CancelStep,
    CancelTrain,
    CancelValidate,
)
from trainer.callbacks.device import DeviceCallback, Normalize, NormalizeCallback
from trainer.callbacks.freeze import FreezeBody
from trainer.callbacks.guards import NonFiniteGuard, NonFiniteLossError
from trainer.callbacks.lr_finder import LRFinder, LRFindResult, lr_find, valley
from trainer.callbacks.mixup import MixUp
from trainer.callbacks.precision import MixedPrecision
from trainer.callbacks.progress import ProgressCallback
from trainer.callbacks.recorder import Recorder, SmoothLoss
from trainer.callbacks.resize import ProgressiveResize
from trainer.callbacks.schedule import ParamScheduler
from trainer.callbacks.stats import AvgStatsCallback, MetricsLogger, accuracy
from trainer.callbacks.step_checkpoint import (
    StepCheckpoint,
    mid_epoch_state,
    resume_position,
)
from trainer.callbacks.tta import TestTimeAugmentation

__all__ = [
    "CHECKPOINT_VERSION", "EVENTS", "AvgStatsCallback", "Callback",
    "CallbackError", "CancelBatch", "CancelEpoch", "CancelException", "CancelFit",
    "CancelStep", "CancelTrain", "CancelValidate", "CheckpointCallback", "CheckpointError",
    "DeviceCallback", "FreezeBody", "LRFindResult", "LRFinder", "MetricsLogger", "MixUp",
    "MixedPrecision",
    "NonFiniteGuard", "NonFiniteLossError", "Normalize", "NormalizeCallback", "ParamScheduler",
    "ProgressCallback", "Recorder", "SmoothLoss", "accuracy", "checkpoint_state",
    "load_checkpoint", "lr_find", "restore", "save_checkpoint", "valley",
    "ProgressiveResize", "TestTimeAugmentation",
    "StepCheckpoint", "mid_epoch_state", "resume_position",
]
