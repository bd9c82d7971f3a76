// The sockstack dashboard: follows dashboard/events (Server-Sent Events, one sample per
// interval) and shows it as numbers and two uPlot charts. Everything it loads comes from the
// server that served the page; the access token the page was given (?access_token=) is passed
// on to the event stream, which a browser cannot send headers to.
"use strict";
(function () {
  const KEEP = 300; // points kept in the charts
  const HEIGHT = 300; // of each chart, pixels
  const token = new URLSearchParams(location.search).get("access_token");
  const query = token ? "?access_token=" + encodeURIComponent(token) : "";
  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ formatting

  const int = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
  function rate(x) {
    if (x === null || x === undefined) return "–";
    return x < 10 ? x.toFixed(1) : int.format(x);
  }
  function short(x) {
    return String(Number(x.toPrecision(3))); // 3 significant digits, no trailing zeros
  }
  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const ms = seconds * 1000;
    if (ms >= 1000) return short(ms / 1000) + " s";
    return short(ms) + " ms";
  }
  function bucket(bounds) {
    if (!bounds) return "";
    const [lo, hi] = bounds;
    if (hi === null) return "≥ " + duration(lo);
    const [a, ua] = duration(lo).split(" ");
    const b = duration(hi);
    return (ua === b.split(" ")[1] ? a : a + " " + ua) + "–" + b;
  }
  function setNumber(id, value, text) {
    const el = $(id);
    el.dataset.value = value === null || value === undefined ? "" : String(value);
    el.textContent = text;
  }

  // ------------------------------------------------------------------ charts

  const data = { t: [], calls: [], errors: [], p50: [], p90: [], p99: [] };
  let charts = null;

  function chartWidth(el) {
    return Math.max(300, el.clientWidth);
  }
  function makeCharts() {
    const rEl = $("chart-rates");
    const lEl = $("chart-latency");
    const common = {
      height: HEIGHT,
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true } },
      legend: { live: false },
    };
    const rates = new uPlot(
      Object.assign({}, common, {
        width: chartWidth(rEl),
        scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(1, max * 1.15)] } },
        series: [
          {},
          { label: "calls/s", stroke: "#2563eb", width: 2, fill: "rgba(37, 99, 235, 0.10)",
            value: (u, v) => rate(v) },
          { label: "errors/s", stroke: "#dc2626", width: 2, value: (u, v) => rate(v) },
        ],
      }),
      [data.t, data.calls, data.errors],
      rEl,
    );
    const latency = new uPlot(
      Object.assign({}, common, {
        width: chartWidth(lEl),
        scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(0.1, max * 1.15)] } },
        series: [
          {},
          { label: "p50", stroke: "#059669", width: 2, value: (u, v) => (v === null ? "–" : short(v) + " ms") },
          { label: "p90", stroke: "#d97706", width: 2, value: (u, v) => (v === null ? "–" : short(v) + " ms") },
          { label: "p99", stroke: "#7c3aed", width: 2, value: (u, v) => (v === null ? "–" : short(v) + " ms") },
        ],
      }),
      [data.t, data.p50, data.p90, data.p99],
      lEl,
    );
    charts = { rates, latency, rEl, lEl };
    window.addEventListener("resize", () => {
      rates.setSize({ width: chartWidth(rEl), height: HEIGHT });
      latency.setSize({ width: chartWidth(lEl), height: HEIGHT });
    });
  }

  function plot(s) {
    const ms = (x) => (x === null || x === undefined ? null : x * 1000);
    const lat = s.latency || null;
    data.t.push(s.time);
    data.calls.push(s.metrics ? s.calls_per_s : null);
    data.errors.push(s.metrics ? s.errors_per_s : null);
    data.p50.push(lat ? ms(lat.p50) : null);
    data.p90.push(lat ? ms(lat.p90) : null);
    data.p99.push(lat ? ms(lat.p99) : null);
    if (data.t.length > KEEP) for (const k in data) data[k].shift();
    if (charts === null) return;
    charts.rates.setData([data.t, data.calls, data.errors]);
    charts.latency.setData([data.t, data.p50, data.p90, data.p99]);
    charts.rEl.dataset.points = charts.lEl.dataset.points = String(data.t.length);
  }

  // ------------------------------------------------------------------ numbers

  function row(tbody, name, value) {
    const tr = document.createElement("tr");
    const th = document.createElement("th");
    const td = document.createElement("td");
    th.textContent = name;
    td.textContent = value;
    td.dataset.transport = name;
    tr.append(th, td);
    tbody.append(tr);
  }

  function notice(text) {
    const el = $("notice");
    el.hidden = !text;
    el.textContent = text || "";
  }

  let lastSeq = null;
  let missed = 0;

  function show(s) {
    if (lastSeq !== null && s.seq > lastSeq + 1) missed += s.seq - lastSeq - 1;
    lastSeq = s.seq;
    $("missed").textContent = String(missed);
    $("updated").textContent = "updated " + new Date(s.time * 1000).toLocaleTimeString();

    const tbody = $("connections").tBodies[0];
    tbody.replaceChildren();
    for (const [name, n] of Object.entries(s.connections)) row(tbody, name, int.format(n));
    $("http-in-flight").textContent = String(s.http_in_flight);

    if (s.metrics) {
      $("calls-rate").textContent = rate(s.calls_per_s);
      setNumber("calls-total", s.calls, int.format(s.calls));
      $("calls-by-transport").textContent = Object.entries(s.calls_per_s_by_transport)
        .map(([t, r]) => t + " " + rate(r) + "/s")
        .join(" · ");
      $("errors-rate").textContent = rate(s.errors_per_s);
      $("errors-rate").className = s.errors_per_s > 0 ? "bad" : "";
      setNumber("errors-total", s.errors, int.format(s.errors));
      const codes = Object.entries(s.errors_by_code);
      const ec = $("errors-codes");
      ec.textContent = codes.length ? codes.map(([c, n]) => c + " ×" + n).join(", ") : "none in this interval";
      ec.className = codes.length ? "sub" : "sub errors-none";
      const lat = s.latency;
      for (const p of ["p50", "p90", "p99"]) {
        $(p).textContent = lat ? "≈ " + duration(lat[p]) : "–";
        $(p + "-bucket").textContent = lat ? bucket(lat[p + "_bucket"]) : "";
      }
      $("latency-calls").textContent = lat
        ? "over " + int.format(lat.calls) + " calls in the last " + s.dt.toFixed(1) + " s"
        : "no call answered in the last " + s.dt.toFixed(1) + " s";
    } else {
      for (const id of ["calls-rate", "errors-rate"]) $(id).textContent = "off";
      setNumber("calls-total", null, "metrics off");
      setNumber("errors-total", null, "metrics off");
      $("latency-calls").textContent = "metrics off";
    }

    const b = s.broker;
    if (b) {
      setNumber("drops-total", b.dropped, int.format(b.dropped));
      $("drops-rate").textContent = rate(b.dropped_per_s) + " /s now; " +
        int.format(b.slow_consumers_disconnected) + " slow consumers disconnected";
      $("broker-detail").textContent = int.format(b.subscriptions) + " subscriptions · " +
        int.format(b.published) + " published · " + int.format(b.delivered) + " delivered";
    } else {
      setNumber("drops-total", null, "–");
      $("drops-rate").textContent = "no broker on this server";
      $("broker-detail").textContent = "";
    }
    plot(s);
  }

  // ------------------------------------------------------------------ the stream

  function status(state, text) {
    const el = $("status");
    el.dataset.state = state;
    el.textContent = text;
  }

  function start() {
    try {
      makeCharts();
    } catch (e) {
      notice("The charts could not be drawn: " + e);
    }
    const events = new EventSource("dashboard/events" + query);
    let opened = false;
    events.addEventListener("open", () => {
      opened = true;
      status("connected", "connected");
    });
    events.addEventListener("error", () => {
      if (events.readyState === EventSource.CLOSED) status("closed", "disconnected");
      else status("reconnecting", "reconnecting…");
      if (!opened && !token) {
        notice("The event stream could not be opened. If the server has a secret, open this " +
          "page as /?access_token=SECRET: a browser's event stream cannot send headers.");
      }
    });
    events.addEventListener("hello", (e) => {
      const h = JSON.parse(e.data);
      $("interval").textContent = String(h.interval);
      notice(h.metrics ? "" :
        "Metrics are off on this server (Gateway(metrics=False), or prometheus-client is not " +
        "installed): calls, errors and latency are not measured.");
    });
    events.addEventListener("sample", (e) => show(JSON.parse(e.data)));
    events.addEventListener("end", (e) => status("ending", JSON.parse(e.data).reason));
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
