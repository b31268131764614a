// meshpi dashboard: live toggles, the live region (headline, connected list), the traffic
// graph, copy buttons and the log. Plain JavaScript, no library; every request goes to
// this device only. The server renders every piece of HTML; this only swaps it in.
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

  function setText(id, text) {
    const el = document.getElementById(id);
    if (el) el.textContent = text;
  }

  function cssVar(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  // Forms that ask first (revoke, leave the mesh); delegated, as rows are swapped live.
  document.addEventListener("submit", function (ev) {
    const form = ev.target;
    if (form.dataset && form.dataset.confirm && !window.confirm(form.dataset.confirm)) ev.preventDefault();
  });

  // Copy buttons. A dashboard on plain HTTP is not a secure context, where
  // navigator.clipboard is absent: then the older copy command does it.
  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "sr";
    document.body.appendChild(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    return ok ? Promise.resolve() : Promise.reject(new Error("copy refused"));
  }
  document.addEventListener("click", function (ev) {
    const button = ev.target.closest ? ev.target.closest("button.copy") : null;
    if (!button) return;
    const label = button.dataset.label || button.textContent;
    button.dataset.label = label;
    copyText(button.dataset.copy).then(function () {
      button.textContent = "Copied"; button.classList.add("done");
    }, function () {
      button.textContent = "Select and copy it by hand";
    }).finally(function () {
      window.setTimeout(function () { button.textContent = label; button.classList.remove("done"); }, 2000);
    });
  });

  // The QR code: never narrower than a camera decodes (the server says how wide that is).
  const qr = document.getElementById("qr");
  if (qr && qr.dataset.min) qr.style.minWidth = Math.min(Number(qr.dataset.min), window.screen.width) + "px";

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

  // -- traffic: the agent's per-minute history, the big graph and the row sparklines --
  let history = null;

  function line(ctx, values, xOf, yOf, color) {
    ctx.strokeStyle = color;
    ctx.lineWidth = 1.6;
    ctx.beginPath();
    values.forEach(function (v, i) { if (i === 0) ctx.moveTo(xOf(i), yOf(v)); else ctx.lineTo(xOf(i), yOf(v)); });
    ctx.stroke();
  }

  function fit(canvas) {
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    canvas.width = Math.round(w * ratio); canvas.height = Math.round(h * ratio);
    const ctx = canvas.getContext("2d");
    ctx.scale(ratio, ratio);
    ctx.clearRect(0, 0, w, h);
    return { ctx: ctx, w: w, h: h };
  }

  function drawSparks() {
    document.querySelectorAll("tr[data-id] canvas.spark").forEach(function (canvas) {
      const id = canvas.closest("tr").dataset.id;
      const series = history && history.peers ? history.peers[id] : null;
      const c = fit(canvas);
      if (!series) return;
      const n = Math.min(30, series.rx.length);  // the last half hour
      const rx = series.rx.slice(-n), tx = series.tx.slice(-n);
      const top = Math.max(1, Math.max.apply(null, rx.concat(tx)));
      const xOf = function (i) { return n < 2 ? c.w : (i * (c.w - 2)) / (n - 1) + 1; };
      const yOf = function (v) { return c.h - 2 - (v / top) * (c.h - 4); };
      line(c.ctx, rx, xOf, yOf, cssVar("--rx"));
      line(c.ctx, tx, xOf, yOf, cssVar("--tx"));
      canvas.dataset.points = String(n);
    });
  }

  function hhmm(t) {
    const d = new Date(t * 1000);
    return String(d.getHours()).padStart(2, "0") + ":" + String(d.getMinutes()).padStart(2, "0");
  }

  function drawGraph(canvas) {
    const c = fit(canvas), ctx = c.ctx;
    const minutes = Number(canvas.dataset.minutes);
    const left = 4, right = c.w - 4, top = 16, bottom = c.h - 18;
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = cssVar("--muted");
    ctx.strokeStyle = cssVar("--line");
    ctx.lineWidth = 1;
    if (!history) { ctx.fillText("no history yet", left, top); return; }
    const step = history.step || 60, end = history.end;
    const start = end - minutes * 60;
    const xOfTime = function (t) { return left + ((t - start) / (end - start)) * (right - left); };
    // Time axis: a tick every 10 min (1 h), hour (6 h) or 3 hours (24 h), on the clock.
    const every = minutes <= 60 ? 600 : minutes <= 360 ? 3600 : 10800;
    const offset = new Date().getTimezoneOffset() * 60;
    let labels = 0;
    for (let t = Math.ceil((start - offset) / every) * every + offset; t <= end; t += every) {
      const x = xOfTime(t);
      ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, bottom); ctx.stroke();
      const text = hhmm(t), w = ctx.measureText(text).width;
      if (x - w / 2 >= left && x + w / 2 <= right) { ctx.fillText(text, x - w / 2, c.h - 4); labels++; }
    }
    ctx.beginPath(); ctx.moveTo(left, bottom); ctx.lineTo(right, bottom); ctx.stroke();
    const rx = history.total.rx.slice(-minutes), tx = history.total.tx.slice(-minutes);
    const n = rx.length;
    const peak = Math.max(1024, Math.max.apply(null, rx.concat(tx, [0])));
    ctx.fillText("peak " + bytes(peak / step) + "/s", left + 2, top - 4);
    const xOf = function (i) { return xOfTime(end - (n - 1 - i) * step); };
    const yOf = function (v) { return bottom - (v / peak) * (bottom - top); };
    line(ctx, rx, xOf, yOf, cssVar("--rx"));
    line(ctx, tx, xOf, yOf, cssVar("--tx"));
    canvas.dataset.points = String(n);
    canvas.dataset.labels = String(labels);
  }

  const graph = document.getElementById("graph");

  function loadHistory() {
    const minutes = graph ? graph.dataset.minutes : "30";
    const src = graph ? graph.dataset.src : "/api/traffic";
    return getJSON(src + "?minutes=" + encodeURIComponent(minutes)).then(function (doc) {
      history = doc;
      if (graph) drawGraph(graph);
      drawSparks();
    }).catch(function (e) { setText("rate", "no history: " + e.message); });
  }

  if (graph) {
    document.querySelectorAll(".range button[data-minutes]").forEach(function (button) {
      button.addEventListener("click", function () {
        document.querySelectorAll(".range button").forEach(function (b) { b.classList.remove("on"); });
        button.classList.add("on");
        graph.dataset.minutes = button.dataset.minutes;
        loadHistory();
      });
    });
    window.addEventListener("resize", function () { drawGraph(graph); drawSparks(); });
  }

  // -- the live region: headline, rows and totals, as the server renders them ---------
  const live = document.getElementById("live");
  if (live) {
    let last = null;

    function mergeRows(body, fresh) {
      // A row whose Manage panel is open, or that has the focus, stays as it is.
      const keep = {};
      body.querySelectorAll("tr[data-id]").forEach(function (tr) {
        if (tr.querySelector("details[open]") || tr.contains(document.activeElement)) keep[tr.dataset.id] = tr;
      });
      const rows = Array.from(fresh.children).map(function (tr) { return keep[tr.dataset.id] || tr; });
      body.replaceChildren.apply(body, rows);
    }

    function swap(html) {
      const doc = new DOMParser().parseFromString(html, "text/html");
      const headline = doc.getElementById("headline"), mine = document.getElementById("headline");
      if (headline && mine) mine.replaceWith(headline);
      const rows = doc.getElementById("connected-rows"), body = document.getElementById("connected-rows");
      if (rows && body) mergeRows(body, rows);
      const totals = doc.getElementById("totals"), old = document.getElementById("totals");
      if (totals && old) {
        const now = Date.now() / 1000;
        const rx = Number(totals.dataset.rx), tx = Number(totals.dataset.tx);
        if (last && now > last.time && rx >= last.rx && tx >= last.tx) {
          const dt = now - last.time;
          setText("rate", "now " + bytes((rx - last.rx) / dt) + "/s in, " + bytes((tx - last.tx) / dt) + "/s out");
        }
        last = { time: now, rx: rx, tx: tx };
        old.replaceWith(totals);
      }
      drawSparks();
    }

    let polls = 0;
    function poll() {
      fetch(live.dataset.src, { credentials: "same-origin" }).then(function (r) {
        if (r.redirected && new URL(r.url).pathname !== new URL(live.dataset.src, window.location.href).pathname) {
          window.location.reload();  // logged out: the login page
          return;
        }
        return r.text().then(swap);
      }).catch(function () {
        const mine = document.getElementById("headline");
        if (mine) {
          mine.className = "headline error";
          mine.dataset.level = "error";
          mine.replaceChildren(Object.assign(document.createElement("p"), {
            className: "headline-text", textContent: "The dashboard itself does not answer (meshpi-web)",
          }));
        }
      }).finally(function () {
        live.dataset.polls = String(++polls);
        window.setTimeout(poll, 2000);
        if (polls % 15 === 0) loadHistory();  // the history moves a minute at a time
      });
    }
    poll();
    loadHistory();
  }

  // -- the log: newest first, new lines on top, filtered as you type ------------------
  const log = document.getElementById("log");
  if (log) {
    const filter = document.getElementById("log-filter"), level = document.getElementById("log-level");
    const rank = { debug: 0, info: 1, warning: 2, error: 3, critical: 4 };

    function stamp(t) {
      const d = new Date(t * 1000), p = function (n) { return String(n).padStart(2, "0"); };
      return d.getFullYear() + "-" + p(d.getMonth() + 1) + "-" + p(d.getDate()) + " " +
        p(d.getHours()) + ":" + p(d.getMinutes()) + ":" + p(d.getSeconds());
    }

    function shown(div) {
      const words = filter.value.trim().toLowerCase();
      const lvl = (div.className.replace("lvl-", "") || "info");
      const least = level.value ? rank[level.value] : 0;
      return (!words || div.textContent.toLowerCase().indexOf(words) >= 0) && (rank[lvl] || 0) >= least;
    }

    function applyFilter() {
      let visible = 0;
      log.querySelectorAll("div").forEach(function (div) {
        div.hidden = !shown(div);
        if (!div.hidden) visible++;
      });
      document.getElementById("log-empty").hidden = visible > 0;
    }
    filter.addEventListener("input", applyFilter);
    level.addEventListener("change", applyFilter);

    function pollLog() {
      getJSON("/api/logs?after=" + encodeURIComponent(log.dataset.after)).then(function (doc) {
        (doc.lines || []).forEach(function (ln) {
          const div = document.createElement("div");
          div.className = "lvl-" + String(ln.level).toLowerCase();
          const time = document.createElement("time"), b = document.createElement("b");
          time.textContent = stamp(ln.time);
          b.textContent = ln.level;
          div.append(time, " ", b, " " + ln.message);
          div.hidden = !shown(div);
          log.prepend(div);
          log.dataset.after = String(Math.max(Number(log.dataset.after), ln.seq));
        });
      }).catch(function () {}).finally(function () { window.setTimeout(pollLog, 2000); });
    }
    window.setTimeout(pollLog, 2000);
  }
})();
