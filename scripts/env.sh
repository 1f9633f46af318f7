#!/usr/bin/env bash
# Sourced by scripts/demo and scripts/test: makes .venv once (CPU torch, herd editable, test extras)
# and puts it first on PATH. Re-installs only when pyproject.toml changes.
# HERD_TORCH overrides the torch requirement (e.g. "torch==2.13.0" is the default on this machine;
# elsewhere use "torch --index-url https://download.pytorch.org/whl/cpu" to avoid a CUDA download).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${HERD_VENV:-$root/.venv}
if [ ! -x "$venv/bin/python" ]; then
    echo "herd: creating virtual environment in $venv" >&2
    python3 -m venv "$venv"
fi
stamp="$venv/.herd-$(cat "$root/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "herd: installing torch and herd into $venv (once)" >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check ${HERD_TORCH:-torch==2.13.0}
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$root[test]"
    touch "$stamp"
fi
# The web page's browser test drives Debian's Chromium through chromedriver; install them once where
# this runs as root with apt (CI, fresh Debian machines). Elsewhere: apt install chromium chromium-driver.
if ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "herd: installing Debian's chromium and chromium-driver for the web page test (once)" >&2
    apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } ||
        echo "herd: could not install chromium; the web page test will fail" >&2
fi
export PATH="$venv/bin:$PATH"
