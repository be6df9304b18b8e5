#!/usr/bin/env bash
# Prepare what tools/gpu_check.sh carries to a lent GPU machine (run HERE, with PyPI reachable, from the repo root):
#   .devpack/wheels/           the Python packages bloodcell's training and benchmarks import that the device's image
#                              lacks (/work/.library/device/KINDS.md lists its packages: pydantic and its needs are
#                              the only ones missing), as cp312 manylinux wheels, in the versions of this .venv
#   .devpack/pbc224-webp.zip   the PBC images as WebP, made by ../shared/tools/device_pack.py
#   .devpack/pack.txt          how the zip was made (quality), read back into the check's log
# Then it prints the sizes: one device call carries at most 64 MiB, the working tree included.
#
#   bash tools/gpu_check_wheels.sh              # wheels again; the zip only if it is missing
#   bash tools/gpu_check_wheels.sh --repack     # the zip again too
#   bash tools/gpu_check_wheels.sh --no-pack    # wheels and sizes only (no ../shared needed)
set -euo pipefail
cd "$(dirname "$0")/.."

LIMIT=$((64 * 1024 * 1024))   # the device tool's limit on what travels per call (tree + carried paths)
MARGIN=$((1 * 1024 * 1024))   # headroom for files the lead adds before the call
PY=${PY:-.venv/bin/python}    # the interpreter whose package versions were tested here
PACKER=${PACKER:-../shared/tools/device_pack.py}
repack=0; pack=1
for a in "$@"; do
  case $a in
    --repack) repack=1 ;;
    --no-pack) pack=0 ;;
    *) echo "usage: $0 [--repack] [--no-pack]" >&2; exit 2 ;;
  esac
done

# Missing on the device: pydantic (bloodcell's config) and what it requires. typing-extensions is there, but
# pydantic-core needs a recent one, and the image's version is not documented, so ours travels too (50 KB).
# Everything else training and the benchmarks import (typer, rich, click, pyyaml, safetensors, timm, lightning,
# torchmetrics, scikit-learn/-image, matplotlib) is in the image. imbalanced-learn (SMOTE, paper configs only)
# is left out on purpose: the check never imports it, and its scikit-learn pins may not match the image's.
NAMES="pydantic pydantic-core annotated-types typing-inspection typing-extensions"

mkdir -p .devpack
rm -rf .devpack/wheels
specs=$("$PY" - $NAMES <<'EOF'
import sys
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in sys.argv[1:]))
EOF
)
echo "wheels for python 3.12 x86_64: $specs"
# N of manylinux_2_N must match exactly: the usual ones; pydantic-core is published for 2_17 (manylinux2014)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .devpack/wheels $specs 2>&1 | { grep -v "is ignored: it is neither" || true; }  # this machine's pip.conf
n=$(ls .devpack/wheels/*.whl | wc -l)
[ "$n" -eq "$(echo $NAMES | wc -w)" ] || { echo "expected one wheel per name, got $n" >&2; exit 1; }
# What each wheel needs, for a human to compare with the device's list (no extras)
for w in .devpack/wheels/*.whl; do
  echo "  $(basename "$w"): $(unzip -p "$w" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/Requires-Dist: //' | tr '\n' ' ')"
done

size_of() { local b; b=$(du -cb "$@" 2>/dev/null | tail -1 | cut -f1) || true; echo "${b:-0}"; }
# What travels besides the carried paths: tracked files and untracked ones git does not ignore (as on disk now)
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | "$PY" -c '
import os, sys
print(sum(os.lstat(p).st_size for p in sys.stdin.read().split("\0") if p and os.path.lexists(p)))')
wheel_bytes=$(size_of .devpack/wheels)

if [ $pack = 1 ] && { [ $repack = 1 ] || [ ! -f .devpack/pbc224-webp.zip ]; }; then
  [ -f "$PACKER" ] || { echo "no $PACKER: give PACKER=path/to/device_pack.py or --no-pack" >&2; exit 1; }
  # device_pack.py's default quality 75 gives about 52 MiB, more than is left beside a 30 MiB tree: choose the
  # highest quality whose size, estimated on 300 random images encoded by device_pack.py itself, fits. (Seen
  # 2026-11-29: tree 30.1 MiB, so quality 20, 27.6 MiB, RMS error about 5.9 grey levels against the JPEGs.)
  budget=$((LIMIT - tree_bytes - wheel_bytes - MARGIN - 4096))
  quality=$("$PY" - "$PACKER" "$budget" <<'EOF'
import glob, os, random, sys
packer, budget = sys.argv[1], int(sys.argv[2])
sys.path.insert(0, os.path.dirname(os.path.abspath(packer)))
import device_pack
src = os.path.join(os.path.dirname(os.path.abspath(packer)), "..", "data", "pbc")
files = sorted(glob.glob(os.path.join(src, "*", "*")))
sample = random.Random(0).sample(files, min(300, len(files)))
for q in (75, 70, 65, 60, 55, 50, 45, 40, 35, 30, 25, 20):
    sizes = [len(b) + 100 for b in map(device_pack.encode, ((f, q) for f in sample)) if b]  # + zip entry overhead
    estimate = sum(sizes) / len(sizes) * len(files) * 1.03  # 3 % for the sample's error
    print(f"quality {q}: about {estimate / 2**20:.1f} MiB (budget {budget / 2**20:.1f})", file=sys.stderr)
    if estimate <= budget:
        print(q)
        break
else:
    sys.exit("even quality 20 does not fit: carry less or shrink the tree")
EOF
)
  echo "packing at WebP quality $quality (device_pack.py, niced: the machine is shared)"
  nice -n 10 "$PY" "$PACKER" --quality "$quality" --out .devpack/pbc224-webp.zip
  echo "device_pack.py --quality $quality, $(date -u +%F)" > .devpack/pack.txt
fi

if [ -f .devpack/pbc224-webp.zip ]; then
  # a broken pack would cost a whole lent session: read its index and decode a few images here first
  "$PY" - .devpack/pbc224-webp.zip <<'EOF'
import collections, io, random, sys, zipfile
from PIL import Image
with zipfile.ZipFile(sys.argv[1]) as zf:
    names = zf.namelist()
    per_class = collections.Counter(n.split("/")[0] for n in names)
    for n in random.Random(0).sample(names, min(8, len(names))):
        Image.open(io.BytesIO(zf.read(n))).convert("RGB")
print(f"pack: {len(names)} images, {len(per_class)} classes ({', '.join(f'{k} {v}' for k, v in sorted(per_class.items()))}); 8 decoded")
EOF
fi
zip_bytes=$(size_of .devpack/pbc224-webp.zip)
carried=$(size_of .devpack)
total=$((tree_bytes + carried))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "sizes: wheels $(mib "$wheel_bytes") ($n files), zip $(mib "$zip_bytes"), .devpack $(mib "$carried"),"
echo "       working tree $(mib "$tree_bytes"), total per call $(mib "$total") of $(mib "$LIMIT")"
if [ "$total" -gt "$LIMIT" ]; then
  echo "over the limit: run with --repack (it picks a lower quality), or carry less" >&2
  exit 1
fi
echo 'device call: run(command="bash tools/gpu_check.sh", carry=[".devpack"], timeout_s=540)'
