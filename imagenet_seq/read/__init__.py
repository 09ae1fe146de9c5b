"""Reading: a split's reader (``reader``: one file, or the shards of a manifest), the
sequential reader of one device's files (``shard_file``), which shards share a device
(``devices``), the read-ahead (``readahead``), and page-cache eviction for honest
measurements (``evict``)."""
__all__: list = []
