"""Conversion: source images (ImageFolder tree, tar archives, devkit labels) -> sequential LMDBs.

``scan``/``inputs`` find the sources, ``source_reader`` reads them in on-disk order, ``workers``
validate and normalise them, ``passes``/``sort_runs``/``writer`` write the split; ``cli`` is
``preprocess_sequential.py``.
"""
__all__: list = []
