#!/usr/bin/env bash
# Wheels for a GPU machine that reaches no package registry but has Python, CUDA torch and the common scientific
# stack (such as this project's lent H200: Python 3.12, torch 2.11): the project's needs it lacks, pinned to the
# versions of the Python that runs this script, saved in ./.whl (git-ignored). scripts/gpu_check.sh installs them
# offline there (pip --no-index --target) when its python3 cannot import the project's needs.
#
#   bash scripts/gpu_wheels.sh                          # uses .venv/bin/python (else python3) for the pins
#   PY_VERSION=3.11 bash scripts/gpu_wheels.sh          # for another Python on the GPU machine
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${FASTARDIFF_PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3)}"
PY_VERSION="${PY_VERSION:-3.12}"
# not in a CUDA+torch image: DeepSpeed and its pydantic, the loader's webdataset; transformers pinned too (our
# Qwen2 modules follow its internals); diffusers for VAE presets
PKGS="hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions webdataset braceexpand
      transformers diffusers importlib-metadata"
pins=$("$PY" - deepspeed $PKGS <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
out = []
for name in sys.argv[1:]:
    try:
        out.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        out.append(name)
print(" ".join(out))
PYEOF
)
rm -rf .whl && mkdir -p .whl  # one Python's wheels only: an incompatible duplicate stops the offline install
ds_pin="${pins%% *}" pins="${pins#* }"  # PyPI has DeepSpeed as source only: build its (pure Python) wheel here
echo "building $ds_pin (DS_BUILD_OPS=0: ops are JIT-built where they run)" >&2
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w .whl "$ds_pin"
echo "downloading for CPython $PY_VERSION manylinux x86_64: $pins" >&2
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $pins
du -sh .whl >&2
echo "carry .whl with the working tree (device tool: carry=['.whl']); scripts/gpu_check.sh installs it offline" >&2
