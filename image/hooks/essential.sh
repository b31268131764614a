#!/bin/sh
# mmdebstrap --essential-hook: runs after the Essential packages, before --include ones.
# Divert update-initramfs to /bin/true while packages install: the kernel and the
# raspi-firmware trigger would each build an initramfs (about 225 s each under
# emulation). customize-base.sh restores it and builds one, once.
set -eu
root=$1
chroot "$root" dpkg-divert --quiet --local --rename \
    --divert /usr/sbin/update-initramfs.meshpi-diverted --add /usr/sbin/update-initramfs
ln -s /bin/true "$root/usr/sbin/update-initramfs"
