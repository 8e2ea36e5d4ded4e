"""The Data Block API and the Ray streaming loader."""

from pipeline.batch import Batch

__all__ = ["Batch"]
