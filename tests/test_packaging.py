"""What `pip install` pulls in: core requirements = what the package imports; the rest are extras
whose absence is an ImportError naming the pip line."""
import ast
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
# distribution name -> module name, where they differ
MODULE = {"opencv-python-headless": "cv2", "pillow": "PIL", "msgpack-numpy": "msgpack_numpy",
          "pyzmq": "zmq", "scikit-image": "skimage", "scikit-learn": "sklearn",
          "python-prctl": "prctl", "nvidia-dali-cuda120": "nvidia"}


def _setup_kwargs():
    """install_requires and extras_require, read from setup.py's source: its literal constants
    and the expressions of those two arguments (setup() itself is not run)."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    consts = {}
    for n in tree.body:
        if isinstance(n, ast.Assign) and isinstance(n.value, (ast.List, ast.Tuple)):
            consts[n.targets[0].id] = ast.literal_eval(n.value)
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", "") == "setup")
    return {k.arg: eval(compile(ast.Expression(k.value), "setup.py", "eval"),
                        {"__builtins__": {}}, dict(consts))
            for k in call.keywords if k.arg in ("install_requires", "extras_require")}


def _name(req: str) -> str:
    for sep in "<>=!;[ ":
        req = req.split(sep)[0]
    return req.lower()


def _top_level_imports(folder: str) -> set:
    found = set()
    for d, _, files in os.walk(folder):
        for f in files:
            if f.endswith(".py"):
                for n in ast.walk(ast.parse(open(os.path.join(d, f)).read())):
                    if isinstance(n, ast.Import):
                        found.update(a.name.split(".")[0] for a in n.names)
                    elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
                        found.add(n.module.split(".")[0])
    return found


def test_core_requirements_are_imported_by_the_package_and_nothing_more():
    kw = _setup_kwargs()
    core = {_name(r) for r in kw["install_requires"]}
    assert core == {"numpy", "lmdb", "opencv-python-headless", "tqdm", "pillow", "torch"}
    imported = _top_level_imports(os.path.join(ROOT, "imagenet_seq"))
    for dist in core:
        assert MODULE.get(dist, dist) in imported, f"{dist} is required but never imported"
    for heavy in ("tensorpack", "msgpack", "msgpack-numpy", "pyzmq", "psutil", "torchvision"):
        assert heavy not in core


def test_extras_hold_the_optional_parts_and_test_holds_what_the_suite_needs():
    extras = {k: {_name(r) for r in v} for k, v in _setup_kwargs()["extras_require"].items()}
    assert extras["tensorpack"] == {"tensorpack", "msgpack", "msgpack-numpy", "pyzmq"}
    assert extras["timm"] == {"timm"} and extras["lightning"] == {"lightning"}
    # torchvision from an extra would be a wheel built for another torch (README says the pair)
    assert all("torchvision" not in v for v in extras.values())
    for extra in ("tensorpack", "timm", "lightning"):
        assert extras[extra] <= extras["test"]
    assert extras["tensorpack"] <= extras["bench"]  # the benchmarks' tensorpack peer
    test_imports = _top_level_imports(os.path.join(ROOT, "tests"))
    for dist in ("psutil", "scikit-image", "mfusepy", "matplotlib", "scikit-learn", "tensorpack"):
        assert dist in extras["test"]
    assert {"psutil", "tensorpack"} <= test_imports  # the suite does import them


def test_original_tool_file_without_tensorpack_names_the_pip_line(sample_lmdb, tmp_path):
    pytest.importorskip("tensorpack")
    from tensorpack.dataflow import DataFromList, LMDBSerializer

    dps = [[np.frombuffer(b"\xff\xd8fake", np.uint8), 0]]
    LMDBSerializer.save(DataFromList(dps, shuffle=False), str(tmp_path / "ILSVRC-val.lmdb"))
    # a fresh interpreter where `import tensorpack` fails, as in a core-only install
    code = ("import sys; sys.modules['tensorpack'] = None\n"
            "from imagenet_seq.read.reader import SplitReader\n"
            f"SplitReader({str(tmp_path)!r}, 'val')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:") and 'pip install "imagenet_seq[tensorpack]"' in last
    assert "ILSVRC-val.lmdb" in last and "original tool" in last


def test_console_scripts_point_at_main_functions():
    import importlib

    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", "") == "setup")
    eps = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "entry_points"))
    scripts = dict(e.replace(" ", "").split("=") for e in eps["console_scripts"])
    assert {"imagenet-seq-info", "imagenet-seq-diagnose", "imagenet-seq-bench",
            "imagenet-seq-demo"} <= set(scripts)
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target
