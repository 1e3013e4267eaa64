#!/usr/bin/env bash
# Download into .whl/ the wheels that a bare GPU machine lacks, for `bash benchmark/gpu_check.sh` to install
# there without network. Run from anywhere, on a machine with network:
#
#     bash benchmark/gpu_wheels.sh
#
# The GPU machine is taken to have CPython 3.12 (manylinux x86_64) with torch (CUDA), numpy and torch's own
# dependencies, and nothing else. The set: what common/, algos/, benchmark/ and tests/test_cuda.py import
# (gymnasium, ale-py, mujoco, tyro), what those import at run time (gymnasium's MuJoCo envs import glfw and
# imageio), the dependencies each declares (pillow for imageio), and pytest with pytest-xdist. Not in it:
# - wandb: imported only with --track (and by `common.evaluate --track`);
# - mujoco (the meta package) and mujoco-studio (12 MiB): the `mujoco` module is mujoco-core's;
# - opencv-python-headless (54 MiB): where the GPU machine has no cv2, gpu_check.sh puts
#   benchmark/cv2_numpy/cv2.py on the path instead (common/envs.py's only OpenCV call, bit for bit).
# The versions are those of the development environment the benchmarks were run in. The script prints the
# wheels and their total size, fails above 60 MiB, and checks that the set covers every import
# (python benchmark/gpu_check.py --check-wheels).
set -euo pipefail

WHEELS=(
    gymnasium==1.4.0 cloudpickle==3.1.3 farama-notifications==0.0.6 typing-extensions==4.16.0
    ale-py==0.12.1
    mujoco-core==4.0.0 glfw==2.11.0 imageio==2.38.2 pillow==13.0.0
    tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1
    pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 pygments==2.21.0
    pytest-xdist==3.8.0 execnet==2.1.2
)
MAX_MIB=60

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
rm -rf .whl
mkdir .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d .whl "${WHEELS[@]}"

ls -l .whl/*.whl | awk '{printf "%10d  %s\n", $5, $NF}'
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
"$PYTHON" -c "import sys; print(f'{len(sys.argv) - 2} wheels, {int(sys.argv[1]) / 2**20:.1f} MiB in .whl/')" \
    "$total" .whl/*.whl
if [ "$total" -gt $((MAX_MIB * 1024 * 1024)) ]; then
    echo "error: the wheels take more than $MAX_MIB MiB: leave out a package the GPU check does not need" >&2
    exit 1
fi
"$PYTHON" benchmark/gpu_check.py --check-wheels
