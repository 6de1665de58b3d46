#!/usr/bin/env bash
# The transformers adapter's tests, or the census of the zoo, under each transformers release
# the declared range claims. Each release is installed into its own folder (pip --target) and
# put first on PYTHONPATH, in front of the project's venv (torch, peft and the rest come from
# there).
# usage: scripts/transformers_versions.sh [--census] [VERSION ...]   (run from the repository root)
#   --census: run scripts/transformers_census.py (eager and sdpa) instead of the tests; each
#             release's rows go to census-VERSION.json, its table to census-VERSION.txt.
set -uo pipefail
census=0
if [ "${1:-}" = "--census" ]; then
    census=1
    shift
fi
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(4.53.3 4.57.6 5.0.0 5.25.0)
python=${PYTHON:-.venv/bin/python}
status=0
# Older releases import `kernels` when it is installed but predate the venv's: each gets one
# of its time in its own folder (tried: 4.53.3 with 0.7.1, 5.0.0 with 0.11.7).
kernels_of() {
    case "$1" in
        4.*) echo "kernels==0.7.1" ;;
        5.0.*) echo "kernels==0.11.7" ;;
    esac
}
printf '%-8s  %s\n' transformers result
for version in "${versions[@]}"; do
    target=$(mktemp -d)
    if ! "$python" -m pip install -q --target "$target" "transformers==$version" $(kernels_of "$version") > "$target.log" 2>&1; then
        printf '%-8s  %s\n' "$version" "install failed (see $target.log)"
        status=1
        continue
    fi
    if [ "$census" = 1 ]; then
        PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" "$python" scripts/transformers_census.py --implementations eager,sdpa \
            --workers "${WORKERS:-2}" --json "census-$version.json" > "census-$version.txt" 2>&1 || status=1
        summary=$(grep -E '^\| (exact|total) ' "census-$version.txt" | tr -s ' ' | tr '\n' ' ')
        broken=$(sed -n 's/^Broken rows (\([0-9]*\)).*/\1/p' "census-$version.txt")
        summary=${broken:+"$summary broken rows: $broken"}
        summary=${summary:-"census did not run (see census-$version.txt)"}
    else
        summary=$(PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" "$python" -m pytest -q -p no:cacheprovider tests/test_transformers.py 2>&1 | tail -1)
        case "$summary" in *failed*|*error*) status=1 ;; esac
    fi
    printf '%-8s  %s\n' "$version" "$summary"
    rm -rf "$target" "$target.log"
done
exit "$status"
