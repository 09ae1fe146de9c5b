"""``python -m imagenet_seq.convert SRC DST`` (and under torchrun: ``dist_cli``)."""
import sys

from imagenet_seq.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
