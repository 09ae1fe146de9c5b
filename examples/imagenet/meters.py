"""Accuracy counts and the progress report of the ImageNet example.

Every ``--print-freq`` steps :class:`Progress` prints one line: loss, top-1, throughput (all ranks),
the share of step time spent waiting for data, the epoch's ETA and the estimated hours until the
whole run (all epochs, validation included) completes. The arithmetic is plain functions of
measured times, so tests can check it without a clock.
"""
from __future__ import annotations

import datetime as _dt
import time
from typing import Callable, Dict, Optional, Sequence

import torch


def correct_counts(output: torch.Tensor, target: torch.Tensor,
                   topk: Sequence[int] = (1, 5)) -> torch.Tensor:
    """Number of samples whose target is in the top-k predictions, for each k (float tensor).

    Counts rather than percentages, so ranks can all-reduce them and divide once by the total.
    k larger than the number of classes counts every sample as correct.
    """
    maxk = min(max(topk), output.shape[1])
    pred = output.topk(maxk, dim=1).indices  # (N, maxk)
    hit = pred.eq(target.view(-1, 1))
    return torch.stack([hit[:, :min(k, maxk)].any(dim=1).sum() for k in topk]).float()


def fmt_duration(seconds: float) -> str:
    """``h:mm:ss`` (``d days, h:mm:ss`` past a day); '?' for unknown."""
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    return str(_dt.timedelta(seconds=int(round(seconds))))


def run_eta_seconds(step_time: float, steps_left_in_epoch: int, epochs_left_after: int,
                    steps_per_epoch: int, val_seconds: float) -> float:
    """Seconds until the run completes.

    Args:
        step_time: mean seconds per train step (measured).
        steps_left_in_epoch: train steps still to run in the current epoch.
        epochs_left_after: full epochs after the current one.
        steps_per_epoch: train steps per epoch.
        val_seconds: seconds of one validation pass (measured, or estimated before the first).
    """
    return (step_time * (steps_left_in_epoch + epochs_left_after * steps_per_epoch)
            + val_seconds * (epochs_left_after + 1))


