# A virtual environment at .venv with the project installed editable with its test extras.
set -euo pipefail
py=""
for cand in python3.12 python3.11 python3 /usr/bin/python3; do
  if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    py=$(command -v "$cand"); break
  fi
done
[ -n "$py" ] || { echo "setup: no Python >= 3.11 found" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  echo "    venv: creating .venv with $py"
  "$py" -m venv .venv
fi
stamp=.venv/.salvus-pyproject.sha256
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c 'import salvus_jobs' 2>/dev/null; then
  echo "    venv: up to date (pyproject.toml unchanged)"; exit 0
fi
# Skip the Cython build of cassandra-driver: minutes of compile for a registry that is not hot.
export CASS_DRIVER_NO_CYTHON=1
.venv/bin/python -m pip install -q --upgrade pip
echo "    venv: installing salvus-jobs (editable) with its optional groups and test extras"
.venv/bin/python -m pip install -q -e '.[test,all]'
echo "$want" > "$stamp"
