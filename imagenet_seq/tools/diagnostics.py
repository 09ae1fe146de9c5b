"""Shuffle diagnostics: how close a configuration's batches are to a full random shuffle.

Computed from the order plan (:class:`imagenet_seq.plan.stage.Plan`, resolved as the Loader
resolves it) and the labels stored in the file: no image is read or decoded, so ImageNet-sized
configurations take seconds.

* **label diversity**: mean number of distinct labels per batch, against the expectation for a
  full shuffle (batches drawn without replacement from the whole split).
* **co-batch repetition**: of the record pairs that shared a batch in epoch ``e``, the share that
  shares a batch again in epoch ``e + 1`` (full shuffle: ``(B - 1) / (N - 1)``, ~0.02 % for
  ImageNet at batch 256). A high value means the model sees the same groups of images together
  every epoch, i.e. the shuffle is only local.

Validation is read in file order (complete, no shuffle), so its batches are the same every
epoch: repetition 100 % is expected there and harmless (evaluation does not learn from order).

    imagenet-seq-diagnose /data/lmdb --split train --world-size 8 --batch-size 256 --plot d.png
    python -m imagenet_seq.tools.diagnostics /data/lmdb ...          # the same
    loader_report(loader)  # prints the table for a Loader's configuration, returns the report
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, TextIO

import numpy as np

from imagenet_seq.format import SPLITS
from imagenet_seq.plan import order
from imagenet_seq.plan.stage import Plan

__all__ = ["batch_ids", "distinct_labels_per_batch", "mean_distinct_labels",
           "full_shuffle_distinct_labels", "cobatch_repetition", "ShuffleReport",
           "shuffle_report", "loader_report", "write_plot", "build_parser", "main"]


def batch_ids(num_records: int, mode: str = "train", *, batch_size: int, seed: int = 0,
              epoch: int = 0, world_size: int = 1, shuffle: bool = True,
              chunk_size: int = order.DEFAULT_CHUNK_RECORDS, buffer_size: int = 0,
              drop_last: bool = False, node_ranks: int = 0) -> np.ndarray:
    """Global batch id of every record in ``epoch`` (all ranks; ``-1``: not read this epoch).
    ``node_ranks``: the node plan of nodes of that many ranks (0: the per-rank plan)."""
    plan = Plan(num_records, mode, seed, 0, world_size, shuffle, chunk_size, buffer_size,
                node_ranks)
    return _batch_ids(plan, batch_size, drop_last, epoch)


def _batch_ids(plan: Plan, batch_size: int, drop_last: bool, epoch: int) -> np.ndarray:
    ids = np.full(plan.num_records, -1, np.int64)
    offset = 0
    for rank in range(plan.world_size):
        seq = plan.for_rank(rank).epoch_order(epoch)
        if drop_last:
            seq = seq[: len(seq) // batch_size * batch_size]
        ids[seq] = offset + np.arange(len(seq)) // batch_size
        offset += -(-len(seq) // batch_size)
    return ids


def distinct_labels_per_batch(ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Number of distinct labels in each batch, given each record's batch id."""
    seen = ids >= 0
    pairs = np.unique(np.stack([ids[seen], labels[seen]]), axis=1)
    per_batch = np.bincount(pairs[0])
    return per_batch[per_batch > 0]


def mean_distinct_labels(ids: np.ndarray, labels: np.ndarray) -> float:
    """Mean number of distinct labels per batch, given each record's batch id."""
    return float(distinct_labels_per_batch(ids, labels).mean())


def full_shuffle_distinct_labels(labels: np.ndarray, batch_size: int) -> float:
    """Expected distinct labels in a batch drawn without replacement from all records."""
    n = len(labels)
    b = min(batch_size, n)
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    # P(class absent) = C(n - c, b) / C(n, b), via log-gamma
    absent = np.array([math.exp(math.lgamma(n - c + 1) - math.lgamma(n - c - b + 1)
                                - math.lgamma(n + 1) + math.lgamma(n - b + 1))
                       if n - c >= b else 0.0 for c in counts])
    return float(np.sum(1.0 - absent))


def cobatch_repetition(ids_a: np.ndarray, ids_b: np.ndarray) -> float:
    """Share of the pairs co-batched in epoch a that are co-batched again in epoch b."""
    both = (ids_a >= 0) & (ids_b >= 0)
    sizes_a = np.bincount(ids_a[ids_a >= 0])
    pairs_a = float(np.sum(sizes_a * (sizes_a - 1) / 2))
    if pairs_a == 0:
        return 0.0
    key = ids_a[both] * (int(ids_b.max()) + 1) + ids_b[both]
    _, k = np.unique(key, return_counts=True)
    return float(np.sum(k * (k - 1) / 2)) / pairs_a


