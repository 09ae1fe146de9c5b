"""A training run killed with SIGKILL mid-epoch resumes with exactly the batches of an
uninterrupted run (issue 13, item 4): examples/imagenet/main.py --save-every N, --resume.

Every training step of both runs is logged (``--log-batches``: record ids and a SHA-1 of the
images); after the resume, every later step's records and pixels must equal the uninterrupted
run's.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "imagenet")
ARGS = ["-a", "tiny", "-b", "4", "--image-size", "32", "--resize-size", "40", "-p", "100",
        "--epochs", "2", "--device", "cpu", "--threads", "1", "--seed", "5"]
# each step sleeps a little, so the test can kill the run between two checkpoints
RUNNER = f"""
import sys, time
sys.path.insert(0, {EXAMPLE!r})
import meters
step = meters.Progress.step
def slow(self, *a, **k):
    time.sleep(float(__import__('os').environ.get('STEP_DELAY', '0')))
    return step(self, *a, **k)
meters.Progress.step = slow
import main
sys.exit(main.main(sys.argv[1:]))
"""


def launch(argv, delay=0.0):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               STEP_DELAY=str(delay))
    return subprocess.Popen([sys.executable, "-c", RUNNER] + argv, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def steps(path):
    if not os.path.exists(path):
        return []
    out = []
    for line in open(path):
        if line.endswith("\n"):
            out.append(json.loads(line))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])
def test_sigkill_mid_epoch_then_resume_gives_the_same_batches(sample_lmdb, tmp_path, workers):
    ref_log = str(tmp_path / "ref.jsonl")
    ref = launch([sample_lmdb, *ARGS, "-j", workers, "--output-dir", str(tmp_path / "ref"),
                  "--log-batches", ref_log])
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]
    reference = {(s["epoch"], s["step"]): s for s in steps(ref_log)}
    per_epoch = max(s["step"] for s in reference.values()) + 1
    assert per_epoch == 12 and len(reference) == 24

    run_dir, log1 = str(tmp_path / "run"), str(tmp_path / "first.jsonl")
    first = launch([sample_lmdb, *ARGS, "-j", workers, "--output-dir", run_dir,
                    "--save-every", "3", "--log-batches", log1], delay=0.25)
    ckpt = os.path.join(run_dir, "checkpoint.pth")
    deadline = time.time() + 240
    # kill in epoch 1 (the second), after its step-6 checkpoint, before its step 9
    while time.time() < deadline:
        done = [(s["epoch"], s["step"]) for s in steps(log1)]
        if (1, 7) in done:
            break
        assert first.poll() is None, first.communicate()[1][-3000:]
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    import torch

    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["epoch"] == 1 and saved["step"] == 6, (saved["epoch"], saved.get("step"))
    assert saved["loader"][0]["batches"] == 6

    log2 = str(tmp_path / "resumed.jsonl")
    second = launch([sample_lmdb, *ARGS, "-j", workers, "--output-dir", run_dir,
                     "--resume", run_dir, "--log-batches", log2])
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err[-3000:]
    assert "mid-epoch: epoch 2, step 6 of 12" in out
    resumed = steps(log2)
    assert [(s["epoch"], s["step"]) for s in resumed] == [(1, k) for k in range(6, 12)]
    for s in resumed:
        want = reference[(s["epoch"], s["step"])]
        assert s["records"] == want["records"], f"step {s['step']}: records"
        assert s["sha1"] == want["sha1"], f"step {s['step']}: pixels"
    # and the steps the killed run did before the checkpoint were the reference's too
    for s in steps(log1):
        assert s["records"] == reference[(s["epoch"], s["step"])]["records"]


def test_save_every_must_be_non_negative(sample_lmdb, tmp_path):
    sys.path.insert(0, EXAMPLE)
    import main

    with pytest.raises(SystemExit):
        main.parse_args([sample_lmdb, "--save-every", "-1"])
