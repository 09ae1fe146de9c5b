"""A tiny Lightning fit on imagenet_seq's DataModule, run by tests/test_lightning.py.

    python tests/lightning_fit.py LMDB OUT --devices 2 --epochs 2 [--max-steps N]
        [--ckpt-every N] [--resume CKPT]

Writes OUT/rank<r>.json: the record indices of every train batch the model saw, per epoch, the
epochs Lightning set through the sampler, the val records, the (rank, world) the Loader got.
"""
import argparse
import json
import os
import sys

import torch
from torch import nn


def main():
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--resume", default=None)
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
            images, targets = batch
            # the records of this batch, noted as the loader yielded it (Lightning prefetches
            # one batch, so the loader's last_batch_records is one ahead of the step)
            recs = self._recs.pop(0)
            self.seen.setdefault(str(self.current_epoch), []).append(recs)
            loss = nn.functional.cross_entropy(self.net(images.float() / 255), targets)
            return loss

        def validation_step(self, batch, i):
            images, targets = batch
            self.log("val_loss", nn.functional.cross_entropy(self.net(images.float() / 255),
                                                             targets), sync_dist=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    dm = ImagenetSeqDataModule(args.data, batch_size=4, num_workers=1, image_size=16,
                               resize_size=16)
    model = Tiny()
    model._recs = []
    # record each batch's records at the moment the loader yields it
    orig = dm._wrap

    def wrap(loader):
        w = orig(loader)
        inner = type(w).__iter__
        into = model._recs if loader.mode == "train" else model.val_seen

        def it(self):
            for b in inner(self):
                into.append(self.loader.last_batch_records.tolist())
                yield b
        w.__class__ = type("Recorded" + type(w).__name__, (type(w),), {"__iter__": it})
        return w
    dm._wrap = wrap
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
    out = {"rank": rank, "world": trainer.world_size, "seen": model.seen,
           "epochs_set": model.epochs_set, "val_seen": model.val_seen,
           "loader_rank": dm.train_loader.rank, "loader_world": dm.train_loader.world_size,
           "len": len(dm.train_loader)}
    with open(os.path.join(args.out, f"{args.tag}_rank{rank}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    sys.exit(main())
