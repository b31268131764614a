#!/bin/sh
# Runs inside the arm64 rootfs (chroot, qemu-user) last, after finish.sh: takes out
# what a Pi 3/4/400/CM4/Zero 2 W appliance never reads, so the image is smaller
# (issue 14: <= 250 MB compressed). Used by scripts/build-image.
#
# Kept: everything to boot any of those boards (firmware start*.elf/fixup*.dat of the
# default configuration, the bcm27xx device trees, the whole initramfs), to get on the
# network (Ethernet, USB network adapters, the onboard Wi-Fi, PCIe NICs a CM4 carrier
# board takes), and every module a kept module depends on (vc4's HDMI needs cec and
# snd: they stay). /etc/dpkg/dpkg.cfg.d/meshpi-slim (image/overlay) keeps later apt
# installs from bringing docs, man pages and translations back.
set -eu
say() { printf 'slim: %s\n' "$*"; }
mb() { du -sm "$@" 2>/dev/null | awk '{s += $1} END {print s + 0}'; }

# Documentation, man and info pages, translations: no one reads them on the Pi (over
# SSH, `man` is not installed). Licences (copyright files) stay.
docs() { mb /usr/share/doc /usr/share/man /usr/share/info /usr/share/locale /usr/share/lintian; }
before=$(docs)
find /usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete
find /usr/share/doc -mindepth 1 -type d -empty -delete
rm -rf /usr/share/man/* /usr/share/info/* /usr/share/lintian
find /usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
say "docs, man pages, translations: -$((before - $(docs))) MB"

# The firmware's alternative start files (start_x: camera, start_db: debug, start_cd:
# cut-down) are used only when config.txt names them (start_x=1, start_debug=1,
# gpu_mem=16), which meshpi's does not. The kernel hook copies what is left.
before=$(mb /boot/firmware /usr/lib/raspi-firmware)
for dir in /boot/firmware /usr/lib/raspi-firmware; do
    rm -f "$dir"/start_x.elf "$dir"/start_db.elf "$dir"/start_cd.elf "$dir"/start4x.elf \
        "$dir"/start4db.elf "$dir"/start4cd.elf "$dir"/fixup_x.dat "$dir"/fixup_db.dat \
        "$dir"/fixup_cd.dat "$dir"/fixup4x.dat "$dir"/fixup4db.dat "$dir"/fixup4cd.dat
done
say "firmware start/fixup variants: -$((before - $(mb /boot/firmware /usr/lib/raspi-firmware))) MB"

# Device trees of other vendors' boards (Debian's arm64 kernel carries every one);
# the raspi-firmware hook copies the broadcom ones to /boot/firmware.
before=$(mb /usr/lib/linux-image-*)
for dir in /usr/lib/linux-image-*/*/; do
    [ "$(basename "$dir")" = broadcom ] || rm -rf "$dir"
done
say "device trees of other boards: -$((before - $(mb /usr/lib/linux-image-*))) MB"

# Kernel modules for hardware a Pi cannot have or an exit node does not use: sound,
# TV/cameras, other GPUs, InfiniBand, CAN, WWAN, other vendors' Wi-Fi (their firmware
# is not in the image either) and server NICs. A module any kept module depends on is
# kept (modules.dep), then depmod writes the index again.
before=$(mb /usr/lib/modules)
for kver in $(ls /usr/lib/modules); do
    python3 - "/usr/lib/modules/$kver" <<'EOF'
import os
import sys

root = sys.argv[1]
DROP = ("kernel/sound/", "kernel/drivers/media/", "kernel/drivers/gpu/", "kernel/drivers/infiniband/",
        "kernel/drivers/net/can/", "kernel/drivers/net/wwan/", "kernel/drivers/net/wireless/",
        "kernel/drivers/net/ethernet/")
KEEP = ("kernel/drivers/gpu/drm/vc4/", "kernel/drivers/net/wireless/broadcom/",
        "kernel/drivers/net/ethernet/broadcom/", "kernel/drivers/net/ethernet/intel/",
        "kernel/drivers/net/ethernet/realtek/", "kernel/drivers/net/ethernet/microchip/")
deps = {}
with open(os.path.join(root, "modules.dep")) as f:
    for line in f:
        module, _, needs = line.partition(":")
        deps[module] = needs.split()
kept = {m for m in deps if not m.startswith(DROP) or m.startswith(KEEP)}
todo = list(kept)
while todo:
    for need in deps.get(todo.pop(), ()):
        if need not in kept:
            kept.add(need)
            todo.append(need)
gone = [m for m in deps if m not in kept]
for module in gone:
    os.remove(os.path.join(root, module))
print(f"slim: {len(gone)} of {len(deps)} modules removed, {len(kept)} kept")
EOF
    find "/usr/lib/modules/$kver/kernel" -type d -empty -delete
    depmod -a "$kver"
done
say "kernel modules: -$((before - $(mb /usr/lib/modules))) MB"

# pip stays in the factory venv (~17 MB on disk): meshpi-update copies it into the
# next version's venv; ensurepip instead took 55 s of the first update under qemu.

# apt's package lists and caches are downloaded again by `apt update`.
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb
say "done"
