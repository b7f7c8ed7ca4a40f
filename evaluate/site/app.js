// The latent browser: an index of every latent and one page per latent, from data/*.js (no server needed).
"use strict";

const I = window.BROWSER_INDEX;
const PAGE = 100;
const state = { key: "freq", dir: -1, page: 0, query: "", matches: null };
const latentCache = {};
let searchPostings = null;

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

const fmt = (v) => (v === 0 ? "0" : Math.abs(v) >= 0.01 && Math.abs(v) < 1e4 ? (+v.toPrecision(3)).toString() : v.toExponential(2));
const tokText = (t) => I.vocab[t];

function loadScript(src) {
  return new Promise((resolve, reject) => {
    const s = document.createElement("script");
    s.src = src;
    s.onload = resolve;
    s.onerror = () => reject(new Error("could not load " + src));
    document.head.append(s);
  });
}

// ------------------------------------------------------------------ index
const rows = I.freq.map((f, id) => ({ id, freq: f, mean: I.mean[id], max: I.max[id], top: I.toptok[id] || [] }));

function drawBars(svg, counts, tip, loLabel, hiLabel) {
  svg.replaceChildren();
  const W = +svg.getAttribute("width"), H = +svg.getAttribute("height"), pad = 24;
  const top = Math.max(1, ...counts), bw = (W - 2 * pad) / Math.max(1, counts.length);
  const ns = "http://www.w3.org/2000/svg";
  counts.forEach((c, i) => {
    const r = document.createElementNS(ns, "rect");
    const h = ((H - 2 * pad) * c) / top;
    r.setAttribute("class", "bar"); r.setAttribute("x", pad + i * bw); r.setAttribute("width", Math.max(1, bw - 1));
    r.setAttribute("y", H - pad - h); r.setAttribute("height", h);
    const t = document.createElementNS(ns, "title");
    t.textContent = `${c} ${tip(i)}`;
    r.append(t); svg.append(r);
  });
  for (const [x, text, anchor] of [[pad, loLabel, "start"], [W - pad, hiLabel, "end"]]) {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x); t.setAttribute("y", H - 6); t.setAttribute("text-anchor", anchor);
    t.textContent = text; svg.append(t);
  }
}

function drawHistogram(svg, values, bins, label) {
  if (!values.length) { svg.replaceChildren(); return; }
  const lo = Math.min(...values), hi = Math.max(...values) + 1e-9, w = (hi - lo) / bins;
  const counts = new Array(bins).fill(0);
  for (const v of values) counts[Math.min(bins - 1, Math.floor((v - lo) / w))]++;
  drawBars(svg, counts, (i) => `latents (${label(lo + i * w)} – ${label(lo + (i + 1) * w)})`, label(lo), label(hi));
}

function filtered() {
  const lo = parseFloat($("min-freq").value) || 0;
  const hiRaw = parseFloat($("max-freq").value);
  const hi = Number.isFinite(hiRaw) ? hiRaw : 1;
  let out = rows.filter((r) => r.freq >= lo && r.freq <= hi && r.freq > 0);
  if (state.matches) out = out.filter((r) => state.matches.has(r.id));
  out.sort((a, b) => (a[state.key] - b[state.key]) * state.dir || a.id - b.id);
  return out;
}

function renderIndex() {
  const list = filtered();
  const pages = Math.max(1, Math.ceil(list.length / PAGE));
  state.page = Math.min(state.page, pages - 1);
  const body = $("latents").tBodies[0];
  body.replaceChildren();
  for (const r of list.slice(state.page * PAGE, (state.page + 1) * PAGE)) {
    const link = el("a", { href: `#latent/${r.id}`, text: `#${r.id}` });
    body.append(el("tr", { "data-id": r.id }, el("td", {}, link), el("td", { class: "num", text: fmt(r.freq) }),
      el("td", { class: "num", text: fmt(r.mean) }), el("td", { class: "num", text: fmt(r.max) }),
      el("td", { text: r.top.map((t) => JSON.stringify(tokText(t))).join("  ") })));
  }
  $("count").textContent = `${list.length} of ${rows.filter((r) => r.freq > 0).length} firing latents` +
    (state.query ? ` match “${state.query}”` : "");
  $("page").textContent = `page ${state.page + 1} of ${pages}`;
  $("prev").disabled = state.page === 0;
  $("next").disabled = state.page >= pages - 1;
  for (const th of document.querySelectorAll("th[data-key]")) {
    th.classList.toggle("sorted-asc", th.dataset.key === state.key && state.dir > 0);
    th.classList.toggle("sorted-desc", th.dataset.key === state.key && state.dir < 0);
  }
}

async function runSearch(q) {
  state.query = q.trim();
  if (!state.query) { state.matches = null; renderIndex(); return; }
  if (!searchPostings) {
    await new Promise((resolve, reject) => { window.searchLoaded = (p) => { searchPostings = p; resolve(); };
                                            loadScript("data/search.js").catch(reject); });
  }
  const needle = state.query.toLowerCase();
  const hits = new Set();
  I.vocab.forEach((text, t) => {
    if (text.toLowerCase().includes(needle) && searchPostings[t]) for (const id of searchPostings[t]) hits.add(id);
  });
  state.matches = hits;
  state.page = 0;
  renderIndex();
}

