"""One rank of a Loader with the node reader (tests/test_node_loader.py), as a real process.

    RANK=r WORLD_SIZE=w LOCAL_WORLD_SIZE=l python tests/node_loader_ranks.py LMDB OUT
        [--node-reader auto|on|off] [--epochs 0 1] [--mode train] [--save-after K]
        [--resume STATE.json] [--forever] [--linger S]
        [--ddp] [--block-after K --block allreduce|store|sleep] [--child] [--workers process]

Takes its rank from the environment as torchrun sets it (the gloo/torchrun path is
tests/ddp_ranks.py's, run by tests/test_ddp.py with the node reader on). Writes, as JSON to
OUT: whether the node reader is on, the plan's name, the reader's pid, and per epoch every
batch's records (``last_batch_records``), targets and a digest of its pixels. ``--save-after
K``: in the first epoch, the state after K batches (then the pass goes on). ``--resume``: load
that state first and read the rest of its epoch. ``--forever``: repeat the epochs until an
error. An error is written with its type, message and time; ``--linger``: seconds the rank
waits after it (or after its last epoch) before it closes and writes. Progress (batches so
far) goes to OUT + '.progress'.

Faults in a DDP job (``--ddp``: a gloo process group from MASTER_ADDR/MASTER_PORT; every
batch is followed by an all-reduce, as DDP's gradient sync): ``--block-after K`` makes the
rank stop after K batches in ``--block``: ``allreduce`` (one more all-reduce, which the
others may never join), ``store`` (a wait on a key nobody sets in the test's TCPStore at
BLOCK_STORE_PORT: a collective that, like NCCL's, never notices a dead peer) or ``sleep`` (a
long step in Python). It first writes OUT + '.blocked': its pid, its reader's pid, its child
and every process below it (``--child`` adds a ``sleep`` child without a parent-death signal;
``--workers process``: decode processes).
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

from node_procs import add_batch, error_entry, new_epoch, write_progress, write_result


def _block(how, rank, out, ld, child):
    from imagenet_seq.read import node_fault

    with open(out + ".blocked.tmp", "w") as f:
        json.dump(dict(pid=os.getpid(), reader_pid=getattr(ld.reader, "reader_pid", None),
                       below=node_fault.descendants(), child=child and child.pid), f)
    os.replace(out + ".blocked.tmp", out + ".blocked")
    if how == "sleep":
        time.sleep(3600)
    elif how == "store":
        import datetime

        import torch.distributed as dist
        # the test holds this store: no rank's death ends the wait
        store = dist.TCPStore("127.0.0.1", int(os.environ["BLOCK_STORE_PORT"]),
                              is_master=False, timeout=datetime.timedelta(hours=1))
        store.wait(["nobody-sets-this"], datetime.timedelta(hours=1))
    else:
        import torch
        import torch.distributed as dist
        dist.all_reduce(torch.ones(1))
    raise RuntimeError(f"the {how} block returned")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("out")
    p.add_argument("--node-reader", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--mode", default="train")
    p.add_argument("--epochs", type=int, nargs="*", default=[0])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--save-after", type=int, default=None)
    p.add_argument("--resume", default=None)
    p.add_argument("--forever", action="store_true")
    p.add_argument("--linger", type=float, default=0.0)
    p.add_argument("--ddp", action="store_true")
    p.add_argument("--block-after", type=int, default=None)
    p.add_argument("--block", choices=("allreduce", "store", "sleep"), default="allreduce")
    p.add_argument("--child", action="store_true")
    p.add_argument("--workers", choices=("thread", "process"), default="thread")
    args = p.parse_args()
    import faulthandler
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a hung rank's stacks on demand

    from imagenet_seq.data import Loader

    rank = int(os.environ["RANK"])
    where = dict(rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    if args.ddp:
        import torch
        import torch.distributed as dist
        dist.init_process_group("gloo", **where)
    child = None
    if args.child:  # no PR_SET_PDEATHSIG: only its parent's fault watch ends it
        child = subprocess.Popen(["sleep", "600"])
    flag = dict(auto=None, on=True, off=False)[args.node_reader]
    out = dict(rank=rank, epochs={}, error=None, state=None)
    try:
        ld = Loader(args.root, args.mode, batch_size=args.batch_size, num_workers=1,
                    worker_type=args.workers, image_size=16, resize_size=16, seed=3,
                    chunk_size=4, buffer_size=8, node_reader=flag, stall_timeout=60, **where)
    except Exception as e:  # noqa: BLE001 - reported to the test
        out["error"] = error_entry(e)
        write_result(args.out, out)
        return 0
    out.update(node_reader=ld.settings.order.node_reader, plan=ld.plan.name,
               reader_pid=getattr(ld.reader, "reader_pid", None), len=len(ld))
    epochs = list(args.epochs)
    if args.resume:
        state = json.load(open(args.resume))
        ld.load_state_dict(state)
        epochs = [state["epoch"]]
    done = 0
    try:
        while True:
            for e in epochs:
                ld.set_epoch(e)
                got = new_epoch()
                for images, targets in ld:
                    add_batch(got, ld, images, targets)
                    done += 1
                    write_progress(args.out, done)
                    if args.save_after is not None and out["state"] is None and \
                            len(got["records"]) == args.save_after:
                        out["state"] = json.loads(json.dumps(ld.state_dict()))
                    if args.block_after is not None and done >= args.block_after:
                        _block(args.block, rank, args.out, ld, child)
                    if args.ddp:
                        dist.all_reduce(torch.ones(1))  # DDP's gradient sync, in miniature
                out["epochs"][str(e)] = got
            if not args.forever:
                break
    except Exception as e:  # noqa: BLE001 - reported to the test
        out["error"] = error_entry(e)
    time.sleep(args.linger)
    ld.close()
    write_result(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
