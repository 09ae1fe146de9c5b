"""What a converted output holds, for comparing conversions (tests of the distributed
converter): every record's bytes and label in split order, each shard's records and metadata
(the conversion's random split id left out), the report's rows."""
import hashlib
import json
import os

from imagenet_seq import format as fmt
from imagenet_seq.format import manifest as mf


def contents(root: str, split: str) -> dict:
    """Records (sha1 of bytes, label) in order, shard sizes and metadata, report rows."""
    got = mf.open_split(root, split)
    out = {"records": [], "shards": [], "report": None}
    for path in got.paths:
        env = fmt.open_env(path)
        try:
            with env.begin(buffers=True) as txn:
                meta = json.loads(bytes(txn.get(fmt.META_KEY)))
                meta.get("shard", {}).pop("split_id", None)
                n = meta["num_records"]
                for k in range(n):
                    rec = bytes(txn.get(fmt.record_key(k)))
                    out["records"].append(hashlib.sha1(rec).hexdigest())
                out["shards"].append(meta)
        finally:
            env.close()
    report = os.path.join(root, f"ILSVRC-{split}.report.tsv")
    if os.path.exists(report):
        with open(report) as f:
            out["report"] = sorted(f.read().splitlines())
    return out
