#!/usr/bin/env bash
# Install meshpi on an existing Raspberry Pi OS or Debian system (a Pi 5 included),
# as root: the same services as the SD-card image, from this checkout.
#
#   sudo ./scripts/install.sh [--wheels DIR] [--no-start]
#   sudo ./scripts/install.sh --uninstall [--purge] [--no-start]
#
#   --wheels DIR  meshpi and its dependencies from the wheels in DIR only (offline; e.g.
#                 `pip wheel -w DIR .` made elsewhere); default: meshpi from this
#                 checkout, its dependencies from pip's index
#   --no-start    enable the units but do not start, restart or stop anything (the same
#                 happens by itself where systemd is not running, e.g. in a chroot)
#   --uninstall   stop and remove the units, the venv, the users and groups;
#                 /var/lib/meshpi* (keys, the mesh's database) stay
#   --purge       with --uninstall: remove /var/lib/meshpi, /var/lib/meshpi-control (and
#                 its DynamicUser copy in /var/lib/private), /var/lib/meshpi-web and the
#                 trusted update keys in /etc/meshpi/update-keys too
#
# Steps (one line each, "ok" when there was nothing to do: a second run changes nothing
# and says so):
#   packages  python3 python3-venv nftables iproute2 wireguard-tools avahi-daemon
#   venv      /opt/meshpi-versions/factory, and /opt/meshpi -> it (rebuilt only when the
#             source or the wheels changed; meshpi-update installs later versions beside it)
#   commands  meshpi, meshpi-control, meshpi-web, meshpi-update linked into /usr/local/bin
#   keys      /etc/meshpi/update-keys (the keys whose update bundles are trusted: none yet)
#   users     group meshpi (the agent's LocalAPI socket), user meshpi-web (systemd-sysusers)
#   units     meshpi-agent, meshpi-control, meshpi-web.socket/.service, meshpi-password-reset,
#             from image/overlay, into /usr/local/lib/systemd/system; networkd told to
#             leave the agent's rules and routes alone (/etc/systemd/networkd.conf.d)
#   enable    all but meshpi-control (`meshpi create-mesh` enables that one)
#   upgrades  Debian's security updates (unattended-upgrades: security and stable-updates
#             only, nightly in prefs.upgrade_window): apt's config and timers, meshpi-upgrades
# The last line is JSON: {"changed": [...], "action": "install"|"uninstall"}.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SRC=$PWD

say() { printf 'install: %-8s %s\n' "$1" "${*:2}"; }
die() { printf 'install: ERROR: %s\n' "$*" >&2; exit 1; }

WHEELS="" START=1 ACTION=install PURGE=0
while (($#)); do
    case $1 in
        --wheels) WHEELS=$(realpath "${2:?--wheels needs a directory}"); shift 2 ;;
        --no-start) START=0; shift ;;
        --uninstall) ACTION=uninstall; shift ;;
        --purge) PURGE=1; shift ;;
        -h | --help) sed -n '2,/^set -e/p' "$0" | sed -n 's/^# \{0,1\}//p'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
[[ $(id -u) -eq 0 ]] || die "must run as root. Try: sudo $0 $*"
((PURGE == 0)) || [[ $ACTION == uninstall ]] || die "--purge goes with --uninstall"
[[ -z $WHEELS || -d $WHEELS ]] || die "--wheels $WHEELS: no such directory"

VERSIONS=/opt/meshpi-versions
VENV=$VERSIONS/factory
CURRENT=/opt/meshpi # what the units run: a symlink to the version in use
KEYS=/etc/meshpi/update-keys
UNIT_DIR=/usr/local/lib/systemd/system
SYSUSERS=/usr/local/lib/sysusers.d/meshpi.conf
AVAHI=/etc/avahi/services/meshpi.service
# systemd-networkd, where it runs, leaves the agent's rules and routes alone (a networkd
# restart no longer takes them away until the agent's next resync).
NETWORKD=/etc/systemd/networkd.conf.d/meshpi.conf
STAMP=$VENV/.meshpi-install
PACKAGES=(python3 python3-venv nftables iproute2 wireguard-tools avahi-daemon unattended-upgrades)
# The units the image runs that make sense on any Debian: not first boot, not the
# image's self-test, not growing the SD card's partition.
UNITS=(usr/lib/systemd/system/meshpi-agent.service usr/lib/systemd/system/meshpi-control.service
    etc/systemd/system/meshpi-web.socket etc/systemd/system/meshpi-web.service
    usr/lib/systemd/system/meshpi-password-reset.service
    usr/lib/systemd/system/meshpi-upgrades.service usr/lib/systemd/system/meshpi-upgrades.path
    usr/lib/systemd/system/meshpi-update.path usr/lib/systemd/system/meshpi-update.service
    usr/lib/systemd/system/meshpi-update-check.timer usr/lib/systemd/system/meshpi-update-check.service)
