#!/usr/bin/env bash
# The GPU check of the speed issue (docs/performance.md): TMCA at the papers' size (ConvNeXt-Tiny, batch 32, 224²)
# trained for a fixed number of steps on QaTa-COV19's train split, once per loader worker count; prints samples/s,
# step time, peak GPU memory, data-wait fraction and the loss at the first and last step. At most ~8 minutes.
#
#   bundle/device_check.sh [STEPS] [WORKERS...]     default: 60 steps, workers 4 8 12
#
# Where the bundle is installed (this repository's .venv, or PYTHON=...), it runs as it is, on the QaTa folder in
# QATA_DIR (default ../shared/data/qata). On a bare GPU machine (PyTorch and transformers only, no network) it
# takes what is missing from .device_payload/, written beforehand on a machine with the bundle installed:
#
#   python -m bundle device-check --prepare .device_payload  # wheels, the text encoder in fp16, 128 QaTa images
#
# and copied along (the device tool: carry [".device_payload"]). CPU mode, for the tests: STEPS=3 DEVICE=cpu
# BATCH=2 ENCODER=cpu SIZE=64 WARMUP=1 bundle/device_check.sh 3 0
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-60}; shift $(( $# > 0 ? 1 : 0 ))
workers=("$@"); [[ ${#workers[@]} -gt 0 ]] || workers=(4 8 12)
py=${PYTHON:-}
[[ -n $py ]] || { [[ -x .venv/bin/python ]] && py=.venv/bin/python || py=python3; }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
qata=${QATA_DIR:-../shared/data/qata}
extra=()
if [[ -d .device_payload ]] && ! $py -c "import monai, ignite" 2>/dev/null; then
    site=${TMPDIR:-/tmp}/device_check_site
    $py -m pip install -q --no-index --no-deps --no-compile --target "$site" .device_payload/wheels/*.whl
    export PYTHONPATH=$PYTHONPATH:$site
fi
if [[ -d .device_payload ]]; then
    [[ -d $qata ]] || qata=.device_payload/qata
    extra+=(--text-encoder-dir .device_payload/text_encoder)
fi
out=${OUT:-${TMPDIR:-/tmp}/device_check}
mkdir -p "$out"
$py -m bundle datalist folder --root "$qata" --out "$out/datalist.json" > /dev/null
$py -c "import torch; print('torch', torch.__version__, '· cuda', torch.cuda.is_available(),
  '·', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
$py -m bundle device-check --datalist "$out/datalist.json" --steps "$steps" --warmup "${WARMUP:-10}" \
    --batch-size "${BATCH:-32}" --encoder-size "${ENCODER:-tiny}" --size "${SIZE:-224}" --workers "${workers[@]}" \
    ${DEVICE:+--device "$DEVICE"} --json "$out/device_check.json" "${extra[@]}"