class Progress:
    """Timing and printing of one rank's training (only rank 0 is given a real ``printer``).

    Args:
        epochs: the run's last epoch (exclusive), for the run ETA.
        steps_per_epoch: ``len(train_loader)`` (equal on every rank).
        val_steps: ``len(val_loader)``: a validation step is costed as a train step until the
            first validation has been timed (a pessimistic estimate: no backward pass).
        world_size: number of ranks; throughput is reported for all of them.
        print_freq: steps between lines.
        printer: where lines go (``print``; ``tqdm.write`` under ``--tqdm``).
        bar: optional tqdm bar, updated every step.
        clock: time source (tests pass a fake one).
    """

    def __init__(self, epochs: int, steps_per_epoch: int, val_steps: int, world_size: int = 1,
                 print_freq: int = 10, printer: Optional[Callable[[str], None]] = print,
                 bar=None, clock: Callable[[], float] = time.perf_counter):
        self.epochs, self.steps_per_epoch, self.val_steps = epochs, steps_per_epoch, val_steps
        self.world_size, self.print_freq = world_size, max(1, print_freq)
        self.printer, self.bar, self.clock = printer, bar, clock
        self.val_seconds: Optional[float] = None
        self.start_epoch(0)

    def start_epoch(self, epoch: int) -> None:
        """Reset the epoch's counters; ``epoch`` is 0-based."""
        self.epoch = epoch
        self.step_i = 0
        self.images = 0
        self.data_s = self.step_s = 0.0
        self.loss_sum = self.correct1 = 0.0
        self.first_step_s = 0.0
        self._win = [0, 0.0, 0.0]  # images, data seconds, step seconds since the last line
        self.epoch_t0 = self.clock()

    def mean_step_time(self) -> float:
        """Mean train step time this epoch, leaving out the first step (start-up) when possible."""
        if self.step_i > 1:
            return (self.step_s - self.first_step_s) / (self.step_i - 1)
        return self.step_s / self.step_i if self.step_i else float("nan")

    def steady_rate(self) -> float:
        """Images/s over all ranks this epoch, leaving out the first step (worker start-up)."""
        t = self.mean_step_time()
        return self.images * self.world_size / self.step_i / t if self.step_i and t > 0 \
            else float("nan")

    def epoch_rate(self) -> float:
        """Images/s over all ranks this epoch, every step counted (the epoch line's figure)."""
        return self.images * self.world_size / self.step_s if self.step_s > 0 else float("nan")

    def val_estimate(self) -> float:
        """Seconds of one validation pass: measured, or ``val_steps`` x the train step time."""
        if self.val_seconds is not None:
            return self.val_seconds
        return self.val_steps * self.mean_step_time()

    def run_eta(self) -> float:
        """Seconds until the whole run (all epochs, validation included) completes."""
        return run_eta_seconds(self.mean_step_time(), self.steps_per_epoch - self.step_i,
                               self.epochs - self.epoch - 1, self.steps_per_epoch,
                               self.val_estimate())

    def step(self, batch: int, data_s: float, step_s: float, loss: Optional[float] = None,
             correct1: Optional[float] = None) -> Optional[str]:
        """Account one train step on this rank; return (and print) a line every print_freq steps.

        Args:
            batch: images in this rank's batch.
            data_s: seconds blocked waiting for the batch (loader + host-to-device copy).
            step_s: seconds of the whole step, data wait included.
            loss, correct1: batch loss and top-1 correct count; pass them (they synchronise the
                device) only on print steps.
        """
        self.step_i += 1
        if self.step_i == 1:
            self.first_step_s = step_s
        self.images += batch
        self.data_s += data_s
        self.step_s += step_s
        for i, v in enumerate((batch, data_s, step_s)):
            self._win[i] += v
        if loss is not None:
            self.loss_sum, self.correct1 = loss, correct1 if correct1 is not None else 0.0
        if self.bar is not None:
            self.bar.update(1)
        if self.step_i % self.print_freq and self.step_i != self.steps_per_epoch:
            return None
        line = self.line(loss, correct1, batch)
        self._win = [0, 0.0, 0.0]
        if self.bar is not None:
            self.bar.set_postfix_str(line.split("] ", 1)[-1], refresh=False)
        elif self.printer is not None:
            self.printer(line)
        return line

    def line(self, loss: Optional[float], correct1: Optional[float], batch: int) -> str:
        """The per-N-steps line, from the window since the previous one."""
        images, data_s, step_s = self._win
        rate = images * self.world_size / step_s if step_s > 0 else float("nan")
        wait = 100.0 * data_s / step_s if step_s > 0 else float("nan")
        epoch_eta = self.mean_step_time() * (self.steps_per_epoch - self.step_i)
        width = len(str(self.steps_per_epoch))
        parts = [f"Epoch {self.epoch + 1}/{self.epochs} [{self.step_i:>{width}}/"
                 f"{self.steps_per_epoch}]"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if correct1 is not None and batch:
            parts.append(f"top1 {100.0 * correct1 / batch:5.1f}%")
        parts += [f"{rate:,.0f} img/s", f"data wait {wait:.0f}%",
                  f"epoch ETA {fmt_duration(epoch_eta)}",
                  f"run ETA {self.run_eta() / 3600:.2f} h ({fmt_duration(self.run_eta())})"]
        return "  ".join(parts)

    def end_epoch(self, val: Optional[Dict[str, float]] = None,
                  val_seconds: Optional[float] = None) -> str:
        """The epoch summary line (printed), after validation if any.

        Args:
            val: ``{"top1", "top5", "loss", "total"}`` of the all-reduced validation.
            val_seconds: wall time of that validation (refines the run ETA).
        """
        if val_seconds is not None:
            self.val_seconds = val_seconds
        wall = self.clock() - self.epoch_t0
        rate = self.epoch_rate()
        wait = 100.0 * self.data_s / self.step_s if self.step_s > 0 else float("nan")
        left = (self.epochs - self.epoch - 1) * (self.steps_per_epoch * self.mean_step_time()
                                                 + self.val_estimate())
        text = (f"Epoch {self.epoch + 1}/{self.epochs} done in {fmt_duration(wall)}: "
                f"{self.images * self.world_size:,} train images at {rate:,.0f} img/s, "
                f"data wait {wait:.0f}%")
        if val is not None:
            text += (f"; val top1 {val['top1']:.2f}% top5 {val['top5']:.2f}% loss "
                     f"{val['loss']:.4f} on {int(val['total']):,} images")
            if val_seconds is not None:
                text += f" in {fmt_duration(val_seconds)}"
        text += f"; run ETA {left / 3600:.2f} h"
        if self.printer is not None:
            self.printer(text)
        return text
