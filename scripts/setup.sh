#!/usr/bin/env bash
# Set up .venv in the repo root with everything masksub needs; `dev` adds the test tools.
# Safe to re-run: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="train,timm,hf,clip,lightning"
[ "${1:-}" = "dev" ] && extra="$extra,dev"

# Fashion-MNIST from Debian's archive (the quick-start data set, read offline).
if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || ! dpkg -s wordnet-base >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist wordnet-base >/dev/null \
      || echo "setup: could not install dataset-fashion-mnist/wordnet-base; torchvision will download Fashion-MNIST when online" >&2
  else
    echo "setup: run 'sudo apt-get install dataset-fashion-mnist wordnet-base' for the offline data sets" >&2
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=".venv/.masksub-$extra-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>/dev/null || true
  # torch first and pinned: pip takes this build from the machine's disk.
  .venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extra]"
  touch "$stamp"
fi
