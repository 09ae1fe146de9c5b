"""The Loader: composes plan -> read -> shuffle -> batch -> decode -> finish.

Users import it as ``from imagenet_seq.data import Loader``.
"""