@dataclass
class ShuffleReport:
    num_records: int
    batch_size: int
    world_size: int
    chunk_size: int
    buffer_size: int
    distinct_labels: float
    full_shuffle_distinct_labels: float
    diversity_ratio: float
    repetition: float
    full_shuffle_repetition: float
    mode: str = "train"
    shuffle: bool = True
    epoch: int = 0
    plan: str = "rank-1"  # the plan's name: rank-1 (per-rank readers) or node-1 (node reader)
    node_ranks: int = 0  # ranks per node reading through one node reader (node-1)

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)

    @property
    def in_file_order(self) -> bool:
        """Batches are the file's order every epoch (val, or ``shuffle=False``)."""
        return self.mode == "val" or not self.shuffle

    def explanation(self) -> str:
        """What the figures mean for this configuration, in a sentence or two."""
        if self.in_file_order:
            what = "val is" if self.mode == "val" else "shuffle=False: batches are"
            return (f"{what} read in file order, complete and unshuffled, so every epoch has "
                    "the same batches: repetition 100 % is expected and harmless for evaluation "
                    "(order does not change what a model scores)")
        close = (self.diversity_ratio >= 0.98
                 and self.repetition <= self.full_shuffle_repetition + 0.01)
        verdict = ("close to a full shuffle (diversity within 2 %, repetition within 1 point)"
                   if close else "far from a full shuffle: a larger buffer (buffer_size) or "
                   "smaller chunks mix more")
        return (f"{verdict}; README: >= 2,000 buffer records per rank keep repetition under "
                "1 % on ImageNet")

    def table(self, title: str = "") -> str:
        """The plain-text table a person reads."""
        e = self.epoch
        lines = [title] if title else []
        lines += [f"{self.num_records:,} records, batch {self.batch_size}, world size "
                  f"{self.world_size}, chunk {self.chunk_size}, buffer {self.buffer_size:,} "
                  f"records per rank, {self.mode}{'' if self.shuffle else ', file order'}, "
                  f"plan {self.plan_text()}", "",
                  f"{'measure':<40}{'this config':>13}{'full shuffle':>14}{'ratio':>9}",
                  "-" * 76,
                  f"{'distinct labels per batch':<40}{self.distinct_labels:>13.2f}"
                  f"{self.full_shuffle_distinct_labels:>14.2f}{self.diversity_ratio:>9.4f}",
                  f"{f'co-batch repetition, epoch {e} -> {e + 1}':<40}"
                  f"{100 * self.repetition:>12.3f}%{100 * self.full_shuffle_repetition:>13.3f}%"
                  f"{_ratio(self.repetition, self.full_shuffle_repetition):>9}",
                  "", "note: " + self.explanation()]
        return "\n".join(lines)

    def plan_text(self) -> str:
        """Which plan the figures are of, in words."""
        if self.node_ranks:
            return f"{self.plan} (one node reader per {self.node_ranks} ranks)"
        return f"{self.plan} (a reader per rank)"

    def __str__(self) -> str:
        return (f"N={self.num_records} batch={self.batch_size} world={self.world_size} "
                f"chunk={self.chunk_size} buffer={self.buffer_size}: distinct labels/batch "
                f"{self.distinct_labels:.2f} vs {self.full_shuffle_distinct_labels:.2f} "
                f"(ratio {self.diversity_ratio:.4f}); co-batch repetition "
                f"{100 * self.repetition:.3f}% (full shuffle "
                f"{100 * self.full_shuffle_repetition:.3f}%)")


def shuffle_report(labels: np.ndarray, *, batch_size: int, mode: str = "train", seed: int = 0,
                   epoch: int = 0, world_size: int = 1, shuffle: bool = True,
                   chunk_size: int = order.DEFAULT_CHUNK_RECORDS, buffer_size: int = 0,
                   drop_last: bool = False, node_ranks: int = 0) -> ShuffleReport:
    """Diversity of epoch ``epoch`` and repetition between ``epoch`` and ``epoch + 1``.

    Args:
        labels: label of every record, in file order (``SplitReader.labels``).
        node_ranks: ranks per node reading through one node reader (the node plan,
            ``node-1``); 0: a reader per rank (``rank-1``).
        other arguments: as for the Loader (``buffer_size`` in records).
    """
    labels = np.asarray(labels, np.int64)
    plan = Plan(len(labels), mode, seed, 0, world_size, shuffle, chunk_size, buffer_size,
                node_ranks)
    return _report(labels, plan, batch_size, drop_last, epoch)


