#!/usr/bin/env bash
# Create ./.venv with the pinned OpenMMLab 2 stack and mmdat (editable, with
# its C++ CPU kernels compiled in place: mmdat/ops/_C*.so, so that no run
# compiles anything). Idempotent: when everything is installed already it
# returns in seconds.
#
# mmcv 2.1.0 has no wheel for torch 2.14 and its setup.py asks for C++17,
# while torch >= 2.10 headers need C++20: we build it from the PyPI sdist with
# that one flag changed, and keep the wheel in ~/.cache/mmdat/wheels so a
# second set-up on the same machine installs it instantly.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
WHEELS="${MMDAT_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mmdat/wheels}"
STAMP="$VENV/.mmdat-setup"
KEY="$(cat "$ROOT/requirements.txt" "$ROOT/tools/setup_env.sh" "$ROOT/setup.py" | sha256sum | cut -c1-16)"
# the compiled kernels are those of the current csrc/ (else rebuilt below)
KERNELS_OK='from mmdat.ops import library as L; import sys
sys.exit(0 if L.build_info()["source"] == "aot" else 1)'

site_dir() { "$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ] && [ -L "$(site_dir)/mmdat" ] && \
   "$PY" -c 'import mmdat, mmcv.ops, mmdet, mmseg, mmpretrain, onnx, onnxruntime, pandas' >/dev/null 2>&1 && \
   MMDAT_EXT=aot "$PY" -W ignore -c "$KERNELS_OK" >/dev/null 2>&1; then
  exit 0
fi

log() { echo "[mmdat setup] $*"; }
pipi() { "$PY" -m pip install --disable-pip-version-check -q "$@" 2>&1 \
           | grep -v -e '^WARNING: Location' -e 'dependency resolver' \
                     -e 'which is incompatible' || true; \
         return "${PIPESTATUS[0]}"; }

need_apt=()
command -v g++ >/dev/null || need_apt+=(g++)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv python3-dev)
if [ "${#need_apt[@]}" -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    log "installing ${need_apt[*]} with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    log "please install: ${need_apt[*]} (needed to create the venv and build mmcv)"; exit 1
  fi
fi
if [ ! -x "$PY" ]; then
  log "creating $VENV"
  if command -v python3.11 >/dev/null; then python3.11 -m venv "$VENV"; else python3 -m venv "$VENV"; fi
fi
# setuptools < 81 still ships pkg_resources, which mmcv's setup.py imports
pipi --upgrade pip 'setuptools>=69,<81' wheel ninja
pipi torch==2.14.1 torchvision==0.29.1 'numpy<2'

if ! "$PY" -c 'import mmcv.ops' >/dev/null 2>&1; then
  mkdir -p "$WHEELS"
  whl="$(ls "$WHEELS"/mmcv-2.1.0-*.whl 2>/dev/null | head -n1 || true)"
  if [ -z "$whl" ]; then
    log "building mmcv 2.1.0 from source (about 15-25 minutes on 2 cores; done once per machine)"
    tmp="$(mktemp -d)"
    "$PY" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: \
      --no-build-isolation -d "$tmp" mmcv==2.1.0 2>&1 | grep -v '^WARNING: Location' || true
    tar -xzf "$tmp"/mmcv-2.1.0.tar.gz -C "$tmp"
    sed -i 's/-std=c++14/-std=c++20/g; s/-std=c++17/-std=c++20/g' "$tmp/mmcv-2.1.0/setup.py"
    (cd "$tmp/mmcv-2.1.0" && MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      "$PY" -m pip wheel --disable-pip-version-check -q --no-deps --no-build-isolation \
      -w "$WHEELS" . 2>&1 | grep -v '^WARNING: Location' || true)
    rm -rf "$tmp"
    whl="$(ls "$WHEELS"/mmcv-2.1.0-*.whl 2>/dev/null | head -n1 || true)"
    [ -n "$whl" ] || { log "mmcv build failed"; exit 1; }
  fi
  pipi --no-deps "$whl"
fi

log "installing the pinned stack"
# numpy<2 in every call that could pull numpy 2 (mmcv 2.1 is built against
# 1.x); pandas 3 needs numpy 2
pipi 'numpy<2' 'pandas<3' mmengine==0.10.7 'opencv-python<4.11' matplotlib pycocotools scipy shapely six \
  terminaltables tqdm packaging prettytable einops importlib-metadata mat4py modelindex \
  rich ftfy regex pytest hypothesis Click colorama model-index pandas requests tabulate
# ONNX export and its check (issue 13); in one call with numpy<2: ml_dtypes
# 0.6 (an onnx dependency) would upgrade numpy to 2.x, which mmcv 2.1 breaks on
pipi onnx==1.23.2 onnxruntime==1.32.0 'ml_dtypes<0.6' 'numpy<2'
# the three libraries pin mmcv ranges that pip would try to re-resolve from source;
# openmim's dataset-download dependency (openxlab) would downgrade setuptools.
pipi --no-deps mmdet==3.3.0 mmsegmentation==1.2.2 mmpretrain==1.2.0 openmim==0.3.9
# editable install; compiles the C++ CPU kernels (every instruction set,
# chosen at run time) into mmdat/ops/_C*.so: about a minute on 2 cores
log "installing mmdat (editable) and compiling its CPU kernels"
MAX_JOBS="${MAX_JOBS:-$(nproc)}" pipi --no-deps --no-build-isolation -e "$ROOT"
# openmim (`mim search mmdat`) reads <distribution location>/mmdat/.mim; a PEP
# 660 editable install keeps its dist-info in site-packages and no mmdat there:
# link the package (import mmdat finds the link first: the repository's files)
SITE="$(site_dir)"
if [ ! -e "$SITE/mmdat" ] || [ -L "$SITE/mmdat" ]; then
  ln -sfn "$ROOT/mmdat" "$SITE/mmdat"
fi
"$PY" -c 'import mmdat, mmcv.ops, mmdet, mmseg, mmpretrain, onnx, onnxruntime, pandas' >/dev/null
if ! MMDAT_EXT=aot "$PY" -W ignore -c "$KERNELS_OK"; then
  log "the compiled CPU kernels do not load:"
  MMDAT_EXT=aot "$PY" -W ignore -c 'from mmdat.ops import library as L; print(L.build_info())'
  exit 1
fi
"$PY" -c 'from mmdat.ops import library as L; i = L.build_info()
print("[mmdat setup] CPU kernels:", i["source"], i["isa"], "(runnable here: " + ", ".join(i["isas"]) + ")")'
echo "$KEY" > "$STAMP"
log "ready: $VENV"
