#!/usr/bin/env bash
# Validation Dice of a trained row of docs/results.md with templated reports, held-out free-text reports and no
# report (issue 19, part 4): the row's best checkpoint evaluated on the three datalists `python -m bundle freetext`
# writes beside the row's datalist.
#
#   bundle/freetext_eval.sh NAME TAG [-- extra monai.bundle overrides ...]
#
#   NAME, TAG and RUNS_DIR as for bundle/qata.sh (the run folder RUNS_DIR/TAG with models/model.pt).
# Results: RUNS_DIR/TAG/eval_val{,_freetext,_noreport}/metrics.json (eval_val, the templated reports, is the one
# bundle/qata.sh writes; it is made here when missing). Each evaluation that exists already is not run again.
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?network name}; tag=${2:?run tag}; shift 2
[[ ${1:-} == -- ]] && shift
runs=${RUNS_DIR:-runs/qata}
run=$runs/$tag
py=${PYTHON:-.venv/bin/python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1
[[ -f $run/models/model.pt ]] || { echo "error: $run/models/model.pt not found (train it with bundle/qata.sh)" >&2; exit 2; }
[[ -f $runs/datalist_freetext.json ]] || $py -m bundle freetext "$runs/datalist.json"
run_abs=$(cd "$run" && pwd)
for variant in "" _freetext _noreport; do
    [[ -f $run/eval_val$variant/metrics.json ]] && continue
    $py -m monai.bundle run evaluating --meta_file configs/metadata.json --bundle_root . \
        --config_file "['configs/train.yaml','configs/networks/$name.yaml','configs/evaluate.yaml']" \
        --dataset_dir "$runs" --datalist "$runs/datalist$variant.json" --ckpt_dir "$run/models" \
        --tracking_uri "sqlite:///$run_abs/mlruns.db" --num_workers "${NUM_WORKERS:-0}" \
        --output_dir "$run/eval_val$variant" --run_name "qata_${tag}_eval_val$variant" "$@"
done
for variant in "" _freetext _noreport; do
    printf '%-10s ' "${variant:-template}"
    $py -c "import json,sys; m=json.load(open(sys.argv[1]))['metrics']; print('dice_mean %.4f dice_pooled %.4f' % (m['val_dice_mean'], m['val_dice_pooled']))" "$run/eval_val$variant/metrics.json"
done
