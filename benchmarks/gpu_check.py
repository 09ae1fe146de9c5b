#!/usr/bin/env python3
"""The GPU check: one prepared, time-bounded run of the GPU path on a fresh GPU host.

    bash benchmarks/gpu_check.sh OUTDIR              # on the GPU host (16 cores, one GPU)
    bash benchmarks/gpu_check.sh OUTDIR --dry-run    # anywhere: the same code, tiny sizes, CPU

Steps, in this order, each in its own process group under its own time bound (a step that
overruns is killed with its workers and reported ``timeout``; the rest still run), all under one
global budget (``--budget``, default 450 s, so a whole run stays under 8 minutes with start-up):

  1. ``probe``: GPU, driver, torch's CUDA build, torchvision, lmdb, DALI, the crop-decode
     extension; a tiny CUDA kernel. Named problems: ``no_gpu``, ``cuda_mismatch``, ``no_dali``,
     ``no_lmdb`` (then the script exits non-zero, after measuring what it can).
  2. ``setup``: installs the wheels that travel (``benchmarks/gpu_wheels/cache/*.whl``, see
     benchmarks/gpu_wheels/fetch.sh) into a private folder, unpacks the libjpeg-turbo Debian
     packages there and builds ``imagenet_seq/decode/_jpegcrop`` for this Python.
  3. ``sample``: >= 5,000 ImageNet-like JPEGs (``imagenet_seq.tools.sample``, ~500x375), made by
     one process per CPU; ``convert``: ``preprocess_sequential.py`` (train split).
  4. ``pytest``: ``pytest -m "gpu or dali"`` over the test files that use those markers (the
     dry run only collects them); a GPU or DALI test skipped for lack of CUDA is a failure.
  5. ``loader:*``: images/s into device memory, ready for the model (uint8 -> float normalised
     on the device, channels_last): ours (``Loader``, decoder='cpu') with 1/4/8/15 thread and
     process workers; torchvision ImageFolder + DataLoader (15 workers, uint8 tensors, pinned,
     normalised on the device like ours); ours with ``decoder='dali'``; DALI's own reference
     pipeline (fn.readers.file -> decoders.image_random_crop on 'mixed' -> resize ->
     crop_mirror_normalize). The main loaders also feed a training loop: ResNet-50,
     channels_last, bf16 autocast, SGD, batch 256; images/s and the share of step time spent
     waiting for the next batch. ``train:synthetic`` runs the same loop on one device-resident
     batch (the model's own rate).

Outputs in OUTDIR: ``gpu_check.json`` (every step: status, seconds, result or reason; rewritten
after each step, so a killed run still leaves what it measured), ``gpu_check.md`` (a short
table), ``gpu_check.log`` (every step's output), ``pytest.xml``.

Exit status: 0 every step ran; 1 a step failed or timed out; 2 a prerequisite is missing (no GPU,
CUDA build mismatch, no DALI, no lmdb: named in the JSON's ``problems`` and on stderr), after the
rest was measured. ``--no-dali`` makes a missing DALI a skip instead of a problem. The dry run
needs no GPU (device steps run on the CPU) and treats a missing DALI as a skip.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_WHEELS = os.path.join(HERE, "gpu_wheels", "cache")
MARKER_EXPR = "gpu or dali"
# DALI wheels do not fit the 64 MiB a GPU-host run carries (nvidia-dali-cuda130 2.4.0: 190 MiB,
# plus nvimgcodec/nvcomp); said when DALI is missing there
DALI_HINT = ("nvidia-dali is not importable here; its wheel (nvidia-dali-cuda130 2.4.0: 190 MiB, "
             "plus nvidia-nvimgcodec-cu13 and nvidia-libnvcomp-cu13) does not fit the 64 MiB a "
             "run carries: install it on the host (pip install nvidia-dali-cuda130, driver >= 580 "
             "for CUDA 13 / nvidia-dali-cuda120 for CUDA 12), or gather its wheels there "
             "(whole, or split as NAME.whl.part-*, across calls on a warm host) in a folder "
             "given as --wheels; --no-dali skips DALI on purpose")
# a skip reason that means "this test needs CUDA/a GPU" (not: "tests the error raised without
# CUDA", which skips where CUDA is present)
NO_CUDA_SKIP = re.compile(r"\bno (CUDA|GPU)\b|(CUDA|GPU) (is )?not available|\bneeds? (a )?"
                          r"(CUDA|GPU)\b|\brequires? (a )?(CUDA|GPU)\b", re.I)
PROBLEM_CODES = ("no_gpu", "cuda_mismatch", "no_dali", "no_lmdb")


# --- sizes ---------------------------------------------------------------------------------

def plan(args: argparse.Namespace) -> Dict[str, Any]:
    """Sizes and step list: full on the GPU host, tiny with --dry-run."""
    dry = args.dry_run
    p = dict(
        images=args.images or (64 if dry else 5000),
        batch=args.batch or (8 if dry else 256),
        image_size=32 if dry else 224,
        workers=[int(w) for w in (args.workers or ("2" if dry else "1,4,8,15")).split(",")],
        main_workers=int(args.main_workers or (2 if dry else 15)),
        # the dry run's model: small enough for a loaded 2-core CI machine (~0.1 s a step)
        model=args.model or ("squeezenet1_1" if dry else "resnet50"),
        warmup_batches=1 if dry else 3,
        measure_s=0.5 if dry else args.measure_s,
        max_batches=4 if dry else 400,
        min_batches=2 if dry else 5,
        train_warmup=1 if dry else 6,
        train_measure_s=0.5 if dry else args.train_measure_s,
        train_min_steps=1 if dry else 8,
        train_max_steps=1 if dry else 200,
        dali_threads=2 if dry else 8,
        cpus=os.cpu_count() or 1,
    )
    p["sample_procs"] = min(p["cpus"], 2 if dry else 16)
    return p


# --- running steps under bounds ------------------------------------------------------------

ACTIVE: List[subprocess.Popen] = []  # the step running now (its group is killed with the run)


def on_term(run: "Run") -> Callable[[int, Any], None]:
    """SIGTERM/SIGINT (the outer ``timeout``, Ctrl-C): end the running step's process group,
    record it, write the JSON and the table, exit 124."""
    def handler(signum: int, frame: Any) -> None:
        for proc in list(ACTIVE):
            kill_group(proc, grace=1.0)
        run.data["killed"] = f"signal {signum} after {time.monotonic() - run.t0:.0f} s"
        run.data["exit"] = 124
        run.write()
        print(f"gpu_check: killed by signal {signum}; partial results in "
              f"{run.outdir}/gpu_check.json", file=sys.stderr, flush=True)
        os._exit(124)
    return handler


def kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the child's process group (its workers too), then SIGKILL after ``grace`` s."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            # the leader is gone; stray members of the group get the same signal
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        except subprocess.TimeoutExpired:
            continue


def run_bounded(cmd: List[str], timeout: float, log_path: Optional[str] = None,
                env: Optional[Dict[str, str]] = None,
                cwd: str = REPO) -> Tuple[Optional[int], float, str]:
    """Run ``cmd`` in a new session, output to ``log_path`` (appended), killed with its process
    group after ``timeout`` s. Returns (exit status or None if it timed out, seconds, last
    output lines)."""
    t0 = time.monotonic()
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        if log_path:
            log.write(f"\n$ {' '.join(cmd)}   (bound {timeout:.0f} s)\n".encode())
            log.flush()
        try:
            # its own process group (not session: whatever outlives the run is still ended by
            # whoever ends this session), killed whole at the bound
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                    preexec_fn=os.setpgrp, stdin=subprocess.DEVNULL)
        except OSError as e:  # no such program: an exit status, not a crash of the whole run
            if log_path:
                log.write(f"OSError: cannot run {cmd[0]}: {e}\n".encode())
            return 127, time.monotonic() - t0, f"OSError: cannot run {cmd[0]}: {e}"
        ACTIVE.append(proc)
        try:
            rc: Optional[int] = proc.wait(max(timeout, 0.1))
            # workers a step left behind (they share its process group) end with it
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        except subprocess.TimeoutExpired:
            kill_group(proc)
            rc = None
        finally:
            ACTIVE.remove(proc)
    finally:
        if log_path:
            log.close()
    return rc, time.monotonic() - t0, tail(log_path) if log_path else ""


def tail(path: Optional[str], lines: int = 12) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 6000))
        text = f.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


class Run:
    """The run's record: steps, problems, plan; written to OUTDIR after every step."""

    def __init__(self, outdir: str, budget: float, dry_run: bool, params: Dict[str, Any],
                 argv: List[str]):
        self.outdir = outdir
        self.t0 = time.monotonic()
        self.budget = budget
        self.log = os.path.join(outdir, "gpu_check.log")
        self.work = os.path.join(outdir, "work") if dry_run else "/tmp/imagenet_seq_gpu_check"
        self.data: Dict[str, Any] = {
            "dry_run": dry_run, "argv": argv, "budget_s": budget, "params": params,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "problems": [], "steps": {}, "ratios": {}, "targets": {}}
        self.env = dict(os.environ)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["PYTHONPATH"] = os.pathsep.join(
            [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def problem(self, code: str, message: str) -> None:
        if not any(p["code"] == code for p in self.data["problems"]):
            self.data["problems"].append({"code": code, "message": message})
            print(f"gpu_check: PROBLEM {code}: {message}", file=sys.stderr, flush=True)

    def record(self, name: str, status: str, seconds: float = 0.0, result: Any = None,
               reason: str = "") -> Dict[str, Any]:
        entry: Dict[str, Any] = {"status": status, "seconds": round(seconds, 2)}
        if result is not None:
            entry["result"] = result
        if reason:
            entry["reason"] = reason
        self.data["steps"][name] = entry
        print(f"gpu_check: {name}: {status} ({seconds:.1f} s)" + (f": {reason}" if reason else ""),
              file=sys.stderr, flush=True)
        self.write()
        return entry

    def bound(self, want: float, minimum: float = 10.0) -> Optional[float]:
        """The time a step may take: ``want``, cut to what the budget leaves (5 s kept for the
        report); None if less than ``minimum`` is left."""
        room = self.left() - 5.0
        return None if room < minimum else min(want, room)

    def child(self, name: str, kind: str, params: Dict[str, Any], want: float,
              minimum: float = 10.0) -> Dict[str, Any]:
        """Run ``gpu_check.py --child KIND`` bounded; its result dict is the step's result."""
        timeout = self.bound(want, minimum)
        if timeout is None:
            return self.record(name, "skipped", reason=f"global budget: {self.left():.0f} s left")
        res_path = os.path.join(self.work, f"result_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.json")
        if os.path.exists(res_path):
            os.unlink(res_path)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", kind,
               "--params", json.dumps(params), "--result", res_path]
        rc, secs, out = run_bounded(cmd, timeout, self.log, self.env)
        result = None
        if os.path.exists(res_path):
            with open(res_path) as f:
                result = json.load(f)
        if rc is None:
            return self.record(name, "timeout", secs, result,
                               f"killed after its {timeout:.0f} s bound; last output: "
                               f"{last_line(out)}")
        if rc != 0 or result is None:
            return self.record(name, "failed", secs, result,
                               f"exit status {rc}: {last_error(out)}")
        if result.get("skipped"):
            return self.record(name, "skipped", secs, result, result["skipped"])
        return self.record(name, "ok", secs, result)

    def group(self, items: List[Tuple[str, str, Dict[str, Any], float]],
              minimum: float = 15.0) -> None:
        """Run several children's work in one bounded process (``--group``): one time bound for
        all (the sum of theirs); what finished is kept when it is killed."""
        timeout = self.bound(sum(it[3] for it in items), minimum)
        if timeout is None:
            for name, *_ in items:
                self.record(name, "skipped", reason=f"global budget: {self.left():.0f} s left")
            return
        res_path = os.path.join(self.work, "result_group.json")
        if os.path.exists(res_path):
            os.unlink(res_path)
        params = {"items": [[n, k, p] for n, k, p, _ in items]}
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "group",
               "--params", json.dumps(params), "--result", res_path]
        rc, secs, out = run_bounded(cmd, timeout, self.log, self.env)
        results: Dict[str, Any] = {}
        if os.path.exists(res_path):
            with open(res_path) as f:
                results = json.load(f)
        reported = False
        for name, *_ in items:
            r = results.get(name)
            if r is None:
                if rc is None and not reported:
                    self.record(name, "timeout", reason=f"the group was killed after its "
                                f"{timeout:.0f} s bound during this step: {last_line(out)}")
                    reported = True
                elif rc is None:
                    self.record(name, "skipped", reason="not reached: the group was killed")
                else:
                    self.record(name, "failed", reason=f"group exit status {rc}: "
                                f"{last_error(out)}")
            elif "error" in r:
                self.record(name, "failed", r["seconds"], reason=r["error"])
            elif r["result"].get("skipped"):
                self.record(name, "skipped", r["seconds"], r["result"], r["result"]["skipped"])
            else:
                self.record(name, "ok", r["seconds"], r["result"])

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        path = os.path.join(self.outdir, "gpu_check.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(path + ".tmp", path)
        with open(os.path.join(self.outdir, "gpu_check.md.tmp"), "w") as f:
            f.write(markdown(self.data))
        os.replace(os.path.join(self.outdir, "gpu_check.md.tmp"),
                   os.path.join(self.outdir, "gpu_check.md"))


def trim_log(path: str, keep: int = 4 << 20) -> None:
    """Keep the log under what comes back from a GPU host (16 MiB a file): its first and last
    ``keep`` bytes."""
    size = os.path.getsize(path) if os.path.exists(path) else 0
    if size <= 2 * keep:
        return
    with open(path, "rb") as f:
        head = f.read(keep)
        f.seek(size - keep)
        end = f.read()
    with open(path, "wb") as f:
        f.write(head + f"\n[... {size - 2 * keep} bytes left out ...]\n".encode() + end)


def last_line(out: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


def last_error(out: str) -> str:
    """The most telling line of a failed step's output: its last exception line, if any."""
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", ln) or ln.startswith("FAILED"):
            return ln[:400]
    return lines[-1][:400] if lines else "(no output)"


# --- prerequisites -------------------------------------------------------------------------

def nvidia_smi(timeout: float = 20.0) -> Dict[str, Any]:
    """What nvidia-smi says: GPUs, driver version, the highest CUDA version the driver runs."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"found": False, "gpus": [], "error": "nvidia-smi is not on the PATH"}
    try:
        lst = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=timeout)
        head = subprocess.run([exe], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"found": True, "gpus": [], "error": f"nvidia-smi did not answer in {timeout:.0f} s"}
    gpus = [ln.strip() for ln in lst.stdout.splitlines() if ln.strip()] if lst.returncode == 0 \
        else []
    m = re.search(r"CUDA Version:\s*([0-9.]+)", head.stdout)
    d = re.search(r"Driver Version:\s*([0-9.]+)", head.stdout)
    out = {"found": True, "gpus": gpus, "driver": d.group(1) if d else None,
           "driver_cuda": m.group(1) if m else None}
    if lst.returncode != 0:
        out["error"] = (lst.stderr or lst.stdout).strip()[:300]
    return out


def diagnose(probe: Dict[str, Any], smi: Dict[str, Any], want_dali: bool,
             dry_run: bool) -> List[Tuple[str, str]]:
    """Named problems from the probe and nvidia-smi: [(code, message)], message saying the fix."""
    out: List[Tuple[str, str]] = []
    tcuda = probe.get("torch_cuda")
    drv = smi.get("driver_cuda") or probe.get("driver_cuda")
    if not probe.get("cuda_available"):
        if smi.get("gpus") and not dry_run:
            if tcuda is None:
                out.append(("cuda_mismatch",
                            f"nvidia-smi sees {smi['gpus'][0]!r} (driver {smi.get('driver')}, "
                            f"CUDA {drv}) but torch {probe.get('torch')} is a CPU-only build "
                            "(torch.version.cuda is None): install a CUDA build of torch"))
            else:
                out.append(("cuda_mismatch",
                            f"nvidia-smi sees {smi['gpus'][0]!r} (driver {smi.get('driver')}, "
                            f"runs CUDA <= {drv}) but torch {probe.get('torch')} built for CUDA "
                            f"{tcuda} cannot use it "
                            f"({probe.get('cuda_warning') or 'no reason given'})"
                            ": install a torch built for CUDA <= the driver's, or a newer driver"))
        elif not dry_run:
            out.append(("no_gpu", "no CUDA device: " + (smi.get("error") or "nvidia-smi lists none")
                        + f"; torch {probe.get('torch')} (CUDA build {tcuda}) sees "
                        f"{probe.get('device_count', 0)} device(s); run on the GPU host, or "
                        "use --dry-run here"))
    elif probe.get("kernel_error"):
        out.append(("cuda_mismatch",
                    f"torch sees {probe.get('device_name')} (capability "
                    f"{probe.get('capability')}) but a kernel fails: {probe['kernel_error']}; "
                    f"torch {probe.get('torch')} is built for {probe.get('arch_list')}: install "
                    "a torch built for this GPU"))
    if not probe.get("lmdb"):
        out.append(("no_lmdb", f"lmdb is not importable ({probe.get('lmdb_error')}): carry its "
                    "wheel (bash benchmarks/gpu_wheels/fetch.sh, then carry "
                    "benchmarks/gpu_wheels/cache) or pip install lmdb"))
    if want_dali:
        if not probe.get("dali"):
            if not dry_run:
                out.append(("no_dali", f"{probe.get('dali_error')}; {DALI_HINT}"))
        elif probe.get("cuda_available") and probe.get("dali_cuda") and drv:
            if int(str(probe["dali_cuda"])[:2]) > int(str(drv).split(".")[0]):
                out.append(("no_dali",
                            f"DALI {probe.get('dali')} ({probe.get('dali_dist')}) is built for "
                            f"CUDA {probe['dali_cuda']}, the driver runs CUDA <= {drv}: install "
                            f"nvidia-dali-cuda{str(drv).split('.')[0]}0"))
    return out


# --- setup: wheels, libjpeg-turbo headers, the crop-decode extension ----------------------

def assemble_parts(wheels: str, work: str) -> List[str]:
    """Wheels in ``wheels``; ``NAME.whl.part-*`` pieces are joined (sorted) into ``work``."""
    found = sorted(glob.glob(os.path.join(wheels, "*.whl")))
    parts: Dict[str, List[str]] = {}
    for p in sorted(glob.glob(os.path.join(wheels, "*.whl.part-*"))):
        parts.setdefault(os.path.basename(p).split(".part-")[0], []).append(p)
    for name, pieces in parts.items():
        dst = os.path.join(work, name)
        with open(dst, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as f:
                    shutil.copyfileobj(f, out)
        found.append(dst)
    return found


def setup_wheels(run: Run, wheels: str) -> None:
    """pip install the carried wheels (no index, no deps) into WORK/site, put it on PYTHONPATH."""
    if not os.path.isdir(wheels):
        run.record("setup:wheels", "skipped", reason=f"no wheel folder {wheels} (bash "
                   "benchmarks/gpu_wheels/fetch.sh makes it; carry benchmarks/gpu_wheels/cache)")
        return
    files = assemble_parts(wheels, run.work)
    if not files:
        run.record("setup:wheels", "skipped", reason=f"no *.whl in {wheels}")
        return
    site = os.path.join(run.work, "site")
    timeout = run.bound(90, 5)
    if timeout is None:
        run.record("setup:wheels", "skipped", reason="global budget")
        return
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", site]
    names = [os.path.basename(f) for f in files]
    mine = f"cp{sys.version_info.major}{sys.version_info.minor}"
    foreign = sorted({m.group(1) for m in (re.search(r"-(cp\d+)-", n) for n in names)
                      if m and m.group(1) != mine})
    if foreign and not run.data["dry_run"]:
        run.record("setup:wheels", "failed", result={"wheels": names},
                   reason=f"the wheels are built for {foreign}, this Python is {mine}: fetch "
                   "them for it (benchmarks/gpu_wheels/fetch.sh, --python-version)")
        return
    if foreign:  # the dry run here: install them as the host would, for its Python, unused
        ver = foreign[0][2] + "." + foreign[0][3:]
        cmd += ["--python-version", ver, "--implementation", "cp", "--only-binary", ":all:"] + \
            [a for plat in ("manylinux2014_x86_64", "manylinux_2_17_x86_64",
                            "manylinux_2_28_x86_64") for a in ("--platform", plat)]
    rc, secs, out = run_bounded(cmd + files, timeout, run.log, run.env)
    if rc == 0:
        if not foreign:
            run.env["PYTHONPATH"] = os.pathsep.join([site, run.env["PYTHONPATH"]])
        run.record("setup:wheels", "ok", secs,
                   {"installed": names, "target": site,
                    "on_path": not foreign,
                    **({"note": f"built for {foreign[0]}, not this {mine}: installed, unused"}
                       if foreign else {})})
    else:
        run.record("setup:wheels", "timeout" if rc is None else "failed", secs,
                   {"wheels": names}, last_error(out))


def extract_deb(deb: str, prefix: str) -> List[str]:
    """``dpkg -x DEB PREFIX`` without dpkg: a .deb is an ar archive whose ``data.tar.*`` member
    holds the files (symbolic links kept). Returns the member names extracted."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise ValueError(f"{deb} is not a Debian package (no ar header)")
        while True:
            head = f.read(60)
            if len(head) < 60:
                raise ValueError(f"{deb} has no data.tar member")
            name = head[:16].decode().strip().rstrip("/")
            size = int(head[48:58].decode().strip())
            if name.startswith("data.tar"):
                data = io.BytesIO(f.read(size))
                break
            f.seek(size + (size & 1), os.SEEK_CUR)
    os.makedirs(prefix, exist_ok=True)
    with tarfile.open(fileobj=data, mode="r:*") as tar:
        names = tar.getnames()
        if hasattr(tarfile, "data_filter"):
            tar.extractall(prefix, filter="data")
        else:  # Python < 3.12 without the backport: members of a Debian archive, relative paths
            tar.extractall(prefix)
    return names


def setup_extension(run: Run, wheels: str, install: bool) -> None:
    """Build imagenet_seq/decode/_jpegcrop for this Python against the carried libjpeg-turbo.

    The .debs (libjpeg62-turbo-dev + libjpeg62-turbo) are unpacked like ``dpkg -x`` into
    WORK/jpeg (by :func:`extract_deb`: no dpkg needed), never into /. The module is compiled
    into WORK/ext; with ``install`` it is copied next to _jpegcrop.c unless an extension for this
    Python is already there (the dry run never writes into the package)."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    pkg = os.path.join(REPO, "imagenet_seq", "decode")
    target = os.path.join(pkg, "_jpegcrop" + suffix)
    if install and os.path.exists(target):
        run.record("setup:extension", "ok", result={"built": False, "present": target})
        return
    debs = sorted(glob.glob(os.path.join(wheels, "*.deb")))
    prefix = os.path.join(run.work, "jpeg")
    inc_dirs, lib_dirs = ["/usr/include"], []
    t0 = time.monotonic()
    if debs:
        for deb in debs:
            try:
                extract_deb(deb, prefix)
            except (OSError, ValueError, tarfile.TarError) as e:
                run.record("setup:extension", "failed", time.monotonic() - t0,
                           reason=f"cannot unpack {deb}: {e}")
                return
        inc_dirs = [os.path.join(prefix, "usr/include"),
                    os.path.join(prefix, "usr/include/x86_64-linux-gnu")]
        lib_dirs = [os.path.join(prefix, "usr/lib/x86_64-linux-gnu")]
    if not any(os.path.exists(os.path.join(d, "jpeglib.h")) for d in inc_dirs):
        run.record("setup:extension", "skipped", time.monotonic() - t0,
                   reason="no jpeglib.h (carry libjpeg62-turbo-dev + libjpeg62-turbo .debs: "
                   "bash benchmarks/gpu_wheels/fetch.sh); the CPU path decodes with OpenCV "
                   "(same pixels, slower)")
        return
    pyinc = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(pyinc, "Python.h")):
        run.record("setup:extension", "skipped", time.monotonic() - t0,
                   reason=f"no Python.h in {pyinc}: cannot build extensions for this Python; "
                   "the CPU path decodes with OpenCV (same pixels, slower)")
        return
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        cc = shutil.which("gcc") or shutil.which("cc") or ""
    if not cc:
        run.record("setup:extension", "skipped", time.monotonic() - t0,
                   reason="no C compiler (gcc/cc) on the PATH; the CPU path decodes with OpenCV "
                   "(same pixels, slower)")
        return
    os.makedirs(os.path.join(run.work, "ext"), exist_ok=True)
    built = os.path.join(run.work, "ext", "_jpegcrop" + suffix)
    cmd = [cc, "-shared", "-fPIC", "-O2", "-I" + pyinc] + ["-I" + d for d in inc_dirs] + \
        [os.path.join(pkg, "_jpegcrop.c"), "-o", built] + ["-L" + d for d in lib_dirs] + \
        ["-Wl,-rpath," + d for d in lib_dirs] + ["-ljpeg"]
    timeout = run.bound(60, 5)
    if timeout is None:
        run.record("setup:extension", "skipped", reason="global budget")
        return
    rc, _, out = run_bounded(cmd, timeout, run.log, run.env)
    if rc != 0:
        run.record("setup:extension", "failed", time.monotonic() - t0,
                   reason=f"{cc} exit {rc}: {last_line(out)}")
        return
    check = [sys.executable, "-c",
             "import importlib.util as u,sys; s=u.spec_from_file_location("
             "'imagenet_seq.decode._jpegcrop', sys.argv[1]); m=u.module_from_spec(s); "
             "s.loader.exec_module(m); print('ok', [n for n in dir(m) if not n.startswith('_')])",
             built]
    rc, _, out = run_bounded(check, 30, run.log, run.env)
    if rc != 0:
        run.record("setup:extension", "failed", time.monotonic() - t0,
                   reason=f"built {built} but it does not import: {last_error(out)}")
        return
    if install:
        shutil.copy(built, target)
    run.record("setup:extension", "ok", time.monotonic() - t0,
               {"built": built, "installed": target if install else None,
                "libjpeg": "carried .debs" if debs else "system"})


# --- sample + conversion -------------------------------------------------------------------

def _sample_part(args: Tuple[str, int, int, int]) -> int:
    from imagenet_seq.tools.sample import make_sample_imagefolder

    root, train_per_class, val_per_class, seed = args
    make_sample_imagefolder(root, train_per_class=train_per_class, val_per_class=val_per_class,
                            seed=seed)
    return seed


def child_sample(p: Dict[str, Any]) -> Dict[str, Any]:
    """``images`` train JPEGs in ``root``: one make_sample_imagefolder per process (8 classes
    each, own seed), class folders renamed ``p<NN>_<class>`` so classes stay distinct."""
    from concurrent.futures import ProcessPoolExecutor

    from imagenet_seq.tools.sample import PHOTOS

    root, procs = p["root"], p["procs"]
    shutil.rmtree(root, ignore_errors=True)
    per_class = max(1, math.ceil(p["images"] / (procs * len(PHOTOS))))
    parts = [(os.path.join(root + ".parts", f"p{i:02d}"), per_class, 1, i) for i in range(procs)]
    shutil.rmtree(root + ".parts", ignore_errors=True)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(procs) as ex:
        list(ex.map(_sample_part, parts))
    for part, _, _, i in parts:
        for split in ("train", "val"):
            os.makedirs(os.path.join(root, split), exist_ok=True)
            for cls in os.listdir(os.path.join(part, split)):
                os.rename(os.path.join(part, split, cls),
                          os.path.join(root, split, f"p{i:02d}_{cls}"))
    shutil.rmtree(root + ".parts", ignore_errors=True)
    secs = time.perf_counter() - t0
    n, size = 0, 0
    for dirpath, _, files in os.walk(os.path.join(root, "train")):
        n += len(files)
        size += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    classes = len(os.listdir(os.path.join(root, "train")))
    return {"train_images": n, "classes": classes, "mean_kb": round(size / max(n, 1) / 1e3, 1),
            "seconds": round(secs, 2), "images_per_s": round(n / secs, 1), "processes": procs}


def convert(run: Run, src: str, dst: str, workers: int, want: float) -> None:
    timeout = run.bound(want, 10)
    if timeout is None:
        run.record("convert", "skipped", reason="global budget")
        return
    shutil.rmtree(dst, ignore_errors=True)
    cmd = [sys.executable, os.path.join(REPO, "preprocess_sequential.py"), src, dst,
           "--splits", "train", "--workers", str(workers), "--no-progress", "--json"]
    rc, secs, out = run_bounded(cmd, timeout, run.log, run.env)
    if rc == 0:
        summary = None
        for ln in reversed(out.splitlines()):
            if ln.startswith("{"):
                try:
                    summary = json.loads(ln)
                except ValueError:
                    pass
                break
        mb = sum(os.path.getsize(f) for f in glob.glob(os.path.join(dst, "*.lmdb")))
        run.record("convert", "ok", secs, {"lmdb_mb": round(mb / 1e6, 1), "workers": workers,
                                           "summary": summary})
    else:
        run.record("convert", "timeout" if rc is None else "failed", secs,
                   reason=last_error(out))


# --- pytest --------------------------------------------------------------------------------

def marked_test_files() -> List[str]:
    """Test files that use the gpu/dali markers (others are not collected: a module importing a
    package this host lacks would turn a GPU check into a collection error)."""
    out = []
    for path in sorted(glob.glob(os.path.join(REPO, "tests", "test_*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if re.search(r"mark\.(gpu|dali)\b|\bgpu_test\b|\bdali_test\b", text):
            out.append(os.path.relpath(path, REPO))
    return out


def parse_junit(path: str) -> Dict[str, Any]:
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    skips: Dict[str, int] = {}
    failed: List[str] = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skip = case.find("skipped")
        if bad is not None:
            counts["failed"] += 1
            failed.append(f"{name}: {(bad.get('message') or '')[:200]}")
        elif skip is not None:
            counts["skipped"] += 1
            reason = (skip.get("message") or "").strip()
            skips[reason] = skips.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return {**counts, "skip_reasons": skips, "failures": failed[:30]}


def pytest_step(run: Run, on_gpu: bool, want: float) -> None:
    files = marked_test_files()
    if not files:
        run.record("pytest", "failed", reason="no test file uses the gpu/dali markers")
        return
    timeout = run.bound(want, 15)
    if timeout is None:
        run.record("pytest", "skipped", reason="global budget")
        return
    xml = os.path.join(run.outdir, "pytest.xml")
    cmd = [sys.executable, "-m", "pytest", "-m", MARKER_EXPR, "-p", "no:cacheprovider", "-q",
           "-rs", "--junitxml", xml] + files
    if run.data["dry_run"]:
        cmd.insert(-len(files), "--collect-only")
    if os.path.exists(xml):
        os.unlink(xml)
    rc, secs, out = run_bounded(cmd, timeout, run.log, run.env)
    res: Dict[str, Any] = {"files": files, "exit": rc}
    if run.data["dry_run"]:
        m = re.search(r"(\d+)/(\d+) tests collected", out) or re.search(r"(\d+) tests? collected",
                                                                        out)
        res["collected"] = int(m.group(1)) if m else None
        status = "ok" if rc == 0 and res["collected"] else ("timeout" if rc is None else "failed")
        run.record("pytest", status, secs, res, "" if status == "ok" else last_error(out))
        return
    if os.path.exists(xml):
        res.update(parse_junit(xml))
    if rc is None:
        run.record("pytest", "timeout", secs, res, f"killed after {timeout:.0f} s")
        return
    no_cuda = {r: n for r, n in res.get("skip_reasons", {}).items()
               if NO_CUDA_SKIP.search(r)}
    if rc not in (0, 5) or res.get("failed"):
        run.record("pytest", "failed", secs, res, f"pytest exit {rc}: "
                   f"{res.get('failed', '?')} failed; {last_error(out)}")
    elif on_gpu and no_cuda:
        run.record("pytest", "failed", secs, res, f"{sum(no_cuda.values())} test(s) skipped for "
                   f"lack of CUDA on a GPU host: {list(no_cuda)}")
    else:
        run.record("pytest", "ok", secs, res)


# --- the measurements (children) -----------------------------------------------------------

def tree_cpu() -> float:
    """CPU seconds of this process and its descendants (workers), reaped ones included."""
    try:
        import psutil
    except ImportError:
        return float("nan")
    me = psutil.Process()
    total = 0.0
    for p in [me] + me.children(recursive=True):
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _endless(make_iter: Callable[[int], Any]) -> Iterator[Any]:
    epoch = 0
    while True:
        for item in make_iter(epoch):
            yield item
        epoch += 1


def build_loader(p: Dict[str, Any], device: Any) -> Tuple[Iterator[Any], Callable[[], None],
                                                           Dict[str, Any]]:
    """(endless iterator of (images, targets) ready for the model on ``device``, close, info)."""
    import torch

    from imagenet_seq.data import Loader, to_device

    kind, B, S = p["kind"], p["batch"], p["image_size"]
    if kind in ("ours", "ours-dali"):
        # the shuffle buffer of benchmarks/peers.py: ~4 % of the images (ImageNet's default is
        # ~1.5 %); the default (2 GiB) would hold this whole sample, and each epoch would wait
        # for all of it to be read before its first batch
        buf = max(B, p["images"] // 25)
        kw = dict(batch_size=B, image_size=S, device=device, channels_last=True, drop_last=True,
                  buffer_size=buf)
        if kind == "ours":
            kw.update(num_workers=p["workers"], worker_type=p["worker_type"], decoder="cpu")
        else:
            kw.update(decoder="dali")
        ld = Loader(p["lmdb"], "train", **kw)

        def epoch_iter(epoch: int):
            ld.set_epoch(epoch)
            return iter(ld)

        info = {"num_workers": ld.num_workers, "worker_type": getattr(ld, "worker_type", None),
                "buffer_size": buf, "decoder": kw["decoder"]}
        return _endless(epoch_iter), ld.close, info
    if kind == "torchvision":
        from torchvision import datasets, transforms

        tf = transforms.Compose([transforms.RandomResizedCrop(S), transforms.RandomHorizontalFlip(),
                                 transforms.PILToTensor()])
        ds = datasets.ImageFolder(os.path.join(p["folder"], "train"), tf)
        w = p["workers"]
        dl = torch.utils.data.DataLoader(ds, batch_size=B, shuffle=True, num_workers=w,
                                         pin_memory=device.type == "cuda", drop_last=True,
                                         persistent_workers=w > 0)

        def gen():
            for x, y in _endless(lambda e: iter(dl)):
                yield to_device(x, y, device, channels_last=True)

        def close():
            it = getattr(dl, "_iterator", None)
            if it is not None and hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()

        return gen(), close, {"num_workers": w, "pin_memory": device.type == "cuda",
                              "transform": "RandomResizedCrop+flip (PIL) -> uint8; normalised "
                                           "on the device like ours"}
    if kind == "dali-ref":
        return dali_reference(p, device)
    raise ValueError(f"loader kind {kind!r}; expected ours, ours-dali, torchvision, dali-ref")


def dali_reference_pipeline(p: Dict[str, Any], gpu: bool, device_id: Optional[int]) -> Any:
    """DALI's own ImageNet training pipeline on the sample's files (defined, not built): file
    reader (shuffled), decode of a random crop ('mixed': nvJPEG on the GPU; else 'cpu'), resize to
    the side, crop/mirror/normalise to float, channels-last (HWC) output. DALI checks every
    argument here, so the GPU graph is checked on a machine without one."""
    from nvidia.dali import fn, pipeline_def, types

    S = p["image_size"]

    @pipeline_def
    def train_pipe():
        jpegs, labels = fn.readers.file(file_root=os.path.join(p["folder"], "train"),
                                        random_shuffle=True, name="Reader")
        # nvJPEG's buffers sized once for ImageNet (NVIDIA's examples), not grown per batch
        kw = dict(device_memory_padding=211025920, host_memory_padding=140544512) if gpu else {}
        images = fn.decoders.image_random_crop(jpegs, device="mixed" if gpu else "cpu",
                                               output_type=types.RGB,
                                               random_aspect_ratio=[3 / 4, 4 / 3],
                                               random_area=[0.08, 1.0], num_attempts=100, **kw)
        images = fn.resize(images, resize_x=S, resize_y=S, interp_type=types.INTERP_TRIANGULAR,
                           antialias=True)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="HWC",
                                          mean=[0.485 * 255, 0.456 * 255, 0.406 * 255],
                                          std=[0.229 * 255, 0.224 * 255, 0.225 * 255],
                                          mirror=fn.random.coin_flip(probability=0.5))
        return images, (labels.gpu() if gpu else labels)

    return train_pipe(batch_size=p["batch"], num_threads=p["dali_threads"], device_id=device_id,
                      seed=0)


def dali_reference(p: Dict[str, Any], device: Any) -> Tuple[Iterator[Any], Callable[[], None],
                                                            Dict[str, Any]]:
    """:func:`dali_reference_pipeline` read through DALI's PyTorch iterator."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    gpu = device.type == "cuda"
    pipe = dali_reference_pipeline(p, gpu, (device.index or 0) if gpu else None)
    pipe.build()
    it = DALIGenericIterator([pipe], ["data", "label"], reader_name="Reader",
                             last_batch_policy=LastBatchPolicy.DROP, auto_reset=True)

    def gen():
        for batch in _endless(lambda e: it):
            x = batch[0]["data"].permute(0, 3, 1, 2)  # NHWC storage = NCHW channels_last view
            y = batch[0]["label"].reshape(-1).long()
            yield x, y

    return gen(), lambda: None, {"num_threads": p["dali_threads"],
                                 "decoder": "mixed" if gpu else "cpu"}


def throughput(batches: Iterator[Any], p: Dict[str, Any], device: Any) -> Dict[str, Any]:
    """Images/s of the ready batches: warm-up batches skipped, then at least ``min_batches`` and
    up to ``measure_s`` seconds (or ``max_batches``); a device sync at both ends. The last batch
    is checked: float32 on ``device``, channels_last, normalised (mean ~0, std ~1)."""
    import torch

    t_first = time.perf_counter()
    x = y = None
    for _ in range(p["warmup_batches"]):
        x, y = next(batches)
    _sync(device)
    first_s = time.perf_counter() - t_first
    n = k = 0
    c0, t0 = tree_cpu(), time.perf_counter()
    while True:
        x, y = next(batches)
        n += int(y.shape[0])
        k += 1
        el = time.perf_counter() - t0
        if k >= p["min_batches"] and (el >= p["measure_s"] or k >= p["max_batches"]):
            break
    _sync(device)
    dt = time.perf_counter() - t0
    cpu = tree_cpu() - c0
    xs = x.float()
    return {"images": n, "batches": k, "seconds": round(dt, 3), "images_per_s": round(n / dt, 1),
            "cpu_us_per_image": round(cpu / n * 1e6, 1) if cpu == cpu else None,
            "warmup_s": round(first_s, 2),
            "check": {"dtype": str(x.dtype).replace("torch.", ""), "device": str(x.device),
                      "shape": list(x.shape),
                      "channels_last": bool(x.is_contiguous(memory_format=torch.channels_last)),
                      "mean": round(float(xs.mean()), 3), "std": round(float(xs.std()), 3),
                      "targets_device": str(y.device)}}


def train_loop(batches: Iterator[Any], p: Dict[str, Any], device: Any) -> Dict[str, Any]:
    """``model`` (torchvision), channels_last, bf16 autocast, SGD: per step the wait for the next
    batch, then the step, then a device sync; images/s and the share of step time spent
    waiting for data. ``batches`` yields ready (images, targets) on ``device``."""
    import torch
    import torchvision

    torch.backends.cudnn.benchmark = True
    model = getattr(torchvision.models, p["model"])(num_classes=1000)
    model = model.to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    crit = torch.nn.CrossEntropyLoss()

    def step(x: Any, y: Any) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = crit(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t_first = time.perf_counter()
    for _ in range(p["train_warmup"]):
        x, y = next(batches)
        step(x, y)
    _sync(device)
    warm = time.perf_counter() - t_first
    wait = total = 0.0
    n = k = 0
    while True:
        ta = time.perf_counter()
        x, y = next(batches)
        tb = time.perf_counter()
        step(x, y)
        _sync(device)
        tc = time.perf_counter()
        wait += tb - ta
        total += tc - ta
        n += int(y.shape[0])
        k += 1
        if k >= p["train_min_steps"] and (total >= p["train_measure_s"] or
                                          k >= p["train_max_steps"]):
            break
    out = {"model": p["model"], "steps": k, "images": n, "seconds": round(total, 3),
           "images_per_s": round(n / total, 1), "wait_share": round(wait / total, 4),
           "step_ms": round(total / k * 1e3, 1), "warmup_s": round(warm, 2),
           "amp": "bf16", "channels_last": True}
    if device.type == "cuda":
        out["max_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 1)
    return out


def _device(p: Dict[str, Any]) -> Any:
    import torch

    return torch.device(p["device"])


def child_loader(p: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    device = _device(p)
    torch.manual_seed(0)  # DALI steps run only where the probe found DALI: a broken one fails
    batches, close, info = build_loader(p, device)
    try:
        res: Dict[str, Any] = {"loader": info, "throughput": throughput(batches, p, device)}
        if p.get("train"):
            res["train"] = train_loop(batches, p, device)
        return res
    finally:
        close()


def child_synthetic(p: Dict[str, Any]) -> Dict[str, Any]:
    """The training loop on one device-resident batch: what the model alone allows."""
    import torch

    device = _device(p)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(p["batch"], 3, p["image_size"], p["image_size"], generator=g)
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (p["batch"],), generator=g).to(device)

    def same():
        while True:
            yield x, y

    return {"train": train_loop(same(), p, device)}


def child_probe(p: Dict[str, Any]) -> Dict[str, Any]:
    import importlib
    import importlib.util
    import platform
    import warnings

    out: Dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                           "machine": platform.machine()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch

        out.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                   cuda_available=torch.cuda.is_available(),
                   device_count=torch.cuda.device_count())
    msgs = [str(w.message) for w in caught if "cuda" in str(w.message).lower()]
    if msgs:
        out["cuda_warning"] = msgs[0][:400]
    try:
        out["driver_cuda"] = "%d.%d" % divmod(torch._C._cuda_getDriverVersion() // 10, 100)
    except Exception:  # noqa: BLE001 - private API, best effort
        pass
    if out["cuda_available"]:
        out.update(device_name=torch.cuda.get_device_name(0),
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   arch_list=torch.cuda.get_arch_list(),
                   cudnn=torch.backends.cudnn.version(),
                   memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
        try:
            a = torch.ones(256, 256, device="cuda")
            out["kernel_ok"] = float((a @ a).sum()) == 256.0 ** 3
        except Exception as e:  # noqa: BLE001 - reported as cuda_mismatch
            out["kernel_error"] = f"{type(e).__name__}: {e}"[:400]
    # imported: what the steps need working here (fast); versions only: the rest (importing
    # torchvision, scikit-image and DALI costs seconds; their steps report a broken install)
    for mod, key in (("cv2", "cv2"), ("lmdb", "lmdb")):
        try:
            out[key] = importlib.import_module(mod).__version__
        except Exception as e:  # noqa: BLE001 - missing or broken: named in the result
            out[key] = None
            out[key + "_error"] = f"{type(e).__name__}: {e}"[:300]
    from importlib import metadata

    for dist, key in (("torchvision", "torchvision"), ("pillow", "pillow"),
                      ("scikit-image", "skimage"), ("psutil", "psutil")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
            out[key + "_error"] = f"{dist} is not installed"
    dists = sorted(d.metadata["Name"] for d in metadata.distributions()
                   if (d.metadata["Name"] or "").lower().startswith("nvidia-dali"))
    if dists and importlib.util.find_spec("nvidia") is not None and \
            importlib.util.find_spec("nvidia.dali") is not None:
        out["dali"] = metadata.version(dists[0])
        out["dali_dist"] = dists[0]
        m = re.search(r"cuda(\d+)", dists[0])
        out["dali_cuda"] = m.group(1) if m else None
    else:
        out["dali"] = None
        out["dali_error"] = "nvidia-dali is not installed" + (
            f" ({dists[0]} is, without its nvidia.dali module)" if dists else "")
    try:
        from imagenet_seq.decode import _jpegcrop  # noqa: F401

        out["jpegcrop"] = True
    except ImportError as e:
        out["jpegcrop"] = False
        out["jpegcrop_error"] = str(e)[:200]
    return out


CHILDREN = {"probe": child_probe, "sample": child_sample, "loader": child_loader,
            "synthetic": child_synthetic}


def child_group(p: Dict[str, Any], result: str) -> Dict[str, Any]:
    """Several measurements in one process (the dry run: one torch import instead of one per
    step): ``{name: {"result", "seconds"} or {"error"}}``, rewritten after each."""
    import traceback

    out: Dict[str, Any] = {}
    for name, kind, params in p["items"]:
        t0 = time.perf_counter()
        try:
            out[name] = {"result": CHILDREN[kind](params)}
        except Exception as e:  # noqa: BLE001 - one measurement's failure is its own
            traceback.print_exc()
            out[name] = {"error": f"{type(e).__name__}: {e}"[:400]}
        out[name]["seconds"] = round(time.perf_counter() - t0, 2)
        _write_json(result, out)
    return out


def _write_json(path: str, obj: Any) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, default=str)
    os.replace(path + ".tmp", path)


def child_main(kind: str, params: str, result: str) -> int:
    p = json.loads(params)
    if kind == "group":
        child_group(p, result)
        return 0
    res = CHILDREN[kind](p)
    with open(result + ".tmp", "w") as f:
        json.dump(res, f, default=str)
    os.replace(result + ".tmp", result)
    return 0


# --- report ---------------------------------------------------------------------------------

def _rate(steps: Dict[str, Any], name: str, part: str = "throughput") -> Optional[float]:
    s = steps.get(name) or {}
    r = (s.get("result") or {}).get(part) or {}
    return r.get("images_per_s") if s.get("status") == "ok" else None


def ratios(data: Dict[str, Any]) -> None:
    """Ratios and the issue's targets, from what was measured (None where a side is missing)."""
    steps, p = data["steps"], data["params"]
    W = p["main_workers"]
    one_t = _rate(steps, "loader:ours-thread-1")
    best_ours = max([r for r in (_rate(steps, f"loader:ours-thread-{W}"),
                                 _rate(steps, f"loader:ours-process-{W}")) if r] or [0]) or None
    tv = _rate(steps, f"loader:torchvision-{W}")
    dali = _rate(steps, "loader:ours-dali")
    ref = _rate(steps, "loader:dali-ref")
    div = (lambda a, b: round(a / b, 3) if a and b else None)
    data["ratios"] = {
        f"ours_{W}_workers_over_torchvision_{W}": div(best_ours, tv),
        f"ours_{W}_workers_over_1_thread": div(best_ours, one_t),
        "ours_dali_over_dali_reference": div(dali, ref),
        "ours_dali_over_ours_cpu": div(dali, best_ours),
    }
    # the training loop fed by each loader, as a share of the model's own rate
    model = _rate(steps, "train:synthetic", "train")
    for name in steps:
        if name.startswith("loader:") and _rate(steps, name, "train"):
            data["ratios"][f"train_{name[7:]}_over_synthetic"] = div(_rate(steps, name, "train"),
                                                                     model)
    cores = p["cpus"]
    dali_step = steps.get("loader:ours-dali") or {}
    wait = ((dali_step.get("result") or {}).get("train") or {}).get("wait_share") \
        if dali_step.get("status") == "ok" else None
    on_gpu = str(data.get("device", "")).startswith("cuda")
    if not on_gpu:  # the GPU targets are for the GPU host; a CPU run says nothing of them
        dali = wait = None
    data["targets"] = {
        "dali_images_per_s_>=5000": None if dali is None else dali >= 5000,
        f"ours_{W}_workers_>=0.8x{cores}_cores_x1_thread": None if not (best_ours and one_t)
        else best_ours >= 0.8 * cores * one_t,
        "ours_>=1.5x_torchvision": None if not (best_ours and tv) else best_ours >= 1.5 * tv,
        "dali_train_wait_share_<=5%": None if wait is None else wait <= 0.05,
    }


def markdown(data: Dict[str, Any]) -> str:
    p, steps = data["params"], data["steps"]
    probe = (steps.get("probe") or {}).get("result") or {}
    lines = [f"# GPU check{' (dry run: tiny sizes, CPU)' if data['dry_run'] else ''}", "",
             f"Started {data['started']}, {data.get('elapsed_s', 0):.0f} s of a "
             f"{data['budget_s']:.0f} s budget. Device: {probe.get('device_name') or 'CPU'}; "
             f"torch {probe.get('torch')} (CUDA {probe.get('torch_cuda')}), DALI "
             f"{probe.get('dali')}, crop-decode extension "
             f"{'yes' if probe.get('jpegcrop') else 'no'}, {probe.get('cpus')} CPUs. "
             f"Batch {p.get('batch')}, {p.get('image_size')} px, model {p.get('model')}.", ""]
    if data["problems"]:
        lines += ["**Problems**: " + "; ".join(f"`{q['code']}`: {q['message']}"
                                                for q in data["problems"]), ""]
    lines += ["| step | status | images/s into device | CPU µs/image | train images/s | "
              "wait for data | note |", "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for name, s in steps.items():
        r = s.get("result") or {}
        th, tr = r.get("throughput") or {}, r.get("train") or {}
        note = s.get("reason", "")
        if name == "sample" and r:
            note = f"{r.get('train_images')} images, {r.get('mean_kb')} KB mean"
        if name == "pytest" and r:
            note = note or ", ".join(f"{k} {r[k]}" for k in ("passed", "failed", "skipped",
                                                              "collected") if k in r)
        if th.get("check") and not note:
            c = th["check"]
            note = f"{c['dtype']} on {c['device']}, mean {c['mean']}, std {c['std']}"
        lines.append("| {} | {} | {} | {} | {} | {} | {} |".format(
            name, s["status"], th.get("images_per_s", ""), th.get("cpu_us_per_image", "") or "",
            tr.get("images_per_s", ""),
            f"{tr['wait_share'] * 100:.1f} %" if "wait_share" in tr else "",
            note.replace("|", "/")[:160]))
    if data.get("ratios"):
        lines += ["", "Ratios: " + ", ".join(f"{k} {v}" for k, v in data["ratios"].items()),
                  "", "Targets: " + ", ".join(f"{k}: {'n/a' if v is None else v}"
                                                for k, v in data["targets"].items())]
    return "\n".join(lines) + "\n"


# --- main -----------------------------------------------------------------------------------

def loader_steps(p: Dict[str, Any], with_dali: bool) -> List[Tuple[str, Dict[str, Any], float]]:
    """(step name, loader params, time bound) in priority order: the main comparison (with the
    training loop) first, then the worker sweep."""
    W = p["main_workers"]
    main = [("ours-thread", dict(kind="ours", worker_type="thread", workers=W)),
            ("ours-process", dict(kind="ours", worker_type="process", workers=W)),
            ("torchvision", dict(kind="torchvision", workers=W))]
    out = [(f"loader:{n}-{W}", dict(q, train=True), 150.0) for n, q in main]
    if with_dali:
        out += [("loader:ours-dali", dict(kind="ours-dali", train=True), 150.0),
                ("loader:dali-ref", dict(kind="dali-ref", train=True), 150.0)]
    for wt in ("thread", "process"):
        for w in p["workers"]:
            if w != W:
                out.append((f"loader:ours-{wt}-{w}",
                            dict(kind="ours", worker_type=wt, workers=w), 60.0))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", nargs="?")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny sizes, CPU allowed (no GPU needed): checks the script itself")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run (default 450; dry run 240)")
    ap.add_argument("--images", type=int, help="train JPEGs in the sample (default 5000)")
    ap.add_argument("--batch", type=int, help="batch size (default 256)")
    ap.add_argument("--workers", help="worker counts of the sweep (default 1,4,8,15)")
    ap.add_argument("--main-workers", type=int,
                    help="workers of the main comparison, torchvision too (default 15)")
    ap.add_argument("--model", help="torchvision model of the training loop (default resnet50)")
    ap.add_argument("--measure-s", type=float, default=5.0, help="seconds per loader measurement")
    ap.add_argument("--train-measure-s", type=float, default=8.0,
                    help="seconds per training-loop measurement")
    ap.add_argument("--wheels", default=os.environ.get("GPU_CHECK_WHEELS", DEFAULT_WHEELS),
                    help="folder of carried wheels and .debs (default benchmarks/gpu_wheels/cache)")
    ap.add_argument("--no-dali", action="store_true",
                    help="do not require DALI: its steps are skipped, not a problem")
    ap.add_argument("--skip", default="",
                    help="comma-separated steps to leave out: setup, pytest, sweep, train, dali")
    ap.add_argument("--group", action="store_true", default=None,
                    help="all measurements in one bounded process (default with --dry-run: one "
                    "torch import instead of one per step); --no-group: one process per step")
    ap.add_argument("--no-group", dest="group", action="store_false")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args.child, args.params, args.result)
    if not args.outdir:
        ap.error("OUTDIR is required: the folder for gpu_check.json, gpu_check.md, gpu_check.log")
    skip = {s for s in args.skip.split(",") if s}
    bad = skip - {"setup", "pytest", "sweep", "train", "dali"}
    if bad:
        ap.error(f"--skip {sorted(bad)}: expected some of setup, pytest, sweep, train, dali")
    budget = args.budget if args.budget is not None else (240.0 if args.dry_run else 450.0)
    p = plan(args)
    os.makedirs(args.outdir, exist_ok=True)
    run = Run(os.path.abspath(args.outdir), budget, args.dry_run, p, sys.argv[1:] if argv is None
              else argv)
    os.makedirs(run.work, exist_ok=True)
    open(run.log, "w").close()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_term(run))
    want_dali = not args.no_dali and "dali" not in skip
    failed = False

    # 1. setup (before the probe: the probe must see the carried lmdb and the built extension)
    if "setup" not in skip:
        setup_wheels(run, args.wheels)
        setup_extension(run, args.wheels, install=not args.dry_run)
    # 2. probe
    smi = nvidia_smi()
    probe = run.child("probe", "probe", {}, 90, 5)
    pr = probe.get("result") or {}
    pr["nvidia_smi"] = smi
    run.write()
    if probe["status"] != "ok":
        run.problem("no_gpu" if not smi.get("gpus") else "cuda_mismatch",
                    f"the probe (import torch, a tiny CUDA kernel) did not finish: "
                    f"{probe.get('reason')}")
    for code, msg in diagnose(pr, smi, want_dali, args.dry_run):
        run.problem(code, msg)
    on_gpu = bool(pr.get("cuda_available")) and not pr.get("kernel_error")
    device = "cuda:0" if on_gpu else "cpu"
    have_dali = bool(pr.get("dali")) and want_dali
    run.data["device"] = device

    # 3. sample + conversion
    folder = os.path.join(run.work, "sample")
    lmdb_dir = os.path.join(run.work, "lmdb")
    s = run.child("sample", "sample", {"root": folder, "images": p["images"],
                                       "procs": p["sample_procs"]}, 120, 10)
    if s["status"] == "ok":
        convert(run, folder, lmdb_dir, p["cpus"], 90)
    # 4. tests
    if "pytest" not in skip:
        pytest_step(run, on_gpu, 120)
    # 5. loaders (+ training loops) and the model alone
    common = dict(p, lmdb=lmdb_dir, folder=folder, device=device)
    train_ok = on_gpu or args.dry_run
    items: List[Tuple[str, str, Dict[str, Any], float]] = []
    for name, lp, want in loader_steps(p, have_dali or args.dry_run):
        if "sweep" in skip and not lp.get("train"):
            continue
        if lp["kind"] in ("ours-dali", "dali-ref") and not have_dali:
            run.record(name, "skipped", reason="DALI not wanted (--no-dali / --skip dali)"
                       if not want_dali else f"{pr.get('dali_error')}; {DALI_HINT}")
            continue
        if s["status"] != "ok":
            run.record(name, "skipped", reason="no sample (see the sample step)")
            continue
        if (run.data["steps"].get("convert") or {}).get("status") != "ok" and \
                lp["kind"] in ("ours", "ours-dali"):
            run.record(name, "skipped", reason="no converted sample (see the convert step)")
            continue
        lp = dict(common, **lp)
        if "train" in skip or not train_ok:
            lp["train"] = False
        items.append((name, "loader", lp, want))
    if train_ok and "train" not in skip:
        # the model's own rate right after the loaders that feed it, before the worker sweep
        at = sum(1 for it in items if it[2].get("train"))
        items.insert(at, ("train:synthetic", "synthetic", dict(common), 90.0))
    elif "train" not in skip:
        run.record("train:synthetic", "skipped",
                   reason=f"no usable CUDA device (device {device}): ResNet-50 at batch "
                   f"{p['batch']} is not measured on the CPU outside --dry-run")
    group = args.group if args.group is not None else args.dry_run
    if group and items:
        run.group(items)
    else:
        for name, kind, lp, want in items:
            run.child(name, kind, lp, want, 15)
    ratios(run.data)
    run.write()
    failed = any(st["status"] in ("failed", "timeout") for st in run.data["steps"].values())
    codes = [q["code"] for q in run.data["problems"]]
    run.data["exit"] = 2 if codes else (1 if failed else 0)
    run.write()
    trim_log(run.log)
    print(markdown(run.data))
    print(f"gpu_check: wrote {run.outdir}/gpu_check.json and gpu_check.md; exit "
          f"{run.data['exit']}" + (f" (problems: {', '.join(codes)})" if codes else ""),
          file=sys.stderr)
    return run.data["exit"]


if __name__ == "__main__":
    sys.exit(main())
