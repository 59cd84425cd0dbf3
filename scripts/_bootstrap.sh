# Sourced by scripts/serve and scripts/test: make sure .venv exists and holds the project.
# Idempotent: a second run only reinstalls when setup.cfg changed since the last install.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
EXTRAS="${1:-}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
STAMP="$VENV/.installed${EXTRAS:+-$EXTRAS}"
if [ ! -f "$STAMP" ] || [ "$REPO/setup.cfg" -nt "$STAMP" ]; then
    "$VENV/bin/python" -m pip install --quiet -e "$REPO${EXTRAS:+[$EXTRAS]}"
    touch "$STAMP"
fi