def _report(labels: np.ndarray, plan: Plan, batch_size: int, drop_last: bool,
            epoch: int) -> ShuffleReport:
    """:func:`shuffle_report` of ``plan`` (any rank of it: every rank's batches count)."""
    labels = np.asarray(labels, np.int64)
    n = len(labels)
    ids_a = _batch_ids(plan, batch_size, drop_last, epoch)
    ids_b = _batch_ids(plan, batch_size, drop_last, epoch + 1)
    got = mean_distinct_labels(ids_a, labels)
    ref = full_shuffle_distinct_labels(labels, batch_size)
    return ShuffleReport(n, batch_size, plan.world_size, plan.chunk_size, plan.buffer_size, got,
                         ref, got / ref if ref else 1.0, cobatch_repetition(ids_a, ids_b),
                         (min(batch_size, n) - 1) / max(1, n - 1), plan.mode,
                         bool(plan.shuffle), epoch, plan.name, plan.node_ranks)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b > 0 else "-"


def _labels_of(reader) -> np.ndarray:
    if reader.labels is None:
        raise ValueError(f"{reader.path} stores no __labels__ record (an original-tool "
                         "LMDB); convert it with preprocess_sequential.py for diagnostics")
    return reader.labels


def loader_report(loader, epoch: Optional[int] = None, *, quiet: bool = False,
                  file: Optional[TextIO] = None) -> ShuffleReport:
    """Print (to ``file``, default stdout; nothing with ``quiet``) and return
    :func:`shuffle_report` for a :class:`imagenet_seq.data.Loader`'s configuration.

    Raises:
        ValueError: the file stores no labels (original-tool LMDBs).
    """
    settings = loader.settings
    planned, plan = settings.order, settings.order.plan
    rep = _report(_labels_of(loader.reader), plan, planned.batch_size, planned.drop_last,
                  loader.epoch if epoch is None else epoch)
    if not quiet:
        print(rep.table(f"{settings.data.path} ({plan.mode}), rank "
                        f"{plan.rank} of {plan.world_size}"), file=file)
    return rep


