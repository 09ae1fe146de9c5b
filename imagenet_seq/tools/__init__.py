"""Command-line tools and helpers around the data path: demo, bench, verify, diagnostics, sample."""
__all__: list = []
