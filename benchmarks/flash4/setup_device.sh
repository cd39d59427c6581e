#!/usr/bin/env bash
# flash-attn-4 on a GPU machine without network, from wheels carried in two device calls
# (benchmarks/flash4/NOTES.md). Files stay under $FA4_DIR (default /tmp/fa4) between calls
# while the machine is warm.
#
#   call 1, carry [".whl/fa4-call1"]:  bash benchmarks/flash4/setup_device.sh stage1
#   call 2, carry [".whl/fa4-call1b"]: bash benchmarks/flash4/setup_device.sh add fa4-call1b
#   call 3, carry [".whl/fa4-call2"]:  bash benchmarks/flash4/setup_device.sh stage2 && \
#                                      export PYTHONPATH="src:$(bash benchmarks/flash4/setup_device.sh path)" && ...
#   only if stage1 reports cuda.bindings missing, carry [".whl/fa4-cuda"] in a call before stage2:
#                                      bash benchmarks/flash4/setup_device.sh cuda
set -euo pipefail
DIR=${FA4_DIR:-/tmp/fa4}
PY=${PYTHON:-python3}
CU13=nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl

path() {  # what `pip install` would add: the target, and the .pth file's dsl_packages entry
  echo "$DIR/site:$DIR/site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}"
}

install_wheels() {  # $@ = wheel files; pip if there is one, else plain extraction (no wheel has .data/)
  if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install --quiet --no-deps --no-index --no-compile --target "$DIR/site" "$@"
  else
    for w in "$@"; do "$PY" -m zipfile -e "$w" "$DIR/site"; done
  fi
}

case "${1:-}" in
  stage1)
    mkdir -p "$DIR/wheels"
    cp .whl/fa4-call1/* "$DIR/wheels/"
    "$PY" - <<'PY'
import importlib.util, platform, sys
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None,
      "capability", torch.cuda.get_device_capability() if torch.cuda.is_available() else None)
for name in ("cuda.bindings", "cuda.pathfinder", "numpy", "typing_extensions", "triton", "transformers"):
    found = importlib.util.find_spec(name.split(".")[0]) is not None and importlib.util.find_spec(name) is not None
    print(f"{name}: {'present' if found else 'MISSING'}")
PY
    ls -l "$DIR/wheels"
    ;;
  add)  # one more carried folder of parts, .whl/$2
    mkdir -p "$DIR/wheels"
    cp ".whl/${2:?name the carried folder under .whl/}"/* "$DIR/wheels/"
    ls -l "$DIR/wheels"
    ;;
  cuda)
    mkdir -p "$DIR/wheels"
    cp .whl/fa4-cuda/* "$DIR/wheels/"
    install_wheels "$DIR"/wheels/cuda_bindings-*.whl "$DIR"/wheels/cuda_pathfinder-*.whl
    ;;
  stage2)
    cp .whl/fa4-call2/* "$DIR/wheels/"
    cat "$DIR"/wheels/cu13.whl.part? > "$DIR/wheels/$CU13"  # part0, part1, ... in order
    (cd "$DIR/wheels" && sha256sum --check --ignore-missing SHA256SUMS)
    rm -f "$DIR"/wheels/cu13.whl.part?
    install_wheels "$DIR/wheels/$CU13" "$DIR"/wheels/flash_attn_4-*.whl "$DIR"/wheels/nvidia_cutlass_dsl-*.whl \
      "$DIR"/wheels/nvidia_cutlass_dsl_libs_core-*.whl "$DIR"/wheels/nvidia_cutlass_dsl_libs_base-*.whl \
      "$DIR"/wheels/quack_kernels-*.whl "$DIR"/wheels/apache_tvm_ffi-*.whl "$DIR"/wheels/torch_c_dlpack_ext-*.whl \
      "$DIR"/wheels/einops-*.whl
    PYTHONPATH="$(path)" "$PY" -c "
import cutlass, cutlass.cute, flash_attn.cute
from transformers.utils import is_flash_attn_4_available
print('cutlass', cutlass.__version__, '| flash_attn.cute', flash_attn.cute.flash_attn_func.__module__,
      '| transformers sees flash-attn-4:', is_flash_attn_4_available())"
    ;;
  path)
    path
    ;;
  *)
    echo "usage: $0 stage1|add FOLDER|cuda|stage2|path" >&2
    exit 2
    ;;
esac
