#!/usr/bin/env bash
# Every plugin and adapter installs on its own into an environment that holds only the host.
#
# A fresh virtual environment gets torch (the pinned build, from this machine's disk) and the host
# package. The plugin distributions are built into a wheelhouse that stands in for PyPI, where they
# would be published; each one must then resolve alone (`pip install --dry-run`, its dependencies
# on other quantplug plugins coming from the wheelhouse). Finally the issue's command runs for real:
# QDrop alone (with what it declares) plus the torchvision adapter, on the zoo ResNet-18.
#
#   bash .ci/install_alone.sh [VENV_DIR]     (reuses VENV_DIR if it already has torch)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-$(mktemp -d)/venv}"
[ -x "$VENV/bin/python" ] || python -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" install torch==2.14.1 torchvision==0.29.1
"${PIP[@]}" install .
WHEELS="$(mktemp -d)"
"${PIP[@]}" wheel --no-deps -w "$WHEELS" ./plugins/quantplug-* ./adapters/quantplug-* >/dev/null
for dir in ./plugins/quantplug-* ./adapters/quantplug-*; do
  [ -f "$dir/pyproject.toml" ] || continue
  "${PIP[@]}" install --dry-run --find-links "$WHEELS" "$dir" >/dev/null \
    || { echo "FAIL: $dir does not install alone"; exit 1; }
  echo "ok: $dir resolves alone (host + its declared dependencies)"
done
"${PIP[@]}" install --find-links "$WHEELS" ./plugins/quantplug-qdrop ./adapters/quantplug-torchvision
listed="$("$VENV/bin/quantplug" plugins)"  # whole, then searched: grep -q would close the pipe early
echo "$listed" | grep -q '"quantplug-qdrop"' || { echo "FAIL: qdrop not listed"; exit 1; }
out="$("$VENV/bin/quantplug" apply --plugin qdrop zoo:resnet18-fmnist --w-bits 2 --a-bits 4 --data fmnist-subset \
  --calib-samples 64 --eval-samples 200 -o recon.iters=20 -o recon.act_iters=10 --no-save 2>&1)" \
  || { echo "$out"; echo "FAIL: quantplug apply --plugin qdrop in the host-only environment"; exit 1; }
echo "$out" | tail -n 3
echo "ok: quantplug-qdrop installed alone and ran on zoo:resnet18-fmnist at W2A4"
