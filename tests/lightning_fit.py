"""A tiny Lightning fit on imagenet_seq's DataModule, run by tests/test_lightning.py.

    python tests/lightning_fit.py LMDB OUT --devices 2 --epochs 2 [--max-steps N]
        [--ckpt-every N] [--resume CKPT] [--kill-at-step N]

Lightning drives the DataModule as it would any user's: nothing of ours is wrapped. The model
notes what it was given (a hash of each batch's pixels and targets, per epoch); after the fit
the script builds a fresh Loader with the same settings and hashes the batches of
``epoch_order(e)`` for every epoch Lightning trained, so the test can compare what Lightning's
epoch ``e`` consumed with the Loader's epoch ``e``. ``--kill-at-step N``: every rank SIGKILLs
itself at the start of global step N (a crash mid-epoch, after the checkpoints before it).

Writes OUT/<tag>_rank<r>.json.
"""
import argparse
import hashlib
import json
import os
import signal
import sys

import torch
from torch import nn

LOADER_ARGS = dict(batch_size=4, num_workers=1, image_size=16, resize_size=16)


def batch_hash(images, targets) -> str:
    h = hashlib.sha1(images.contiguous().numpy().tobytes())
    h.update(targets.numpy().tobytes())
    return h.hexdigest()[:16]


def reference(data, loader, epochs):
    """Hashes of the batches and the record order of a fresh Loader's epochs (same settings)."""
    from imagenet_seq.data import Loader

    ref = Loader(data, "train", shuffle=True, seed=0, rank=loader.rank,
                 world_size=loader.world_size, buffer_size=loader.buffer_size,
                 chunk_size=loader.chunk_size, **dict(LOADER_ARGS, num_workers=0))
    out = {}
    for e in epochs:
        ref.set_epoch(e)
        hashes, records = [], []
        for images, targets in ref:
            hashes.append(batch_hash(images, targets))
            records += ref.last_batch_records.tolist()
        out[str(e)] = {"hashes": hashes, "records": records,
                       "epoch_order": ref.epoch_order(e).tolist()}
    ref.close()
    return out


def val_reference(data, loader):
    """Hashes and records of a fresh val Loader's pass for this rank (same settings)."""
    from imagenet_seq.data import Loader

    ref = Loader(data, "val", shuffle=False, seed=0, rank=loader.rank,
                 world_size=loader.world_size, **dict(LOADER_ARGS, num_workers=0))
    hashes, records = [], []
    for images, targets in ref:
        hashes.append(batch_hash(images, targets))
        records += ref.last_batch_records.tolist()
    ref.close()
    return {"hashes": hashes, "records": records}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--resume", default=None)
    p.add_argument("--kill-at-step", type=int, default=-1)
    p.add_argument("--tag", default="run")
    args = p.parse_args()
    torch.set_num_threads(1)
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    from imagenet_seq.integrations.lightning import ImagenetSeqDataModule

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
            self.seen = {}
            self.val_seen = []
            self.epochs_set = []

        def on_train_epoch_start(self):
            self.epochs_set.append(self.trainer.datamodule.train_loader.epoch)

        def training_step(self, batch, i):
            if self.global_step == args.kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            images, targets = batch
            self.seen.setdefault(str(self.current_epoch), []).append(batch_hash(images, targets))
            return nn.functional.cross_entropy(self.net(images.float() / 255), targets)

        def validation_step(self, batch, i):
            images, targets = batch
            self.val_seen.append(batch_hash(images, targets))
            self.log("val_loss", nn.functional.cross_entropy(self.net(images.float() / 255),
                                                             targets), sync_dist=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    dm = ImagenetSeqDataModule(args.data, **LOADER_ARGS)
    model = Tiny()
    callbacks = []
    if args.ckpt_every:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(
            dirpath=os.path.join(args.out, "ckpt"), every_n_train_steps=args.ckpt_every,
            save_top_k=-1, filename="{epoch}-{step}"))
    strategy = DDPStrategy(process_group_backend="gloo") if args.devices > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy,
                        max_epochs=args.epochs, max_steps=args.max_steps, logger=False,
                        enable_checkpointing=bool(args.ckpt_every), callbacks=callbacks,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm, ckpt_path=args.resume)
    rank = trainer.global_rank
    loader = dm.train_loader
    out = {"rank": rank, "world": trainer.world_size, "seen": model.seen,
           "epochs_set": model.epochs_set, "val_seen": model.val_seen,
           "loader_rank": loader.rank, "loader_world": loader.world_size,
           "len": len(loader), "reference": reference(args.data, loader, range(args.epochs)),
           "val_reference": val_reference(args.data, dm.val_loader)}
    with open(os.path.join(args.out, f"{args.tag}_rank{rank}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    sys.exit(main())
