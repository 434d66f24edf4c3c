// livestack viewer: follows the server's event stream, swaps pictures without a blank frame, keeps the
// visitor's zoom, pan and stretch (all display-only), and recovers by itself when anything goes away.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const picture = $("picture");
  const stage = $("stage");
  const params = new URLSearchParams(location.search);
  const kiosk = params.get("kiosk") === "1";
  if (kiosk) document.body.classList.add("kiosk");

  // A control token given in the address is kept for this tab only and taken out of the address bar,
  // so that it is neither projected nor sent on as a referrer.
  const TOKEN_KEY = "livestack-control-token";
  if (params.has("token")) {
    sessionStorage.setItem(TOKEN_KEY, params.get("token"));
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + (rest ? "?" + rest : ""));
  }
  const token = sessionStorage.getItem(TOKEN_KEY);

  const state = {
    stacks: new Map(),      // key -> stack summary plus fwhm, background, updatedAt, lastFrameAt
    status: null,
    selected: "auto",
    caption: "",
    bus: "connecting",
    open: false,
    everOpen: false,
    lastMessage: performance.now(),
    curves: new Map(),      // photometry target -> [[time, magnitude, error], ...]
    timeScale: null,
  };

  // -- the event stream ----------------------------------------------------------------------------------
  let source = null;
  let retryMs = 1000;
  let retryTimer = null;

  function connect() {
    clearTimeout(retryTimer);
    retryTimer = null;
    if (source) source.close();
    state.lastMessage = performance.now();
    source = new EventSource("events");
    source.onopen = () => { state.open = true; state.everOpen = true; retryMs = 1000; showConnection(); };
    source.onerror = () => {
      state.open = false;
      showConnection();
      // The browser retries by itself unless the server answered with an error; then we do, slower.
      if (source.readyState === EventSource.CLOSED && retryTimer === null) {
        retryTimer = setTimeout(connect, retryMs);
        retryMs = Math.min(retryMs * 2, 8000);
      }
    };
    for (const [name, handler] of Object.entries(handlers)) {
      source.addEventListener(name, (e) => {
        state.lastMessage = performance.now();
        handler(JSON.parse(e.data));
      });
    }
  }

  // A stream that says nothing for a while is dead even if the browser has not noticed (a laptop that slept,
  // a proxy that dropped it): start again.
  setInterval(() => {
    if (performance.now() - state.lastMessage > 12000) {
      state.open = false;
      showConnection();
      connect();
    }
  }, 2000);

  const handlers = {
    hello(d) {
      state.caption = d.caption || "";
      state.status = d.status;
      state.bus = d.bus;
      const now = performance.now();
      const stacks = new Map();
      for (const s of d.stacks) {
        stacks.set(s.key, {
          ...s, updatedAt: now - s.updated_age * 1000,
          lastFrameAt: s.last_frame_age === null ? null : now - s.last_frame_age * 1000,
        });
      }
      state.stacks = stacks;
      state.curves = new Map(Object.entries(d.lightcurves || {}));
      state.timeScale = d.time_scale;
      if (d.control && token) checkControl();
      render();
      renderCurve();
    },
    photometry(m) {
      state.timeScale = m.time_scale;
      for (const { target, point } of m.points) {
        if (!state.curves.has(target)) state.curves.set(target, []);
        const curve = state.curves.get(target);
        curve.push(point);
        if (curve.length > 1000) curve.splice(0, curve.length - 1000);
      }
      renderCurve();
    },
    status(s) { state.status = s; state.bus = "live"; renderCounts(); showConnection(); },
    stack(s) { mergeStack(s); render(); },
    picture(s) { mergeStack(s); render(); },
    frame(f) {
      const s = f.key === null ? null : state.stacks.get(f.key);
      if (s) {
        s.lastFrameAt = performance.now();
        if (f.verdict === "accepted") {
          s.fwhm.push(f.fwhm);
          s.background.push(f.background);
          s.updatedAt = performance.now();
        }
      }
      if (f.verdict === "rejected" && !kiosk) notice(`${f.name} rejected: ${f.reason}`);
      render();
    },
    log(l) { if (!kiosk) notice(l.message, l.level === "error"); },
    bus(b) { state.bus = b.state; showConnection(); },
    ping(p) { state.bus = p.bus; showConnection(); },
  };

  function mergeStack(s) {
    const old = state.stacks.get(s.key);
    const same = old && old.session === s.session;
    state.stacks.set(s.key, {
      ...s,
      fwhm: same ? old.fwhm : [],
      background: same ? old.background : [],
      updatedAt: performance.now(),
      lastFrameAt: s.last_frame_age === null ? (same ? old.lastFrameAt : null)
        : performance.now() - s.last_frame_age * 1000,
    });
  }

  // -- what is shown ---------------------------------------------------------------------------------------
  function shownStack() {
    if (state.selected !== "auto" && state.stacks.has(state.selected)) return state.stacks.get(state.selected);
    let latest = null;
    for (const s of state.stacks.values()) if (!latest || s.updatedAt > latest.updatedAt) latest = s;
    return latest;
  }

  function render() {
    renderSelector();
    renderCounts();
    renderPlots();
    $("caption").textContent = state.caption;
    const s = shownStack();
    showPicture(s ? s.picture : null);
    showConnection();
  }

  function renderCounts() {
    const s = shownStack();
    $("target").textContent = s ? (s.target || "unnamed target") : "waiting for the telescope";
    $("filter").textContent = s && s.filter ? s.filter : "";
    $("stacked").textContent = s ? String(s.frames) : "0";
    $("rejected").textContent = state.status ? String(state.status.rejected) : "0";
    $("exposure").textContent = duration(s ? s.exptime : 0);
    renderAge();
  }

  function renderAge() {
    const s = shownStack();
    let text = "\u2013";
    if (s && s.lastFrameAt !== null) text = ago((performance.now() - s.lastFrameAt) / 1000);
    if (state.status && state.status.state === "paused") text += " (paused)";
    $("age").textContent = text;
  }
  setInterval(renderAge, 1000);

  function renderPlots() {
    const s = shownStack();
    plot("plot-fwhm", "fwhm", s ? s.fwhm : [], (v) => `${v.toFixed(2)} px`);
    plot("plot-background", "background", s ? s.background : [], (v) => v.toPrecision(4));
  }

  function plot(svgId, labelId, values, format) {
    const points = values.map((v, i) => [i, v]).filter(([, v]) => v !== null && Number.isFinite(v));
    const last = points.length ? points[points.length - 1][1] : null;
    $(labelId).textContent = last === null ? "\u2013" : format(last);
    const line = $(svgId).querySelector("polyline");
    if (points.length < 2) { line.setAttribute("points", ""); return; }
    let lo = Math.min(...points.map((p) => p[1]));
    let hi = Math.max(...points.map((p) => p[1]));
    // At least 10% of the level on the vertical axis: a steady night draws a steady line, not its noise.
    const least = 0.1 * Math.abs((lo + hi) / 2) || 1;
    if (hi - lo < least) {
      const mid = (lo + hi) / 2;
      lo = mid - least / 2;
      hi = mid + least / 2;
    }
    const span = hi - lo;
    const n = values.length - 1 || 1;
    line.setAttribute("points", points.map(([i, v]) =>
      `${(100 * i / n).toFixed(2)},${(22 - 20 * (v - lo) / span).toFixed(2)}`).join(" "));
  }

  // The first photometry target's light curve: a dot per point (binned to at most 100), its error bar
  // through it; brighter (smaller magnitudes) up, as astronomers draw them.
  const SVG = "http://www.w3.org/2000/svg";
  function renderCurve() {
    const figure = $("curve");
    const entry = state.curves.entries().next();
    if (entry.done || entry.value[1].length === 0) { figure.hidden = true; return; }
    const [name, raw] = entry.value;
    figure.hidden = false;
    const per = Math.ceil(raw.length / 100);
    const points = [];
    for (let i = 0; i < raw.length; i += per) {
      const chunk = raw.slice(i, i + per);
      const w = chunk.map((p) => 1 / (p[2] * p[2]));
      const sw = w.reduce((a, b) => a + b, 0);
      points.push([chunk.reduce((a, p) => a + p[0], 0) / chunk.length,
        chunk.reduce((a, p, k) => a + w[k] * p[1], 0) / sw, 1 / Math.sqrt(sw)]);
    }
    const lo = Math.min(...points.map((p) => p[1] - p[2]));
    const hi = Math.max(...points.map((p) => p[1] + p[2]));
    const t0 = points[0][0];
    const tspan = points[points.length - 1][0] - t0 || 1;
    const y = (m) => (2 + 26 * (m - lo) / ((hi - lo) || 1e-4)).toFixed(2);
    const x = (t) => (points.length === 1 ? 50 : 2 + 96 * (t - t0) / tspan).toFixed(2);
    const svg = $("plot-curve");
    const marks = [];
    for (const [t, m, e] of points) {
      const bar = document.createElementNS(SVG, "line");
      bar.setAttribute("x1", x(t)); bar.setAttribute("x2", x(t));
      bar.setAttribute("y1", y(m - e)); bar.setAttribute("y2", y(m + e));
      const dot = document.createElementNS(SVG, "circle");
      dot.setAttribute("cx", x(t)); dot.setAttribute("cy", y(m)); dot.setAttribute("r", "0.9");
      marks.push(bar, dot);
    }
    svg.replaceChildren(...marks);
    const last = raw[raw.length - 1];
    $("curve-name").textContent = name;
    $("curve-last").textContent = `${last[1] >= 0 ? "+" : ""}${last[1].toFixed(3)} \u00b1 ${last[2].toFixed(3)} mag`;
    figure.title = `${name}: differential magnitude (${state.timeScale || "JD"}), ${raw.length} points`;
  }

  function renderSelector() {
    const select = $("stack-select");
    const stacks = [...state.stacks.values()];
    select.hidden = stacks.length < 2;
    const options = [["auto", "follow the latest stack"],
      ...stacks.map((s) => [s.key, `${s.target || "unnamed"}${s.filter ? " \u00b7 " + s.filter : ""} (${s.frames})`])];
    const wanted = options.map(([v, t]) => v + "\u0000" + t).join("\u0001");
    if (select.dataset.options !== wanted) {
      select.replaceChildren(...options.map(([value, text]) => new Option(text, value)));
      select.dataset.options = wanted;
    }
    select.value = state.stacks.has(state.selected) ? state.selected : "auto";
  }
  $("stack-select").addEventListener("change", (e) => { state.selected = e.target.value; render(); });

  function showConnection() {
    const el = $("connection");
    let text = null;
    if (!state.open) text = state.everOpen ? "reconnecting to the viewer\u2026" : "connecting\u2026";
    else if (state.bus === "reconnecting") text = "reconnecting to the telescope\u2026";
    else if (state.bus === "connecting") text = "waiting for the telescope\u2026";
    el.hidden = text === null;
    if (text !== null) el.textContent = text;
  }

  let noticeTimer = null;
  function notice(text, error = false) {
    const el = $("notice");
    el.textContent = text;
    el.classList.toggle("error", error);
    el.hidden = false;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => { el.hidden = true; }, 6000);
  }

  // -- the picture: preloaded and decoded before the swap, so the shown one is never blank --------------
  let shownUrl = null;
  let wantedUrl = null;
  let preloaded = null;   // kept alive so the decoded picture stays in the page's image cache

  async function showPicture(p) {
    if (!p) {
      if (shownUrl === null) { picture.hidden = true; $("waiting").hidden = false; }
      return;
    }
    if (p.url === shownUrl || p.url === wantedUrl) return;
    wantedUrl = p.url;
    const next = new Image();
    next.src = p.url;
    try {
      await next.decode();
    } catch (e) {
      if (wantedUrl === p.url) wantedUrl = null;
      return;  // superseded or gone: keep what is shown; the next picture will come
    }
    if (wantedUrl !== p.url) return;  // a newer one was asked for meanwhile
    preloaded = next;
    const oldW = picture.naturalWidth;
    const oldH = picture.naturalHeight;
    picture.src = p.url;  // decoded and in the image cache: replaced at once, no empty frame
    picture.dataset.frames = String(p.frames);
    shownUrl = p.url;
    wantedUrl = null;
    if (picture.hidden) {
      picture.hidden = false;
      $("waiting").hidden = true;
    }
    if (oldW && (oldW !== next.naturalWidth || oldH !== next.naturalHeight)) {
      view.cx *= next.naturalWidth / oldW;   // the same spot of the sky stays in the middle
      view.cy *= next.naturalHeight / oldH;
    } else if (!oldW) {
      view.cx = next.naturalWidth / 2;
      view.cy = next.naturalHeight / 2;
    }
    applyView();
  }

  // -- zoom and pan: the image point at the middle of the screen, and a zoom relative to "fit" ------------
  const view = { zoom: 1, cx: 0, cy: 0 };
  const MIN_ZOOM = 0.5;
  const MAX_ZOOM = 24;

  function fitScale() {
    const w = picture.naturalWidth;
    const h = picture.naturalHeight;
    if (!w || !h) return 1;
    return Math.min(stage.clientWidth / w, stage.clientHeight / h);
  }

  function applyView() {
    const w = picture.naturalWidth;
    const h = picture.naturalHeight;
    if (!w || !h) return;
    view.cx = Math.min(Math.max(view.cx, 0), w);
    view.cy = Math.min(Math.max(view.cy, 0), h);
    const scale = fitScale() * view.zoom;
    const tx = stage.clientWidth / 2 - view.cx * scale;
    const ty = stage.clientHeight / 2 - view.cy * scale;
    picture.style.transform = `translate(${tx.toFixed(2)}px, ${ty.toFixed(2)}px) scale(${scale.toFixed(5)})`;
    picture.dataset.zoom = view.zoom.toFixed(4);
  }

  function zoomAt(factor, sx, sy) {
    const before = fitScale() * view.zoom;
    const zoom = Math.min(Math.max(view.zoom * factor, MIN_ZOOM), MAX_ZOOM);
    const after = fitScale() * zoom;
    // Keep the image point under (sx, sy) where it is.
    const px = view.cx + (sx - stage.clientWidth / 2) / before;
    const py = view.cy + (sy - stage.clientHeight / 2) / before;
    view.zoom = zoom;
    view.cx = px - (sx - stage.clientWidth / 2) / after;
    view.cy = py - (sy - stage.clientHeight / 2) / after;
    applyView();
  }

  function fit() {
    view.zoom = 1;
    view.cx = picture.naturalWidth / 2;
    view.cy = picture.naturalHeight / 2;
    applyView();
  }

  window.addEventListener("resize", applyView);
  stage.addEventListener("wheel", (e) => {
    e.preventDefault();
    zoomAt(Math.exp(-e.deltaY * 0.0015), e.clientX, e.clientY);
  }, { passive: false });
  stage.addEventListener("dblclick", (e) => {
    if (view.zoom > 1.01) fit(); else zoomAt(3, e.clientX, e.clientY);
  });
  $("zoom-in").addEventListener("click", () => zoomAt(1.5, stage.clientWidth / 2, stage.clientHeight / 2));
  $("zoom-out").addEventListener("click", () => zoomAt(1 / 1.5, stage.clientWidth / 2, stage.clientHeight / 2));
  $("zoom-fit").addEventListener("click", fit);

  // Drag to pan, pinch to zoom (mouse, pen, fingers alike).
  const pointers = new Map();
  let pinch = null;
  stage.addEventListener("pointerdown", (e) => {
    stage.setPointerCapture(e.pointerId);
    pointers.set(e.pointerId, { x: e.clientX, y: e.clientY });
    stage.classList.add("dragging");
    if (pointers.size === 2) pinch = spread();
  });
  stage.addEventListener("pointermove", (e) => {
    const p = pointers.get(e.pointerId);
    if (!p) return;
    const scale = fitScale() * view.zoom;
    if (pointers.size === 1) {
      view.cx -= (e.clientX - p.x) / scale;
      view.cy -= (e.clientY - p.y) / scale;
      p.x = e.clientX; p.y = e.clientY;
      applyView();
      return;
    }
    p.x = e.clientX; p.y = e.clientY;
    const now = spread();
    if (pinch && now.d > 0) zoomAt(now.d / pinch.d, now.x, now.y);
    pinch = now;
  });
  const release = (e) => {
    pointers.delete(e.pointerId);
    pinch = pointers.size === 2 ? spread() : null;
    if (pointers.size === 0) stage.classList.remove("dragging");
  };
  stage.addEventListener("pointerup", release);
  stage.addEventListener("pointercancel", release);

  function spread() {
    const [a, b] = [...pointers.values()];
    return { d: Math.hypot(a.x - b.x, a.y - b.y), x: (a.x + b.x) / 2, y: (a.y + b.y) / 2 };
  }

  // -- the visitor's stretch: black point and midtones, as a lookup table in an SVG filter -------------------
  function applyStretch() {
    const black = Number($("black").value);
    const m = 1 - Number($("midtones").value);  // the slider brightens to the right
    const identity = black === 0 && Math.abs(m - 0.5) < 1e-6;
    picture.classList.toggle("stretched", !identity);
    if (identity) return;
    const n = 64;
    const table = [];
    for (let i = 0; i < n; i += 1) {
      const x = Math.min(Math.max((i / (n - 1) - black) / (1 - black), 0), 1);
      table.push((((m - 1) * x) / ((2 * m - 1) * x - m)).toFixed(4));
    }
    for (const id of ["lut-r", "lut-g", "lut-b"]) $(id).setAttribute("tableValues", table.join(" "));
  }
  $("black").addEventListener("input", applyStretch);
  $("midtones").addEventListener("input", applyStretch);
  $("stretch-reset").addEventListener("click", () => {
    $("black").value = "0";
    $("midtones").value = "0.5";
    applyStretch();
  });

  // -- full screen ---------------------------------------------------------------------------------------------
  function fullScreen() {
    if (!document.fullscreenElement && document.documentElement.requestFullscreen) {
      document.documentElement.requestFullscreen().catch(() => {});
    }
  }
  $("fullscreen").addEventListener("click", fullScreen);
  if (kiosk) stage.addEventListener("click", fullScreen);  // browsers need a gesture for full screen

  // -- the daemon's controls: only with the token, which the server checks again on every request ----------
  async function checkControl() {
    try {
      const reply = await fetch("api/session", { headers: { Authorization: `Bearer ${token}` } });
      const body = await reply.json();
      $("daemon-controls").hidden = !(body.control && !kiosk);
    } catch (e) {
      $("daemon-controls").hidden = true;
    }
  }
  for (const button of document.querySelectorAll("#daemon-controls button")) {
    button.addEventListener("click", async () => {
      const cmd = button.dataset.cmd;
      if (cmd === "reset" && !confirm("Start the stack again from nothing? (a final snapshot is kept)")) return;
      button.disabled = true;
      try {
        const reply = await fetch(`api/control/${cmd}`, {
          method: "POST", headers: { Authorization: `Bearer ${token}` },
        });
        const body = await reply.json();
        notice(body.ok ? `${cmd}: done` : `${cmd}: ${body.error}`, !body.ok);
      } catch (e) {
        notice(`${cmd}: no answer from the viewer`, true);
      } finally {
        button.disabled = false;
      }
    });
  }

  // -- words -------------------------------------------------------------------------------------------------------
  function duration(seconds) {
    const s = Math.round(seconds);
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
    return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
  }

  function ago(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min ago`;
  }

  render();
  connect();
})();