function setupIndex() {
  $("meta").textContent = `${I.sae} · ${I.model} ${I.site} · ${I.architecture}${I.k ? " k=" + I.k : ""} · ` +
    `${I.d_sae} latents · ${I.tokens.toLocaleString()} tokens (${I.part}, BOS ${I.bos}) · cache ${I.cache_id}`;
  const dead = rows.filter((r) => r.freq === 0);
  $("summary").textContent = `${rows.length - dead.length} latents fired on the ${I.tokens.toLocaleString()} scanned tokens ` +
    `(activations in ${I.mode} mode); ${dead.length} never did.`;
  drawHistogram($("freq-svg"), rows.filter((r) => r.freq > 0).map((r) => Math.log10(r.freq)), 40, (v) => fmt(10 ** v));
  $("dead").querySelector("summary").textContent = `${dead.length} dead latents (never fired)`;
  $("dead-list").textContent = dead.map((r) => r.id).join(", ") || "none";
  for (const th of document.querySelectorAll("th[data-key]")) {
    th.addEventListener("click", () => {
      state.dir = state.key === th.dataset.key ? -state.dir : (th.dataset.key === "id" ? 1 : -1);
      state.key = th.dataset.key; renderIndex();
    });
  }
  let timer = null;
  $("search").addEventListener("input", (e) => { clearTimeout(timer); timer = setTimeout(() => runSearch(e.target.value), 150); });
  for (const id of ["min-freq", "max-freq"]) $(id).addEventListener("input", () => { state.page = 0; renderIndex(); });
  $("prev").addEventListener("click", () => { state.page--; renderIndex(); });
  $("next").addEventListener("click", () => { state.page++; renderIndex(); });
  renderIndex();
}

// ------------------------------------------------------------------ one latent
function context(c, max) {
  const line = el("div", { class: "context" });
  line.append(el("span", { class: "val", text: fmt(c.a[c.at]) }));
  c.t.forEach((t, i) => {
    const a = c.a[i];
    const span = el("span", { class: "tok" + (i === c.at ? " centre" : ""), text: tokText(t), title: `${JSON.stringify(tokText(t))}: ${fmt(a)}` });
    if (a > 0) span.style.background = `rgba(255, 120, 0, ${Math.min(1, 0.15 + 0.85 * (a / max)).toFixed(3)})`;
    span.dataset.act = a;
    line.append(span);
  });
  return line;
}

function renderLatent(d) {
  $("latent-title").textContent = `Latent #${d.id}`;
  $("latent-stats").textContent = `fires on ${fmt(d.freq)} of tokens (${d.fired.toLocaleString()} of ` +
    `${I.tokens.toLocaleString()}) · mean activation ${fmt(d.mean)} · max ${fmt(d.max)}`;
  const top = $("top-contexts");
  top.replaceChildren(...d.top.map((c) => context(c, d.max)));
  const bands = $("bands");
  bands.replaceChildren();
  d.bands.slice().reverse().forEach((b, j) => {
    if (!b.ctx.length) return;
    bands.append(el("h3", { text: `Band ${d.bands.length - j} of ${d.bands.length} of its sampled firings ` +
                                   `(activations ${fmt(b.lo)} – ${fmt(b.hi)})` }));
    for (const c of b.ctx) bands.append(context(c, d.max));
  });
  const e = d.hist.edges;
  drawBars($("act-svg"), d.hist.counts, (i) => `firings with activation ${fmt(e[i])} – ${fmt(e[i + 1])}`,
           fmt(e[0]), fmt(e[e.length - 1]));
  const list = (id, items) => $(id).replaceChildren(...items.map(([t, v]) => el("li", { text: `${JSON.stringify(tokText(t))}  ${v > 0 ? "+" : ""}${fmt(v)}` })));
  list("up", d.up);
  list("down", d.down);
}

async function showLatent(id) {
  $("index-view").hidden = true;
  $("latent-view").hidden = false;
  window.scrollTo(0, 0);
  if (!(id in latentCache)) {
    if (!(I.freq[id] > 0)) {
      $("latent-title").textContent = `Latent #${id}`;
      $("latent-stats").textContent = "This latent never fired on the scanned tokens.";
      for (const x of ["top-contexts", "bands", "up", "down"]) $(x).replaceChildren();
      $("act-svg").replaceChildren();
      return;
    }
    await new Promise((resolve, reject) => {
      window.latentLoaded = (d) => { latentCache[d.id] = d; resolve(); };
      loadScript(`data/latents/${id}.js`).catch(reject);
    });
  }
  renderLatent(latentCache[id]);
}

function route() {
  const m = location.hash.match(/^#latent\/(\d+)$/);
  if (m) showLatent(+m[1]);
  else { $("latent-view").hidden = true; $("index-view").hidden = false; }
}

setupIndex();
window.addEventListener("hashchange", route);
route();
