#!/usr/bin/env bash
# The transformers adapter's tests under each transformers release the declared range claims.
# Each release is installed into its own folder (pip --target) and put first on PYTHONPATH,
# in front of the project's venv (torch, peft and the rest come from there).
# usage: scripts/transformers_versions.sh [VERSION ...]   (run from the repository root)
set -uo pipefail
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(4.53.3 4.57.6 5.0.0 5.24.0)
python=${PYTHON:-.venv/bin/python}
status=0
printf '%-8s  %s\n' transformers result
for version in "${versions[@]}"; do
    target=$(mktemp -d)
    if ! "$python" -m pip install -q --target "$target" "transformers==$version" > "$target.log" 2>&1; then
        printf '%-8s  %s\n' "$version" "install failed (see $target.log)"
        status=1
        continue
    fi
    summary=$(PYTHONPATH="$target" "$python" -m pytest -q -p no:cacheprovider tests/test_transformers.py 2>&1 | tail -1)
    case "$summary" in *failed*|*error*) status=1 ;; esac
    printf '%-8s  %s\n' "$version" "$summary"
    rm -rf "$target" "$target.log"
done
exit "$status"
