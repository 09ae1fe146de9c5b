"""examples/imagenet/main.py: its parts (models, meters, checkpoints, schedule) and end-to-end runs
on the CPU with the tiny arch (no torchvision)."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

EXAMPLE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "examples", "imagenet")
SMALL = ["-a", "tiny", "-b", "8", "-j", "0", "--image-size", "32", "--resize-size", "40",
         "-p", "2", "--lr", "0.05"]


def _load_example():
    spec = importlib.util.spec_from_file_location("imagenet_example_main",
                                                  os.path.join(EXAMPLE_DIR, "main.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # puts EXAMPLE_DIR on sys.path for its sibling modules
    return mod


ex = _load_example()
import checkpoint  # noqa: E402  (examples/imagenet/checkpoint.py)
import meters  # noqa: E402
import models  # noqa: E402


def _has_torchvision():
    return importlib.util.find_spec("torchvision") is not None


# ---------------------------------------------------------------- models


def test_tiny_model_forward_and_learns_shape():
    m = models.build_model("tiny", 7)
    out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert "tiny" in models.available_archs()


def test_unknown_arch_lists_available():
    with pytest.raises(ValueError) as e:
        models.build_model("resnet999", 10)
    msg = str(e.value)
    assert "resnet999" in msg and "tiny" in msg


@pytest.mark.skipif(_has_torchvision(), reason="checks the message without torchvision")
def test_torchvision_arch_without_torchvision_names_pip_line():
    with pytest.raises(ValueError, match="pip install torch==2.14.1 torchvision==0.29.1"):
        models.build_model("resnet18", 10)


def test_torchvision_imports_whenever_it_is_installed():
    """An installed torchvision must load with this torch (a wheel built for another torch fails
    at import with "operator torchvision::nms does not exist"); README gives the matching pair."""
    if not _has_torchvision():
        pytest.skip("torchvision is not installed (optional: README, Train)")
    assert models.torchvision_problem() == ""
    import torchvision

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20, 30, 30]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)  # a compiled op
    assert keep.tolist() == [0, 2]


def test_broken_torchvision_is_explained_with_the_matching_pair(monkeypatch):
    import builtins

    real = builtins.__import__

    def broken(name, *a, **k):
        if name.startswith("torchvision"):
            raise RuntimeError("operator torchvision::nms does not exist")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", broken)
    why = models.torchvision_problem()
    assert "does not load with torch" in why and "torchvision::nms" in why
    assert "pip install torch==2.14.1 torchvision==0.29.1" in why
    assert models.available_archs() == ["tiny"]
    with pytest.raises(ValueError, match="torchvision==0.29.1"):
        models.build_model("resnet18", 10)


# ---------------------------------------------------------------- meters


def test_correct_counts_top1_top5():
    out = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.5, 0.3, 0.2]])
    target = torch.tensor([0, 1, 1])
    c1, c2 = meters.correct_counts(out, target, (1, 2)).tolist()
    assert (c1, c2) == (1.0, 3.0)
    # k above the class count: everything correct
    assert meters.correct_counts(out, target, (5,)).tolist() == [3.0]


def test_run_eta_arithmetic():
    # 10 steps left + 2 epochs x 100 steps at 0.5 s, plus 3 validations of 20 s
    assert meters.run_eta_seconds(0.5, 10, 2, 100, 20.0) == pytest.approx(0.5 * 210 + 60)
    assert meters.fmt_duration(3725) == "1:02:05"
    assert meters.fmt_duration(float("nan")) == "?"


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_line_rate_wait_and_run_eta():
    lines = []
    clock = FakeClock()
    p = meters.Progress(epochs=3, steps_per_epoch=10, val_steps=4, world_size=2, print_freq=5,
                        printer=lines.append, clock=clock)
    p.start_epoch(0)
    for i in range(5):
        out = p.step(32, data_s=0.1, step_s=0.4, loss=1.5 if i == 4 else None,
                     correct1=8 if i == 4 else None)
    assert out is not None and lines == [out]
    # 5 steps x 32 images x 2 ranks / 2.0 s = 160 img/s, 0.5 / 2.0 data wait = 25 %
    assert "160 img/s" in out and "data wait 25%" in out and "top1  25.0%" in out
    # step time 0.4 s: epoch ETA 5 x 0.4 = 2 s; run: (5 + 2 x 10 train steps + 3 x 4 val) x 0.4
    assert "epoch ETA 0:00:02" in out
    assert f"run ETA {(5 + 20 + 12) * 0.4 / 3600:.2f} h" in out
    for _ in range(5):
        p.step(32, 0.1, 0.4)
    assert len(lines) == 2  # printed at step 10 = end of epoch
    clock.t = 4.5
    summary = p.end_epoch({"top1": 50.0, "top5": 90.0, "loss": 1.0, "total": 100},
                          val_seconds=1.0)
    assert "640 train images" in summary and "val top1 50.00%" in summary
    # measured validation (1 s) replaces the estimate: 2 epochs x (10 x 0.4 + 1) s left
    assert f"run ETA {2 * (4 + 1) / 3600:.2f} h" in summary


# ---------------------------------------------------------------- checkpoints, schedule, amp


def test_checkpoint_roundtrip_and_errors(tmp_path):
    m = models.build_model("tiny", 3)
    opt = torch.optim.SGD(m.parameters(), 0.1, momentum=0.9)
    m(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    state = {"epoch": 4, "arch": "tiny", "num_classes": 3, "model": m.state_dict(),
             "optimizer": opt.state_dict(), "best_acc1": 12.5}
    path = checkpoint.save_checkpoint(str(tmp_path), state, is_best=True)
    assert os.path.isfile(tmp_path / "model_best.pth")
    m2 = models.build_model("tiny", 3)
    opt2 = torch.optim.SGD(m2.parameters(), 0.1, momentum=0.9)
    ck = checkpoint.load_checkpoint(str(tmp_path), m2, opt2, arch="tiny", num_classes=3)
    assert ck["epoch"] == 4 and ck["best_acc1"] == 12.5 and ck["path"] == path
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert opt2.state_dict()["state"][0]["momentum_buffer"] is not None
    with pytest.raises(FileNotFoundError, match="drop --resume"):
        checkpoint.load_checkpoint(str(tmp_path / "nope.pth"), m2)
    with pytest.raises(ValueError, match="pass -a tiny"):
        checkpoint.load_checkpoint(path, m2, arch="resnet18")
    with pytest.raises(ValueError, match="3 classes"):
        checkpoint.load_checkpoint(path, m2, num_classes=5)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        checkpoint.load_checkpoint(str(tmp_path / "junk.pth"), m2)


def _lrs(extra, steps_per_epoch=10):
    args = ex.parse_args(["x", "--epochs", "4", "--lr", "1.0"] + extra)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], args.lr)
    sched = ex.make_scheduler(opt, args, steps_per_epoch)
    out = []
    for _ in range(args.epochs * steps_per_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules():
    cos = _lrs(["--lr-schedule", "cosine"])
    assert cos[0] == 1.0 and cos[-1] < 0.01 and all(a >= b for a, b in zip(cos, cos[1:]))
    assert cos[20] == pytest.approx(0.5)
    step = _lrs(["--lr-schedule", "step", "--lr-step-size", "2", "--lr-gamma", "0.1"])
    assert step[19] == 1.0 and step[20] == pytest.approx(0.1)
    warm = _lrs(["--warmup-epochs", "1"])
    assert warm[0] == pytest.approx(0.1) and warm[9] == pytest.approx(1.0)


def test_cpu_threads_leave_cores_to_workers():
    cores = len(os.sched_getaffinity(0))
    assert ex.cpu_threads(1, 0) == cores
    assert ex.cpu_threads(1, cores) == 1  # never 0
    assert ex.cpu_threads(2, 0) == max(1, cores // 2)
    assert ex.rank_workers(ex.parse_args(["x", "-j", "0"])) == (1, 0)


def test_amp_dtype_choices():
    cpu = torch.device("cpu")
    assert ex.amp_dtype(ex.parse_args(["x"]), cpu) is None
    assert ex.amp_dtype(ex.parse_args(["x", "--amp", "bf16"]), cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="--amp bf16"):
        ex.amp_dtype(ex.parse_args(["x", "--amp", "fp16"]), cpu)


# ---------------------------------------------------------------- bad input through main()


def test_folder_without_lmdbs(tmp_path, capsys):
    (tmp_path / "something.txt").write_text("x")
    assert ex.main([str(tmp_path)] + SMALL + ["--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "preprocess_sequential.py" in err


def test_imagefolder_given_to_seq_loader(sample_tree, capsys):
    assert ex.main([sample_tree[0]] + SMALL + ["--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "ILSVRC-val.lmdb" in err and "preprocess_sequential.py" in err
    assert "--loader folder" in err


def test_unknown_arch_main(tmp_path, capsys):
    assert ex.main([str(tmp_path), "-a", "nonet"]) == 2
    err = capsys.readouterr().err
    assert "'nonet'" in err and "tiny" in err


def test_missing_resume(sample_lmdb, tmp_path, capsys):
    missing = str(tmp_path / "gone" / "checkpoint.pth")
    assert ex.main([sample_lmdb] + SMALL + ["--resume", missing,
                                            "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert missing in err and "drop --resume" in err


@pytest.mark.skipif(_has_torchvision(), reason="checks the message without torchvision")
def test_folder_loader_without_torchvision(sample_tree, tmp_path, capsys):
    assert ex.main([sample_tree[0], "--loader", "folder"] + SMALL) == 2
    assert "torchvision==0.29.1" in capsys.readouterr().err


def test_bad_numbers_exit_nonzero(tmp_path):
    with pytest.raises(SystemExit) as e:
        ex.main([str(tmp_path), "--epochs", "0"])
    assert e.value.code != 0


# ---------------------------------------------------------------- end to end on the CPU


@pytest.mark.skipif(not _has_torchvision(), reason="needs torchvision (imagenet_seq[examples])")
def test_folder_loader_and_torchvision_arch(sample_tree, sample_lmdb, tmp_path, capsys):
    """The torchvision baseline (--loader folder) and a torchvision arch on the seq loader."""
    s = ex.run([sample_tree[0], "--loader", "folder"] + SMALL + [
        "--epochs", "1", "--output-dir", str(tmp_path / "folder")])
    assert s["epochs_run"] == 1 and s["val"]["total"] == 12
    assert "loader folder" in capsys.readouterr().out
    small = [a if a != "tiny" else "resnet18" for a in SMALL]
    s = ex.run([sample_lmdb] + small + ["--epochs", "1", "--output-dir", str(tmp_path / "r18")])
    assert s["val"]["total"] == 12
    with pytest.raises(FileNotFoundError, match="ImageFolder root"):
        ex.run([sample_lmdb, "--loader", "folder"] + SMALL)


@pytest.mark.skipif(not _has_torchvision(), reason="needs torchvision (README: the matching pair)")
def test_example_script_trains_resnet18_a_few_steps(sample_lmdb, tmp_path):
    """The command README gives, as a user runs it: a separate process, a torchvision model."""
    cmd = [sys.executable, os.path.join(EXAMPLE_DIR, "main.py"), sample_lmdb, "-a", "resnet18",
           "-b", "16", "-j", "1", "--image-size", "32", "--resize-size", "40", "-p", "1",
           "--epochs", "1", "--device", "cpu", "--output-dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resnet18" in out.stdout + out.stderr
    ck = torch.load(tmp_path / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert ck["arch"] == "resnet18" and ck["epoch"] == 1


@pytest.mark.slow
def test_train_resume_evaluate(sample_lmdb, tmp_path, capsys):
    out = str(tmp_path / "run")
    threads = torch.get_num_threads()
    s = ex.run([sample_lmdb] + SMALL + ["--epochs", "1", "--output-dir", out, "--threads", "1"])
    assert torch.get_num_threads() == threads  # restored for the caller
    text = capsys.readouterr().out
    assert s["epochs_run"] == 1 and s["val"]["total"] == 12  # 4 classes x 3 val images, once
    assert "img/s" in text and "data wait" in text and "run ETA" in text
    assert "Epoch 1/1 done" in text
    assert os.path.isfile(os.path.join(out, "checkpoint.pth"))
    assert os.path.isfile(os.path.join(out, "model_best.pth"))
    ck = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=False)
    assert ck["epoch"] == 1 and ck["arch"] == "tiny" and ck["num_classes"] == 4

    # resume to 2 epochs: runs exactly epoch 2
    s2 = ex.run([sample_lmdb] + SMALL + ["--epochs", "2", "--output-dir", out,
                                         "--resume", out])
    text = capsys.readouterr().out
    assert s2["start_epoch"] == 1 and s2["epochs_run"] == 1
    assert "resumed" in text and "Epoch 2/2 done" in text and "Epoch 1/2" not in text
    ck2 = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=False)
    assert ck2["epoch"] == 2
    assert any(not torch.equal(ck["model"][k], ck2["model"][k]) for k in ck["model"])

    # evaluate the checkpoint: same accuracy as the last epoch's validation
    s3 = ex.run([sample_lmdb] + SMALL + ["--evaluate", "--resume",
                                         os.path.join(out, "checkpoint.pth")])
    assert "val top1" in capsys.readouterr().out
    assert s3["val"]["total"] == 12
    assert s3["val"]["top1"] == pytest.approx(s2["val"]["top1"])


@pytest.mark.dali
def test_dali_decoder(sample_lmdb, tmp_path, capsys):
    """--decoder dali reaches Loader(decoder='dali') (DALI's CPU backend when there is no GPU)."""
    pytest.importorskip("nvidia.dali")
    s = ex.run([sample_lmdb] + SMALL + ["--epochs", "1", "--decoder", "dali",
                                        "--output-dir", str(tmp_path)])
    assert s["epochs_run"] == 1 and s["val"]["total"] == 12
    assert "loader seq/dali" in capsys.readouterr().out


@pytest.mark.slow
def test_tqdm_label_smoothing_step_schedule(sample_lmdb, tmp_path, capsys):
    s = ex.run([sample_lmdb] + SMALL + ["--epochs", "1", "--tqdm", "--label-smoothing", "0.1",
                                        "--lr-schedule", "step", "--amp", "bf16",
                                        "--channels-last", "--output-dir", str(tmp_path)])
    assert s["epochs_run"] == 1 and s["val"]["total"] == 12
    assert "Epoch 1/1 done" in capsys.readouterr().out
