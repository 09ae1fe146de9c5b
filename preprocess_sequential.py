#!/usr/bin/env python
"""Convert an ImageFolder tree into sequential LMDBs: python preprocess_sequential.py SRC DST."""
import sys

from imagenet_seq.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
