#!/bin/sh
# Runs inside the arm64 rootfs (chroot, qemu-user) after image/overlay is copied in:
# the meshpi venv from the wheels in $1, then our units. Used by scripts/build-image.
set -eu
wheels=$1
say() { printf 'finish: %s\n' "$*"; }

# The target's own python3 builds the venv, so /opt/meshpi matches the image's
# Python (3.13), whatever the host runs. Dependencies come only from the arm64 wheels.
say "venv /opt/meshpi"
rm -rf /opt/meshpi
python3 -m venv /opt/meshpi
/opt/meshpi/bin/pip install --quiet --no-index --no-cache-dir --disable-pip-version-check \
    --find-links "$wheels" meshpi
/opt/meshpi/bin/meshpi --help > /dev/null
/opt/meshpi/bin/python -c 'import appliance.kernel.wireguard_netlink, pyroute2, nacl, cryptography, flask, gpiozero'

# meshpi-agent.service stays disabled until the control plane (or first boot) writes
# /etc/meshpi/netmap.json and prefs.json. meshpi-imgtest only runs with
# `meshpi.imgtest` on the kernel command line.
say "units"
systemctl enable --quiet meshpi-ssh-keygen.service meshpi-imgtest.service
install -d -m 0755 /etc/meshpi
say "done"
