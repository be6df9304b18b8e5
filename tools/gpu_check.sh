#!/usr/bin/env bash
# The GPU check: one command for a lent GPU machine that starts bare, finishing in under 8 minutes.
#
#   bash tools/gpu_check.sh [OUTDIR]             # on the device: figures in OUTDIR (default $OUT, else runs/gpu-check)
#   bash tools/gpu_check.sh --dry-run OUTDIR     # the same steps at toy scale on a CPU (about a minute)
#   options: --zip PATH (the WebP pack; default .devpack/pbc224-webp.zip, in a dry run one made from
#            examples/pbc-sample), --wheels DIR (default .devpack/wheels)
#
# Prepare here first (PyPI reachable): bash tools/gpu_check_wheels.sh; then call the device tool with
#   run(command="bash tools/gpu_check.sh", carry=[".devpack"], timeout_s=540)
#
# Steps, each under its own `timeout` and logged to OUTDIR/gpu_check.log; a failed step does not stop the next:
#   env         versions, CPU, nvidia-smi (-q too)                       -> env.txt
#   deps        carried wheels installed into a private folder; imports   (dry run: installed for cp312 elsewhere)
#   unpack      the WebP pack unzipped to a local folder, images counted
#   throughput  benchmarks/train_throughput.py, 4 models at 224 px        -> throughput.md
#   train       the recipe (configs/recipe-search.yaml) from scratch, epochs chosen to fit the time left
#                                                                         -> train_metrics.json, train_history.csv
# OUTDIR/summary.md: each step's exit code and seconds, then the figures, ready to paste into docs/benchmarks.md.
# The device returns at most 8 files of OUTDIR, so the run folders themselves stay in a scratch folder.
set -u
cd "$(dirname "$0")/.."
REPO=$PWD

DRY=0; OUTDIR=""; ZIP=""; WHEELS=.devpack/wheels
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --zip) ZIP=$2; shift ;;
    --wheels) WHEELS=$2; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) OUTDIR=$1 ;;
  esac
  shift
done
OUTDIR=${OUTDIR:-${OUT:-runs/gpu-check}}
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd)
PY=${PY:-python3}  # the device's python3 holds torch; a dry run here passes PY=.venv/bin/python
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
LOG=$OUTDIR/gpu_check.log; STEPS=$WORK/steps.tsv
: > "$LOG"; : > "$STEPS"
rm -f "$OUTDIR"/{summary.md,env.txt,throughput.md,train_metrics.json,train_history.csv}

if [ $DRY = 1 ]; then
  # toy scale for 2 shared CPU cores: each model at its smallest size, 16 images, one epoch on the sample
  DEADLINE=300; THROUGHPUT_MAX=150; TRAIN_MIN=60
  SIZE=32; IMAGES=16; WORKERS=0; EPOCHS_MAX=1
  TRAIN_SET="--set data.input_size=32 --set eval.bootstrap=50"
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  SITE=$WORK/site-cp312  # cp312 wheels cannot load in this interpreter: installed, never imported
  export PYTHONPATH=$REPO/src
else
  # 470 s of work + start-up stays under 8 min; run() is given 540 s so a slow step still returns its files.
  # Throughput: 4 models x 3 loops x 2 epochs of 4,096 images, about 2-3 min if each loop runs >= 1,000 img/s.
  DEADLINE=470; THROUGHPUT_MAX=210; TRAIN_MIN=240
  SIZE=224; IMAGES=4096; WORKERS=16
  EPOCHS_MAX=60  # the recipe's own epoch count; fewer are chosen when the time left is shorter (see step_train)
  TRAIN_SET=""
  SITE=$WORK/site
  export PYTHONPATH=$SITE:$REPO/src
  ZIP=${ZIP:-.devpack/pbc224-webp.zip}
fi
TRAIN_MODEL=resnet50   # the recipe's headline model; its throughput row sizes the training
MODELS="resnet50 mobilenetv2 densenet201 hybrid"
DATA=$WORK/pbc
export BLOODCELL_CACHE=$WORK/cache BLOODCELL_PROGRESS=0 PYTHONUNBUFFERED=1
export DRY PY REPO WORK WHEELS SITE ZIP DATA OUTDIR SIZE IMAGES WORKERS MODELS TRAIN_MODEL EPOCHS_MAX TRAIN_SET

