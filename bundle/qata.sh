#!/usr/bin/env bash
# One row of docs/results.md: train a network of the bundle on QaTa-COV19 with the CPU recipe, then evaluate its
# best checkpoint on the validation split.
#
#   bundle/qata.sh NAME EPOCHS [TAG] [-- extra monai.bundle overrides ...]
#
#   NAME    configs/networks/NAME.yaml, merged on top of configs/train.yaml; A+B merges A.yaml then B.yaml
#   EPOCHS  the budget (cosine schedule over it)
#   TAG     the run folder runs/qata/TAG (default NAME); MLflow store runs/qata/TAG/mlruns.db, run name qata_TAG
#   after --: overrides for both training and evaluation, e.g. -- --seed 1
#
# Resumable: rerun the same command after an interruption; a finished run is not trained again; while one runs, a
# second of the same TAG exits with status 75 and starts nothing (the run folder is locked). Data:
# QATA_DIR (default ../shared/data/qata); run folders under RUNS_DIR (default runs/qata); both relative to the
# bundle root or absolute. Threads: OMP_NUM_THREADS as usual (two runs side by side: 1 each). Loader workers:
# NUM_WORKERS (default 0, the setting of every row in docs/results.md; raise it on a machine with spare cores).
# Results: runs/qata/TAG/eval_val/metrics.json (the four Dice/IoU figures and the report consistency).
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?network name}; epochs=${2:?epochs}; shift 2
tag=$name
if [[ $# -gt 0 && $1 != -- ]]; then tag=$1; shift; fi
[[ ${1:-} == -- ]] && shift
qata=${QATA_DIR:-../shared/data/qata}
runs=${RUNS_DIR:-runs/qata}
run=$runs/$tag
py=${PYTHON:-.venv/bin/python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1
source bundle/network_configs.sh
network_configs "$name"

mkdir -p "$run"
run_abs=$(cd "$run" && pwd)
# one process per run folder: a second qata.sh of the same TAG (another bundle/study.sh lane, a forgotten terminal)
# would train into the same checkpoints and MLflow run. It stops here instead, with status 75 (EX_TEMPFAIL), which
# bundle/study.sh reads as "another process has this run". The lock is the open file descriptor 9, inherited by
# the training and evaluation below, so it is held as long as any of them runs and released however they end.
if command -v flock > /dev/null; then
    exec 9> "$run/.lock"
    if ! flock -n 9; then
        echo "error: $run is in use by another bundle/qata.sh (it holds $run/.lock); nothing started" >&2
        exit 75
    fi
else
    echo "warning: flock(1) not found: a second bundle/qata.sh of tag $tag at the same time would not be stopped" >&2
fi
[[ -f $runs/datalist.json ]] || $py -m bundle datalist folder --root "$qata" --out "$runs/datalist.json"
configs="['configs/train.yaml'$nets]"
common=(--meta_file configs/metadata.json --bundle_root . --dataset_dir "$runs" --ckpt_dir "$run/models"
        --tracking_uri "sqlite:///$run_abs/mlruns.db" --num_workers "${NUM_WORKERS:-0}")

if [[ ! -f $run/trained ]]; then
    resume=False
    compgen -G "$run/models/checkpoint_*.pt" > /dev/null && resume=True
    $py -m monai.bundle run training --config_file "$configs" "${common[@]}" --output_dir "$run" \
        --max_epochs "$epochs" --run_name "qata_$tag" --resume $resume "$@"
    touch "$run/trained"
fi
$py -m monai.bundle run evaluating --config_file "['configs/train.yaml'$nets,'configs/evaluate.yaml']" \
    "${common[@]}" --output_dir "$run/eval_val" --run_name "qata_${tag}_eval_val" "$@"
cat "$run/eval_val/metrics.json"
