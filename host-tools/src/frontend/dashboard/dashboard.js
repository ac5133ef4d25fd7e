// The unipeer dashboard: draws the snapshots the front-end pushes (server-sent events) on a
// canvas ring, with the same nodes as an accessible list (data-* attributes) and tables.
// Plain JavaScript, no build step; every value from the cluster goes through textContent.
'use strict';

const STATE_STROKE = { joined: '#1b5e20', booting: '#9e9e9e', suspected: '#c62828', down: '#616161' };
const JOB_ROWS = 40;
let snap = null;
let hover = null;
const linkCache = new Map(); // node -> {at, links}
const progress = []; // [time_ms, slices run] history
const canvas = document.getElementById('ring');
const ctx = canvas.getContext('2d');

function el(tag, text, attrs) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  return e;
}

function colourOf(server) {
  const s = (snap && snap.servers || []).find((x) => x.name === server);
  return s ? s.colour : '#000000';
}

// A NodeId's place on the ring: its first 32 bits as a fraction of a turn; a node without an
// id yet (booting) by a hash of its name.
function angleOf(n) {
  let frac;
  if (n.overlay_id && n.overlay_id.length >= 8) {
    frac = parseInt(n.overlay_id.slice(0, 8), 16) / 4294967296;
  } else {
    let h = 2166136261;
    for (const c of n.name) h = Math.imul(h ^ c.charCodeAt(0), 16777619) >>> 0;
    frac = h / 4294967296;
  }
  return frac * 2 * Math.PI - Math.PI / 2;
}

function positions() {
  const r = canvas.width / 2 - 40;
  const c = canvas.width / 2;
  return (snap ? snap.nodes : []).map((n) => {
    const a = angleOf(n);
    return { n, x: c + r * Math.cos(a), y: c + r * Math.sin(a) };
  });
}

function drawRing() {
  const w = canvas.width;
  ctx.clearRect(0, 0, w, w);
  ctx.strokeStyle = '#cfd8dc';
  ctx.lineWidth = 2;
  ctx.beginPath();
  ctx.arc(w / 2, w / 2, w / 2 - 40, 0, 2 * Math.PI);
  ctx.stroke();
  const pos = positions();
  const many = pos.length > 60;
  const radius = many ? 4 : 9;
  if (hover) {
    const cached = linkCache.get(hover);
    const from = pos.find((p) => p.n.name === hover);
    if (cached && from) {
      const byId = new Map(pos.map((p) => [p.n.overlay_id, p]));
      for (const [ids, colour] of [[cached.links.table || [], '#b0bec5'], [cached.links.leaf_set || [], '#1565c0']]) {
        ctx.strokeStyle = colour;
        ctx.lineWidth = 1.5;
        for (const id of ids) {
          const to = byId.get(id);
          if (!to || to === from) continue;
          ctx.beginPath();
          ctx.moveTo(from.x, from.y);
          ctx.lineTo(to.x, to.y);
          ctx.stroke();
        }
      }
    }
  }
  for (const p of pos) {
    ctx.beginPath();
    ctx.arc(p.x, p.y, radius, 0, 2 * Math.PI);
    ctx.fillStyle = p.n.state === 'down' ? '#e0e0e0' : colourOf(p.n.server);
    ctx.fill();
    ctx.lineWidth = p.n.state === 'joined' ? 1 : 3;
    ctx.strokeStyle = STATE_STROKE[p.n.state] || '#000';
    if (p.n.state === 'booting') ctx.setLineDash([3, 2]);
    ctx.stroke();
    ctx.setLineDash([]);
    if (!many) {
      ctx.fillStyle = '#263238';
      ctx.font = '11px system-ui';
      ctx.fillText(p.n.name, p.x + 11, p.y + 4);
    }
  }
}

function renderList() {
  const ul = document.getElementById('ring-nodes');
  const frag = document.createDocumentFragment();
  for (const n of snap.nodes) {
    const li = el('li', null, {
      'data-node': n.name, 'data-server': n.server, 'data-state': n.state,
      'data-colour': colourOf(n.server), 'data-overlay-id': n.overlay_id || '',
      class: 'state-' + n.state,
    });
    const sw = el('span', null, { class: 'swatch' });
    sw.style.background = colourOf(n.server);
    li.append(sw, el('span', n.name + ' ' + n.state));
    frag.append(li);
  }
  ul.replaceChildren(frag);
}

function fillTable(id, rows) {
  const tbody = document.querySelector('#' + id + ' tbody');
  const frag = document.createDocumentFragment();
  for (const cells of rows) {
    const tr = el('tr');
    for (const c of cells) tr.append(c instanceof Node ? c : el('td', c));
    frag.append(tr);
  }
  tbody.replaceChildren(frag);
}

function time(ms) {
  return ms ? new Date(ms).toLocaleTimeString() : '';
}

