"""benchmarks/gpu_check.sh: the prepared GPU check, run here as its --dry-run (CPU, tiny sizes);
its time bounds, problem diagnosis and test-report parsing; plus the CUDA tests of the Loader's
device options (marked ``gpu``: they skip without CUDA, and gpu_check runs them on the host)."""
import glob
import json
import os
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import gpu_check  # noqa: E402  (benchmarks/gpu_check.py)

HAVE_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAVE_CUDA, reason="no CUDA device")


def _have(mod):
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


# --- the dry run, end to end, in a real subprocess ---------------------------------------------

@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    """Every step of the real script at tiny sizes on the CPU: exit 0, a JSON and a table, each
    loader's batches float32, channels_last, normalised; training loops measured; nothing
    written into the package. (pytest is left out: its own collection takes ~15 s here; the
    marker selection and report parsing are tested below.)"""
    ext_before = sorted(glob.glob(os.path.join(REPO, "imagenet_seq", "decode", "_jpegcrop*")))
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"), str(out),
                           "--dry-run", "--skip", "pytest", "--budget", "150"],
                          capture_output=True, text=True, timeout=240)
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "gpu_check.json").read_text())
    steps = data["steps"]
    assert data["dry_run"] and data["exit"] == 0 and data["problems"] == []
    assert took < data["budget_s"] + 60
    assert steps["probe"]["status"] == "ok"
    assert steps["probe"]["result"]["torch"] == torch.__version__
    assert steps["sample"]["result"]["train_images"] >= 64
    assert steps["convert"]["status"] == "ok"
    assert steps["setup:extension"]["status"] in ("ok", "skipped")
    loaders = ["loader:ours-thread-2", "loader:ours-process-2", "loader:torchvision-2"]
    dali = ["loader:ours-dali", "loader:dali-ref"]
    for name in loaders + (dali if _have("nvidia.dali") else []):
        s = steps[name]
        assert s["status"] == "ok", (name, s)
        th, tr = s["result"]["throughput"], s["result"]["train"]
        assert th["images"] >= 2 * 8 and th["images_per_s"] > 0
        c = th["check"]
        assert c["dtype"] == "float32" and c["device"] == "cpu" and c["channels_last"], c
        assert c["shape"] == [8, 3, 32, 32]
        # normalised with ImageNet mean/std, not raw 0..255 nor 0..1
        assert abs(c["mean"]) < 2.0 and 0.3 < c["std"] < 3.0, c
        assert tr["images_per_s"] > 0 and 0.0 <= tr["wait_share"] <= 1.0 and tr["steps"] >= 1
    if not _have("nvidia.dali"):
        for name in dali:
            assert steps[name]["status"] == "skipped" and "DALI" in steps[name]["reason"]
    assert steps["train:synthetic"]["status"] == "ok"
    assert steps["train:synthetic"]["result"]["train"]["wait_share"] < 0.5
    assert "pytest" not in steps
    table = (out / "gpu_check.md").read_text()
    assert "| step | status | images/s into device" in table
    for name in loaders:
        assert f"| {name} | ok |" in table
    assert "Ratios:" in table and "Targets:" in table
    # the dry run builds the extension aside, never into the package
    assert sorted(glob.glob(os.path.join(REPO, "imagenet_seq", "decode", "_jpegcrop*"))) == \
        ext_before


def test_usage_without_outdir():
    proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3 and "usage: bash benchmarks/gpu_check.sh OUTDIR" in proc.stderr