# (meshpi-password-reset: a new dashboard password from /boot/firmware/meshpi-password.txt,
# where Raspberry Pi OS has its boot partition too.)
ENABLE=(meshpi-agent.service meshpi-web.socket meshpi-password-reset.service
    meshpi-upgrades.service meshpi-upgrades.path meshpi-update.path meshpi-update-check.timer)
START=(meshpi-agent.service meshpi-web.socket meshpi-upgrades.path meshpi-update.path
    meshpi-update-check.timer) # what runs from now on
COMMANDS=(meshpi meshpi-control meshpi-web meshpi-update meshpi-upgrades) # linked into /usr/local/bin
# meshpi-upgrades' apt config and drop-ins for apt's timers (appliance/kernel/upgrades.py)
UPGRADE_FILES=(/etc/apt/apt.conf.d/52meshpi-upgrades /etc/systemd/system/apt-daily.timer.d/meshpi.conf
    /etc/systemd/system/apt-daily-upgrade.timer.d/meshpi.conf)
changed=()

# systemd as PID 1 means units can start; in a chroot or container build, only enable.
if [[ -d /run/systemd/system ]] && ((START)); then LIVE=1; else LIVE=0; fi
live_note() { ((LIVE)) || say "$1" "systemd is not running here (or --no-start): $2"; }

