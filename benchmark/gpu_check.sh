#!/usr/bin/env bash
# The GPU check in one command, from the repository root (steps and table: benchmark/gpu_check.py):
#
#     bash benchmark/gpu_check.sh --out results/gpu            # on the GPU machine, with .whl/ from gpu_wheels.sh
#     bash benchmark/gpu_check.sh --out /tmp/gpu --dry-run     # without CUDA: the wheel set and the machinery
#
# Options: --steps install,pytest,algo_speed,sampler_throughput,ppo_atari (a subset, appended to the table),
# --limit STEP=SECONDS (another time limit for a step). PYTHON=/path/to/python sets the interpreter (default:
# the first of python, python3 that imports torch).
set -u

usage="bash benchmark/gpu_check.sh --out DIR [--dry-run] [--steps NAMES] [--limit STEP=SECONDS]"
out=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out|--steps|--limit)
            if [ $# -lt 2 ] || [ -z "$2" ]; then echo "error: $1 needs a value: $usage" >&2; exit 2; fi
            if [ "$1" = --out ]; then out=$2; else args+=("$1" "$2"); fi
            shift 2 ;;
        --out=*) out=${1#--out=}; shift ;;
        --dry-run) args+=("$1"); shift ;;
        -h|--help) sed -n '2,9p' "$0" | cut -c3-; exit 0 ;;
        *) echo "error: unknown argument '$1': $usage" >&2; exit 2 ;;
    esac
done
if [ -z "$out" ]; then
    echo "error: --out DIR is required (where gpu_check.md and the logs go): $usage" >&2
    exit 2
fi
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
if ! command -v timeout > /dev/null; then
    echo "error: the 'timeout' command (coreutils) is missing; install coreutils" >&2
    exit 2
fi
cd "$(dirname "$0")/.." || exit 2

python=${PYTHON:-}
if [ -z "$python" ]; then
    for candidate in python python3; do
        if command -v "$candidate" > /dev/null && "$candidate" -c "import torch" 2> /dev/null; then
            python=$candidate
            break
        fi
    done
fi
if [ -z "$python" ]; then
    echo "error: no Python here imports torch: set PYTHON=/path/to/python" >&2
    exit 2
fi
exec "$python" benchmark/gpu_check.py --out "$out" ${args[@]+"${args[@]}"}
