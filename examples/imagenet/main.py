#!/usr/bin/env python
"""Train an ImageNet classifier from sequential LMDBs (imagenet_seq), one GPU or many.

    python examples/imagenet/main.py /data/lmdb -a resnet18 -b 256 -j 8 --epochs 90
    torchrun --nproc_per_node=8 examples/imagenet/main.py /data/lmdb -a resnet50 -b 1024 -j 64
    python examples/imagenet/main.py /data/lmdb -a resnet18 --evaluate --resume run/model_best.pth
    python examples/imagenet/main.py /data/imagenet --loader folder ...   # torchvision baseline

``-b`` and ``-j`` are totals (batch over all ranks, decode workers per node), split between the
ranks as PyTorch's ImageNet example does. On a CPU: ``-a tiny`` (no torchvision needed).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # sibling modules, also when this file is loaded by path (demo, tests)
    sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from checkpoint import load_checkpoint, save_checkpoint, unwrap  # noqa: E402
from meters import Progress, correct_counts  # noqa: E402
from models import available_archs, build_model  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command line (names follow PyTorch's ImageNet example where they exist)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", help="folder with ILSVRC-train.lmdb and ILSVRC-val.lmdb (written by "
                   "preprocess_sequential.py); with --loader folder, the ImageFolder root")
    p.add_argument("-a", "--arch", default="resnet18",
                   help="model: 'tiny' (built in) or a torchvision model name")
    p.add_argument("--loader", choices=("seq", "folder"), default="seq")
    p.add_argument("--decoder", choices=("cpu", "dali"), default="cpu",
                   help="JPEG decode: CPU workers, or DALI on the GPU (pip install "
                   "imagenet_seq[dali])")
    p.add_argument("-j", "--workers", type=int, default=4,
                   help="decode workers per node (split between the node's ranks)")
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("-b", "--batch-size", type=int, default=256,
                   help="total batch size over all ranks")
    p.add_argument("--lr", "--learning-rate", type=float, default=0.1,
                   help="initial LR (0.1 suits -b 256; scale it linearly with -b)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--wd", "--weight-decay", type=float, default=1e-4, dest="weight_decay")
    p.add_argument("--lr-schedule", choices=("cosine", "step"), default="cosine")
    p.add_argument("--lr-step-size", type=int, default=30, help="epochs per step (step schedule)")
    p.add_argument("--lr-gamma", type=float, default=0.1, help="LR factor per step")
    p.add_argument("--warmup-epochs", type=float, default=0.0, help="linear LR warmup")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--amp", choices=("auto", "fp16", "bf16", "off"), default="auto",
                   help="autocast: auto = fp16 on CUDA, off on the CPU")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    p.add_argument("--image-size", type=int, default=224, help="train/val crop size")
    p.add_argument("--progressive", default=None, metavar="START:END",
                   help="progressive resizing: the train crop grows linearly from START px "
                   "(first epoch) to END px (last epoch), in steps of 32 px (FFCV's recipe, e.g. "
                   "160:192); val stays at --image-size")
    p.add_argument("--resize-size", type=int, default=256, help="val: shorter side resized to")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads on the CPU; 0 = the rank's cores minus its "
                   "decode workers (OpenMP threads competing with decode for the same cores "
                   "run several times slower)")
    p.add_argument("--seed", type=int, default=0, help="data order and model init")
    p.add_argument("--pretrained", action="store_true", help="torchvision pretrained weights")
    p.add_argument("-e", "--evaluate", action="store_true", help="validate only, then exit")
    p.add_argument("--resume", default="", metavar="PATH",
                   help="checkpoint.pth (or its folder) to continue from")
    p.add_argument("--start-epoch", type=int, default=None, help="override the resumed epoch")
    p.add_argument("--output-dir", default=".", help="where checkpoint.pth/model_best.pth go")
    p.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="also save checkpoint.pth every N training steps, with every rank's "
                   "loader state: --resume then continues mid-epoch with exactly the batches "
                   "the run would have seen (0 = only at the end of each epoch)")
    p.add_argument("--log-batches", default="", metavar="PATH",
                   help="append one JSON line per training step (epoch, step, rank, record "
                   "ids, SHA-1 of the images): to compare a resumed run with an "
                   "uninterrupted one")
    p.add_argument("-p", "--print-freq", type=int, default=10, help="steps between lines")
    p.add_argument("--tqdm", action="store_true", help="progress bar instead of lines")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classifier size (default: the classes stored in the LMDB)")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "image_size", "resize_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}; must be >= 1")
    if args.progressive is not None:
        try:
            args.progressive = parse_progressive(args.progressive)
        except ValueError as e:
            p.error(str(e))
    if args.threads < 0:
        p.error(f"--threads={args.threads}; must be >= 0 (0 = automatic)")
    if args.workers < 0:
        p.error(f"--workers={args.workers}; must be >= 0 (0 = decode in the training process)")
    if args.save_every < 0:
        p.error(f"--save-every={args.save_every}; must be >= 0 steps (0 = at epoch ends only)")
    return args


def parse_progressive(text: str):
    """``'160:192'`` -> ``(160, 192)``; ValueError naming the value unless two ints >= 16."""
    parts = text.split(":")
    try:
        start, end = (int(x) for x in parts)
    except ValueError:
        raise ValueError(f"--progressive {text!r}; expected START:END, two image sizes in "
                         "pixels, e.g. 160:192") from None
    if min(start, end) < 16:
        raise ValueError(f"--progressive {text!r}; sizes must be >= 16 px")
    return start, end


def progressive_size(epoch: int, epochs: int, start: int, end: int, step: int = 32) -> int:
    """The train image size of ``epoch``: ``start`` at the first epoch, ``end`` at the last,
    linear in between, rounded to a multiple of ``step`` and kept within [start, end]."""
    frac = epoch / max(1, epochs - 1)
    size = int(round((start + (end - start) * frac) / step)) * step
    return max(min(start, end), min(max(start, end), size))


def setup_distributed(args: argparse.Namespace):
    """Join the torchrun job (``env://``) when there is one; return (rank, world, local, device).

    NCCL on CUDA, gloo on the CPU. A process group already initialised by the caller is reused.
    """
    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device; use --device cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo", init_method="env://")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if want_cuda:
        torch.cuda.set_device(local % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return rank, world, local, device


def rank_workers(args: argparse.Namespace):
    """(ranks on this node, decode workers of this rank): -j is split between the node's ranks."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return local_world, 0 if args.workers == 0 else max(1, args.workers // local_world)


def cpu_threads(local_world: int, workers: int) -> int:
    """Intra-op threads for CPU training: this rank's share of the cores minus its workers."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world) - workers)


def make_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LR factor: linear warmup, then cosine to 0 or x gamma every lr_step_size epochs."""
    total = max(1, args.epochs * steps_per_epoch)
    warm = int(args.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if args.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
        return args.lr_gamma ** (step // (args.lr_step_size * steps_per_epoch))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def amp_dtype(args: argparse.Namespace, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for full precision."""
    mode = args.amp if args.amp != "auto" else ("fp16" if device.type == "cuda" else "off")
    if mode == "fp16" and device.type == "cpu":
        raise ValueError("--amp fp16 needs CUDA; on the CPU use --amp bf16 or --amp off")
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}[mode]


def train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler, device, dtype,
                    args, progress: Progress, on_step=None, log_batch=None) -> None:
    """One pass over this rank's shard (the rest of it, after a mid-epoch resume); timing and
    lines go through ``progress``; ``on_step(step)`` after each optimizer step (mid-epoch
    checkpoints); ``log_batch(step, images)`` before it (``--log-batches``)."""
    from imagenet_seq.data import to_device

    model.train()
    steps = len(loader)
    # a Loader resumed mid-epoch starts at batch k: steps are numbered from there
    first = loader.state_dict()["batches"] if hasattr(loader, "state_dict") else 0
    end = time.perf_counter()
    for i, (images, target) in enumerate(loader, start=first):
        if log_batch is not None:
            log_batch(i, images)
        images, target = to_device(images, target, device, normalize=True,
                                   channels_last=args.channels_last)
        data_s = time.perf_counter() - end
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            output = model(images)
            loss = criterion(output, target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_v = c1 = None
        if (i + 1) % args.print_freq == 0 or i + 1 == steps:  # .item() syncs: only when printing
            loss_v = loss.item()
            c1 = correct_counts(output.detach().float(), target, (1,))[0].item()
        now = time.perf_counter()
        progress.step(len(target), data_s, now - end, loss_v, c1)
        if on_step is not None:
            on_step(i + 1)
        end = now


@torch.no_grad()
def validate(model, loader, criterion, device, dtype, args) -> Dict[str, float]:
    """Top-1/top-5/loss over every validation image, counted once across ranks.

    Each rank evaluates its unpadded slice with the unwrapped model (no DDP collectives, since
    ranks may hold different batch counts); correct/total counts are all-reduced afterwards.
    """
    from imagenet_seq.data import to_device

    net = unwrap(model)
    net.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # correct1, correct5, loss sum, total
    for images, target in loader:
        images, target = to_device(images, target, device, normalize=True,
                                   channels_last=args.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            output = net(images)
            loss = criterion(output.float(), target)
        c = correct_counts(output.float(), target, (1, 5)).double().cpu()
        sums += torch.stack([c[0], c[1], loss.double().cpu() * len(target),
                             torch.tensor(float(len(target)), dtype=torch.float64)])
    if dist.is_initialized():
        t = sums.to(device) if dist.get_backend() == "nccl" else sums
        dist.all_reduce(t)
        sums = t.cpu()
    c1, c5, loss_sum, total = sums.tolist()
    total_safe = max(total, 1.0)
    return {"top1": 100.0 * c1 / total_safe, "top5": 100.0 * c5 / total_safe,
            "loss": loss_sum / total_safe, "total": total}


def run(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Parse ``argv``, train/evaluate, return a summary dict (see the end of this function).

    Raises:
        ValueError, FileNotFoundError, ImportError: bad input, with the value and the fix.
    """
    args = parse_args(argv)
    if args.arch != "tiny" and args.arch not in available_archs():
        build_model(args.arch, 1)  # raises the error listing the available archs
    was_initialized = dist.is_initialized()
    rank, world, local, device = setup_distributed(args)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(args.threads or cpu_threads(*rank_workers(args)))
    try:
        return _run(args, rank, world, device)
    finally:
        torch.set_num_threads(threads)  # run() may be called in-process (demo, tests)
        if dist.is_initialized() and not was_initialized:  # ours to close, not the caller's
            dist.destroy_process_group()


def _run(args, rank: int, world: int, device: torch.device) -> Dict[str, Any]:
    log = print if rank == 0 else (lambda *a, **k: None)
    if args.batch_size < world:
        raise ValueError(f"-b {args.batch_size} is the total batch over {world} ranks; "
                         f"use -b >= {world}")
    per_rank_batch = args.batch_size // world
    workers = rank_workers(args)[1]
    torch.manual_seed(args.seed)
    dtype = amp_dtype(args, device)
    if args.progressive and args.loader == "folder":
        raise ValueError("--progressive changes the Loader's image size per epoch; it needs "
                         "--loader seq")
    if args.loader == "folder":
        from loaders import folder_loaders
        train_loader, val_loader, classes = folder_loaders(
            args, device, rank, world, workers, per_rank_batch, need_train=not args.evaluate)
    else:
        from loaders import seq_loaders
        train_loader, val_loader, classes = seq_loaders(
            args, device, workers, per_rank_batch, need_train=not args.evaluate)
    try:
        return _train(args, rank, world, device, dtype, train_loader, val_loader, classes,
                      per_rank_batch, workers, log)
    finally:  # stop workers and close the LMDBs now, also on an error (e.g. a bad --resume)
        for loader in (train_loader, val_loader):
            _close(loader)


def _close(loader) -> None:
    if loader is None:
        return
    if hasattr(loader, "close"):
        loader.close()
    if hasattr(getattr(loader, "reader", None), "close"):
        loader.reader.close()


def _train(args, rank, world, device, dtype, train_loader, val_loader, classes, per_rank_batch,
           workers, log) -> Dict[str, Any]:
    num_classes = args.num_classes or len(classes) or 1000
    model = build_model(args.arch, num_classes, args.pretrained).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing).to(device)
    optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    steps = len(train_loader) if train_loader is not None else 1
    scheduler = make_scheduler(optimizer, args, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start_epoch, best_acc1 = 0, 0.0
    if args.resume:
        ckpt = load_checkpoint(args.resume, model, optimizer, scheduler, scaler,
                               arch=args.arch, num_classes=num_classes)
        start_epoch, best_acc1 = int(ckpt["epoch"]), float(ckpt.get("best_acc1", 0.0))
        if ckpt.get("loader") is not None and train_loader is not None:
            # saved mid-epoch (--save-every): this rank's loader continues at that batch
            states = ckpt["loader"]
            if len(states) != world:
                raise ValueError(
                    f"--resume {ckpt['path']!r} was saved mid-epoch by {len(states)} rank(s); "
                    f"this run has {world}. Resume it on {len(states)} rank(s), or start the "
                    f"next epoch on {world} with --start-epoch {start_epoch + 1}")
            train_loader.load_state_dict(states[rank])
            log(f"=> mid-epoch: epoch {start_epoch + 1}, step {ckpt.get('step')} of "
                f"{len(train_loader)}")
        log(f"=> resumed {ckpt['path']} (next epoch {start_epoch + 1}, best top1 "
            f"{best_acc1:.2f}%)")
    if args.start_epoch is not None:
        start_epoch = args.start_epoch
    log(f"=> {args.arch}, {num_classes} classes, {world} rank(s) on {device.type}, batch "
        f"{per_rank_batch} x {world}, {workers} worker(s) per rank, loader {args.loader}"
        f"/{args.decoder}, amp {dtype or 'off'}"
        + (f", {torch.get_num_threads()} torch thread(s)" if device.type == "cpu" else ""))
    summary: Dict[str, Any] = {"rank": rank, "world_size": world, "start_epoch": start_epoch,
                               "epochs_run": 0, "best_acc1": best_acc1, "checkpoint": None}
    if args.evaluate:
        t0 = time.perf_counter()
        val = validate(model, val_loader, criterion, device, dtype, args)
        log(f" * val top1 {val['top1']:.2f}% top5 {val['top5']:.2f}% loss {val['loss']:.4f} "
            f"on {int(val['total']):,} images in {time.perf_counter() - t0:.1f} s")
        summary["val"] = val
        return summary
    if start_epoch >= args.epochs:
        log(f"=> nothing to train: the checkpoint is at epoch {start_epoch} of --epochs "
            f"{args.epochs}")
    bar = None
    if args.tqdm and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=steps, unit="step", dynamic_ncols=True)
    progress = Progress(args.epochs, steps, len(val_loader), world, args.print_freq,
                        printer=(bar.write if bar is not None else print) if rank == 0 else None,
                        bar=bar)
    batch_log = open(args.log_batches, "a") if args.log_batches else None

    def checkpoint_state(epoch: int) -> Dict[str, Any]:
        return {"epoch": epoch, "arch": args.arch, "num_classes": num_classes,
                "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "best_acc1": best_acc1, "args": vars(args)}

    for epoch in range(start_epoch, args.epochs):
        train_loader.set_epoch(epoch)
        if args.progressive:
            size = progressive_size(epoch, args.epochs, *args.progressive)
            train_loader.set_image_size(size)  # this epoch's crops (val keeps --image-size)
            log(f"=> epoch {epoch + 1}: train images {size} px (--progressive)")

        def on_step(step: int, epoch: int = epoch) -> None:
            """--save-every: a checkpoint of this step with every rank's loader state."""
            if not args.save_every or step % args.save_every or step >= steps:
                return
            states = [train_loader.state_dict()]
            if dist.is_initialized():
                states = [None] * world
                dist.all_gather_object(states, train_loader.state_dict())
            if rank == 0:
                state = checkpoint_state(epoch)  # the epoch is not finished: resume inside it
                state.update(step=step, loader=states)
                save_checkpoint(args.output_dir, state, False)

        def log_batch(step: int, images, epoch: int = epoch) -> None:
            if batch_log is None:
                return
            import hashlib
            import json

            records = [int(r) for r in getattr(train_loader, "last_batch_records", [])]
            digest = hashlib.sha1(images.cpu().contiguous().numpy().tobytes()).hexdigest()
            batch_log.write(json.dumps({"epoch": epoch, "step": step, "rank": rank,
                                        "records": records, "sha1": digest}) + "\n")
            batch_log.flush()
        progress.start_epoch(epoch)
        if bar is not None:
            bar.reset(total=steps)
            bar.set_description(f"epoch {epoch + 1}/{args.epochs}")
        train_one_epoch(model, train_loader, criterion, optimizer, scheduler, scaler, device,
                        dtype, args, progress, on_step, log_batch)
        t0 = time.perf_counter()
        val = validate(model, val_loader, criterion, device, dtype, args)
        progress.end_epoch(val, time.perf_counter() - t0)
        is_best = val["top1"] > best_acc1 or best_acc1 == 0.0
        best_acc1 = max(best_acc1, val["top1"])
        if rank == 0:
            summary["checkpoint"] = save_checkpoint(args.output_dir, checkpoint_state(epoch + 1),
                                                    is_best)
        if dist.is_initialized():
            dist.barrier()  # a resumed run must find the checkpoint of every finished epoch
        summary.update(epochs_run=summary["epochs_run"] + 1, val=val, best_acc1=best_acc1,
                       train_img_per_s=progress.steady_rate(),
                       train_epoch_img_per_s=progress.epoch_rate(),
                       data_wait=progress.data_s / max(progress.step_s, 1e-9))
    if bar is not None:
        bar.close()
    if batch_log is not None:
        batch_log.close()
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry: 0 on success, 2 with a one-line message on bad input."""
    try:
        run(argv)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