def write_plot(rep: ShuffleReport, labels: np.ndarray, path: str, seed: int = 0) -> None:
    """Histogram of distinct labels per batch (this configuration vs the full-shuffle
    expectation) and co-batch repetition bars, as a PNG.

    Raises:
        ImportError: matplotlib is missing (with the pip line).
    """
    try:
        import matplotlib
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install \"imagenet_seq[bench]\" "
                          "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = batch_ids(rep.num_records, rep.mode, batch_size=rep.batch_size, seed=seed,
                    epoch=rep.epoch, world_size=rep.world_size, shuffle=rep.shuffle,
                    chunk_size=rep.chunk_size, buffer_size=rep.buffer_size,
                    node_ranks=rep.node_ranks)
    per_batch = distinct_labels_per_batch(ids, labels)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110,
                               gridspec_kw={"width_ratios": [2, 1]})
    a.hist(per_batch, bins=min(50, max(5, len(np.unique(per_batch)))), color="#4c72b0")
    a.axvline(rep.full_shuffle_distinct_labels, color="#c44e52", linestyle="--",
              label=f"full shuffle {rep.full_shuffle_distinct_labels:.1f}")
    a.set_xlabel("distinct labels in a batch")
    a.set_ylabel("batches")
    a.legend(fontsize=8)
    a.set_title(f"label diversity (mean {rep.distinct_labels:.1f})", fontsize=10)
    vals = [100 * rep.repetition, 100 * rep.full_shuffle_repetition]
    bars = b.bar(["this config", "full shuffle"], vals, color=["#4c72b0", "#c44e52"])
    for bar, v in zip(bars, vals):
        b.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{v:.3f}%",
               ha="center", va="bottom", fontsize=8)
    b.set_ylabel("% of co-batched pairs")
    b.set_title(f"co-batch repetition {rep.epoch} -> {rep.epoch + 1}", fontsize=10)
    fig.suptitle(f"{rep.mode}: batch {rep.batch_size}, world {rep.world_size}, chunk "
                 f"{rep.chunk_size}, buffer {rep.buffer_size:,}, plan {rep.plan}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imagenet-seq-diagnose",
        description="How close a Loader configuration's batches are to a full shuffle (label "
                    "diversity per batch, co-batch repetition between epochs), from the "
                    "labels stored in the LMDB; no image is read.")
    p.add_argument("root", help="folder with ILSVRC-<split>.lmdb (or the file)")
    p.add_argument("--split", default="train", choices=SPLITS)
    p.add_argument("--batch-size", type=int, default=256, help="per rank")
    p.add_argument("--world-size", type=int, default=1, help="ranks (GPUs) in the job")
    p.add_argument("--ranks-per-machine", type=int,
                   help="ranks on one machine: they share its default buffer and, with the "
                        "node reader, one reader (default: LOCAL_WORLD_SIZE when set, else "
                        "--world-size, at most 8)")
    p.add_argument("--node-reader", choices=("auto", "on", "off"), default="auto",
                   help="plan as the Loader reading through one reader per machine (the node "
                        "plan): auto = as the Loader decides (on under torchrun's "
                        "LOCAL_WORLD_SIZE > 1 unless IMAGENET_SEQ_NODE_READER=0)")
    p.add_argument("--buffer-size", type=int,
                   help="shuffle buffer in records per rank (default: the Loader's, 2 GiB per "
                        "machine / ranks per machine / mean record)")
    p.add_argument("--chunk-size", type=int, default=order.DEFAULT_CHUNK_RECORDS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epoch", type=int, default=0, help="compare this epoch with the next")
    p.add_argument("--no-shuffle", action="store_true", help="shuffle=False (train)")
    p.add_argument("--drop-last", action="store_true")
    p.add_argument("--plot", help="write a PNG (label-diversity histogram, repetition bars)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Console entry: 0, or 2 with a one-line message naming the bad value."""
    from imagenet_seq.loader.config import mean_record_bytes, resolve_order
    from imagenet_seq.read.reader import SplitReader

    args = build_parser().parse_args(argv)
    try:
        for name in ("batch_size", "world_size", "chunk_size"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}; "
                                 "expected >= 1")
        reader = SplitReader(args.root, args.split)
        try:
            labels, path = _labels_of(reader), reader.path
            mean = mean_record_bytes(reader.meta, reader, len(reader))  # as the Loader's
        finally:
            reader.close()
        local, node_reader = _node_layout(args)
        # the Loader's order for these arguments: its shuffle, chunk and buffer defaults
        planned = resolve_order(
            len(labels), args.split, mean, batch_size=args.batch_size,
            drop_last=args.drop_last, shuffle=False if args.no_shuffle else None,
            seed=args.seed, rank=0, world_size=args.world_size, local_world_size=local,
            chunk_size=args.chunk_size, buffer_size=args.buffer_size, buffer_bytes=None,
            node_reader=node_reader)
        rep = _report(labels, planned.plan, args.batch_size, args.drop_last, args.epoch)
        if args.plot:
            write_plot(rep, labels, args.plot, args.seed)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"imagenet-seq-diagnose: error: {e}", file=sys.stderr)
        return 2
    plan_note = _plan_note(args, local, node_reader)
    if args.json:
        print(json.dumps(dict(rep.as_dict(), path=path, note=rep.explanation(),
                              plan_note=plan_note)))
    else:
        print(rep.table(f"{path} ({args.split})"))
        print(f"note: {plan_note}")
        if args.plot:
            print(f"plot: {args.plot}")
    return 0


def _node_layout(args: argparse.Namespace):
    """``(ranks per machine, node reader on)`` as the Loader would resolve them."""
    from imagenet_seq.read.rendezvous import enabled

    env_local = os.environ.get("LOCAL_WORLD_SIZE", "")
    if args.ranks_per_machine is not None and args.ranks_per_machine < 1:
        raise ValueError(f"--ranks-per-machine={args.ranks_per_machine}; expected >= 1")
    local = args.ranks_per_machine or (int(env_local) if env_local.isdigit() and
                                       int(env_local) > 0 else min(args.world_size, 8))
    if args.node_reader == "off":
        return local, False
    if args.node_reader == "on":
        if local < 2:
            raise ValueError(f"--node-reader on with {local} rank per machine: nothing to "
                             "share; give --ranks-per-machine (>= 2) or --node-reader off")
        return local, True
    # the Loader's automatic choice: torchrun's variable, a layout of whole nodes, not turned off
    return local, bool(env_local) and args.world_size % local == 0 and enabled(local)


def _plan_note(args: argparse.Namespace, local: int, node_reader: bool) -> str:
    if node_reader:
        return (f"the node plan: ranks of a machine ({local}) read through one node reader, "
                "as the Loader does under torchrun with several ranks per node; "
                "--node-reader off (IMAGENET_SEQ_NODE_READER=0) shows the per-rank plan")
    if args.world_size > 1 and local > 1:
        return (f"the per-rank plan (a reader per rank); under torchrun with {local} ranks "
                "per machine the Loader reads the node plan (one reader per machine) unless "
                "IMAGENET_SEQ_NODE_READER=0: --node-reader on shows it")
    return "the per-rank plan (a reader per rank)"


if __name__ == "__main__":
    sys.exit(main())
