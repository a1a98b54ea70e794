# Sourced by bundle/qata.sh and bundle/freetext_eval.sh (from the bundle root): network_configs NAME sets $nets, the
# network files of NAME for a --config_file list after configs/train.yaml: ",'configs/networks/NAME.yaml'"; NAME
# A+B gives A's then B's (e.g. tmca_v1+tmca_no_target: an ablation row of the first TMCA design, before 1.0.0).
# An unknown part is an error naming it (exit 2) before anything runs.
network_configs() {
    local part parts
    nets=""
    IFS=+ read -ra parts <<< "$1"
    for part in "${parts[@]}"; do
        if [[ -z $part || ! -f configs/networks/$part.yaml ]]; then
            echo "error: no configs/networks/$part.yaml (network '$1'; names: $(cd configs/networks && ls *.yaml | sed 's/\.yaml$//' | tr '\n' ' '))" >&2
            exit 2
        fi
        nets+=",'configs/networks/$part.yaml'"
    done
}
