"""One rank of a node-reader test (tests/test_node_reader.py), as a real process.

    python tests/node_ranks.py LMDB OUT --rank R --world-size W --local-world-size L --job KEY
        [--epochs 0 1] [--position P] [--ring-bytes B] [--sleep S] [--forever]
        [--stop-after N] [--linger S]

Reads its node-plan spans of each epoch through a NodeClient and writes, as JSON to OUT:
records, labels and a digest of every record's bytes, the reader's pid, and -- if reading
fails -- the error's type and message and when it came. ``--forever`` repeats the epochs until
killed or failed; ``--sleep`` slows every record (a rank in long steps). Progress (records
read so far) is written to OUT + '.progress' so a test can wait for every rank to be reading.
"""
import argparse
import hashlib
import os
import sys
import time

from node_procs import error_entry, write_progress, write_result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("out")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--local-world-size", type=int, required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--mode", default="train")
    p.add_argument("--epochs", type=int, nargs="*", default=[0])
    p.add_argument("--position", type=int, default=0)
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--ring-bytes", type=int, default=None)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--forever", action="store_true")
    p.add_argument("--stop-after", type=int, default=None,
                   help="leave the read after this many records and close (a rank done early)")
    p.add_argument("--no-close", action="store_true")
    p.add_argument("--linger", type=float, default=0.0,
                   help="seconds to wait, reading nothing, before closing")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--fork-child", action="store_true",
                   help="fork a child that sleeps (it must not keep the connection alive)")
    args = p.parse_args()

    from imagenet_seq.plan import node
    from imagenet_seq.read.node_client import NodeClient
    from imagenet_seq.read.reader import SplitReader

    reader = SplitReader(args.root, args.mode)
    kw = {} if args.ring_bytes is None else {"ring_bytes": args.ring_bytes}
    out = dict(rank=args.rank, pid=os.getpid(), epochs={}, error=None)
    try:
        client = NodeClient(reader, rank=args.rank, world_size=args.world_size,
                            local_world_size=args.local_world_size, seed=args.seed,
                            chunk_size=args.chunk_size, job=args.job, connect_timeout=60, **kw)
    except Exception as e:  # noqa: BLE001 - reported to the test
        out["error"] = error_entry(e)
        write_result(args.out, out)
        return 1
    out["reader_pid"] = client.reader_pid
    with open(args.out + ".pid", "w") as f:
        f.write(str(client.reader_pid))
    if args.fork_child:
        child = os.fork()
        if child == 0:
            time.sleep(120)
            os._exit(0)
        with open(args.out + ".child", "w") as f:
            f.write(str(child))
    done = 0
    try:
        while True:
            for e in args.epochs:
                tail = node.epoch_spans(len(reader), args.mode, seed=args.seed, epoch=e,
                                        rank=args.rank, world_size=args.world_size,
                                        local_world_size=args.local_world_size,
                                        chunk_size=args.chunk_size, position=args.position)
                recs, labels, digests = [], [], []
                for i, data, label in client.read_spans(tail):
                    recs.append(i)
                    labels.append(label)
                    digests.append(hashlib.sha1(data).hexdigest()[:16])
                    done += 1
                    if done % 8 == 0:
                        write_progress(args.out, done)
                    if args.sleep:
                        time.sleep(args.sleep)
                    if args.stop_after is not None and done >= args.stop_after:
                        break
                out["epochs"][str(e)] = dict(records=recs, labels=labels, digests=digests)
            if not args.forever or args.stop_after is not None and done >= args.stop_after:
                break
    except Exception as e:  # noqa: BLE001 - reported to the test
        out["error"] = error_entry(e)
    time.sleep(args.linger)
    if not args.no_close:
        client.shutdown()
    write_result(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