say() { echo "[gpu_check $(date +%T) +${SECONDS}s] $*" | tee -a "$LOG"; }

# step NAME LIMIT FUNCTION: run FUNCTION in its own process group under `timeout` (which kills the whole group,
# DataLoader workers included), its output appended to the log; record exit code and seconds.
step() {
  local name=$1 limit=$2 fn=$3 t0=$SECONDS rc
  say "== $name (limit ${limit}s)"
  timeout -k 10 "$limit" bash -c "$fn" >> "$LOG" 2>&1
  rc=$?
  [ $rc = 124 ] && say "$name: timed out after ${limit}s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" >> "$STEPS"
  say "$name: exit $rc, $((SECONDS - t0)) s"
}
left() { echo $((DEADLINE - SECONDS)); }  # seconds before the whole check must end

step_env() {
  set -u
  {
    echo "date: $(date -u '+%F %T UTC')  host: $(hostname)  mode: $([ "$DRY" = 1 ] && echo dry-run || echo gpu)"
    echo "commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'unknown (no .git on this machine)')"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(env -u OMP_NUM_THREADS nproc) cores; $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) memory; kernel $(uname -r)"
    "$PY" - <<'EOF'
import platform, importlib
import torch
print(f"python {platform.python_version()} ({__import__('sys').executable})")
print(f"torch {torch.__version__}, cuda {torch.version.cuda}, cudnn {torch.backends.cudnn.version()}, "
      f"gpu available {torch.cuda.is_available()}" + (f": {torch.cuda.get_device_name(0)}, "
      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}" if torch.cuda.is_available() else ""))
for name in ("torchvision", "lightning", "timm", "torchmetrics", "numpy", "PIL", "sklearn", "skimage", "typer", "yaml", "safetensors"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as exc:  # a missing package is a finding, not a reason to stop
        print(f"{name}: not importable ({exc})")
from PIL import features
print(f"PIL reads WebP: {features.check('webp')}")
EOF
    if command -v nvidia-smi > /dev/null; then
      nvidia-smi; echo; nvidia-smi -q
    else
      echo "nvidia-smi: absent on this machine"
    fi
  } > "$OUTDIR/env.txt" 2>&1
  rc=$?; cat "$OUTDIR/env.txt"; exit $rc
}

step_deps() {
  set -u
  ls "$WHEELS"/*.whl > /dev/null 2>&1 || { echo "no wheels in $WHEELS: bash tools/gpu_check_wheels.sh makes them"; [ "$DRY" = 1 ] || exit 1; }
  if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    [ -f .devpack/pack.txt ] && echo "pack: $(cat .devpack/pack.txt)"
    if [ "$DRY" = 1 ]; then  # prove the carried set installs for the device's interpreter
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
        --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 "$WHEELS"/*.whl || exit 1
    else
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl || exit 1
    fi
    ls "$SITE"
  fi
  # everything the check imports, through bloodcell's own modules
  "$PY" -c "
import pydantic, typer, rich, yaml, safetensors, timm, lightning, torchmetrics, sklearn, skimage, matplotlib
import bloodcell.cli, bloodcell.train.fit, bloodcell.study.spec
print('imports ok: pydantic', pydantic.VERSION, '(' + pydantic.__file__ + ')', 'typer', typer.__version__)"
}

step_unpack() {
  set -u
  if [ -z "$ZIP" ]; then
    # a dry run without --zip: a small pack from the embedded sample, same layout as device_pack.py's
    "$PY" - "$REPO/examples/pbc-sample" "$WORK/sample-webp.zip" <<'EOF' || exit 1
import io, pathlib, sys, zipfile
from PIL import Image
src, out = pathlib.Path(sys.argv[1]), sys.argv[2]
with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
    for f in sorted(src.glob("*/*.jpg")):
        buf = io.BytesIO()
        Image.open(f).convert("RGB").save(buf, "WEBP", quality=75)
        zf.writestr(f"{f.parent.name}/{f.stem}.webp", buf.getvalue())
EOF
    ZIP=$WORK/sample-webp.zip
  fi
  echo "pack: $ZIP ($(du -h "$ZIP" | cut -f1))"
  "$PY" -m zipfile -e "$ZIP" "$DATA" || exit 1
  for d in "$DATA"/*/; do echo "  $(basename "$d"): $(find "$d" -type f | wc -l)"; done
  n=$(find "$DATA" -type f -name '*.webp' | wc -l)
  echo "images: $n WebP"
  [ "$n" -gt 0 ]
}

step_throughput() {
  set -u -o pipefail
  # rows are printed (flushed) one model at a time, so a timeout still leaves the finished rows
  "$PY" benchmarks/train_throughput.py "$DATA" --models $MODELS --size "$SIZE" --images "$IMAGES" \
    --workers "$WORKERS" --precision auto | tee "$OUTDIR/throughput.md"
}

step_train() {
  set -u
  "$PY" - "$TRAIN_MODEL" "$WORK/recipe.yaml" <<'EOF' || exit 1
# the recipe as configs/recipe-search.yaml defines it (base + the model's experiment), first seed: one run config
import sys
from bloodcell.config import save_config
from bloodcell.study.spec import expand_runs, load_study
spec, base = load_study("configs/recipe-search.yaml")
run = expand_runs(spec, base, only=[sys.argv[1]])[0]
save_config(run.config, sys.argv[2])
print(f"recipe: {run.key}, {run.config.train.epochs} epochs as written")
EOF
  # Epochs that fit in the time given (TRAIN_SECONDS), from this machine's measured bloodcell rate for the model
  # (throughput.md). An epoch is the training part (56 % of the images) plus validation (14 %, about 3x faster
  # than training), times 1.5 for the recipe's larger batch, AdamW, EMA and Lightning; plus 3 s for the checkpoint
  # written every epoch (about 400 MB for ResNet-50 with optimizer and EMA). 60 s of fixed cost: scan, cache,
  # model, evaluation and figures. With no measured rate, 10 epochs: about 150 s at 1,000 img/s.
  epochs=$("$PY" - "$OUTDIR/throughput.md" "$TRAIN_MODEL" "$(find "$DATA" -type f | wc -l)" "$TRAIN_SECONDS" "$EPOCHS_MAX" <<'EOF'
import sys
table, model, images, seconds, most = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
rate = None
try:
    for line in open(table):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == model:
            rate = float(cells[3])
except (OSError, ValueError, IndexError):
    pass
if rate is None:
    print(min(10, most)); sys.exit()
epoch = 1.5 * (0.56 * images + 0.14 * images / 3) / rate + 3.0
print(max(1, min(most, int((seconds - 60) / epoch))))
print(f"bloodcell {model} at {rate:.0f} img/s: about {epoch:.1f} s per epoch", file=sys.stderr)
EOF
)
  echo "training $TRAIN_MODEL for $epochs epochs in at most ${TRAIN_SECONDS}s"
  "$PY" -m bloodcell.cli train "$WORK/recipe.yaml" --data "$DATA" --out "$WORK/train" \
    --set train.epochs="$epochs" $TRAIN_SET || exit 1
  cp "$WORK/train/metrics.json" "$OUTDIR/train_metrics.json" && cp "$WORK/train/history.csv" "$OUTDIR/train_history.csv"
}
export -f step_env step_deps step_unpack step_throughput step_train

say "mode $([ $DRY = 1 ] && echo dry-run || echo gpu), output $OUTDIR, scratch $WORK"
step env 60 step_env
step deps 90 step_deps
step unpack 90 step_unpack
limit=$(( $(left) - TRAIN_MIN )); limit=$(( limit > THROUGHPUT_MAX ? THROUGHPUT_MAX : limit < 30 ? 30 : limit ))
step throughput $limit step_throughput
TRAIN_SECONDS=$(( $(left) - 10 )); TRAIN_SECONDS=$(( TRAIN_SECONDS < 30 ? 30 : TRAIN_SECONDS )); export TRAIN_SECONDS
step train $TRAIN_SECONDS step_train

# summary.md: the steps, then the figures, as markdown for docs/benchmarks.md (stdlib only: it must work when
# torch or the project does not import)
"$PY" - "$STEPS" "$OUTDIR" "$SECONDS" "$DRY" "$IMAGES" "$SIZE" "$WORKERS" "$TRAIN_MODEL" > "$OUTDIR/summary.md" <<'EOF' || {
import csv, json, os, re, sys, time
steps, out, total, dry, images, size, workers, model = sys.argv[1:]
def read(name):
    try:
        return open(os.path.join(out, name)).read()
    except OSError:
        return ""
env = read("env.txt")
def field(prefix):
    m = re.search(rf"^{re.escape(prefix)}(.*)$", env, re.M)
    return m.group(1).strip() if m else "?"
gpu = re.search(r"^\| +\d+ +(NVIDIA[^|]*?)\s{2,}", env, re.M)
gpu = gpu.group(1).strip() if gpu else ("no GPU (dry run on CPU, toy scale)" if dry == "1" else "no GPU found")
print(f"### GPU check, {time.strftime('%Y-%m-%d')}: {gpu}\n")
print(f"`bash tools/gpu_check.sh{' --dry-run' if dry == '1' else ''}`, commit {field('commit:')}; CPU {field('cpu:')}; "
      f"python {field('python ')}; torch {field('torch ')}; lightning {field('lightning ')}; timm {field('timm ')}. "
      f"Whole check {total} s.\n")
print("| step | exit code | seconds | limit (s) |\n|---|---:|---:|---:|")
for name, rc, secs, limit in csv.reader(open(steps), delimiter="\t"):
    print(f"| {name} | {rc}{' (timed out)' if rc == '124' else ''} | {secs} | {limit} |")
table = [l for l in read("throughput.md").splitlines() if l.startswith("|")]
print(f"\nTraining throughput (`benchmarks/train_throughput.py`, {images} images per epoch at {size} px, batch 32, SGD, "
      f"reference DataLoader workers {workers}; one warm-up and one timed epoch per loop):\n")
print("\n".join(table) if len(table) > 2 else "(no throughput rows: see gpu_check.log)")
try:
    m = json.load(open(os.path.join(out, "train_metrics.json")))
    rows = list(csv.DictReader(open(os.path.join(out, "train_history.csv"))))
    t, p = m["test"], m["provenance"]
    ci = t.get("ci95", {}).get("accuracy")
    ci = f" [95% CI {100 * ci[0]:.2f}, {100 * ci[1]:.2f}]" if ci else ""
    secs = [float(r["seconds"]) for r in rows if r.get("seconds")]
    n_train = sum(p.get("split_counts", {}).get("train", {}).values())
    print(f"\nTraining from scratch: {model}, the recipe of `configs/recipe-search.yaml` (seed 42), {len(rows)} epochs at "
          f"{p.get('input_size')} px, precision {p.get('precision')}, {n_train} training images: "
          f"**test accuracy {100 * t['accuracy']:.2f} %**{ci} on {t['n']} test images, macro F1 {t['f1_macro']:.4f}; "
          f"training {float(p.get('train_seconds', 0)):.0f} s" + (f", {sum(secs) / len(secs):.1f} s per epoch" if secs else "") + ".")
except (OSError, KeyError, ValueError, TypeError, IndexError) as exc:
    print(f"\nTraining from scratch: no result ({type(exc).__name__}: {exc}; see gpu_check.log)")
EOF
  # no usable python: the steps alone
  { echo "| step | exit code | seconds | limit (s) |"; echo "|---|---:|---:|---:|"
    awk -F'\t' '{ printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4 }' "$STEPS"; } > "$OUTDIR/summary.md"
}
cat "$OUTDIR/summary.md" | tee -a "$LOG"
say "done in ${SECONDS}s; files: $(cd "$OUTDIR" && ls | tr '\n' ' ')"
# exit code: 0 only when every step succeeded
! cut -f2 "$STEPS" | grep -qv '^0$'
