"""Run under torchrun by tests/test_ddp.py: one rank's view of the Loader, written as JSON.

Every image of the test data is a solid colour that encodes its id (4 bits per channel), so the
id survives decode, crop and resize; the rank recovers which records it received from the pixels.

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_ranks.py LMDB OUT --epochs 3
"""
import argparse
import datetime
import json
import os

import torch
import torch.distributed as dist


def colour_of(i: int):
    """RGB of image id ``i`` (< 4096): channel value 8 + 16 * (4-bit digit)."""
    return tuple(8 + 16 * ((i >> (4 * c)) & 15) for c in range(3))


def ids_of(images: torch.Tensor):
    """Image ids from a uint8 NCHW batch of solid-colour images."""
    mean = images.float().mean(dim=(2, 3))  # (N, 3)
    digits = ((mean - 8) / 16).round().clamp(0, 15).long()
    return (digits[:, 0] + 16 * digits[:, 1] + 256 * digits[:, 2]).tolist()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("out")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=None)
    args = p.parse_args()
    # a short timeout: unequal batch counts must fail the test, not hang it
    dist.init_process_group("gloo", init_method="env://",
                            timeout=datetime.timedelta(seconds=60))
    from imagenet_seq.data import Loader

    rank, world = dist.get_rank(), dist.get_world_size()
    kw = dict(batch_size=args.batch_size, num_workers=args.workers, image_size=16,
              resize_size=16)
    train = Loader(args.root, "train", shuffle=True, seed=0, chunk_size=args.chunk_size, **kw)
    val = Loader(args.root, "val", **kw)
    out = {"rank": rank, "world_size": world, "loader_rank": train.rank,
           "loader_world_size": train.world_size, "dataset_size": train.dataset_size,
           "train_len": [], "train_batches": [], "train_ids": [], "train_labels": [], "train_keys": [],
           "node_reader": train.settings.order.node_reader, "train_num_records": [], "val_len": len(val), "val_ids": [], "val_labels": [], "val_keys": []}
    for epoch in range(args.epochs):
        train.set_epoch(epoch)
        out["train_len"].append(len(train))
        out["train_num_records"].append(train.num_records)
        ids, labels, keys, batches = [], [], [], 0
        for images, targets in train:
            dist.all_reduce(torch.ones(1))  # what DDP's gradient sync does every step
            batches += 1
            ids += ids_of(images)
            labels += targets.tolist()
            keys += [int(k) for k in train.last_batch_records]  # record indices in the file
        out["train_batches"].append(batches)
        out["train_ids"].append(ids)
        out["train_labels"].append(labels)
        out["train_keys"].append(keys)
    # mid-epoch resume under a process group: each rank saves its own state after k batches
    # of the last epoch; a fresh Loader on the same rank yields exactly the rest
    k = max(1, len(train) // 2)
    train.set_epoch(args.epochs - 1)
    it = iter(train)
    for _ in range(k):
        next(it)
        dist.all_reduce(torch.ones(1))
    state = json.loads(json.dumps(train.state_dict()))
    train.close()
    resumed = Loader(args.root, "train", shuffle=True, seed=0, chunk_size=args.chunk_size, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(args.epochs - 1)
    rest = []
    for _ in resumed:
        dist.all_reduce(torch.ones(1))
        rest += [int(r) for r in resumed.last_batch_records]
    resumed.close()
    out["resume_state"] = {key: state[key] for key in ("rank", "world_size", "epoch", "batches")}
    out["resume_rest_keys"] = rest
    for images, targets in val:
        out["val_ids"] += ids_of(images)
        out["val_labels"] += targets.tolist()
        out["val_keys"] += [int(k) for k in val.last_batch_records]
    # the ranks reach here together only if they yielded equal batch counts without hanging
    flag = torch.ones(1)
    dist.all_reduce(flag)
    out["all_reduce"] = flag.item()
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
