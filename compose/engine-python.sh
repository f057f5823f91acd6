# Sourced by the compose scripts (bash): `images VERB ...` runs compose/images.py and
# `engine VERB` compose/engine.py, the engine's API through the Docker SDK for Python, with
# $DUALPATH_PYTHON, else this checkout's .venv/bin/python (`make venv`), else python3.
DUALPATH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${DUALPATH_PYTHON:-}" ]; then
  DUALPATH_PYTHON=python3
  if [ -x "$DUALPATH_ROOT/.venv/bin/python" ]; then DUALPATH_PYTHON=$DUALPATH_ROOT/.venv/bin/python; fi
fi

# Whether $DUALPATH_PYTHON runs those modules: the SDK and what the project needs (a fresh
# machine before `make venv` has neither; Debian's python3 may have an SDK but not the rest).
# Asked once, here.
if PYTHONPATH="$DUALPATH_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$DUALPATH_PYTHON" \
  -c 'import compose.images' >/dev/null 2>&1; then
  DUALPATH_SDK=yes
else
  DUALPATH_SDK=no
fi
has_docker_sdk() { [ "$DUALPATH_SDK" = yes ]; }

_sdk_module() {
  local module=$1
  shift
  if ! has_docker_sdk; then
    echo "$module: $DUALPATH_PYTHON cannot import it (the Docker SDK for Python and the" \
      "project's dependencies): run make venv, or set DUALPATH_PYTHON to the venv's python" >&2
    return 1
  fi
  PYTHONPATH="$DUALPATH_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$DUALPATH_PYTHON" -m "$module" "$@"
}
images() { _sdk_module compose.images "$@"; }
engine() { _sdk_module compose.engine "$@"; }
