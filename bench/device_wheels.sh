#!/bin/bash
# The wheels a GPU machine needs beside its own JAX to run train.py, evaluate.py and bench/cosmosim_problems.py,
# downloaded here for Python 3.12 on x86-64 Linux into DIR (default .whl): tensorflow-datasets and grain with the
# dependencies such an image lacks, and CosmoSim. Measured on the lent H100/H200 image of 2026-11/12 (jax 0.11.2 with
# CUDA, flax, optax, orbax-checkpoint, pandas, OpenCV, protobuf and etils installed, these not); 18 MB in all.
#
#   bash bench/device_wheels.sh [DIR]
#
# There, before the command:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site
set -eu -o pipefail
DIR=${1:-.whl}
mkdir -p "$DIR"
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)
WHEELS=(
    tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 grain==0.2.18
    array_record==0.8.6 dm-tree==0.1.10 simple-parsing==0.1.9 docstring_parser==0.18.0 immutabledict==4.3.1
    termcolor==3.3.0 toml==0.10.2 portpicker==1.6.0 importlib_resources==7.1.0 cascadict==0.8.5 cosmosim==3.3.0
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]/#/--platform=}" -d "$DIR" "${WHEELS[@]}"
# promise (tensorflow-datasets needs it) is published as a source archive only: a pure-Python wheel built here.
python3 -m pip wheel -q --no-deps -w "$DIR" promise==2.3
ls "$DIR"
