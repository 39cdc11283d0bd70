#!/usr/bin/env bash
# `nas bench fidelity` on a lent GPU machine (one H100, 16 cores, Python 3.12 with torch 2.11): the
# benchmark's 30 runs, JOBS at a time sharing the GPU (through CUDA MPS when its daemon starts),
# stopped at DEADLINE seconds. Back in $OUT: runs.tgz (every finished run, without its LM and
# checkpoint), ckpt.tar.* (the checkpoints of unfinished runs, furthest first, to resume here) and
# bench.log. Unpack both into results/bench-fidelity/runs/ (runs-<hash>/ for a DATA other than synth,
# as nas.bench.fidelity.runs_dir names it) and run `nas bench fidelity` to finish
# and rank. The project's packages the GPU image lacks travel as wheels in .whl (see the device
# tool's README); the corpus is synthesized there, on all cores.
set -u
T0=$(date +%s)
DEADLINE=${DEADLINE:-520}
JOBS=${JOBS:-15}
PY=${PY:-python3}  # a dry run elsewhere: PY=.venv/bin/python INSTALL=no NAS_CACHE=~/.cache/nas ARGS="--proxy tiny ..."
since() { echo "$(( $(date +%s) - T0 )) s"; }
if [ "${INSTALL:-yes}" = yes ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD NAS_CACHE=${NAS_CACHE:-/tmp/nas-cache} OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.used,utilization.gpu --format=csv,noheader
nproc

# MPS lets the runs' small kernels run side by side instead of in turns; without it, they take turns.
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
# On 2026-11-27 a first call left its daemon running (it had stopped on an error), and the second
# call took "already running" for a failure, so its 15 runs took turns on the GPU without MPS: about
# 30,700 steps in 500 s in all (61 a second), each run no faster than on 2 CPU cores (the unshared
# design trains 5.5 steps a second there). Hence the trap, and a running daemon is used.
MPS=off
if command -v nvidia-cuda-mps-control >/dev/null; then
  nvidia-cuda-mps-control -d 2>&1  # "An instance of this daemon is already running" is fine
  if timeout 60 $PY -c "import torch; print('CUDA through MPS:', torch.ones(2, device='cuda').sum().item())"; then
    MPS=on
    trap 'echo quit | nvidia-cuda-mps-control' EXIT
  else
    echo quit | nvidia-cuda-mps-control
  fi
fi
[ "$MPS" = off ] && unset CUDA_MPS_PIPE_DIRECTORY
echo "MPS $MPS at $(since)"

DATA=${DATA:-synth}
$PY -c "from nas.data import synth; synth.build(synth.default_dir(), workers=16, progress=False)" || exit 1
$PY -c "from nas.workers import prepare_data; print(prepare_data('$DATA')[1])" 2>&1 | grep -v "utt/s\]" || exit 1
echo "corpus and features at $(since)"
# A smoke run on the device first (a failure here costs seconds, not the lease), and a step time.
$PY -c "from nas.config import ArchConfig; from nas.schedule import load_schedule; from nas.data.corpus import resolve_data; from nas.train import train; train(ArchConfig.load('search_spaces/designs/paper-1m.json'), load_schedule('tiny'), resolve_data('$DATA'), '/tmp/smoke', threads=1, progress=False)" \
  >/tmp/smoke.log 2>&1 || { tail -20 /tmp/smoke.log; exit 1; }
$PY -c "import json; m = json.load(open('/tmp/smoke/metrics.json')); print('smoke:', m['device'], m['steps'], 'steps in', m['train_seconds'], 's')"
echo "smoke at $(since)"

setsid $PY -c "from pathlib import Path; from nas import bench; bench.run('fidelity', Path('/tmp/bench'), fidelity=dict(jobs=$JOBS, threads=1, data='$DATA'${ARGS:-}))" >/tmp/bench.log 2>&1 &
PID=$!
while kill -0 "$PID" 2>/dev/null && [ "$(( $(date +%s) - T0 ))" -lt "$DEADLINE" ]; do sleep 5; done
kill -TERM -- "-$PID" 2>/dev/null; sleep 5; kill -KILL -- "-$PID" 2>/dev/null
echo "stopped at $(since)"
cp /tmp/bench.log "$OUT/bench.log"

$PY - <<'EOF'
import os, subprocess, tarfile
from pathlib import Path
import torch
from nas.bench.fidelity import runs_dir
runs, out = runs_dir(Path("/tmp/bench/bench-fidelity"), os.environ.get("DATA", "synth")), Path(os.environ["OUT"])
done = sorted(d for d in runs.iterdir() if (d / "metrics.json").is_file()) if runs.is_dir() else []
left = []
for d in sorted(runs.iterdir()) if runs.is_dir() else []:
    if d not in done and (d / "checkpoint.pt").is_file():
        state = torch.load(d / "checkpoint.pt", map_location="cpu", weights_only=False)["state"]
        left.append((d, state["step"], state["train_seconds"]))
        print(f"unfinished {d.name}: step {state['step']}, {state['train_seconds']:.0f} s")
with tarfile.open(out / "runs.tgz", "w:gz") as tar:
    for d in done:
        for f in d.iterdir():
            if f.name not in ("checkpoint.pt", "lm"):
                tar.add(f, arcname=f"{d.name}/{f.name}")
print(f"{len(done)} runs finished: {', '.join(d.name for d in done)}")
size, chosen = 0, []
for d, step, _ in sorted(left, key=lambda x: -x[1]):
    b = (d / "checkpoint.pt").stat().st_size
    if size + b < 58e6:
        chosen.append(d)
        size += b
if chosen:
    with tarfile.open("/tmp/ckpt.tar", "w") as tar:
        for d in chosen:
            for f in ("checkpoint.pt", "tokenizer.model"):
                if (d / f).is_file():
                    tar.add(d / f, arcname=f"{d.name}/{f}")
    subprocess.run(["split", "-b", "15M", "/tmp/ckpt.tar", str(out / "ckpt.tar.")], check=True)
    print(f"checkpoints back: {', '.join(d.name for d in chosen)} ({size / 1e6:.0f} MB)")
EOF
grep -v "^\s*$" /tmp/bench.log | grep -v "it/s\]\|utt/s\]" | tail -50
echo "end at $(since)"
