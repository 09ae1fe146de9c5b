"""The Loader: plan -> read -> shuffle -> batch -> decode -> finish, one pass per epoch.

Users import it as ``from imagenet_seq.data import Loader``. Reading it, in this order:

* :mod:`.loader` -- the ``Loader``: its arguments go once through :func:`.config.resolve` into
  a frozen :class:`.config.Settings` (groups: data, order, decode, device, runtime); it holds
  that value, a :class:`.state.Cursor` (the epoch of the next pass, a resume point) and a
  :class:`.epoch.Passes`, and is otherwise its public surface.
* **the epoch, in two files**: :mod:`.epoch` starts a pass (the decode stage's workers, the
  epoch and resume point, read-ahead adopted or dropped) and hands its batches out in order
  through the finish stage; :mod:`.feeder` is the thread that produces them --
  :func:`.feeder.record_stream` (plan -> read -> shuffle: the one pass builder, also used by
  the DataFlow face) cut into batches and submitted to the decode stage.

The stages, in data-path order, each in its own module and each tested alone on plain lists
(``tests/test_stages.py``); each gets the settings it needs, none reads the Loader:

=========  ==========================================  =====================================
stage      module                                      state a resume needs
=========  ==========================================  =====================================
plan       :mod:`imagenet_seq.plan.stage` (``Plan``)   none: a pure function of its fields
                                                       and the epoch
read       :mod:`imagenet_seq.read.stage` (``read``)   none: the plan says where to read
shuffle    :mod:`imagenet_seq.plan.shuffle`            none stored: ``fast_forward`` +
           (``ShuffleBuffer``)                         ``fill`` replay it from a position
batch      :mod:`imagenet_seq.loader.batcher`          the batch it starts at
decode     :mod:`imagenet_seq.decode.stage`            none (augmentation = f(seed, epoch,
           (``Decode``)                                record)); workers live until close()
finish     :mod:`imagenet_seq.loader.finish`           ``state()`` / ``restore()``: the skip
                                                       count, in ``state_dict()``
=========  ==========================================  =====================================

The resume state (``Loader.state_dict()``) is therefore the epoch, the batches handed out and
the skip count, plus the settings that fix the order (:mod:`.state`). The rest of the package:
:mod:`.ranks` (rank and world size: ``torch.distributed``, ``LOCAL_WORLD_SIZE``, asked once at
construction), :mod:`.faces` (``loader.sampler`` / ``loader.dataset``), :mod:`.device`
(``to_device``).
"""
__all__: list = []
