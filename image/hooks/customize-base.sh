#!/bin/sh
# mmdebstrap --customize-hook for the cached base rootfs (packages only, no meshpi):
# Pi boot configuration, one initramfs, reproducible host identity, no baked-in secrets.
set -eu
root=$1
say() { printf 'customize-base: %s\n' "$*"; }

# The initramfs fsck hook would otherwise probe the chroot's (missing) root device
# and leave fsck out of the initramfs.
mkdir -p "$root/etc/initramfs-tools/conf.d"
echo FSTYPE=ext4 > "$root/etc/initramfs-tools/conf.d/fstype"

# /etc/default/raspi-firmware drives config.txt and cmdline.txt. In a chroot its hook
# can detect neither the board nor the consoles, so say what one image for all boards needs:
# - root by label, whatever the SD/USB device is called;
# - no cma=: the hook would add cma=64M (it cannot see a Pi 4, where that option can
#   make the board unbootable), and a headless appliance needs no CMA pool for vc4;
# - the Pi 3/4 serial console (ttyS1) last, so boot messages go there, plus HDMI.
set_default() { # KEY VALUE: replace the commented-out default
    sed -i "s|^#\\?$1=.*|$1=$2|" "$root/etc/default/raspi-firmware"
    grep -q "^$1=$2\$" "$root/etc/default/raspi-firmware"
}
set_default ROOTPART LABEL=RASPIROOT
set_default CMA 0
set_default CONSOLES '"tty0 ttyS1,115200"'

say "building the initramfs (once)"
rm "$root/usr/sbin/update-initramfs"
chroot "$root" dpkg-divert --quiet --local --rename \
    --divert /usr/sbin/update-initramfs.meshpi-diverted --remove /usr/sbin/update-initramfs
chroot "$root" update-initramfs -c -k all
# The raspi-firmware kernel hook copies kernel, initrd, dtbs and blobs into
# /boot/firmware and writes config.txt + cmdline.txt; run it again now that the
# initrd exists and ROOTPART is set.
for moddir in "$root"/lib/modules/*; do
    # (It exits early unless it sees a dpkg "configure".)
    chroot "$root" env DEB_MAINT_PARAMS=configure \
        /etc/kernel/postinst.d/z50-raspi-firmware "$(basename "$moddir")"
done
grep -q 'root=LABEL=RASPIROOT' "$root/boot/firmware/cmdline.txt"
if grep -q 'cma=' "$root/boot/firmware/cmdline.txt"; then say "cma= in cmdline.txt"; exit 1; fi
say "cmdline.txt: $(cat "$root/boot/firmware/cmdline.txt")"
ls "$root"/boot/firmware/initrd.img* > /dev/null

# Every card must get its own SSH host keys (meshpi-ssh-keygen.service makes them
# at first boot) and machine-id (systemd's first-boot logic).
rm -f "$root"/etc/ssh/ssh_host_*
printf 'uninitialized\n' > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"

echo meshpi > "$root/etc/hostname"
ln -sf ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"

chroot "$root" systemctl enable --quiet systemd-networkd.service systemd-resolved.service
say "done"
