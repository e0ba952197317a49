#!/usr/bin/env bash
# Bring what the GPU machine's image lacks, as wheels prepared beside the checkout, and install them
# there offline in well under a minute (docs/gpu.md has the whole procedure).
#
#   bash bench/gpu_setup.sh --prepare [--python 3.11,3.12] [--bnb-cuda 128,130,132]      # here, with PyPI
#   bash bench/gpu_setup.sh --list                                                        # what --prepare takes
#   bash bench/gpu_setup.sh                                                               # there, offline
#   . .gpu-carry/env.sh                                                                   # then: PYTHONPATH
#
# --prepare fills .gpu-carry/ (git-ignored; name it in the device call's `carry`):
#   wheels/             lorafit's dependencies the image lacks (pyproject.toml's dependencies and the bench
#                       and gpu extras, with their own dependencies), at the versions of this checkout's
#                       .venv, manylinux x86_64 / pure-Python wheels for each --python version; bitsandbytes
#                       slimmed to the CUDA libraries of --bnb-cuda (its wheel holds one per CUDA and ROCm
#                       version: 43 MB; slimmed 14 MB); --pinned NAMES replaces PINNED below;
#   requirements-<py>.txt  the wheels to install for each Python version;
#   reference/seed_stack.py  the reference (../shared does not travel with the checkout);
#   manifest.json       versions, sizes and what the carry weighs against the 64 MiB limit.
# The image's own packages (DEVICE_HAS: the 'cuda' image's list, read 2026-11-17) are not carried, except
# PINNED ones, carried at this checkout's versions so the GPU runs the versions the CPU suite tests.
#
# On the device (no package index) the script installs the wheels with pip --no-index into
# /tmp/lorafit-site, ahead of the image's packages on PYTHONPATH (.gpu-carry/env.sh sets it, with src/),
# tries `pip install --no-deps -e .`, then imports everything the check needs; a pinned package that does
# not import against the image is dropped so the image's own version is used, and said so.
# LORAFIT_GPU_PYTHON (default python3) and LORAFIT_GPU_SITE (default /tmp/lorafit-site) override those two.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY="$ROOT/.gpu-carry"
WHEELS="$CARRY/wheels"
SITE="${LORAFIT_GPU_SITE:-/tmp/lorafit-site}"
LIMIT_BYTES=$((64 * 1024 * 1024))
MODE=install
PYVERS="3.11,3.12"  # the image's python3 is 3.12.3 (KINDS.md); --python 3.10 adds ~16 MiB (older fastapi, trl, transformers)
BNB_CUDA="128,130,132"  # the image's torch is 2.11.0+cu130; 128 for a CUDA 12.8 image (+6.8 MB)
PINNED="peft typer rich transformers"

while [ $# -gt 0 ]; do
  case "$1" in
    --prepare) MODE=prepare ;;
    --list) MODE=list ;;
    --python) PYVERS="$2"; shift ;;
    --bnb-cuda) BNB_CUDA="$2"; shift ;;
    --pinned) PINNED="$2"; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "gpu_setup.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

# The 'cuda' image's Python packages (docs: the device's KINDS.md, read 2026-11-17), canonical names.
DEVICE_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet
filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