function render() {
  if (!snap) return;
  const states = {};
  for (const n of snap.nodes) states[n.state] = (states[n.state] || 0) + 1;
  document.getElementById('summary').textContent = snap.cluster
    ? snap.nodes.length + ' nodes on ' + snap.servers.length + ' server(s): ' +
      Object.entries(states).map(([k, v]) => v + ' ' + k).join(', ')
    : 'no cluster is running';
  document.getElementById('updated').textContent = 'updated ' + time(snap.time_ms);
  drawRing();
  renderList();
  fillTable('servers', snap.servers.map((s) => {
    const td = el('td', null, { 'data-server': s.name, 'data-colour': s.colour });
    const sw = el('span', null, { class: 'swatch' });
    sw.style.background = s.colour;
    td.append(sw, el('span', s.name));
    return [td, s.vms, s.up, s.memory_mb, s.running];
  }));
  let slices = 0, running = 0, supervising = 0;
  for (const n of snap.nodes) { slices += n.works_run; running += n.running; supervising += n.supervising; }
  if (progress.length === 0 || progress[progress.length - 1][1] !== slices) progress.push([snap.time_ms, slices]);
  if (progress.length > 600) progress.shift();
  const jp = document.getElementById('jobs-progress');
  jp.setAttribute('data-works-run', slices);
  jp.setAttribute('data-running', running);
  jp.textContent = running + ' task(s) running, ' + supervising + ' supervised, ' + slices + ' task slices run';
  // The busiest nodes first, at most JOB_ROWS of them (the page stays light with 500 nodes).
  const busy = snap.nodes.filter((n) => n.running > 0 || n.works_run > 0 || n.supervising > 0)
    .sort((a, b) => (b.running - a.running) || (b.supervising - a.supervising) || (b.works_run - a.works_run));
  document.getElementById('jobs-more').textContent = busy.length > JOB_ROWS
    ? 'the ' + JOB_ROWS + ' busiest of ' + busy.length + ' nodes with tasks' : '';
  fillTable('jobs', busy.slice(0, JOB_ROWS).map((n) => [n.name, n.server, n.slots, n.running, n.supervising, n.works_run,
    n.heap_size ? Math.round(100 * n.heap_in_use / n.heap_size) + '%' : n.heap_in_use]));
  const repl = document.getElementById('replication');
  if (!snap.replication.length) {
    repl.replaceChildren(el('p', 'No replicated instance is reported by the nodes.', { class: 'empty' }));
  } else {
    const t = el('table');
    for (const r of snap.replication) {
      const tr = el('tr', null, { 'data-node': r.node });
      tr.append(el('td', r.node), el('td', Object.entries(r.fields).map(([k, v]) => k + '=' + v).join(' ')));
      t.append(tr);
    }
    repl.replaceChildren(t);
  }
  fillTable('faults', snap.faults.slice().reverse().map((f) => [f.kind, f.target, f.detail, time(f.started_ms),
    f.healed_ms ? time(f.healed_ms) : 'active']));
}

function nearest(ev) {
  const rect = canvas.getBoundingClientRect();
  const x = (ev.clientX - rect.left) * canvas.width / rect.width;
  const y = (ev.clientY - rect.top) * canvas.height / rect.height;
  let best = null, bestD = 144;
  for (const p of positions()) {
    const d = (p.x - x) ** 2 + (p.y - y) ** 2;
    if (d < bestD) { best = p.n; bestD = d; }
  }
  return best;
}

canvas.addEventListener('mousemove', (ev) => {
  const n = nearest(ev);
  const name = n ? n.name : null;
  if (name === hover) return;
  hover = name;
  const info = document.getElementById('hover');
  if (!n) { info.textContent = 'Hover a node for its leaf set and routing links.'; drawRing(); return; }
  info.textContent = n.name + ' (' + n.server + ', ' + n.state + ') id ' + (n.overlay_id || '?') + ', ' +
    n.memory_mb + ' MiB, heap ' + n.heap_in_use + ' B, ' + n.running + '/' + n.slots + ' slots busy, leaf set ' +
    n.leaf_set + ', table ' + n.table_filled;
  const cached = linkCache.get(name);
  if (!cached || Date.now() - cached.at > 5000) {
    fetch('/v1/dashboard/node/' + encodeURIComponent(name), { credentials: 'same-origin' })
      .then((r) => r.ok ? r.json() : null)
      .then((links) => { if (links) { linkCache.set(name, { at: Date.now(), links }); drawRing(); } })
      .catch(() => {});
  }
  drawRing();
});

function accept(data) {
  try {
    snap = JSON.parse(data);
    render();
  } catch (e) {
    document.getElementById('errors').textContent = 'bad snapshot: ' + e;
  }
}

fetch('/v1/dashboard/state', { credentials: 'same-origin' })
  .then((r) => r.ok ? r.text() : Promise.reject(new Error('state: HTTP ' + r.status)))
  .then(accept)
  .catch((e) => { document.getElementById('errors').textContent = String(e); });
const events = new EventSource('/v1/dashboard/events');
events.addEventListener('snapshot', (e) => accept(e.data));
events.onerror = () => { document.getElementById('updated').textContent = 'reconnecting…'; };
