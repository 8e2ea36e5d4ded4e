"""The one-off sharding tool: folder-labelled images -> webdataset tar shards + meta.json."""
