#!/usr/bin/env bash
# Install edgeagent as a systemd service in a virtual environment of its own (/opt/edgeagent),
# leaving the system Python alone: the way to install on PEP 668 systems (Debian 12, Raspberry
# Pi OS bookworm, Ubuntu 24.04) and a good one everywhere else (Ubuntu 22.04 / JetPack 6).
#
#   sudo scripts/install.sh                         # from PyPI, extras chosen for this box
#   sudo scripts/install.sh --source .              # from this checkout
#   sudo scripts/install.sh --extras gpu,litert --pip-arg=--extra-index-url=URL   # Jetson
#
# It makes the venv, installs edgeagent with one onnxruntime build (cpu or gpu) and LiteRT,
# then runs the venv's `edgeagent install-service`: the unit (ExecStart= the venv's edgeagent),
# /etc/edgeagent/agent.toml if none exists, and the system user. Running it again upgrades the
# venv in place and rewrites the unit; the configuration is kept. Options: --help.
set -euo pipefail

PREFIX=/opt/edgeagent
EXTRAS=""
SOURCE=edgeagent
VERSION=""
ROOT=/
SERVICE_USER=edgeagent
PYTHON=${PYTHON:-python3}
SERVICE=1
ENABLE=0
PIP_ARGS=()
ORIG_ARGS=("$@")

usage() {
  cat <<'EOF'
usage: sudo install.sh [options]
  --prefix DIR     the virtual environment (default /opt/edgeagent)
  --extras LIST    pip extras (default: gpu,litert where an NVIDIA GPU is found, else cpu,litert);
                   exactly one of cpu and gpu (they install the same module)
  --source SPEC    what pip installs: edgeagent (default, from PyPI), a checkout or a wheel
  --version VER    with the default source: that release (edgeagent==VER)
  --pip-arg ARG    passed to pip install (repeatable), e.g. --pip-arg=--extra-index-url=URL
  --user NAME      the service user (default edgeagent)
  --python PATH    Python 3.10 or newer to make the venv with (default python3)
  --root DIR       write the unit and config under DIR, for images and tests (no user is made,
                   systemd is not touched; the unit names PREFIX as seen from DIR)
  --no-service     only make the venv and install the package
  --enable         also enable and start the service (systemctl enable --now edgeagent)
EOF
}

die() { echo "install.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX=${2:?}; shift ;;
    --prefix=*) PREFIX=${1#*=} ;;
    --extras) EXTRAS=${2:?}; shift ;;
    --extras=*) EXTRAS=${1#*=} ;;
    --source) SOURCE=${2:?}; shift ;;
    --source=*) SOURCE=${1#*=} ;;
    --version) VERSION=${2:?}; shift ;;
    --version=*) VERSION=${1#*=} ;;
    --pip-arg) PIP_ARGS+=("${2:?}"); shift ;;
    --pip-arg=*) PIP_ARGS+=("${1#*=}") ;;
    --user) SERVICE_USER=${2:?}; shift ;;
    --user=*) SERVICE_USER=${1#*=} ;;
    --python) PYTHON=${2:?}; shift ;;
    --python=*) PYTHON=${1#*=} ;;
    --root) ROOT=${2:?}; shift ;;
    --root=*) ROOT=${1#*=} ;;
    --no-service) SERVICE=0 ;;
    --enable) ENABLE=1 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option $1" ;;
  esac
  shift
done

