from setuptools import Extension, find_packages, setup

# Partial JPEG decoding for TrainTransform (imagenet_seq/decode/_jpegcrop.c) against the system
# libjpeg-turbo (Debian/Ubuntu: apt-get install libjpeg62-turbo-dev / libjpeg-turbo8-dev).
# optional: without the headers the build prints a warning, the install goes on, and decoding
# uses the cv2 path (same pixels, slower).
JPEGCROP = Extension("imagenet_seq.decode._jpegcrop", ["imagenet_seq/decode/_jpegcrop.c"],
                     libraries=["jpeg"], optional=True)

# tensorpack's DataFlow (module tensorpack.dataflow; the PyPI package `dataflow` is unrelated) and
# what its serialisation needs: reading LMDBs written by the original tool, imagenet_seq.dataflow,
# the benchmarks' tensorpack peer
TENSORPACK = ["tensorpack>=0.11", "msgpack", "msgpack-numpy", "pyzmq"]

setup(
    name="imagenet_seq",
    version="0.1.0",
    description="Train ImageNet-style classifiers with PyTorch from HDD/NFS via sequential LMDBs",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["imagenet_seq", "imagenet_seq.*"]),
    py_modules=["preprocess_sequential"],
    ext_modules=[JPEGCROP],
    # the example ships beside the package so imagenet-seq-demo also runs from a wheel install
    data_files=[("share/imagenet_seq/examples/imagenet",
                 [f"examples/imagenet/{m}.py" for m in
                  ("main", "models", "meters", "checkpoint", "loaders")])],
    # core: what the package's own modules import (grep the imports before adding one)
    install_requires=[
        "numpy",
        "lmdb>=1.0",
        "opencv-python-headless>=4.5",
        "tqdm",
        "pillow",
        "torch>=2.1",  # 2.1: uint8 antialiased resize (the fast path's filter)
    ],
    extras_require={
        "sample": ["scikit-image"],
        # preprocess_sequential.py --devkit ILSVRC2012_devkit_t12.tar.gz reads meta.mat
        "devkit": ["scipy"],
        # torchvision is not here: pip would pick a wheel built for another torch (README:
        # `pip install torch==2.14.1 torchvision==0.29.1`, a matching pair; see .ci/run)
        "examples": ["scikit-image"],
        "dali": ["nvidia-dali-cuda120"],
        "tensorpack": TENSORPACK,
        "timm": ["timm>=1.0"],  # imagenet_seq.integrations.timm checks it too
        "lightning": ["lightning>=2.0"],
        # imagenet-seq-bench --plot, imagenet-seq-diagnose --plot; benchmarks/ (slow-disk
        # emulator: also Debian fuse3; tensorpack: their peer); benchmarks/fidelity.py also
        # needs torchvision (its data: scikit-learn's digits)
        "bench": ["matplotlib", "scikit-image", "psutil", "scikit-learn"] + TENSORPACK,
        "slowdisk": ["mfusepy", "matplotlib", "scikit-image"],
        # the docs/ site (mkdocs.yml; 1.6: its link and anchor validation settings)
        "docs": ["mkdocs>=1.6"],
        # everything the test suite imports (torchvision: see "examples"); mkdocs: tests/test_docs.py
        # pytest-timeout: a hung test fails alone with its stacks (pytest.ini, conftest.py)
        "test": ["pytest", "pytest-timeout>=2.1", "scikit-image", "mfusepy", "matplotlib",
                 "scikit-learn", "scipy", "psutil", "timm", "lightning>=2.0",
                 "mkdocs>=1.6"] + TENSORPACK,
        # workers die with the trainer (PR_SET_PDEATHSIG) through python-prctl when installed
        # (needs `apt-get install libcap-dev`); without it the same prctl call goes via ctypes
        "prctl": ["python-prctl"],
    },
    entry_points={
        "console_scripts": [
            "imagenet-seq-preprocess=imagenet_seq.convert.cli:main",
            "imagenet-seq-demo=imagenet_seq.tools.demo:main",
            "imagenet-seq-bench=imagenet_seq.tools.bench:main",
            "imagenet-seq-verify=imagenet_seq.tools.verify_cli:main",
            "imagenet-seq-info=imagenet_seq.tools.info:main",
            "imagenet-seq-diagnose=imagenet_seq.tools.diagnostics:main",
        ],
    },
)
