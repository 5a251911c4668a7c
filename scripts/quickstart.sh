#!/usr/bin/env bash
# Sets up the project and trains a tiny Stable Diffusion LoRA on the bundled images, on CPU, no cluster.
# Ends by listing the output folder. Pass extra `--set key=value` overrides through.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/lora-train --config examples/quickstart-sd.yaml --set overwrite=true "$@"
