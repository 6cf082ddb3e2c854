# Shared by scripts/run-agent and scripts/run-tests: make .venv and install the project with the
# extras given in $EXTRAS, skipping the install when pyproject.toml has not changed since.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" - <<'PYEOF' || { echo "edgeagent needs Python 3.10 or newer (set PYTHON=/path/to/python3.x)" >&2; exit 2; }
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PYEOF
if [ ! -x .venv/bin/python ]; then
  echo "setting up .venv ..." >&2
  "$PY" -m venv .venv
fi
stamp=".venv/.edgeagent-installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-${EXTRAS//,/-}"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -U pip >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[${EXTRAS}]" >&2
  rm -f .venv/.edgeagent-installed-*
  touch "$stamp"
fi
