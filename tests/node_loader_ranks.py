"""One rank of a Loader with the node reader (tests/test_node_loader.py), as a real process.

    RANK=r WORLD_SIZE=w LOCAL_WORLD_SIZE=l python tests/node_loader_ranks.py LMDB OUT
        [--node-reader auto|on|off] [--epochs 0 1] [--mode train] [--save-after K]
        [--resume STATE.json] [--forever]

Takes its rank from the environment as torchrun sets it (the gloo/torchrun path is
tests/ddp_ranks.py's, run by tests/test_ddp.py with the node reader on). Writes, as JSON to
OUT: whether the node reader is on, the
plan's name, the reader's pid, and per epoch every batch's records (``last_batch_records``),
targets and a digest of its pixels. ``--save-after K``: in the first epoch, the state after K
batches (then the pass goes on). ``--resume``: load that state first and read the rest of its
epoch. ``--forever``: repeat the epochs
until an error. An error is written with its type, message and time. Progress (batches so
far) goes to OUT + '.progress'.
"""
import argparse
import hashlib
import json
import os
import signal
import sys
import time


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
    args = p.parse_args()
    import faulthandler
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a hung rank's stacks on demand

    from imagenet_seq.data import Loader

    where = dict(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    flag = dict(auto=None, on=True, off=False)[args.node_reader]
    out = dict(rank=int(os.environ["RANK"]), epochs={}, error=None, state=None)
    try:
        ld = Loader(args.root, args.mode, batch_size=args.batch_size, num_workers=1,
                    worker_type="thread", image_size=16, resize_size=16, seed=3,
                    chunk_size=4, buffer_size=8, node_reader=flag, stall_timeout=60, **where)
    except Exception as e:  # noqa: BLE001 - reported to the test
        out["error"] = dict(type=type(e).__name__, message=str(e), at=time.time())
        json.dump(out, open(args.out, "w"))
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
                got = dict(records=[], targets=[], pixels=[])
                for images, targets in ld:
                    got["records"].append([int(r) for r in ld.last_batch_records])
                    got["targets"].append(targets.tolist())
                    got["pixels"].append(hashlib.sha1(images.numpy().tobytes()).hexdigest())
                    done += 1
                    with open(args.out + ".progress", "w") as f:
                        f.write(str(done))
                    if args.save_after is not None and out["state"] is None and \
                            len(got["records"]) == args.save_after:
                        out["state"] = json.loads(json.dumps(ld.state_dict()))
                out["epochs"][str(e)] = got
            if not args.forever:
                break
    except Exception as e:  # noqa: BLE001 - reported to the test
        out["error"] = dict(type=type(e).__name__, message=str(e), at=time.time())
    ld.close()
    with open(args.out + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
