"""The epoch plan: which records a rank reads and in which order (``order``), the bounded shuffle
buffer (``shuffle``), and the :class:`~.stage.Plan` that holds all their parameters (``stage``).
Pure functions of the arguments: no file, environment or process group is consulted here (the
Loader finds its rank in :mod:`imagenet_seq.loader.ranks`)."""
__all__: list = []
