"""The Loader: composes plan -> read -> shuffle -> batch -> decode -> finish.

Users import it as ``from imagenet_seq.data import Loader``.

The stages, in data-path order, each in its own module and each usable alone on a plain list:

=========  ========================================  =======================================
stage      module                                    holds state (``state()``)
=========  ========================================  =======================================
plan       :mod:`imagenet_seq.plan.stage` (``Plan``)  none: a pure function of its arguments
read       :mod:`imagenet_seq.read.stage` (``Read``)  records yielded
shuffle    :mod:`imagenet_seq.plan.shuffle`           consumed / emitted (replayable:
           (``ShuffleBuffer``)                        ``fast_forward`` + ``fill`` restore it)
batch      :mod:`imagenet_seq.loader.batcher`         next batch index
decode     :mod:`imagenet_seq.decode.stage`           none (augmentation = f(seed, epoch,
           (``Decode``)                               record)); workers live until close()
finish     :mod:`imagenet_seq.loader.finish`          skip count
=========  ========================================  =======================================

Interface: iterate (or ``map(iterable)`` for the decode and finish stages, which take batches
one at a time); ``state()`` where it holds state; ``close()``. No stage calls another's private
parts; :mod:`.epoch` wires one pass, :mod:`.loader` owns the stages, :mod:`.state` is the
resume state (``Loader.state_dict()``).
"""
__all__: list = []
