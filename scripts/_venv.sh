# Sourced by scripts/test and scripts/demo: creates .venv and installs the project into it when
# it is missing or pyproject.toml changed since the last install.
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "trueloss-replay needs Python 3.10 or newer; set PYTHON=/path/to/python3.x" >&2
  exit 1
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [[ ! -f $stamp ]]; then
  echo "== setting up .venv (first run installs TensorFlow; a few minutes)"
  [[ -x .venv/bin/python ]] || "$PY" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install --quiet -e ".[dev,demo]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import trueloss_replay, tensorflow, jax, sklearn" \
    || { echo "installing trueloss-replay into .venv failed" >&2; exit 1; }
  rm -f .venv/.installed-* && touch "$stamp"
fi
