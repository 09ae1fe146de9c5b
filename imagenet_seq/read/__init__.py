"""Reading: one sequential reader per split (``reader``), its read-ahead (``readahead``), and
page-cache eviction for honest measurements (``evict``)."""
__all__: list = []
