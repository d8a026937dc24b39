#!/usr/bin/env bash
# Recompile requirements.txt (the lock) from requirements.in with pip-tools.
#
#   pip install pip-tools && bash tools/update_lock.sh            # keep every pin that still fits
#   bash tools/update_lock.sh --upgrade                           # newest versions allowed by requirements.in
#   bash tools/update_lock.sh --upgrade-package transformers      # one package (and what it needs)
#
# After any change of the lock: install it into a fresh virtual environment, re-run every notebook
# there (jupyter nbconvert --to notebook --execute --inplace NOTEBOOK.ipynb) and run pytest; commit
# the lock and the re-run notebooks together.
set -euo pipefail
cd "$(dirname "$0")/.."
CUSTOM_COMPILE_COMMAND="bash tools/update_lock.sh" pip-compile --quiet --allow-unsafe --strip-extras --no-emit-find-links --no-emit-index-url \
    --output-file=requirements.txt "$@" requirements.in
# pip resolves torch to the local CPU wheel of the course machines, 2.13.0+cpu. The lock keeps the
# plain version: on those machines it still takes that wheel, and on a GPU machine the CUDA build of
# the same version (installed first, see the README) satisfies it instead of being replaced.
sed -i -E 's/^(torch==[0-9.]+)\+cpu$/\1/' requirements.txt
