"""What one ``imagenet-seq-bench`` measurement saw (:class:`Measurement`), the progress bar
shown while it runs, and the bench's error for bad input."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict

__all__ = ["MIN_IMAGES", "MIN_SECONDS", "MAX_EPOCHS", "BenchError", "Measurement", "progress_bar",
           "tick"]

# a figure resting on less than this is flagged as rough
MIN_IMAGES = 1000
MIN_SECONDS = 3.0
MAX_EPOCHS = 50  # whole-epoch measurements of a tiny split stop here


class BenchError(ValueError):
    """Bad input: the message names the value and what to do."""


@dataclass
class Measurement:
    """What one measurement saw: ``images`` in ``seconds`` is the figure's basis.

    ``fill_s``: time before those seconds in which records were read from the device but no
    image was delivered (the Loader's shuffle buffer filling); the projection adds it to every
    epoch. ``method`` says how the figure was taken (see
    :func:`imagenet_seq.tools.bench.measure_pipeline`).
    """

    name: str
    images: int = 0
    bytes: int = 0
    seconds: float = 0.0
    startup_s: float = 0.0
    fill_s: float = 0.0
    evicted: bool = False
    note: str = ""
    interrupted: bool = False
    method: str = ""
    passes: int = 0
    # the pipeline's images after each epoch's first batch while records still came from the
    # device (the steady windows), summed over the epochs measured
    steady_images: int = 0
    steady_s: float = 0.0
    buffer_records: int = 0
    fits_buffer: bool = False  # the split fits the shuffle buffer: reads and decode never overlap

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def projection(self, records: int, epochs: int) -> Dict[str, Any]:
        """images/s, MB/s, seconds per epoch and hours for ``epochs`` epochs of ``records``,
        with what the figure rests on (``images`` in ``seconds``, after ``fill_s``).

        An epoch = ``fill_s`` + ``records`` at the measured rate; images/s and MB/s are the
        epoch's (with a fill, below the rate measured after it)."""
        measured = self.images_per_s
        epoch_s = self.fill_s + records / measured if measured > 0 else float("inf")
        rate = records / epoch_s if measured > 0 else 0.0
        mb = rate * self.bytes / self.images / 1e6 if self.images else 0.0
        return {"images_per_s": rate, "mb_per_s": mb, "epoch_s": epoch_s,
                "hours": epoch_s * epochs / 3600.0, "images": self.images,
                "seconds": self.seconds, "startup_s": self.startup_s, "fill_s": self.fill_s,
                "method": self.method, "passes": self.passes,
                "page_cache_evicted": self.evicted, "interrupted": self.interrupted}

    def too_little(self) -> str:
        """Why this figure is rough ('' when it rests on enough)."""
        if self.images >= MIN_IMAGES and self.seconds >= MIN_SECONDS:
            return ""
        return (f"the {self.name} figure rests on only {self.images:,} images in "
                f"{self.seconds:.2f} s (want >= {MIN_IMAGES:,} images and >= {MIN_SECONDS:g} s): "
                "treat it as rough; a larger split or a longer --seconds gives a firmer one")


def progress_bar(desc: str, seconds: float, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=round(seconds, 1), desc=desc, unit="s", disable=not enabled,
                bar_format="{desc}: {bar} {n:.0f}/{total:.0f} s {postfix}", leave=False)


def tick(bar, t0: float, m: Measurement) -> None:
    bar.n = round(min(time.monotonic() - t0, bar.total), 1)
    bar.set_postfix_str(f"{m.images} images", refresh=True)
