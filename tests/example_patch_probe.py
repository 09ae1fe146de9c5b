"""Run a (patched) pytorch/examples ``imagenet/main.py`` as ``python main.py ARGS`` would, and
record which targets its loops consumed.

    torchrun ... tests/example_patch_probe.py MAIN_PY OUT_DIR [main.py's arguments...]

The script is loaded from its path and its ``main()`` called with ``sys.argv`` set to its
arguments; nothing of it is changed except that its module-level ``accuracy(output, target,
topk)`` (which ``train()`` and ``validate()`` call once per batch) also appends
``[phase, targets]`` to a list, phase ``'train'`` with autograd on and ``'val'`` under
``validate()``'s ``no_grad``. At exit the list goes to ``OUT_DIR/consumed-rank{RANK}.json``.
Without ``--multiprocessing-distributed`` only (mp.spawn would import the script afresh).
"""
import importlib.util
import json
import os
import sys

import torch


def main() -> None:
    script, out = sys.argv[1], sys.argv[2]
    spec = importlib.util.spec_from_file_location("imagenet_example_main", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    consumed = []
    accuracy = module.accuracy

    def recording_accuracy(output, target, topk=(1,)):
        consumed.append(["train" if torch.is_grad_enabled() else "val", target.tolist()])
        return accuracy(output, target, topk)

    module.accuracy = recording_accuracy
    sys.argv = [script] + sys.argv[3:]
    module.main()
    rank = os.environ.get("RANK", "0")
    with open(os.path.join(out, f"consumed-rank{rank}.json"), "w") as f:
        json.dump(consumed, f)


if __name__ == "__main__":
    main()
