#!/bin/sh
# Runs inside the arm64 rootfs (chroot, qemu-user) on the venv layer, after
# image/overlay is copied in: meshpi itself from its wheel in $1, users and groups,
# then which units run. Used by scripts/build-image.
set -eu
wheels=$1
say() { printf 'finish: %s\n' "$*"; }

say "meshpi into /opt/meshpi (-> $(readlink /opt/meshpi))"
/opt/meshpi/bin/pip install --quiet --no-index --no-deps --no-cache-dir --disable-pip-version-check \
    "$wheels"/meshpi-*.whl
/opt/meshpi/bin/pip check
/opt/meshpi/bin/meshpi --help > /dev/null
/opt/meshpi/bin/meshpi-firstboot --help > /dev/null
/opt/meshpi/bin/meshpi-update --help > /dev/null
/opt/meshpi/bin/meshpi-upgrades --help > /dev/null
/opt/meshpi/bin/python -c 'import appliance.kernel.wireguard_netlink, webui'
# The commands an admin types (over SSH) on PATH.
for cmd in meshpi meshpi-control meshpi-web meshpi-update meshpi-upgrades; do
    ln -sf "/opt/meshpi/bin/$cmd" "/usr/local/bin/$cmd"
done

# The group of the agent's LocalAPI socket and the dashboard's user
# (image/overlay/usr/lib/sysusers.d/meshpi.conf).
say "users and groups"
systemd-sysusers

# Only what the appliance needs runs:
# - SSH is off until meshpi.toml gives a key (meshpi-firstboot turns it on); host keys
#   are made on the first boot by meshpi-ssh-keygen.service, so Debian's sshd-keygen
#   (which would race it) is off too;
# - Wi-Fi runs as wpa_supplicant@wlan0 (started when wlan0 appears and has a
#   configuration), not the D-Bus wpa_supplicant.service;
# - apt's timers (package lists, unattended-upgrades) only as prefs.auto_upgrades says,
#   in prefs.upgrade_window: meshpi-upgrades configures them below, and again at boot and
#   on every change of prefs.json (meshpi-upgrades.service, .path);
# - meshpi-control starts only on a Pi that created a mesh (meshpi create-mesh);
# - meshpi-imgtest runs only with meshpi.imgtest on the kernel command line.
say "units"
systemctl disable --quiet ssh.service sshd-keygen.service wpa_supplicant.service
systemctl enable --quiet meshpi-agent.service meshpi-firstboot.service meshpi-firstboot-mesh.service \
    meshpi-grow-rootfs.service meshpi-ssh-keygen.service meshpi-imgtest.service \
    meshpi-upgrades.service meshpi-upgrades.path
# The dashboard (socket-activated on port 80), its password reset from the boot
# partition and its first-run setup code, when the checkout has them.
for unit in meshpi-web.socket meshpi-password-reset.service meshpi-setup-code.service meshpi-update.path \
    meshpi-update-check.timer; do
    if [ -e "/etc/systemd/system/$unit" ] || [ -e "/usr/lib/systemd/system/$unit" ]; then
        systemctl enable --quiet "$unit"
    fi
done
# The agent's input policy (table inet meshpi): the dashboard on port 80 answers the
# LAN only (`meshpi set --dashboard-from-mesh` opens it to the mesh), SSH the LAN
# and the mesh; nothing else is filtered. Later `meshpi set`s merge into this file.
install -d -m 0700 /var/lib/meshpi
if [ ! -e /var/lib/meshpi/prefs.json ]; then
    install -m 0600 /dev/null /var/lib/meshpi/prefs.json
    printf '{"dashboard_port": 80, "ssh_port": 22}\n' > /var/lib/meshpi/prefs.json
fi
# Debian's security updates: apt's config and the timers' window from the prefs (defaults: on,
# 03:00-05:00).
/usr/local/bin/meshpi-upgrades configure --offline
say "enabled: $(systemctl list-unit-files --state=enabled --no-legend | awk '{print $1}' | paste -sd' ')"
say "done"
