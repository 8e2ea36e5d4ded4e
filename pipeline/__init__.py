"""The Ray streaming loader; `ImageList`/`ItemList` (the Data Block API, `shards.items`) too."""

from pipeline.batch import Batch
from pipeline.settings import StreamSettings
from pipeline.stream import ShardStream
from shards.items import ImageList, ItemList

__all__ = ["Batch", "ImageList", "ItemList", "ShardStream", "StreamSettings"]
