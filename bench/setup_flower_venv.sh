#!/usr/bin/env bash
# Create the virtualenv that bench/vs_flower.py runs Flower's simulation in.
#
# Flower's `simulation` extra pins its own Ray (flwr 1.42.0 -> ray==2.55.1), which must not
# meet apf-ray's Ray 2.60, so Flower lives in its own venv: flwr[simulation], torch and numpy,
# nothing of apf-ray. The Flower side imports the LeNet-5 class and the minibatch schedule
# from this repository via PYTHONPATH (those modules need only torch and numpy).
#
# torch is pinned to exactly 2.13.0: that CPU wheel lies on this machine's local wheel
# directory; any other version would download a multi-GB CUDA build, so the pin is passed
# as a constraint too (a dependency cannot pull another torch in).
#
#   bash bench/setup_flower_venv.sh [VENV_DIR]     (default: bench/.venv-flower, git-ignored)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${1:-$here/.venv-flower}"
python="${PYTHON:-python3}"
FLWR_VERSION="${FLWR_VERSION:-1.42.0}"
TORCH_VERSION="2.13.0"

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==$TORCH_VERSION" >"$constraints"

# --only-binary torch: never build or fetch a torch sdist; the constraint keeps every
# resolver step on the local 2.13.0 CPU wheel.
# (pip's notes about this machine's empty local index folders are filtered out.)
PIP_CONSTRAINT="$constraints" "${pip[@]}" install --quiet --only-binary torch \
    "flwr[simulation]==$FLWR_VERSION" "torch==$TORCH_VERSION" numpy \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

"$venv/bin/python" - <<'PY'
import flwr, ray, torch, numpy
print(f"flower venv ready: flwr {flwr.__version__}, ray {ray.__version__}, "
      f"torch {torch.__version__}, numpy {numpy.__version__}")
assert torch.__version__.startswith("2.13.0"), torch.__version__
PY