case "$PREFIX" in /*) ;; *) die "--prefix must be an absolute path, got $PREFIX" ;; esac
case "$ROOT" in /*) ;; *) die "--root must be an absolute path, got $ROOT" ;; esac
ROOT=${ROOT%/}; ROOT=${ROOT:-/}
exec_start=""
if [ "$ROOT" != / ]; then
  case "$PREFIX/" in
    "$ROOT"/*) exec_start="/${PREFIX#"$ROOT"/}/bin/edgeagent"; exec_start=${exec_start//\/\///} ;;
    *) die "--prefix $PREFIX is not under --root $ROOT" ;;
  esac
fi
if [ "$ROOT" = / ] && [ "$(id -u)" != 0 ]; then
  die "run as root (sudo $0 ...): it writes $PREFIX, the systemd unit and /etc/edgeagent"
fi

# --- Python: 3.10 or newer, with venv (Debian and Ubuntu split it into python3-venv) ---------
command -v "$PYTHON" >/dev/null 2>&1 || die "no $PYTHON: install Python 3.10 or newer \
(apt install python3 python3-venv), or name one with --python"
"$PYTHON" - <<'PYEOF' || die "edgeagent needs Python 3.10 or newer; $PYTHON is older (JetPack 6 \
ships 3.10, Debian 12 3.11, Ubuntu 24.04 3.12): name another with --python"
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PYEOF
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || die "$PYTHON cannot make virtual \
environments: apt install python3-venv (Debian, Raspberry Pi OS, Ubuntu)"

# --- Which onnxruntime build ----------------------------------------------------------------
jetson=0
[ -f /etc/nv_tegra_release ] && jetson=1
if [ -z "$EXTRAS" ]; then
  if [ "$jetson" = 1 ] || [ -e /proc/driver/nvidia/version ]; then
    EXTRAS=gpu,litert
  else
    EXTRAS=cpu,litert
  fi
fi
case ",$EXTRAS," in
  *,cpu,*gpu,*|*,gpu,*cpu,*) die "--extras names both cpu and gpu: they install the same \
onnxruntime module and overwrite each other; pick one" ;;
esac
if [ "$jetson" = 1 ] && [[ ",$EXTRAS," == *,gpu,* ]] && [[ " ${PIP_ARGS[*]-} " != *index-url* ]]
then
  die "on Jetson, onnxruntime-gpu comes from NVIDIA's JetPack wheel index, not PyPI: pass \
--pip-arg=--extra-index-url=URL with the index for your JetPack (see the README), or \
--extras cpu,litert for the CPU build"
fi

if [ "$SOURCE" = edgeagent ]; then
  spec="edgeagent[$EXTRAS]${VERSION:+==$VERSION}"
else
  [ -z "$VERSION" ] || die "--version applies to the default source only"
  case "$SOURCE" in
    /*|./*|../*|.) SOURCE=$(cd "$(dirname "$SOURCE")" && pwd)/$(basename "$SOURCE") ;;
  esac
  SOURCE=${SOURCE%/.}
  spec="$SOURCE[$EXTRAS]"
fi

# --- The virtual environment ----------------------------------------------------------------
if [ -x "$PREFIX/bin/python" ]; then
  echo "upgrading the virtual environment in $PREFIX"
else
  echo "making a virtual environment in $PREFIX ($("$PYTHON" --version 2>&1))"
  mkdir -p "$(dirname "$PREFIX")"
  "$PYTHON" -m venv "$PREFIX"
fi
echo "installing $spec"
"$PREFIX/bin/python" -m pip install --disable-pip-version-check -q --upgrade \
  ${PIP_ARGS[@]+"${PIP_ARGS[@]}"} "$spec"
"$PREFIX/bin/edgeagent" --version

[ "$SERVICE" = 1 ] || { echo "done (no service: --no-service)"; exit 0; }

# --- The unit, a starting configuration, the user -------------------------------------------
args=(install-service --user "$SERVICE_USER")
if [ "$ROOT" != / ]; then
  args+=(--prefix "$ROOT" --exec "$exec_start")
fi
"$PREFIX/bin/edgeagent" "${args[@]}"
# Shell completion, where the shells look for it.
if [ -d "${ROOT%/}/usr/share/bash-completion/completions" ]; then
  "$PREFIX/bin/edgeagent" completion bash > "${ROOT%/}/usr/share/bash-completion/completions/edgeagent"
fi
if [ -d "${ROOT%/}/usr/share/zsh/vendor-completions" ]; then
  "$PREFIX/bin/edgeagent" completion zsh > "${ROOT%/}/usr/share/zsh/vendor-completions/_edgeagent"
fi
if [ ! -x "${ROOT%/}/bin/kill" ]; then
  echo "install.sh: warning: no /bin/kill: 'systemctl reload edgeagent' needs it (apt install procps)" >&2
fi
if [ "$ROOT" = / ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  if [ "$ENABLE" = 1 ]; then
    systemctl enable --now edgeagent
    systemctl --no-pager status edgeagent || true
  fi
fi
cat <<EOF

edgeagent is installed in $PREFIX (the system Python is untouched).
  check the box:      $PREFIX/bin/edgeagent probe
  start the service:  sudo systemctl enable --now edgeagent
  upgrade later:      sudo $0 ${ORIG_ARGS[*]-}  (or: sudo $PREFIX/bin/pip install -U '$spec')
  commands on PATH:   sudo ln -s $PREFIX/bin/edgeagent /usr/local/bin/edgeagent
EOF
