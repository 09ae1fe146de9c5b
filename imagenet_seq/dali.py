"""``from imagenet_seq.dali import DaliDecoder`` (the documented import); the code lives in
:mod:`imagenet_seq.decode.dali`."""
from imagenet_seq.decode.dali import DaliDecoder

__all__ = ["DaliDecoder"]