finish() {
    if ((${#changed[@]})); then
        say done "${ACTION}ed; changed: ${changed[*]}"
    else
        say done "nothing changed: already ${ACTION}ed"
    fi
    printf '{"action": "%s", "changed": [%s]}\n' "$ACTION" \
        "$( ((${#changed[@]})) && printf '"%s",' "${changed[@]}" | sed 's/,$//')"
}

# -------------------------------------------------------------------------- uninstall
if [[ $ACTION == uninstall ]]; then
    units_here=()
    for unit in "${UNITS[@]}"; do
        [[ -e $UNIT_DIR/${unit##*/} ]] && units_here+=("${unit##*/}")
    done
    if ((${#units_here[@]})); then
        if ((LIVE)); then
            systemctl disable --quiet --now "${units_here[@]}"
        else
            systemctl disable --quiet "${units_here[@]}"
        fi
        # Stopping the agent leaves the data plane up on purpose (a restart takes it over);
        # leaving for good takes it down: interface, routes, rules, nft table, sysctls.
        if ((LIVE)) && [[ -x $CURRENT/bin/meshpi ]]; then
            "$CURRENT/bin/meshpi" down --state-dir /var/lib/meshpi >/dev/null 2>&1 \
                || say units "meshpi down found nothing to remove"
        fi
        (cd "$UNIT_DIR" && rm -f "${units_here[@]}")
        ((LIVE)) && systemctl daemon-reload
        say units "removed ${units_here[*]}"
        changed+=(units)
    else
        say units "ok (none installed)"
    fi
    # apt's hooks call meshpi-upgrades: its config goes before the command does. Debian's
    # own unattended-upgrades config (and the timers' state) stays as it is.
    upgrade_files=()
    for f in "${UPGRADE_FILES[@]}"; do [[ -e $f ]] && upgrade_files+=("$f"); done
    if ((${#upgrade_files[@]})); then
        rm -f "${upgrade_files[@]}"
        rmdir --ignore-fail-on-non-empty /etc/systemd/system/apt-daily.timer.d \
            /etc/systemd/system/apt-daily-upgrade.timer.d 2>/dev/null || true
        ((LIVE)) && systemctl daemon-reload
        say upgrades "removed ${upgrade_files[*]}"
        changed+=(upgrades)
    else
        say upgrades "ok (no meshpi config for apt)"
    fi
    for cmd in "${COMMANDS[@]}"; do
        [[ $(readlink "/usr/local/bin/$cmd" 2>/dev/null) == "$CURRENT/bin/$cmd" ]] && rm -f "/usr/local/bin/$cmd"
    done
    if [[ -e $CURRENT || -L $CURRENT || -e $VERSIONS ]]; then
        rm -rf "$CURRENT" "$VERSIONS"
        say venv "removed $CURRENT, $VERSIONS and the commands in /usr/local/bin"
        changed+=(venv)
    else
        say venv "ok (no $CURRENT)"
    fi
    removed=()
    if getent passwd meshpi-web >/dev/null; then userdel meshpi-web && removed+=(user:meshpi-web); fi
    for group in meshpi-web meshpi; do
        if getent group "$group" >/dev/null; then groupdel "$group" && removed+=("group:$group"); fi
    done
    rm -f "$SYSUSERS" "$AVAHI" "$NETWORKD"
    if ((${#removed[@]})); then
        say users "removed ${removed[*]}"
        changed+=(users)
    else
        say users "ok (none)"
    fi
    state=(/var/lib/meshpi /var/lib/meshpi-control /var/lib/meshpi-web /var/lib/private/meshpi-control "$KEYS")
    if ((PURGE)); then
        present=()
        for dir in "${state[@]}"; do [[ -e $dir ]] && present+=("$dir"); done
        if ((${#present[@]})); then
            rm -rf "${present[@]}"
            say state "removed ${present[*]}"
            changed+=(state)
        else
            say state "ok (none)"
        fi
    else
        for dir in "${state[@]}"; do [[ -e $dir ]] && say state "kept $dir (--purge removes it)"; done
    fi
    finish
    exit 0
fi

# -------------------------------------------------------------------------- install
[[ -f $SRC/pyproject.toml && -d $SRC/image/overlay ]] || die "run it from a meshpi checkout ($SRC is not one)"

missing=()
for pkg in "${PACKAGES[@]}"; do
    [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true) == "install ok installed" ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
    say packages "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    changed+=(packages)
else
    say packages "ok (${PACKAGES[*]})"
fi
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "meshpi needs Python 3.11 or newer; this system has $(python3 --version) (Debian 12 / Raspberry Pi OS bookworm or newer)"

# What the venv is made from: the wheels, or this checkout's source.
if [[ -n $WHEELS ]]; then
    source_id="wheels $(cd "$WHEELS" && find . -maxdepth 1 -name '*.whl' | LC_ALL=C sort | xargs -r sha256sum | sha256sum | cut -c1-16)"
else
    source_id="checkout $(find pyproject.toml appliance webui -type f ! -path '*/__pycache__/*' ! -name '*.pyc' \
        | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)"
fi
source_id="$source_id $(python3 --version)"
if [[ -x $VENV/bin/meshpi && $(cat "$STAMP" 2>/dev/null) == "$source_id" && $(readlink "$CURRENT") == "${VENV#/opt/}" ]]; then
    say venv "ok ($CURRENT -> $VENV, $source_id)"
else
    say venv "building $VENV from the ${source_id%% *}"
    # A fresh venv each time, so no file of an older meshpi lingers; the stamp is
    # written last, so a failed build is redone by the next run.
    rm -rf "$VENV"
    mkdir -p "$VERSIONS"
    python3 -m venv "$VENV"
    pip=("$VENV/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir)
    if [[ -n $WHEELS ]]; then
        "${pip[@]}" --no-index --find-links "$WHEELS" meshpi
    else
        "${pip[@]}" "$SRC"
    fi
    "$VENV/bin/meshpi" --help >/dev/null
    echo "$source_id" > "$STAMP"
    # An /opt/meshpi of an older install is a venv itself: the link replaces it. A link
    # to another version (meshpi-update's) is moved back: this checkout is what was asked.
    [[ -L $CURRENT ]] || rm -rf "$CURRENT"
    # Relative, so that it also resolves from outside a chroot the install ran in.
    ln -sfn "${VENV#/opt/}" "$CURRENT.new" && mv -T "$CURRENT.new" "$CURRENT"
    changed+=(venv)
fi

links=()
for cmd in "${COMMANDS[@]}"; do
    [[ $(readlink "/usr/local/bin/$cmd" 2>/dev/null) == "$CURRENT/bin/$cmd" ]] && continue
    ln -sfn "$CURRENT/bin/$cmd" "/usr/local/bin/$cmd"
    links+=("$cmd")
done
if ((${#links[@]})); then
    say commands "${links[*]} in /usr/local/bin"
    changed+=(commands)
else
    say commands "ok (${COMMANDS[*]} in /usr/local/bin)"
fi

if [[ -d $KEYS ]]; then
    say keys "ok ($KEYS: $(find "$KEYS" -name '*.pub' | wc -l) trusted)"
else
    install -d -m 0755 "$KEYS"
    install -m 0644 image/overlay/etc/meshpi/update-keys/README "$KEYS/README"
    say keys "$KEYS made: no update key trusted yet (see its README)"
    changed+=(keys)
fi

# same SRC DEST: true when DEST exists with SRC's content.
same() { [[ -f $2 ]] && cmp -s "$1" "$2"; }

sysusers_src=image/overlay/usr/lib/sysusers.d/meshpi.conf
if ! same "$sysusers_src" "$SYSUSERS" || ! getent group meshpi >/dev/null || ! getent passwd meshpi-web >/dev/null; then
    install -D -m 0644 "$sysusers_src" "$SYSUSERS"
    systemd-sysusers "$SYSUSERS"
    say users "group meshpi, user meshpi-web (member of meshpi)"
    changed+=(users)
else
    say users "ok (meshpi, meshpi-web)"
fi

new_units=()
for unit in "${UNITS[@]}"; do
    [[ -f image/overlay/$unit ]] || { say units "no $unit in this checkout: skipped"; continue; }
    same "image/overlay/$unit" "$UNIT_DIR/${unit##*/}" && continue
    install -D -m 0644 "image/overlay/$unit" "$UNIT_DIR/${unit##*/}"
    new_units+=("${unit##*/}")
done
avahi_src=image/overlay/etc/avahi/services/meshpi.service
if [[ -d ${AVAHI%/*} ]] && ! same "$avahi_src" "$AVAHI"; then
    install -m 0644 "$avahi_src" "$AVAHI"
    new_units+=("$AVAHI")
fi
networkd_src=image/overlay/etc/systemd/networkd.conf.d/meshpi.conf
if ! same "$networkd_src" "$NETWORKD"; then
    install -D -m 0644 "$networkd_src" "$NETWORKD" # read when networkd next starts
    new_units+=("$NETWORKD")
fi
if ((${#new_units[@]})); then
    ((LIVE)) && systemctl daemon-reload
    say units "installed ${new_units[*]} in $UNIT_DIR"
    changed+=(units)
else
    say units "ok (${UNITS[*]##*/})"
fi

to_enable=()
for unit in "${ENABLE[@]}"; do
    [[ -e $UNIT_DIR/$unit ]] || continue
    [[ $(systemctl is-enabled "$unit" 2>/dev/null || true) == enabled ]] || to_enable+=("$unit")
done
if ((${#to_enable[@]})); then
    systemctl enable --quiet "${to_enable[@]}"
    say enable "${to_enable[*]}"
    changed+=(enable)
else
    say enable "ok (${ENABLE[*]})"
fi

# Debian's security updates as the prefs say (defaults: on, 03:00-05:00); prints what it changed.
offline=()
((LIVE)) || offline=(--offline)
upgrades=$("$CURRENT/bin/meshpi-upgrades" configure --prefs /var/lib/meshpi/prefs.json "${offline[@]}") \
    || die "meshpi-upgrades configure failed"
if [[ $upgrades == '{"changed": []}' ]]; then
    say upgrades "ok (apt: security and stable-updates, nightly)"
else
    say upgrades "$upgrades"
    changed+=(upgrades)
fi

if ((LIVE)); then
    # New code or units reach running services; a restarted agent takes the data plane over.
    for unit in "${START[@]}"; do
        [[ -e $UNIT_DIR/$unit ]] || continue
        if ! systemctl is-active --quiet "$unit"; then
            systemctl start "$unit" && say start "$unit"
        elif ((${#changed[@]})) && [[ " ${changed[*]} " =~ \ (venv|units)\  ]]; then
            systemctl restart "$unit" && say start "restarted $unit"
        fi
    done
else
    live_note start "enabled, not started"
fi
finish