# The wheels to carry for one Python version: name==version per line, from this checkout's .venv.
wheel_list() {
  DEVICE_HAS="$DEVICE_HAS" PINNED="$PINNED" "$HOST_PY" - "$1" "$ROOT/pyproject.toml" <<'EOF'
import os, re, sys, tomllib
from importlib import metadata
from packaging.requirements import Requirement

version, pyproject = sys.argv[1], sys.argv[2]
canon = lambda name: re.sub(r"[-_.]+", "-", name).lower()
has = {canon(n) for n in os.environ["DEVICE_HAS"].split()}
pinned = {canon(n) for n in os.environ["PINNED"].split()}
env = {"python_version": version, "python_full_version": version + ".0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
project = tomllib.load(open(pyproject, "rb"))["project"]
roots = [*project["dependencies"], *project["optional-dependencies"]["bench"],
         *project["optional-dependencies"]["gpu"], *sorted(pinned)]
carried, todo = {}, [Requirement(r) for r in roots]
while todo:
    req = todo.pop()
    name = canon(req.name)
    if (req.marker and not req.marker.evaluate(env)) or name in carried or (name in has and name not in pinned):
        continue
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:  # only another Python needs it (tomli < 3.11): the newest that fits
        carried[name] = str(req.specifier)
        continue
    carried[name] = "==" + dist.version
    todo += [Requirement(r) for r in dist.requires or []]
for name in sorted(carried):
    print(f"{name}{carried[name]}")
EOF
}

# bitsandbytes' wheel without the CUDA/ROCm/XPU libraries of other versions than BNB_CUDA (RECORD rewritten).
slim_bitsandbytes() {
  local wheel
  wheel=$(ls "$WHEELS"/bitsandbytes-*.whl 2>/dev/null | head -1) || true
  [ -n "$wheel" ] || return 0
  BNB_CUDA="$BNB_CUDA" "$HOST_PY" - "$wheel" <<'EOF'
import base64, hashlib, os, re, sys, zipfile
path = sys.argv[1]
keep = {f"libbitsandbytes_cuda{v.strip()}.so" for v in os.environ["BNB_CUDA"].split(",") if v.strip()}
def wanted(name):
    base = name.rsplit("/", 1)[-1]
    return not re.match(r"libbitsandbytes_(cuda|rocm|xpu)", base) or base in keep
with zipfile.ZipFile(path) as z:
    items = [(i, z.read(i.filename)) for i in z.infolist() if wanted(i.filename)]
if not any(i.filename.endswith(tuple(keep)) for i, _ in items):
    sys.exit(f"gpu_setup.sh: {os.path.basename(path)} has none of {sorted(keep)}: check --bnb-cuda")
record = next(i for i, _ in items if i.filename.endswith(".dist-info/RECORD"))
lines = []
for info, data in items:
    if info is record:
        continue
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    lines.append(f"{info.filename},sha256={digest},{len(data)}")
lines.append(f"{record.filename},,")
tmp = path + ".tmp"
with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
    for info, data in items:
        z.writestr(info, "\n".join(lines) + "\n" if info is record else data, zipfile.ZIP_DEFLATED)
os.replace(tmp, path)
print(f"bitsandbytes slimmed to {sorted(keep)}: {os.path.getsize(path) / 1e6:.1f} MB")
EOF
}

download() {  # download PYTHON_VERSION PIP_ARGS...: wheels for that Python into $WHEELS, no dependencies
  local v="$1"; shift
  "$HOST_PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$v" --implementation cp \
    "${PLATFORMS[@]}" -d "$WHEELS" "$@"
}

# One wheel at a time; where this checkout's version does not support Python $1 (fastapi 0.165 needs
# 3.11), the newest that does, and the requirements file says which.
download_each() {
  local v="$1" req="$CARRY/requirements-$1.txt" line name
  : > "$req.new"
  while read -r line; do
    name="${line%%[=<>]*}"
    if download "$v" "$line" 2>/dev/null; then
      echo "$line" >> "$req.new"
    else
      download "$v" "$name"
      echo "$name" >> "$req.new"
      echo "  python $v: $line has no wheel for it; carried the newest $name that has" >&2
    fi
  done < "$req"
  mv "$req.new" "$req"
}

tree_bytes() {  # what travels besides .gpu-carry: tracked and untracked-not-ignored files
  (cd "$ROOT" && { git ls-files -z; git ls-files -z --others --exclude-standard; } \
    | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
}

prepare() {
  mkdir -p "$WHEELS" "$CARRY/reference"
  rm -f "$WHEELS"/*.whl "$CARRY"/requirements-*.txt
  for v in ${PYVERS//,/ }; do
    wheel_list "$v" > "$CARRY/requirements-$v.txt"
    echo "python $v: $(wc -l < "$CARRY/requirements-$v.txt") wheels"
    download "$v" -r "$CARRY/requirements-$v.txt" 2>/dev/null || download_each "$v"
  done
  slim_bitsandbytes
  local ref="$ROOT/../shared/bench/seed_stack.py"
  if [ -f "$ref" ]; then cp "$ref" "$CARRY/reference/seed_stack.py"; else echo "warning: no $ref: the reference part will fail" >&2; fi
  local carry tree
  carry=$(du -sb "$CARRY" | cut -f1)
  tree=$(tree_bytes)
  "$HOST_PY" - "$CARRY" "$carry" "$tree" "$LIMIT_BYTES" "$PYVERS" "$BNB_CUDA" <<'EOF'
import json, os, sys, time
carry, carry_bytes, tree_bytes, limit = sys.argv[1], *map(int, sys.argv[2:5])
wheels = {w: os.path.getsize(os.path.join(carry, "wheels", w)) for w in sorted(os.listdir(os.path.join(carry, "wheels")))}
manifest = {"created": time.strftime("%Y-%m-%d"), "python": sys.argv[5].split(","), "bnb_cuda": sys.argv[6].split(","),
            "wheels": wheels, "carry_bytes": carry_bytes, "tree_bytes": tree_bytes, "limit_bytes": limit,
            "fits": carry_bytes + tree_bytes <= limit}
json.dump(manifest, open(os.path.join(carry, "manifest.json"), "w"), indent=1)
for w, b in sorted(wheels.items(), key=lambda x: -x[1])[:8]:
    print(f"  {b / 2**20:6.2f} MiB  {w}")
mib = lambda b: f"{b / 2**20:.1f} MiB"
print(f".gpu-carry {mib(carry_bytes)} + working tree {mib(tree_bytes)} = {mib(carry_bytes + tree_bytes)} of {mib(limit)}")
sys.exit(0 if manifest["fits"] else "gpu_setup.sh: over the 64 MiB a device call carries: drop --python versions or --pinned packages")
EOF
}

install() {
  local t0 py pyver req
  t0=$(date +%s)
  py="${LORAFIT_GPU_PYTHON:-python3}"  # the image's python3 (the one with torch)
  pyver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  req="$CARRY/requirements-$pyver.txt"
  if [ ! -f "$req" ]; then
    echo "gpu_setup.sh: no wheels for Python $pyver (prepared: $(ls "$CARRY" | grep -o 'requirements-.*\.txt' | tr '\n' ' '));" \
      "run --prepare --python $pyver here" >&2
    exit 3
  fi
  mkdir -p "$SITE"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    --find-links "$WHEELS" -r "$req"
  "$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir -e "$ROOT" >/dev/null 2>&1 \
    || echo "note: pip install -e . failed; lorafit runs from src/ on PYTHONPATH" >&2
  printf 'export PYTHONPATH=%s:%s${PYTHONPATH:+:$PYTHONPATH}\n' "$ROOT/src" "$SITE" > "$CARRY/env.sh"
  # shellcheck disable=SC1091
  . "$CARRY/env.sh"
  local name ok="" verify='import json
from importlib import metadata
import bitsandbytes, datasets, fastapi, gguf, peft, rich, transformers, trl, typer, uvicorn
import lorafit.cli.main, lorafit.serving.server
names = ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets", "typer", "rich",
         "fastapi", "uvicorn", "gguf", "cmeel-mimalloc", "nvidia-ml-py"]
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "missing"
print(json.dumps({name: version(name) for name in names}))'
  imports() { "$py" -c "$verify" >"$CARRY/versions.json" 2>"$CARRY/import-error.txt"; }
  if ! imports; then  # a pinned package may not fit the image: drop one at a time (the image has its own)
    mkdir -p "$SITE/.dropped"
    for name in $PINNED; do
      mv "$SITE/$name" "$SITE/$name"-*.dist-info "$SITE/.dropped/" 2>/dev/null || continue
      if imports; then ok=1; echo "gpu_setup.sh: the carried $name does not import here; the image's is used" >&2; break; fi
      mv "$SITE/.dropped/$name" "$SITE/.dropped/$name"-*.dist-info "$SITE/"
    done
    [ -n "$ok" ] || { cat "$CARRY/import-error.txt" >&2; exit 4; }
  fi
  cat "$CARRY/versions.json"
  echo "gpu_setup.sh: installed in $(( $(date +%s) - t0 )) s; now: . .gpu-carry/env.sh"
}

HOST_PY="$ROOT/.venv/bin/python"
[ -x "$HOST_PY" ] || HOST_PY=python3
case "$MODE" in
  prepare) prepare ;;
  list) for v in ${PYVERS//,/ }; do echo "# python $v"; wheel_list "$v"; done ;;
  install) install ;;
esac
