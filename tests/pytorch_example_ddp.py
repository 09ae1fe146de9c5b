"""PyTorch's ImageNet example's DDP data code, run on imagenet_seq's Loader (by torchrun).

The data lines below reproduce ``pytorch/examples`` ``imagenet/main.py`` (commit 77f55b9:
lines 262-283, the sampler, ``set_epoch`` and loaders; lines 358-422, ``validate`` with its
auxiliary val loader) with the documented substitution: the two ``ImageFolder`` datasets and
``DataLoader``s become ``ImagenetLoader(args.data, split, transform, ...)`` and
``DistributedSampler(train_dataset)`` becomes ``train_loader.sampler`` (the README's diff).
Everything else the example does with them is its own code, unchanged.

    python -m torch.distributed.run --nproc_per_node=2 tests/pytorch_example_ddp.py LMDB OUT
"""
import argparse
import datetime
import json
import os

import torch
import torch.distributed as dist
import torch.utils.data.distributed  # noqa: F401 - as the example imports it
from torch import nn
from torch.utils.data import Subset


class AverageMeter:
    """The example's meter, reduced to what validate() uses (sum, count, all_reduce)."""

    def __init__(self):
        self.sum, self.count, self.avg = 0.0, 0, 0.0

    def update(self, val, n=1):
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count

    def all_reduce(self):
        total = torch.tensor([self.sum, self.count], dtype=torch.float32)
        dist.all_reduce(total, dist.ReduceOp.SUM, async_op=False)
        self.sum, self.count = total.tolist()
        self.avg = self.sum / self.count


def accuracy(output, target):
    return (output.argmax(1) == target).float().mean() * 100


def main():
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("-b", "--batch-size", type=int, default=4)
    p.add_argument("-j", "--workers", type=int, default=1)
    p.add_argument("--transform", choices=("torchvision", "fast"), default="torchvision")
    args = p.parse_args()
    dist.init_process_group("gloo", init_method="env://",
                            timeout=datetime.timedelta(seconds=60))
    args.world_size, args.rank = dist.get_world_size(), dist.get_rank()
    args.distributed = args.world_size > 1
    from imagenet_seq.data import ImagenetLoader

    if args.transform == "torchvision":  # the example's own transforms, sizes made small
        from torchvision import transforms
        normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
        train_tf = transforms.Compose([transforms.RandomResizedCrop(32),
                                       transforms.RandomHorizontalFlip(),
                                       transforms.ToTensor(), normalize])
        val_tf = transforms.Compose([transforms.Resize(40), transforms.CenterCrop(32),
                                     transforms.ToTensor(), normalize])
        extra = {}
    else:  # the fast path: uint8 batches
        train_tf = val_tf = None
        extra = dict(image_size=32, resize_size=40)

    # --- pytorch/examples imagenet/main.py, data loading, with the substitution -------------
    train_loader = ImagenetLoader(args.data, 'train', train_tf, batch_size=args.batch_size,
                                  num_workers=args.workers, shuffle=True, **extra)
    val_loader = ImagenetLoader(args.data, 'val', val_tf, batch_size=args.batch_size,
                                num_workers=args.workers, shuffle=False, **extra)
    if args.distributed:
        train_sampler = train_loader.sampler  # was: DistributedSampler(train_dataset)
    else:
        train_sampler = None
    # -----------------------------------------------------------------------------------------

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    model = nn.parallel.DistributedDataParallel(model)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), 0.05)
    log = {"rank": args.rank, "train_batches": [], "train_records": [], "val_records": [],
           "sampler_len": {"train": len(train_loader.sampler), "val": len(val_loader.sampler)},
           "dataset_len": {"train": len(train_loader.dataset), "val": len(val_loader.dataset)},
           "epochs_seen": [], "val_count": [], "aux_built": []}

    def as_float(images):
        return images.float() / 255 if images.dtype == torch.uint8 else images

    def train(loader):
        model.train()
        n, recs = 0, []
        for i, (images, target) in enumerate(loader):
            loss = criterion(model(as_float(images)), target)
            optimizer.zero_grad()
            loss.backward()  # DDP's gradient all-reduce: unequal batch counts would hang here
            optimizer.step()
            n += 1
            recs += loader.last_batch_records.tolist()
        log["train_batches"].append(n)
        log["train_records"].append(recs)

    # --- pytorch/examples imagenet/main.py, validate(), data parts unchanged -----------------
    def validate(val_loader, model, criterion, args):
        seen = []

        def run_validate(loader, base_progress=0):
            with torch.no_grad():
                for i, (images, target) in enumerate(loader):
                    i = base_progress + i
                    output = model(as_float(images))
                    loss = criterion(output, target)
                    losses.update(loss.item(), images.size(0))
                    top1.update(accuracy(output, target).item(), images.size(0))
                    if hasattr(loader, "last_batch_records"):
                        seen.extend(loader.last_batch_records.tolist())

        losses, top1 = AverageMeter(), AverageMeter()
        progress_len = len(val_loader) + (args.distributed and (
            len(val_loader.sampler) * args.world_size < len(val_loader.dataset)))
        model.eval()
        run_validate(val_loader)
        if args.distributed:
            top1.all_reduce()
        aux = args.distributed and (len(val_loader.sampler) * args.world_size
                                    < len(val_loader.dataset))
        if aux:
            aux_val_dataset = Subset(val_loader.dataset,
                                     range(len(val_loader.sampler) * args.world_size,
                                           len(val_loader.dataset)))
            aux_val_loader = torch.utils.data.DataLoader(
                aux_val_dataset, batch_size=args.batch_size, shuffle=False,
                num_workers=args.workers, pin_memory=True)
            run_validate(aux_val_loader, len(val_loader))
        log["aux_built"].append(bool(aux))
        log["progress_len"] = int(progress_len)
        log["val_count"].append(top1.count)
        log["val_records"].append(seen)
        return top1.avg
    # -----------------------------------------------------------------------------------------

    for epoch in range(args.epochs):
        if args.distributed:
            train_sampler.set_epoch(epoch)
        log["epochs_seen"].append(train_loader.epoch)
        train(train_loader)
        validate(val_loader, model, criterion, args)

    # the auxiliary loader's machinery itself, forced over this rank's last val records:
    # Subset(val_loader.dataset, ...) through a DataLoader with worker processes gives the
    # Loader's own pixels for those records
    mine = log["val_records"][-1]
    tail = mine[-3:]
    loader_images = {}
    for images, _ in val_loader:
        for r, im in zip(val_loader.last_batch_records.tolist(), images):
            loader_images[r] = im
    forced = torch.utils.data.DataLoader(Subset(val_loader.dataset, tail),
                                         batch_size=2, num_workers=args.workers)
    got = [im for images, _ in forced for im in images]
    log["forced_aux_equal"] = [bool(torch.equal(g, loader_images[r]))
                               for g, r in zip(got, tail)]
    flag = torch.ones(1)
    dist.all_reduce(flag)
    log["all_reduce"] = flag.item()
    with open(os.path.join(args.out, f"rank{args.rank}.json"), "w") as f:
        json.dump(log, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
