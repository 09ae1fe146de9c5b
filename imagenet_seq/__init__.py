"""imagenet_seq: train image classifiers from slow storage through sequential LMDB files."""
from imagenet_seq.format import FORMAT_VERSION

__version__ = "0.1.0"
__all__ = ["FORMAT_VERSION", "__version__"]
