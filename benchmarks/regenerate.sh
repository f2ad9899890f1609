#!/bin/sh
# Rebuild every file derived from committed benchmark results, in dependency order:
#   benchmark JSON -> fidelity summary + plugin README blocks -> toolbox table -> generated docs pages.
# Run after adding results (and before committing them); with --check, only report what is stale (exit 1).
set -e
cd "$(dirname "$0")/.."
check=""
[ "${1:-}" = "--check" ] && check="--check"
python benchmarks/fidelity_summary.py $check
python benchmarks/toolbox.py $check
python docs/gen_docs.py $check
