#!/usr/bin/env bash
# Fetch here what the GPU host lacks, into benchmarks/gpu_wheels/cache/ (git-ignored), for
# benchmarks/gpu_check.sh to install there: that host reaches no registry; its Python 3.12 has
# torch (CUDA 13), torchvision, OpenCV, scikit-image, psutil, pytest, but not lmdb or DALI.
#
#   bash benchmarks/gpu_wheels/fetch.sh            # lmdb (cp312 manylinux) + libjpeg-turbo .debs
#   then, with the device tool: carry ["benchmarks/gpu_wheels/cache"],
#        command "bash benchmarks/gpu_check.sh $OUT"
#
# What travels must stay under 64 MiB with the working tree: lmdb's wheel is 0.6 MB, the two
# .debs 0.5 MB. DALI does not fit (nvidia-dali-cuda130 2.4.0 is 190 MiB, plus its nvimgcodec and
# nvcomp wheels): gpu_check reports `no_dali` unless DALI is on the host (or --no-dali is given).
# The libjpeg-turbo .debs (Debian bookworm: libjpeg62-turbo-dev for jpeglib.h, libjpeg62-turbo for
# libjpeg.so.62) are unpacked on the host with `dpkg -x DEB /tmp/imagenet_seq_gpu_check/jpeg`
# (never into /), and imagenet_seq/decode/_jpegcrop.c is compiled against them with an rpath.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="$here/cache"
mkdir -p "$cache"
PY="${PYTHON:-python3}"
LMDB_VERSION="${LMDB_VERSION:-3.0.0}"
# one version of each wheel: two stop the whole install there
rm -f "$cache"/lmdb-*.whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$cache" "lmdb==$LMDB_VERSION"
if command -v apt-get >/dev/null; then
  # apt-get download writes to the current folder; as root it warns that _apt cannot write there
  (cd "$cache" && rm -f libjpeg62-turbo*.deb \
    && apt-get download libjpeg62-turbo-dev libjpeg62-turbo 2>&1 | grep -v "^W: Download is performed unsandboxed" || true)
  # plain names ('1%3a2.1.5' -> '2.1.5'): every path that travels stays simple
  for f in "$cache"/*%3a*.deb; do [ -e "$f" ] && mv "$f" "${f/\%3a/_}"; done
  ls "$cache"/libjpeg62-turbo-dev_*.deb "$cache"/libjpeg62-turbo_*.deb >/dev/null \
    || { echo "fetch.sh: apt-get download libjpeg62-turbo-dev libjpeg62-turbo failed (a Debian/Ubuntu source with them is needed); the crop-decode extension will not be built there, the CPU path then decodes with OpenCV" >&2; }
else
  echo "fetch.sh: no apt-get here: get libjpeg62-turbo-dev and libjpeg62-turbo (amd64 .debs) into $cache by hand" >&2
fi
total=$(du -sk "$cache" | cut -f1)
echo "fetch.sh: $cache holds $((total / 1024)) MiB:"
ls -l "$cache"
if [ "$total" -gt $((60 * 1024)) ]; then
  echo "fetch.sh: over 60 MiB: with the working tree it may not fit the 64 MiB a run carries" >&2
  exit 1
fi
