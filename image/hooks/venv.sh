#!/bin/sh
# Runs inside the arm64 rootfs (chroot, qemu-user) on the base layer: the venv of the
# image's own version, /opt/meshpi-versions/factory, with meshpi's dependencies, from
# the arm64 wheels in $1 (meshpi itself comes in the next layer, finish.sh, so a change
# to its code does not redo this ~4 min step). /opt/meshpi, what the units run, is a
# symlink to it; meshpi-update installs later versions beside it and moves the link.
# Used by scripts/build-image.
set -eu
wheels=$1
say() { printf 'venv: %s\n' "$*"; }

# The target's own python3 builds the venv, so /opt/meshpi matches the image's
# Python (3.13), whatever the host runs. Exactly the wheels given, nothing from an index.
say "venv /opt/meshpi-versions/factory"
rm -rf /opt/meshpi /opt/meshpi-versions
mkdir -p /opt/meshpi-versions
python3 -m venv /opt/meshpi-versions/factory
ln -s meshpi-versions/factory /opt/meshpi # relative: it resolves from the build host too
deps=$(ls "$wheels"/*.whl | grep -v '/meshpi-[^/]*\.whl$')
# shellcheck disable=SC2086 # one word per wheel
/opt/meshpi/bin/pip install --quiet --no-index --no-deps --no-cache-dir --disable-pip-version-check $deps
/opt/meshpi/bin/python -c 'import pyroute2, nacl, cryptography, flask, gpiozero'
say "done: $(echo "$deps" | wc -l) packages"
