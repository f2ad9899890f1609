#!/usr/bin/env bash
# The tutorial plugin, checked the way a plugin author would (call it from .ci/run): install
# docs/tutorial/quantplug-signround into the current environment, run its tests, apply its recipe.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export QUANTPLUG_PROGRESS="${QUANTPLUG_PROGRESS:-0}"
python -m pip install --quiet "$here/quantplug-signround"
# -p no:cacheprovider: leave no .pytest_cache in the source tree; rootdir and options come from its pyproject
(cd "$here/quantplug-signround" && python -m pytest -p no:cacheprovider -q)
quantplug apply --plugin signround testing:tiny-resnet --calib-samples 64 --eval-samples 100 --no-save
