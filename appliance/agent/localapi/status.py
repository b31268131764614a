"""What `/v1/status` and `/metrics` say, made from what the agent knows: its
applied netmap, the kernel's peer counters, the control link's status file, the
LEDs. `peer_rows`, `detect_lan`, `metrics_text` and `format_status` are pure.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from appliance.agent.localapi.connected import ONLINE_WITHIN, HostedRow, connected_rows
from appliance.agent.localapi.headline import Facts, headline
from appliance.base.keys import PublicKey
from appliance.base.net import IPAddress
from appliance.base.version import installed_version
from appliance.core.model import Connected, HostedDevice
from appliance.core.upgrades import format_upgrades
from appliance.kernel.base import KernelError, PeerStats
from appliance.leds.states import LedState
from appliance.update.state import update_slot
from appliance.wire.netmap import Netmap

if TYPE_CHECKING:
    from appliance.agent.control.local import LocalControl
    from appliance.agent.inputs import Inputs
    from appliance.core.prefs import Prefs
    from appliance.kernel.base import WgDevice


class StatusView(Protocol):
    """What status needs of the agent: reads only (the agent is one)."""

    last_error: str | None  # the last apply or input failure, until one succeeds

    def control_status(self) -> dict[str, Any]: ...
    def applied(self) -> Inputs | None: ...
    def read_device(self) -> WgDevice | None: ...
    def stored_prefs(self) -> Prefs: ...
    def led_state(self) -> str: ...
    def connected(self) -> tuple[Connected, ...]: ...
    def lan_address(self, dev: str, prefixes: list[str]) -> str | None: ...
    def firstboot_report(self) -> dict[str, Any] | None: ...
    def route_conflicts(self) -> list[str]: ...
    def reach_status(self) -> dict[str, Any] | None: ...
    def path_status(self) -> Mapping[PublicKey, str] | None: ...
    def hosted_rows(self) -> list[HostedRow]: ...
    def traffic_active(self) -> Mapping[PublicKey, float]: ...
    def exit_users(self) -> frozenset[IPAddress]: ...
    def reach_report(self) -> dict[str, Any] | None: ...
    def dns_status(self) -> dict[str, Any] | None: ...
    def upgrades_report(self) -> dict[str, Any]: ...
    def dataplane_status(self) -> dict[str, Any]: ...


EXIT_ROUTES = frozenset({"0.0.0.0/0", "::/0"})


def meshpi_version() -> str:
    return installed_version("meshpi") or "unknown"


def agent_status(agent: StatusView, local: LocalControl | None) -> dict[str, Any]:
    out: dict[str, Any] = {"agent": "running", "version": meshpi_version(), "control": agent.control_status()}
    inputs = agent.applied()
    stats: Mapping[PublicKey, PeerStats] = {}
    out["interface"] = None
    try:
        device = agent.read_device()
    except KernelError as e:
        out["error"] = str(e)
        device = None
    if device is not None and inputs is not None:
        stats = device.stats
        out["interface"] = inputs.scope.interface
    if inputs is not None:
        me = inputs.netmap.self_node
        out["self"] = {"name": me.name, "addresses": [str(a) for a in me.addresses],
                       "public_key": str(me.public_key)}  # fmt: skip
        out["self"]["dns_name"] = fqdn(inputs.netmap, me.dns_name)
    out["prefs"] = agent.stored_prefs().to_json()
    paths = agent.path_status()
    peers = peer_rows(inputs.netmap if inputs is not None else None, stats, time.time(), paths)
    out["peers"] = peers
    devices = device_rows(inputs.devices if inputs is not None else (), stats, time.time())
    if inputs is not None:
        named = {a: d.dns_name for d in inputs.netmap.self_node.devices for a in d.addresses}
        for row, d in zip(devices, inputs.devices, strict=True):
            row["dns_name"] = next((fqdn(inputs.netmap, named[a]) for a in d.addresses if a in named), None)
    out["devices"] = devices
    out["dns"] = agent.dns_status()
    out["dataplane"] = agent.dataplane_status()
    out["led"] = agent.led_state()
    out["route_conflicts"] = agent.route_conflicts()
    out["reach"] = agent.reach_status()
    hosted = agent.hosted_rows()
    names: dict[PublicKey, str] = {}
    if inputs is not None:
        names = {p.public_key: n for p in inputs.netmap.peers if (n := fqdn(inputs.netmap, p.dns_name))}
        names |= {d.public_key: row["dns_name"] for row, d in zip(devices, inputs.devices, strict=True)
                  if row.get("dns_name")}  # fmt: skip
    connected = connected_rows(
        inputs.netmap if inputs is not None else None, hosted, stats, time.time(), paths,
        agent.traffic_active(), agent.exit_users(), names,
    )  # fmt: skip
    out["connected"] = connected
    # Every byte the kernel counts is a row's: the totals are the rows' sums.
    out["rx_bytes"] = sum(p["rx_bytes"] for p in connected)
    out["tx_bytes"] = sum(p["tx_bytes"] for p in connected)
    out["update"] = update_slot(out["version"])
    out["upgrades"] = agent.upgrades_report()  # Debian's security updates (core/upgrades.py)
    hub = out["prefs"].get("advertise_exit_node", False) or bool(hosted)
    out["headline"] = headline(
        headline_facts(
            out, agent.reach_report(), hub, [r["name"] for r in connected if r["uses_exit"]], agent.last_error
        )  # fmt: skip
    )
    out["lan"] = lan_of(agent)
    out["local_control"] = (
        local.status(out["lan"]) if local is not None else {"running": False, "login_url": None}
    )
    firstboot = agent.firstboot_report()
    if firstboot is not None:
        out["firstboot"] = firstboot
    return out


def headline_facts(status: Mapping[str, Any], report: Mapping[str, Any] | None, hub: bool,
                   exit_users: list[str], last_error: str | None = None) -> Facts:  # fmt: skip
    """The headline's facts from the status made so far and netcheck's report."""
    control = status.get("control", {})
    error = status.get("error") or last_error
    reachable: bool | None = None
    why = endpoint = None
    if report is not None:
        # Nothing probed yet (no STUN round, no mapping, no endpoint given): not known.
        checked = any(report.get(k) for k in ("udp", "stun_errors", "mapped", "reachable"))
        reachable = bool(report.get("reachable")) if checked else None
        why = report.get("why")
        advertised = status.get("prefs", {}).get("advertise_endpoints") or []
        endpoint = report.get("mapped") or (advertised[0] if advertised else None)
        if endpoint is None and reachable:
            endpoint = report.get("ipv6")
    return Facts(
        control=str(control.get("state", "")),
        control_detail=str(control.get("detail", "") or ""),
        error=error,
        hub=hub,
        reachable=reachable,
        reach_why=why,
        public_endpoint=endpoint,
        exit_users=tuple(exit_users),
    )


def lan_of(agent: StatusView) -> dict[str, Any] | None:
    lan = detect_lan(agent.connected())
    if lan is not None:
        lan["address"] = agent.lan_address(lan["interface"], lan["prefixes"])
    return lan


def device_rows(
    devices: Sequence[HostedDevice], stats: Mapping[PublicKey, PeerStats], now: float
) -> list[dict[str, Any]]:
    """The phones this node hosts, as the kernel sees them."""
    rows = []
    for d in devices:
        s = stats.get(d.public_key)
        handshake = s.last_handshake if s is not None else None
        rows.append({
            "name": d.name,
            "public_key": str(d.public_key),
            "addresses": [str(a) for a in d.addresses],
            "endpoint": str(s.endpoint) if s is not None and s.endpoint else None,
            "online": handshake is not None and now - handshake < ONLINE_WITHIN,
            "last_handshake": handshake,
            "rx_bytes": s.rx_bytes if s is not None else 0,
            "tx_bytes": s.tx_bytes if s is not None else 0,
        })  # fmt: skip
    return rows


def peer_rows(
    netmap: Netmap | None,
    stats: Mapping[PublicKey, PeerStats],
    now: float,
    paths: Mapping[PublicKey, str] | None = None,
) -> list[dict[str, Any]]:
    """`paths`: reach/paths.py's label per peer ("direct <endpoint>", "relayed",
    "trying"); a peer it has not chosen for yet is "trying" (the kernel's endpoint
    may be the netmap's candidate, unproven). Without a chooser (static mode,
    `paths` None) a known endpoint is a direct path."""
    rows = []
    for peer in netmap.peers if netmap is not None else ():
        s = stats.get(peer.public_key)
        handshake = s.last_handshake if s is not None else None
        endpoint = s.endpoint if s is not None and s.endpoint else peer.endpoint
        if paths is not None:
            path = paths.get(peer.public_key, "trying")
        else:
            path = f"direct {endpoint}" if endpoint else "trying"
        routes = [str(r) for r in peer.routes]
        rows.append({
            "name": peer.name,
            "public_key": str(peer.public_key),
            "addresses": [str(a) for a in peer.addresses],
            "routes": routes,
            "endpoint": str(endpoint) if endpoint else None,
            "online": handshake is not None and now - handshake < ONLINE_WITHIN,
            "last_handshake": handshake,
            "rx_bytes": s.rx_bytes if s is not None else 0,
            "tx_bytes": s.tx_bytes if s is not None else 0,
            "exit_node": bool(EXIT_ROUTES & set(routes)),
            "path": path,
            "direct": path.startswith("direct"),
            "dns_name": fqdn(netmap, peer.dns_name),
        })  # fmt: skip
    return rows


def fqdn(netmap: Netmap | None, label: str | None) -> str | None:
    """`label.domain`, or None without a name (control from before names, static mode)."""
    if netmap is None or netmap.dns is None or label is None:
        return None
    return netmap.dns.fqdn(label)


def detect_lan(connected: Sequence[Connected]) -> dict[str, Any] | None:
    """The LAN, for the setup page: the first interface with a private IPv4
    prefix, and its private prefixes (RFC 1918, ULA)."""
    for c in connected:
        if c.network.version == 4 and c.network.is_private:
            prefixes = [str(o.network) for o in connected if o.dev == c.dev and o.network.is_private]
            return {"interface": c.dev, "prefixes": prefixes}
    return None


def metrics_text(status: Mapping[str, Any], changes_applied: int) -> str:
    """Prometheus text exposition format 0.0.4."""
    peers = status.get("peers", [])
    connected = status.get("control", {}).get("state") == "connected"
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: Iterable[tuple[str, int]]) -> None:
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    metric("meshpi_peers", "gauge", "Peers in the netmap.", [("", len(peers))])
    metric("meshpi_peers_online", "gauge", "Peers with a handshake in the last 3 minutes.",
           [("", sum(1 for p in peers if p["online"]))])  # fmt: skip
    for way, word in (("rx", "received from"), ("tx", "sent to")):
        metric(f"meshpi_{way}_bytes_total", "counter", f"Bytes {word} each peer through the tunnel.",
               [(_labels(peer=p["name"]), p[f"{way}_bytes"]) for p in peers])  # fmt: skip
    metric("meshpi_changes_applied_total", "counter", "Changes applied to the system since the start.",
           [("", changes_applied)])  # fmt: skip
    metric("meshpi_control_connected", "gauge", "1 while the control link is connected (0 in static mode).",
           [("", int(connected))])  # fmt: skip
    metric("meshpi_led_state", "gauge", "The status LEDs' state: 1 for the one shown.",
           [(_labels(state=s.value), int(s.value == status.get("led"))) for s in LedState])  # fmt: skip
    return "\n".join(lines) + "\n"


def _labels(**labels: str) -> str:
    def escape(text: str) -> str:
        return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


def update_line(up: Mapping[str, Any]) -> str:
    """The `update` slot in words: what runs, what is under way, the last result, what is offered."""
    words = [f"meshpi {up.get('current', '?')}"]
    if up.get("installing"):
        words.append(f"installing {up['installing'].get('version') or 'an upload'} "
                     f"({up['installing'].get('step', '')})")  # fmt: skip
    last = up.get("last")
    if last:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(last["time"])) if last.get("time") else "?"
        what = f"last update {when}: {last.get('result')} {last.get('version') or ''}".rstrip()
        words.append(what + (f" ({last['reason']})" if last.get("reason") else ""))
    if up.get("available"):
        words.append(f"{up['available'].get('version')} available")
    checked = up.get("checked") or {}
    if checked.get("error"):
        words.append(f"update check failed: {checked['error']}")
    return "; ".join(words)


def format_status(st: Mapping[str, Any]) -> str:
    """`meshpi status` for people."""
    control = st.get("control", {})
    headline = st.get("headline")
    lines = [f"{headline['level'].upper()}: {headline['text']}"] if headline else []
    lines += [
        f"agent: {st['agent']} (meshpi {st.get('version', '?')}), LED {st.get('led', '?')}",
        f"control: {control.get('state')} {control.get('detail', '')}".rstrip(),
    ]
    if "self" in st:
        me = st["self"]
        lines.append(f"this node: {me['name']} {' '.join(me['addresses'])} on {st.get('interface') or '-'}")
        if me.get("dns_name"):
            lines.append(f"dns name: {me['dns_name']}")
    dns = st.get("dns")
    if dns:
        serving = ", ".join(dns.get("serving") or []) or "not serving"
        other = ", ".join(dns.get("upstreams") or []) or "nowhere (fail closed)"
        lines.append(f"dns: {dns.get('domain', '-')} on {serving}; other names to {other}"
                     + (f"; error: {dns['error']}" if dns.get("error") else ""))  # fmt: skip
    if "error" in st:
        lines.append(f"error: {st['error']}")
    if st.get("update"):
        lines.append(f"update: {update_line(st['update'])}")
    reach = st.get("reach")
    if reach:
        mapping = reach.get("port_mapping") or {}
        via = f"{mapping.get('protocol')} {mapping.get('external')}" if mapping.get("external") else "none"
        lines.append(f"endpoints: {', '.join(reach['endpoints']) or 'none known'} (port mapping: {via})")
    if st.get("upgrades"):
        lines.append(format_upgrades(st["upgrades"], time.time()))
    for conflict in st.get("route_conflicts", []):
        lines.append(f"local network wins: {conflict}")
    exits = {p["public_key"] for p in st.get("peers", []) if p.get("exit_node")}
    for p in st.get("connected", []):
        seen = p["last_seen"]
        ago = f"{time.time() - seen:.0f}s ago" if seen else "never"
        first = p["addresses"][0] if p["addresses"] else "-"
        state = p["state"] if p["enabled"] else "disabled"
        lines.append(
            f"  {p['name']:<16} {first:<15} {p['kind']:<8} {state:<8}"
            f" seen {ago:<10} rx {p['rx_bytes']} tx {p['tx_bytes']}"
            + (" exit-node" if p["id"] in exits else "")
            + (" uses-this-exit" if p["uses_exit"] else "")
            + (f" {p['path']}" if p["path"] else "")
            + (f" {p['dns_name']}" if p.get("dns_name") else "")
        )
    return "\n".join(lines)
