#!/usr/bin/env bash
# `full` once on a lent GPU machine (issue #11 welcomes its wall time and WER beside the CPU figures
# of results/full-1m): `nas train search_spaces/designs/unshared-1m.json --schedule full` on the
# schedule's own corpus (synth:30), synthesized there on all cores, stopped at DEADLINE seconds.
# Back in $OUT: metrics.json and test_transcripts.json when the run finished (copy metrics.json to
# this folder), train.log (the run's log without its progress bars) and gpu.log (this script's).
#
# Prepared 2026-12-06 and dry-run on a CPU only (below); not yet run on a GPU. The packages that the
# GPU image (Python 3.12, torch 2.11) lacks travel as wheels in .whl, fetched here once:
#   echo /.whl/ >> .git/info/exclude
#   for p in rapidfuzz==3.14.6 annotated-types==0.8.0 espeakng-loader==0.2.4 flashlight-text==0.0.7 \
#            jiwer==4.0.0 pydantic==2.14.4 pydantic_core==2.50.5 typing-inspection==0.4.5 \
#            soundfile==0.14.0 cffi==2.1.1 pycparser==3.12; do
#     python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl "$p"; done          # about 19 MB
# then the device tool's run: command `bash results/full-1m-gpu/gpu.sh`, carry [".whl"], timeout_s 600.
# A dry run elsewhere: PY=.venv/bin/python INSTALL=no NAS_CACHE=~/.cache/nas SCHEDULE=tiny OUT=/tmp/o bash results/full-1m-gpu/gpu.sh
set -u
T0=$(date +%s)
DEADLINE=${DEADLINE:-560}
PY=${PY:-python3}
SCHEDULE=${SCHEDULE:-full}
since() { echo "$(( $(date +%s) - T0 )) s"; }
exec > >(tee "$OUT/gpu.log") 2>&1
if [ "${INSTALL:-yes}" = yes ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD NAS_CACHE=${NAS_CACHE:-/tmp/nas-cache} PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "cores: $(nproc)"

DATA=$($PY -c "from nas.schedule import load_schedule; print(load_schedule('$SCHEDULE').data or 'synth')") || exit 1
HOURS=${DATA#synth}; HOURS=${HOURS#:}
$PY -c "from nas.data import synth; synth.build(synth.default_dir(${HOURS:-synth.DEFAULT_HOURS}), hours=${HOURS:-synth.DEFAULT_HOURS}, workers=$(nproc), progress=False)" || exit 1
$PY -c "from nas.workers import prepare_data; print(prepare_data('$DATA')[1])" 2>&1 | grep -v "utt/s\]" || exit 1
echo "corpus $DATA and its features at $(since)"

RUN=/tmp/full-gpu
setsid $PY -m nas.cli train search_spaces/designs/unshared-1m.json --schedule "$SCHEDULE" --out "$RUN" >/tmp/train.log 2>&1 &
PID=$!
while kill -0 "$PID" 2>/dev/null && [ "$(( $(date +%s) - T0 ))" -lt "$DEADLINE" ]; do sleep 5; done
if kill -0 "$PID" 2>/dev/null; then
  echo "stopped at the deadline, $(since)"
  kill -TERM -- "-$PID" 2>/dev/null; sleep 5; kill -KILL -- "-$PID" 2>/dev/null
fi
tr '\r' '\n' </tmp/train.log | grep -v "^train [^ ]*: .*|" > "$OUT/train.log"
tail -5 "$OUT/train.log"
for f in metrics.json test_transcripts.json; do [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/"; done
if [ -f "$RUN/metrics.json" ]; then
  $PY -c "
import json; m = json.load(open('$RUN/metrics.json'))
print('device', m.get('device'), '| train_seconds', m.get('train_seconds'), '| test', {k: round(v, 4) for k, v in m['test'].items() if k in ('wer', 'cer', 'beam_wer', 'beam_cer')})"
elif [ -f "$RUN/checkpoint.pt" ]; then
  $PY -c "
import torch; s = torch.load('$RUN/checkpoint.pt', map_location='cpu', weights_only=False)['state']
print('unfinished at step', s['step'], 'after', round(s['train_seconds']), 's; dev CER', [(p['step'], round(p['dev_cer'], 4)) for p in s['curve']])" 2>&1 | tail -1
else
  echo "unfinished, before its first evaluation"
fi
echo "end at $(since)"
