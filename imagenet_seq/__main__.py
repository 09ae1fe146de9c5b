"""``python -m imagenet_seq``: the runtime report (the same as ``imagenet-seq-info``)."""
import sys

from imagenet_seq.tools.info import main

if __name__ == "__main__":
    sys.exit(main())
