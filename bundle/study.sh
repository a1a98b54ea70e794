#!/usr/bin/env bash
# The TMCA study of docs/results.md (issue 19): every row trained and evaluated by bundle/qata.sh with one recipe
# and budget for each seed, its metrics kept in docs/results/issue19/<row>_s<seed>.json, then the table.
#
#   bundle/study.sh [--dry-run] [ROW ...]        (default: every row, in the order of ROWS below)
#
# EPOCHS (default 4) and SEEDS (default "0 1 2"); RUNS_DIR, QATA_DIR, PYTHON, OMP_NUM_THREADS as for
# bundle/qata.sh; STUDY_DIR (default docs/results/issue19, the 4-epoch study's) where the metrics files are kept:
# another budget needs a folder of its own. A run whose metrics file exists is not run again; an interrupted one
# resumes where it stopped.
# Lanes: start it twice (e.g. `OMP_NUM_THREADS=1 bundle/study.sh &` twice on 2 cores); a run another process holds
# (bundle/qata.sh locks its run folder) is left to it and named at the end, and this lane goes on with the next.
# --dry-run prints each run's command (one line: network, budget, tag, then the overrides) and runs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

# full TMCA as studied: the design switches of docs/tmca.md ("Design switches"), spelled out although they are
# train.yaml's defaults since 1.0.0 (and the bank switched off for tmca_v2), so that a row means what it meant when
# it ran; every TMCA row below differs from it in one switch, set in its configs/networks file
V2=(--loss#level_reduction mean --loss#warmup_epochs 1 --network_def#enhancement_space aligned
    --network_def#enhancement_alpha_init 0.0 --network_def#alignment_position True)
BANK=(--network_def#report_bank True
      --prepare_batch#text_keys "{'text_ids': 'report_ids', 'text_mask': 'report_mask', 'zones': 'zones'}")
# the recipe of every row: templated reports as written (rephrasing is studied apart, docs/results.md)
RECIPE=(--report_rephrase_prob 0.0)
ROWS=(tmca_backbone tmca_v2 tmca_v2bank tmca_v2bank_no_target tmca_v2bank_single_level tmca_v2bank_no_enhancement
      guidedecoder tmca_image_only)

row() {  # ROW -> $net (configs/networks/$net.yaml) and $args (its overrides)
    args=()
    case $1 in
        tmca_v2) net=tmca; args=("${V2[@]}" --network_def#report_bank False) ;;
        tmca_v2bank) net=tmca; args=("${V2[@]}" "${BANK[@]}") ;;
        tmca_v2bank_no_target | tmca_v2bank_single_level | tmca_v2bank_no_enhancement)
            net=tmca_${1#tmca_v2bank_}; args=("${V2[@]}" "${BANK[@]}") ;;
        tmca_backbone | guidedecoder | tmca_image_only) net=$1 ;;
        *) echo "error: unknown row '$1' (rows: ${ROWS[*]})" >&2; exit 2 ;;
    esac
}

dry=false
[[ ${1:-} == --dry-run ]] && { dry=true; shift; }
rows=("$@")
[[ ${#rows[@]} -gt 0 ]] || rows=("${ROWS[@]}")
for r in "${rows[@]}"; do row "$r"; done  # every name checked before the first run starts

keep=${STUDY_DIR:-docs/results/issue19}
if [[ -z ${STUDY_DIR:-} && ${EPOCHS:-4} != 4 ]]; then
    # the metrics files do not say their budget: a finished 4-epoch run would count as done for this one
    echo "error: EPOCHS=$EPOCHS: $keep keeps the 4-epoch study's figures; set STUDY_DIR to a folder for this budget" >&2
    exit 2
fi
$dry || mkdir -p "$keep"
runs=${RUNS_DIR:-runs/qata}
kept=()
busy=()
for r in "${rows[@]}"; do
    row "$r"
    for seed in ${SEEDS:-0 1 2}; do
        tag=${r}_s$seed
        cmd=(bundle/qata.sh "$net" "${EPOCHS:-4}" "$tag" -- --seed "$seed" "${RECIPE[@]}" "${args[@]}")
        if $dry; then printf '%q ' "${cmd[@]}"; echo; continue; fi
        if [[ ! -f $keep/$tag.json ]]; then
            status=0
            "${cmd[@]}" || status=$?
            if [[ $status == 75 ]]; then busy+=("$tag"); continue; fi  # another lane has it
            [[ $status == 0 ]] || exit $status
            cp "$runs/$tag/eval_val/metrics.json" "$keep/.$tag.json.tmp" && mv "$keep/.$tag.json.tmp" "$keep/$tag.json"
        fi
        kept+=("$keep/$tag.json")
    done
done
$dry && exit 0
[[ ${#busy[@]} -eq 0 ]] || echo "left to the process that holds them (not in the table below): ${busy[*]}" >&2
[[ ${#kept[@]} -gt 0 ]] || { echo "no finished run to tabulate" >&2; exit 0; }
baseline=()
[[ " ${rows[*]} " == *" tmca_backbone "* ]] && baseline=(--baseline tmca_backbone)
"${PYTHON:-.venv/bin/python}" -m bundle results --seeds "${kept[@]}" "${baseline[@]}"
