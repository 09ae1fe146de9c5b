"""``from imagenet_seq.dataflow import LMDBSource, ImageDecoder, DecodeImage, LoaderFlow``: the
documented import of the tensorpack DataFlows; the code lives in
:mod:`imagenet_seq.integrations.tensorpack`."""
from imagenet_seq.integrations.tensorpack import (DecodeImage, ImageDecoder, LMDBSource,
                                                  LoaderFlow, import_tensorpack, numpy_compat)

__all__ = ["LMDBSource", "ImageDecoder", "DecodeImage", "LoaderFlow", "import_tensorpack",
           "numpy_compat"]
