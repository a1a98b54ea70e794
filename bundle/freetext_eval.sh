#!/usr/bin/env bash
# Validation Dice of a trained row of docs/results.md with templated reports, free-text reports and no report
# (issue 19, part 4): the row's best checkpoint evaluated on the datalists `python -m bundle freetext` writes beside
# the row's datalist, with the reports written in the training template (the configs' report_template, qata) and,
# for the free text, also as written (--report_template none).
#
#   bundle/freetext_eval.sh NAME TAG [-- extra monai.bundle overrides ...]
#
#   NAME (A or A+B), TAG and RUNS_DIR as for bundle/qata.sh (the run folder RUNS_DIR/TAG with models/model.pt).
# Results: RUNS_DIR/TAG/eval_val<variant>/metrics.json, variants: "" (templated; the one bundle/qata.sh writes, made
# here when missing), _freetext and _handwritten (each also _as_written), _noreport. Each evaluation that exists
# already is not run again. The hand-written list holds the validation images whose zones a hand-written sentence
# names (bundle/handwritten_reports.json); its line also gives the templated dice_mean of the same images.
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?network name}; tag=${2:?run tag}; shift 2
[[ ${1:-} == -- ]] && shift
runs=${RUNS_DIR:-runs/qata}
run=$runs/$tag
py=${PYTHON:-.venv/bin/python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1
source bundle/network_configs.sh
network_configs "$name"
[[ -f $run/models/model.pt ]] || { echo "error: $run/models/model.pt not found (train it with bundle/qata.sh)" >&2; exit 2; }
[[ -f $runs/datalist_handwritten.json ]] || $py -m bundle freetext "$runs/datalist.json"
run_abs=$(cd "$run" && pwd)
variants=("" _freetext _freetext_as_written _handwritten _handwritten_as_written _noreport)
for variant in "${variants[@]}"; do
    [[ -f $run/eval_val$variant/metrics.json ]] && continue
    as_written=(); [[ $variant == *_as_written ]] && as_written=(--report_template none)
    $py -m monai.bundle run evaluating --meta_file configs/metadata.json --bundle_root . \
        --config_file "['configs/train.yaml'$nets,'configs/evaluate.yaml']" \
        --dataset_dir "$runs" --datalist "$runs/datalist${variant%_as_written}.json" --ckpt_dir "$run/models" \
        --tracking_uri "sqlite:///$run_abs/mlruns.db" --num_workers "${NUM_WORKERS:-0}" \
        --output_dir "$run/eval_val$variant" --run_name "qata_${tag}_eval_val$variant" "$@" "${as_written[@]}"
done
for variant in "${variants[@]}"; do
    printf '%-24s ' "${variant:-template}"
    $py - "$run" "$variant" <<'PY'
import csv, json, sys
run, variant = sys.argv[1:]
m = json.load(open(f"{run}/eval_val{variant}/metrics.json"))["metrics"]
line = f"dice_mean {m['val_dice_mean']:.4f} dice_pooled {m['val_dice_pooled']:.4f}"
if variant.startswith("_handwritten"):  # the templated Dice of the same images
    ids = {r["filename"] for r in csv.DictReader(open(f"{run}/eval_val{variant}/val_dice_mean_raw.csv"))}
    same = [float(r["mean"]) for r in csv.DictReader(open(f"{run}/eval_val/val_dice_mean_raw.csv")) if r["filename"] in ids]
    line += f" ({len(ids)} images; templated on them: dice_mean {sum(same) / len(same):.4f})"
print(line)
PY
done
