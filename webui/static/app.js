// meshpi dashboard: live toggles, the traffic graph, the peer table and the log.
// Plain JavaScript, no library; every request goes to this device only.
"use strict";

(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;

  function send(method, url, body) {
    return fetch(url, {
      method: method,
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: body === undefined ? undefined : JSON.stringify(body),
    }).then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (doc) {
        if (!r.ok) throw new Error(doc.error || r.status + " " + r.statusText);
        return doc;
      });
    });
  }

  function getJSON(url) {
    return fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } }).then(function (r) {
      if (r.status === 401) { window.location.reload(); throw new Error("logged out"); }
      return r.json().then(function (doc) {
        if (!r.ok) throw new Error(doc.error || String(r.status));
        return doc;
      });
    });
  }

  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
  }

  function ago(t, now) {
    if (!t) return "never";
    const s = Math.max(0, Math.round(now - t));
    if (s < 90) return s + " s ago";
    if (s < 5400) return Math.floor(s / 60) + " min ago";
    if (s < 129600) return Math.floor(s / 3600) + " h ago";
    return Math.floor(s / 86400) + " days ago";
  }

  function setText(id, text) {
    const el = document.getElementById(id);
    if (el) el.textContent = text;
  }

  // Forms that ask first (revoke, leave the mesh).
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (ev) {
      if (!window.confirm(form.dataset.confirm)) ev.preventDefault();
    });
  });

  // Sharing toggles: take effect at once; the form posts the same without JavaScript.
  document.querySelectorAll("input[data-toggle]").forEach(function (box) {
    box.addEventListener("change", function () {
      const msg = document.getElementById("toggle-msg");
      const on = box.checked;
      box.disabled = true;
      msg.textContent = "Saving…";
      send("POST", "/api/share", { field: box.dataset.toggle, on: on })
        .then(function () {
          box.form.querySelector('input[name="on"]').value = on ? "0" : "1";
          msg.textContent = "Saved: the agent applies it now.";
        })
        .catch(function (e) {
          box.checked = !on;
          msg.textContent = "Not changed: " + e.message;
        })
        .finally(function () { box.disabled = false; });
    });
  });

  // Traffic graph and peers: poll /api/status every 2 s, rates from the byte counters.
  const canvas = document.getElementById("graph");
  if (canvas) {
    const samples = [];
    const keep = 90;
    let last = null;

    function draw() {
      const ratio = window.devicePixelRatio || 1;
      const w = canvas.clientWidth, h = canvas.clientHeight;
      canvas.width = w * ratio; canvas.height = h * ratio;
      const ctx = canvas.getContext("2d");
      ctx.scale(ratio, ratio);
      ctx.clearRect(0, 0, w, h);
      const top = Math.max(1024, ...samples.map(function (s) { return Math.max(s.rx, s.tx); }));
      const style = getComputedStyle(document.documentElement);
      ctx.fillStyle = style.getPropertyValue("--muted");
      ctx.font = "11px system-ui, sans-serif";
      ctx.fillText(bytes(top) + "/s", 4, 12);
      [["rx", "--rx"], ["tx", "--tx"]].forEach(function (pair) {
        ctx.strokeStyle = style.getPropertyValue(pair[1]);
        ctx.lineWidth = 2;
        ctx.beginPath();
        samples.forEach(function (s, i) {
          const x = w - (samples.length - 1 - i) * (w / (keep - 1));
          const y = h - 4 - (s[pair[0]] / top) * (h - 20);
          if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
        });
        ctx.stroke();
      });
    }

    function peerRow(p, now) {
      const tr = document.createElement("tr");
      const cells = [
        p.name + (p.exit_node ? " (exit)" : ""),
        (p.addresses || [""])[0],
        p.online ? "online" : "offline",
        (p.direct === undefined ? p.endpoint : p.direct) ? "direct" : "relayed",
        p.endpoint || "—",
        ago(p.last_handshake, now),
        bytes(p.rx_bytes || 0),
        bytes(p.tx_bytes || 0),
      ];
      cells.forEach(function (text, i) {
        const td = document.createElement("td");
        td.textContent = text;
        if (i === 2) td.className = p.online ? "online" : "offline";
        tr.appendChild(td);
      });
      return tr;
    }

    function update(st) {
      if (last && st.time > last.time) {
        const dt = st.time - last.time;
        samples.push({
          rx: Math.max(0, (st.rx_bytes - last.rx_bytes) / dt),
          tx: Math.max(0, (st.tx_bytes - last.tx_bytes) / dt),
        });
        if (samples.length > keep) samples.shift();
        const s = samples[samples.length - 1];
        setText("rate", bytes(s.rx) + "/s in, " + bytes(s.tx) + "/s out");
      }
      last = st;
      canvas.dataset.samples = String(samples.length);
      setText("totals", bytes(st.rx_bytes || 0) + " in, " + bytes(st.tx_bytes || 0) + " out");
      const control = st.control || {};
      const state = document.getElementById("control-state");
      if (state) { state.textContent = control.state || "unknown"; state.className = "state " + (control.state || ""); }
      setText("control-detail", control.detail || "");
      setText("led", st.led || "—");
      if (st.self) setText("node-addresses", (st.self.addresses || []).join(", "));
      const body = document.getElementById("peer-rows");
      if (body && st.peers) {
        const rows = st.peers.map(function (p) { return peerRow(p, st.time); });
        if (!rows.length) {
          const tr = document.createElement("tr"), td = document.createElement("td");
          td.colSpan = 8; td.className = "hint"; td.textContent = "No peers yet.";
          tr.appendChild(td); rows.push(tr);
        }
        body.replaceChildren.apply(body, rows);
      }
      draw();
    }

    function poll() {
      getJSON("/api/status").then(update).catch(function (e) { setText("rate", "no data: " + e.message); })
        .finally(function () { window.setTimeout(poll, 2000); });
    }
    poll();
  }

  // The log: append new lines every 2 s.
  const log = document.getElementById("log");
  if (log) {
    function stamp(t) {
      const d = new Date(t * 1000), p = function (n) { return String(n).padStart(2, "0"); };
      return d.getFullYear() + "-" + p(d.getMonth() + 1) + "-" + p(d.getDate()) + " " +
        p(d.getHours()) + ":" + p(d.getMinutes()) + ":" + p(d.getSeconds());
    }
    function pollLog() {
      getJSON("/api/logs?after=" + encodeURIComponent(log.dataset.after)).then(function (doc) {
        const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
        (doc.lines || []).forEach(function (ln) {
          const span = document.createElement("span");
          span.className = "lvl-" + String(ln.level).toLowerCase();
          span.textContent = stamp(ln.time) + " " + ln.level + " " + ln.message + "\n";
          log.appendChild(span);
          log.dataset.after = String(Math.max(Number(log.dataset.after), ln.seq));
        });
        if (atEnd) log.scrollTop = log.scrollHeight;
      }).catch(function () {}).finally(function () { window.setTimeout(pollLog, 2000); });
    }
    window.setTimeout(pollLog, 2000);
  }
})();
