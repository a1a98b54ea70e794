#!/usr/bin/env bash
# The TMCA study of docs/results.md (issue 19): every row trained and evaluated by bundle/qata.sh with one recipe
# and budget for each seed, its metrics kept in docs/results/issue19/<row>_s<seed>.json, then the table.
#
#   bundle/study.sh [--dry-run] [ROW ...]        (default: every row, in the order of ROWS below)
#
# EPOCHS (default 4) and SEEDS (default "0 1 2"); RUNS_DIR, QATA_DIR, PYTHON, OMP_NUM_THREADS as for
# bundle/qata.sh. A run whose metrics file exists is not run again; an interrupted one resumes where it stopped.
# --dry-run prints each run's command (one line: network, budget, tag, then the overrides) and runs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

# full TMCA as studied: the design switches of docs/tmca.md ("Design switches under study") on top of the
# train.yaml defaults; every TMCA row below differs from it in one switch, set in its configs/networks file
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
        tmca_v2) net=tmca; args=("${V2[@]}") ;;
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

keep=docs/results/issue19
runs=${RUNS_DIR:-runs/qata}
kept=()
for r in "${rows[@]}"; do
    row "$r"
    for seed in ${SEEDS:-0 1 2}; do
        tag=${r}_s$seed
        cmd=(bundle/qata.sh "$net" "${EPOCHS:-4}" "$tag" -- --seed "$seed" "${RECIPE[@]}" "${args[@]}")
        if $dry; then printf '%q ' "${cmd[@]}"; echo; continue; fi
        if [[ ! -f $keep/$tag.json ]]; then
            "${cmd[@]}"
            cp "$runs/$tag/eval_val/metrics.json" "$keep/.$tag.json.tmp" && mv "$keep/.$tag.json.tmp" "$keep/$tag.json"
        fi
        kept+=("$keep/$tag.json")
    done
done
$dry && exit 0
baseline=()
[[ " ${rows[*]} " == *" tmca_backbone "* ]] && baseline=(--baseline tmca_backbone)
"${PYTHON:-.venv/bin/python}" -m bundle results --seeds "${kept[@]}" "${baseline[@]}"
