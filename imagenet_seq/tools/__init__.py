"""Command-line tools and helpers around the data path: demo, bench, verify, diagnostics, sample."""