def test_bad_skip_names_the_value(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main([str(tmp_path), "--skip", "sweep,warp"])
    assert e.value.code == 2 and "--skip ['warp']" in capsys.readouterr().err


# --- time bounds ------------------------------------------------------------------------------

def test_a_hung_step_is_killed_with_its_workers(tmp_path):
    """A step that never ends (and its own worker, in the same process group) is killed at its
    bound and reported as timed out."""
    log = str(tmp_path / "log")
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            "print('worker', p.pid, flush=True); time.sleep(120)")
    t0 = time.monotonic()
    rc, secs, out = gpu_check.run_bounded([sys.executable, "-c", code], 3.0, log)
    assert rc is None and time.monotonic() - t0 < 20
    worker = int(out.split("worker ")[1].split()[0])
    for _ in range(50):  # the group was sent SIGKILL: gone (or a zombie of a dead parent) at once
        try:
            with open(f"/proc/{worker}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"worker {worker} outlived its step")


def _pids_with(args, text):
    """Processes whose command line holds ``args`` in a row and ``text`` somewhere."""
    out = []
    for d in glob.glob("/proc/[0-9]*"):
        try:
            with open(os.path.join(d, "cmdline"), "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        joined = "\0".join(argv)
        if "\0".join(args) in joined and text in joined:
            out.append(os.path.basename(d))
    return out


def test_the_outer_bound_ends_the_running_step_too(tmp_path):
    """The run killed from outside (the script's hard bound sends SIGTERM) ends its running
    step's process group, writes what it has and exits 124; the script says so."""
    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"), str(out),
                             "--dry-run", "--skip", "setup", "--budget", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # budget 1: the hard bound is 31 s; the probe (bounded by the budget) is skipped, the
    # sample too, so the run ends by itself well before: exit 1 or 0, never a hang
    _, err = proc.communicate(timeout=90)
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["steps"]["probe"]["status"] == "skipped"
    assert "global budget" in data["steps"]["probe"]["reason"]
    assert proc.returncode in (0, 1, 2), err[-2000:]

    # SIGTERM while a step runs: its group is ended, the JSON says killed
    out2 = tmp_path / "out2"
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"),
                             str(out2), "--dry-run", "--skip", "setup"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    log = out2 / "gpu_check.log"
    while time.monotonic() < deadline and not (log.exists() and "--child probe" in
                                                 log.read_text()):
        time.sleep(0.2)
    time.sleep(0.5)
    children = _pids_with(["--child", "probe"], str(out2))
    assert children, "the probe step was not found running"
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 124 and "killed by signal 15" in err
    data = json.loads((out2 / "gpu_check.json").read_text())
    assert data["exit"] == 124 and data["killed"].startswith("signal 15")
    time.sleep(0.5)
    for pid in children:
        assert not os.path.exists(f"/proc/{pid}") or \
            open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z", pid


def test_a_missing_program_is_an_exit_status_not_a_crash(tmp_path):
    rc, _, out = gpu_check.run_bounded(["/nonexistent/cc", "-v"], 5.0, str(tmp_path / "log"))
    assert rc == 127 and "cannot run /nonexistent/cc" in out


def test_the_log_is_trimmed_to_what_comes_back(tmp_path):
    log = tmp_path / "log"
    log.write_bytes(b"a" * 3000 + b"b" * 3000)
    gpu_check.trim_log(str(log), keep=1000)
    text = log.read_bytes()
    assert text.startswith(b"a" * 1000) and text.endswith(b"b" * 1000)
    assert b"[... 4000 bytes left out ...]" in text and len(text) < 2100


def test_the_budget_skips_steps_that_do_not_fit(tmp_path):
    run = gpu_check.Run(str(tmp_path), budget=4.0, dry_run=True, params={}, argv=[])
    os.makedirs(run.work, exist_ok=True)
    entry = run.child("loader:x", "loader", {}, want=60, minimum=10)
    assert entry["status"] == "skipped" and "global budget" in entry["reason"]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["steps"]["loader:x"]["status"] == "skipped"


def test_a_failing_child_is_reported_with_its_error(tmp_path):
    run = gpu_check.Run(str(tmp_path), budget=120.0, dry_run=True, params={}, argv=[])
    os.makedirs(run.work, exist_ok=True)
    entry = run.child("sample", "sample", {"root": str(tmp_path / "s"), "images": 8,
                                           "procs": 0}, want=60)
    assert entry["status"] == "failed"
    assert "ZeroDivisionError" in entry["reason"], entry  # 0 processes: the sample step fails


# --- prerequisites: each problem named, with its fix -----------------------------------------

GPU_SMI = {"found": True, "gpus": ["NVIDIA H200, 580.159.03, 143771 MiB"], "driver": "580.159.03",
           "driver_cuda": "13.0"}
NO_SMI = {"found": False, "gpus": [], "error": "nvidia-smi is not on the PATH"}
GOOD = {"torch": "2.11.0+cu130", "torch_cuda": "13.0", "cuda_available": True, "device_count": 1,
        "device_name": "NVIDIA H200", "capability": "9.0", "kernel_ok": True, "lmdb": "1.6.2",
        "dali": "2.4.0", "dali_dist": "nvidia-dali-cuda130", "dali_cuda": "130"}


@pytest.mark.parametrize("probe, smi, codes, words", [
    (GOOD, GPU_SMI, [], []),
    (dict(GOOD, cuda_available=False, device_count=0), NO_SMI, ["no_gpu"],
     ["no CUDA device", "nvidia-smi is not on the PATH", "--dry-run"]),
    (dict(GOOD, cuda_available=False, torch_cuda=None, torch="2.11.0+cpu"), GPU_SMI,
     ["cuda_mismatch"], ["CPU-only build", "2.11.0+cpu", "H200"]),
    (dict(GOOD, cuda_available=False, torch_cuda="13.0", cuda_warning="driver too old"),
     dict(GPU_SMI, driver_cuda="12.2"), ["cuda_mismatch"], ["CUDA 13.0", "<= 12.2", "too old"]),
    (dict(GOOD, kernel_error="RuntimeError: no kernel image is available", arch_list=["sm_80"]),
     GPU_SMI, ["cuda_mismatch"], ["no kernel image", "sm_80", "9.0"]),
    (dict(GOOD, dali=None, dali_error="nvidia-dali is not installed"), GPU_SMI,
     ["no_dali"], ["nvidia-dali is not installed", "64 MiB", "--no-dali"]),
    (dict(GOOD, dali_cuda="130"), dict(GPU_SMI, driver_cuda="12.4"), ["no_dali"],
     ["CUDA 130", "nvidia-dali-cuda120"]),
    (dict(GOOD, lmdb=None, lmdb_error="ModuleNotFoundError: No module named 'lmdb'"), GPU_SMI,
     ["no_lmdb"], ["fetch.sh", "benchmarks/gpu_wheels/cache"]),
])
def test_diagnose_names_the_problem_and_the_fix(probe, smi, codes, words):
    got = gpu_check.diagnose(probe, smi, want_dali=True, dry_run=False)
    assert [c for c, _ in got] == codes
    text = " ".join(m for _, m in got)
    for w in words:
        assert w in text, (w, text)


def test_dry_run_without_gpu_or_dali_is_no_problem():
    probe = dict(GOOD, cuda_available=False, device_count=0, dali=None, dali_error="missing")
    assert gpu_check.diagnose(probe, NO_SMI, want_dali=True, dry_run=True) == []
    assert gpu_check.diagnose(dict(GOOD, dali=None), GPU_SMI, want_dali=False,
                              dry_run=False) == []


# --- the pytest step: which files, and what counts as skipped for lack of CUDA --------------

def test_marked_test_files_hold_the_gpu_and_dali_tests():
    files = gpu_check.marked_test_files()
    assert "tests/test_dali.py" in files and "tests/test_gpu_check.py" in files
    assert "tests/test_offsets.py" not in files


def test_gpu_and_dali_markers_are_registered():
    with open(os.path.join(REPO, "pytest.ini")) as f:
        ini = f.read()
    assert "gpu:" in ini and "dali:" in ini and "--strict-markers" in ini


def test_parse_junit_counts_and_cuda_skips(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="ok"/>'
        '<testcase classname="tests.test_a" name="bad"><failure message="assert 1 == 2"/>'
        '</testcase>'
        '<testcase classname="tests.test_a" name="s1"><skipped message="no CUDA device"/>'
        '</testcase>'
        '<testcase classname="tests.test_a" name="s2"><skipped message="tests the error '
        'raised without CUDA"/></testcase>'
        '<testcase classname="tests.test_a" name="s3"><skipped message="nvidia-dali is not '
        'installed"/></testcase>'
        '</testsuite></testsuites>')
    r = gpu_check.parse_junit(str(xml))
    assert (r["passed"], r["failed"], r["skipped"]) == (1, 1, 3)
    assert r["failures"] == ["tests.test_a::bad: assert 1 == 2"]
    no_cuda = [m for m in r["skip_reasons"] if gpu_check.NO_CUDA_SKIP.search(m)]
    assert no_cuda == ["no CUDA device"]


def test_extract_deb_unpacks_the_data_member_with_links(tmp_path):
    """A .deb (ar: debian-binary, control.tar, data.tar.xz) unpacked without dpkg, as the GPU
    host does with the carried libjpeg-turbo packages."""
    import io
    import tarfile

    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        body = b"#define JPEG_LIB_VERSION 62\n"
        info = tarfile.TarInfo("./usr/include/jpeglib.h")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
        link = tarfile.TarInfo("./usr/lib/x86_64-linux-gnu/libjpeg.so")
        link.type, link.linkname = tarfile.SYMTYPE, "libjpeg.so.62"
        tar.addfile(link)

    def member(name, payload):
        head = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(payload):<10}`\n".encode()
        return head + payload + (b"\n" if len(payload) % 2 else b"")

    deb = tmp_path / "x.deb"
    deb.write_bytes(b"!<arch>\n" + member("debian-binary", b"2.0\n") +
                    member("control.tar.xz", b"abc") + member("data.tar.xz", data.getvalue()))
    gpu_check.extract_deb(str(deb), str(tmp_path / "p"))
    assert (tmp_path / "p/usr/include/jpeglib.h").read_bytes().startswith(b"#define")
    assert os.readlink(tmp_path / "p/usr/lib/x86_64-linux-gnu/libjpeg.so") == "libjpeg.so.62"
    (tmp_path / "bad.deb").write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="not a Debian package"):
        gpu_check.extract_deb(str(tmp_path / "bad.deb"), str(tmp_path / "q"))


def test_wheel_parts_are_joined(tmp_path):
    wheels, work = tmp_path / "w", tmp_path / "work"
    wheels.mkdir()
    work.mkdir()
    (wheels / "a-1-py3-none-any.whl").write_bytes(b"whole")
    (wheels / "big-2-py3-none-any.whl.part-aa").write_bytes(b"12")
    (wheels / "big-2-py3-none-any.whl.part-ab").write_bytes(b"34")
    files = gpu_check.assemble_parts(str(wheels), str(work))
    assert [os.path.basename(f) for f in files] == ["a-1-py3-none-any.whl",
                                                    "big-2-py3-none-any.whl"]
    assert (work / "big-2-py3-none-any.whl").read_bytes() == b"1234"


@pytest.mark.dali
@pytest.mark.skipif(not _have("nvidia.dali"), reason="nvidia-dali is not installed")
def test_dali_reference_gpu_graph_is_well_formed_without_a_gpu(tmp_path):
    """DALI checks operator arguments when the graph is defined: the 'mixed' pipeline the GPU
    host will build is defined here (not built)."""
    p = {"folder": str(tmp_path), "image_size": 224, "batch": 4, "dali_threads": 1}
    assert gpu_check.dali_reference_pipeline(p, gpu=True, device_id=None) is not None
    assert gpu_check.dali_reference_pipeline(p, gpu=False, device_id=None) is not None


# --- CUDA: the Loader's device options (skip without CUDA; gpu_check runs them on the host) --

@pytest.mark.gpu
@needs_cuda
def test_to_device_normalises_on_the_gpu():
    from imagenet_seq.data import to_device

    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(4)
    xg, yg = to_device(x.pin_memory(), y, "cuda", channels_last=True)
    torch.cuda.synchronize()
    xc, _ = to_device(x, y, "cpu", channels_last=True)
    assert xg.is_cuda and yg.is_cuda and xg.dtype == torch.float32
    assert xg.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(xg.cpu(), xc, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("worker_type", ["thread", "process"])
def test_loader_device_cuda_gives_the_cpu_batches_normalised_on_the_gpu(sample_lmdb, worker_type):
    from imagenet_seq.data import Loader, to_device

    kw = dict(batch_size=8, num_workers=2, worker_type=worker_type, seed=3, channels_last=True)
    with Loader(sample_lmdb, "train", device="cuda", **kw) as ld:
        xg, yg = next(iter(ld))
    with Loader(sample_lmdb, "train", **kw) as ld:
        x, y = next(iter(ld))
    assert xg.is_cuda and yg.is_cuda and xg.dtype == torch.float32
    assert xg.is_contiguous(memory_format=torch.channels_last)
    xc, yc = to_device(x, y, "cpu", channels_last=True)
    assert torch.equal(yg.cpu(), yc)
    assert torch.allclose(xg.cpu(), xc, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
def test_pin_memory_pins_cpu_batches(sample_lmdb):
    from imagenet_seq.data import Loader

    with Loader(sample_lmdb, "val", batch_size=4, num_workers=1, pin_memory=True) as ld:
        x, y = next(iter(ld))
    assert x.is_pinned() and y.is_pinned() and x.dtype == torch.uint8
