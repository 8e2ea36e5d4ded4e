"""The Data Block API and the Ray streaming loader."""

from pipeline.batch import Batch
from pipeline.items import ImageList, ItemList
from pipeline.settings import StreamSettings
from pipeline.stream import ShardStream

__all__ = ["Batch", "ImageList", "ItemList", "ShardStream", "StreamSettings"]
