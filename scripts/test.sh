#!/usr/bin/env bash
# Install everything the project needs (idempotent), then run the checks and the whole test suite:
# lint and formatting (ruff), types (mypy --strict on services/ and operator/), protocol schema
# drift, pytest.
# Tests start their own Redis, PostgreSQL and S3 servers on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"
ruff check services operator tests bench scripts
ruff format --check services operator tests bench scripts
echo "== mypy"
mypy
echo "== protocol schemas"
python scripts/gen_schemas.py --check
echo "== pytest"
pytest -q -p no:cacheprovider "$@"
