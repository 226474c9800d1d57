// away dashboard: signs in with a user token and drives the broker's /v1 API with it.
// Everything shown is written as text (textContent), never as HTML. See docs/dashboard.md.
'use strict';

const TOKEN_KEY = 'away.userToken';
const TIERS = ['cloud', 'edge', 'client'];
// a migration's phases as the broker reports them on /v1/events
const PHASES = ['migration-requested', 'migration-started', 'migration-succeeded'];

const state = {
  token: null,
  gen: 0, // a sign-in; streams and timers of an older one stop
  abort: null,
  timer: null,
  nodes: [],
  workloads: [],
  migrations: [],
  explained: new Map(), // workload name -> {node, why}
  phases: new Map(), // migration id -> [{kind, at_ms, message}] from /v1/events
  moving: null, // the workload the move form is for
  removeArmed: null,
  results: [],
  figUrl: null,
};

const $ = (sel) => document.querySelector(sel);

/** An element with attributes and children (strings become text nodes). */
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (v === true) e.setAttribute(k, '');
    else if (v !== false && v !== null && v !== undefined) e.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

class ApiProblem extends Error {
  constructor(status, body) {
    super(typeof body === 'object' && body && body.message ? body.message : `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

/** One call of the broker's API with the signed-in token. */
async function api(method, path, body, contentType) {
  const headers = { Authorization: `Bearer ${state.token}` };
  let payload;
  if (typeof body === 'string') {
    payload = body;
    headers['Content-Type'] = contentType || 'text/plain';
  } else if (body !== undefined) {
    payload = JSON.stringify(body);
    headers['Content-Type'] = 'application/json';
  }
  const r = await fetch(path, { method, headers, body: payload, cache: 'no-store' });
  const text = await r.text();
  let data = text;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (_) {
    // not JSON: keep the text
  }
  if (!r.ok) throw new ApiProblem(r.status, data);
  return data;
}

/** An error as the API answered it: status, code, message, field and line. */
function describe(err) {
  if (err instanceof ApiProblem && err.body && typeof err.body === 'object') {
    const b = err.body;
    let s = `${err.status} ${b.code || ''}: ${b.message}`;
    if (b.field) s += ` (field ${b.field}${b.line ? `, line ${b.line}` : ''})`;
    else if (b.line) s += ` (line ${b.line})`;
    return s;
  }
  return String((err && err.message) || err);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const time = (ms) => (ms ? new Date(ms).toLocaleTimeString() : '');
const mib = (n) => (n < 1048576 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / 1048576).toFixed(1)} MiB`);
const secs = (ms) => `${(ms / 1000).toFixed(2)} s`;

function setConn(text) {
  $('#conn').textContent = text;
}

// ---- sign in and out ----

async function signIn(token) {
  performance.mark('away-signin');
  state.token = token;
  $('#signin-error').textContent = '';
  try {
    await api('GET', '/v1/nodes');
  } catch (e) {
    state.token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    const what = e instanceof ApiProblem && e.status === 401 ? 'Sign-in refused' : 'The broker did not answer';
    $('#signin-error').textContent = `${what}: ${describe(e)}`;
    $('#token').focus();
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $('#token').value = '';
  state.gen += 1;
  state.abort = new AbortController();
  $('#signin').hidden = true;
  $('#views').hidden = false;
  $('#signout').hidden = false;
  show('overview');
  await refresh();
  performance.mark('away-first-data');
  streamEvents(state.gen);
  state.timer = setInterval(refresh, 2000);
}

function signOut(message) {
  state.token = null;
  state.gen += 1;
  if (state.abort) state.abort.abort();
  clearInterval(state.timer);
  sessionStorage.removeItem(TOKEN_KEY);
  for (const v of document.querySelectorAll('.view')) v.hidden = true;
  $('#views').hidden = true;
  $('#signout').hidden = true;
  $('#signin').hidden = false;
  $('#signin-error').textContent = message || '';
  setConn('signed out');
  $('#token').focus();
}

function show(view) {
  for (const v of document.querySelectorAll('.view')) v.hidden = v.id !== `view-${view}`;
  for (const b of document.querySelectorAll('#views button')) {
    if (b.dataset.view === view) b.setAttribute('aria-current', 'page');
    else b.removeAttribute('aria-current');
  }
  if (view === 'results') loadResults();
}

// ---- state from the API ----

async function refresh() {
  const gen = state.gen;
  try {
    const [nodes, workloads, migrations] = await Promise.all([
      api('GET', '/v1/nodes'),
      api('GET', '/v1/workloads'),
      api('GET', '/v1/migrations'),
    ]);
    if (gen !== state.gen) return;
    Object.assign(state, { nodes, workloads, migrations });
    await explain(workloads);
    render();
  } catch (e) {
    if (e instanceof ApiProblem && e.status === 401) signOut(`Signed out: ${describe(e)}`);
    else setConn(`broker unreachable: ${describe(e)}`);
  }
}

/** The placement explanation of each workload (only single-workload answers carry it). */
async function explain(workloads) {
  for (const w of workloads) {
    const known = state.explained.get(w.name);
    if (known && known.node === w.node) continue;
    try {
      const one = await api('GET', `/v1/workloads/${encodeURIComponent(w.name)}`);
      state.explained.set(w.name, { node: w.node, why: one.placement ? one.placement.why : '' });
    } catch (_) {
      // gone meanwhile: the next refresh shows it
    }
  }
}

let pending = null;
/** Refresh soon, once, however many events arrive meanwhile. */
function refreshSoon() {
  if (pending) return;
  pending = setTimeout(() => {
    pending = null;
    refresh();
  }, 150);
}

// ---- rendering ----

/** The class that gives a state word its colour (the word itself says it). */
function tone(word) {
  if (['online', 'running', 'succeeded'].includes(word)) return 'good';
  if (['offline', 'failed', 'cancelled', 'node-offline', 'stopped'].includes(word)) return 'bad';
  return 'busy';
}

const stateCell = (word) => el('span', { class: `state ${tone(word)}` }, word);

function render() {
  renderNodes();
  renderWorkloads();
  renderMigrations();
  const online = state.nodes.filter((n) => n.state === 'online').length;
  setConn(`signed in · ${online}/${state.nodes.length} nodes online · updated ${time(Date.now())}`);
}

/**
 * Make `box`'s children the `fresh` ones (each with an id), changing only what changed:
 * a row whose cell reads the same keeps that cell, so a button being pressed or holding
 * the keyboard focus is not swapped away under the user every refresh.
 */
function patch(box, fresh) {
  const old = new Map([...box.children].map((c) => [c.id, c]));
  fresh.forEach((node, i) => {
    const prev = old.get(node.id);
    let keep = node;
    if (prev && prev.tagName === node.tagName) {
      for (const a of prev.getAttributeNames()) if (!node.hasAttribute(a)) prev.removeAttribute(a);
      for (const a of node.getAttributeNames()) prev.setAttribute(a, node.getAttribute(a));
      const [was, now] = [[...prev.children], [...node.children]];
      if (was.length !== now.length) prev.replaceChildren(...now);
      else now.forEach((c, j) => was[j].outerHTML !== c.outerHTML && prev.replaceChild(c, was[j]));
      keep = prev;
    }
    if (box.children[i] !== keep) box.insertBefore(keep, box.children[i] || null);
  });
  while (box.children.length > fresh.length) box.lastChild.remove();
}

function renderNodes() {
  $('#no-nodes').hidden = state.nodes.length > 0;
  for (const tier of TIERS) {
    const nodes = state.nodes.filter((n) => n.tier === tier);
    $(`#tier-${tier}`).hidden = !nodes.length;
    $(`#tier-${tier} h3`).textContent = `${tier} (${nodes.length})`;
    const rows = nodes.map((n) => {
      const info = n.info;
      const runtimes = info.runtimes.map(
        (r) => `${r.kind} ${r.version || '?'}${r.healthy ? '' : ' (unhealthy)'}${r.checkpoint ? ', checkpoints' : ''}`,
      );
      const cpu = typeof info.cpu.vendor === 'string' ? info.cpu.vendor : JSON.stringify(info.cpu.vendor);
      return el(
        'tr',
        { id: `node-${n.name}`, 'data-state': n.state, 'data-draining': n.draining },
        el('td', {}, el('strong', {}, n.name)),
        el('td', {}, stateCell(n.state), n.draining ? el('div', { class: 'small' }, 'draining: takes nothing new') : null),
        el(
          'td',
          {},
          `CPU ${n.load.cpu_percent.toFixed(0)} %`,
          el('div', { class: 'small' }, `memory ${mib(n.load.memory_used_bytes)} of ${mib(info.memory_bytes)}`),
        ),
        el('td', {}, runtimes.join('; ')),
        el('td', {}, `${cpu}, ${info.arch}`, el('div', { class: 'small' }, info.cpu.model)),
        el('td', {}, n.workloads.length ? n.workloads.join(', ') : '—'),
        el(
          'td',
          {},
          el('button', { type: 'button', id: `drain-${n.name}`, 'data-node': n.name, 'data-action': 'drain' }, n.draining ? 'Undrain' : 'Drain'),
        ),
      );
    });
    patch($(`#tier-${tier} tbody`), rows);
  }
}

function renderWorkloads() {
  $('#no-workloads').hidden = state.workloads.length > 0;
  $('#workload-table').hidden = !state.workloads.length;
  const rows = state.workloads.map((w) => {
    // placed there, or moved there since (the placement answer is the submit's)
    const moved = state.migrations
      .filter((m) => m.workload === w.name && m.state === 'succeeded' && m.target === w.node)
      .sort((a, b) => b.requested_ms - a.requested_ms)[0];
    const placed = state.explained.get(w.name) || {};
    const why = moved ? `moved here (${moved.id}): ${moved.why}` : placed.why || '';
    const armed = state.removeArmed === w.name;
    return el(
      'tr',
      { id: `wl-${w.name}`, 'data-node': w.node, 'data-state': w.state },
      el('td', {}, el('strong', {}, w.name), el('div', { class: 'small' }, w.spec.image)),
      el('td', {}, w.node),
      el('td', {}, w.runtime, el('div', { class: 'small' }, w.decision.reason)),
      el('td', {}, stateCell(w.state), w.last_event ? el('div', { class: 'small' }, w.last_event) : null),
      // workloads have no overlay address in the API yet
      el('td', {}, '—'),
      el('td', { class: 'small' }, why || '—'),
      el(
        'td',
        {},
        el('button', { type: 'button', id: `move-${w.name}`, 'data-workload': w.name, 'data-action': 'move' }, 'Move…'),
        ' ',
        el(
          'button',
          { type: 'button', id: `remove-${w.name}`, 'data-workload': w.name, 'data-action': 'remove' },
          armed ? 'Confirm remove' : 'Remove',
        ),
      ),
    );
  });
  patch($('#workload-table tbody'), rows);
}

/** How far a migration got: its record's state, or further if the events say so. */
function progressOf(m) {
  const byState = { pending: 1, running: 2, succeeded: 3, failed: 3, cancelled: 3 }[m.state] || 0;
  const seen = (state.phases.get(m.id) || []).map((e) => PHASES.indexOf(e.kind) + 1);
  const ended = ['migration-failed', 'migration-cancelled'];
  const failed = (state.phases.get(m.id) || []).some((e) => ended.includes(e.kind));
  return Math.max(byState, failed ? 3 : 0, ...seen);
}

function renderMigrations() {
  const list = [...state.migrations].sort((a, b) => b.requested_ms - a.requested_ms).slice(0, 10);
  $('#no-migrations').hidden = list.length > 0;
  const articles = [];
  for (const m of list) {
    const events = state.phases.get(m.id) || [];
    const value = progressOf(m);
    const ended = ['failed', 'succeeded', 'cancelled'].includes(m.state);
    const word = value >= 3 && !ended ? 'finishing' : m.state;
    const last = ['failed', 'cancelled'].includes(m.state) ? m.state : 'done';
    const phaseName = ['', 'requested', 'started on the source', last][value];
    const r = m.report;
    articles.push(
      el(
        'article',
        {
          class: 'migration',
          id: `mig-${m.id}`,
          'data-workload': m.workload,
          'data-state': m.state,
          'data-events': events.map((e) => e.kind).join(' '),
        },
        el('h3', {}, `${m.workload}: ${m.source} → ${m.target} `, stateCell(word)),
        el('div', { class: 'small' }, `${m.id} · requested ${time(m.requested_ms)} · mode ${m.mode || 'auto'} · target chosen by ${m.chosen_by}: ${m.why}`),
        el(
          'p',
          {},
          el('progress', { max: 3, value, 'aria-label': `progress of ${m.id}` }, `${value} of 3`),
          ` phase ${value} of 3: ${phaseName}`,
        ),
        events.length
          ? el('ol', { class: 'phases' }, events.map((e) => el('li', {}, `${time(e.at_ms)} ${e.kind}: ${e.message}`)))
          : null,
        m.error ? el('p', { class: 'error' }, `Error: ${m.error}`) : null,
        r
          ? el(
              'dl',
              { class: 'report' },
              el('dt', {}, 'downtime'),
              el('dd', {}, secs(r.downtime_millis)),
              el('dt', {}, 'total'),
              el('dd', {}, secs(r.total_millis)),
              el('dt', {}, 'bytes on the wire'),
              el('dd', {}, `${mib(r.bytes_wire)} (state ${mib(r.bytes_raw)} before compression)`),
              el('dt', {}, 'mode'),
              el('dd', {}, r.mode),
              el('dt', {}, 'why'),
              el('dd', {}, r.reason),
              el('dt', {}, 'phases'),
              el('dd', {}, r.phases.map((p) => `${p.name} ${secs(p.millis)}`).join(' · ')),
            )
          : null,
      ),
    );
  }
  patch($('#migrations'), articles);
}

// ---- live events (fetch, not EventSource: EventSource cannot send the Authorization header) ----

async function streamEvents(gen) {
  while (gen === state.gen) {
    try {
      const r = await fetch('/v1/events', {
        headers: { Authorization: `Bearer ${state.token}`, Accept: 'text/event-stream' },
        cache: 'no-store',
        signal: state.abort.signal,
      });
      if (r.status === 401) {
        signOut('Signed out: the broker refused the token for events');
        return;
      }
      if (!r.ok) throw new Error(`events: HTTP ${r.status}`);
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value.replace(/\r\n?/g, '\n');
        let end;
        while ((end = buf.indexOf('\n\n')) >= 0) {
          dispatch(buf.slice(0, end));
          buf = buf.slice(end + 2);
        }
      }
    } catch (e) {
      if (e.name === 'AbortError') return;
      setConn(`event stream lost (${describe(e)}); reconnecting`);
    }
    await sleep(2000);
    refreshSoon();
  }
}

/** One Server-Sent Events block: `event:` and `data:` lines; `:` lines keep the stream alive. */
function dispatch(block) {
  const data = block
    .split('\n')
    .filter((l) => l.startsWith('data:'))
    .map((l) => l.slice(5).replace(/^ /, ''))
    .join('\n');
  if (!data) return;
  let ev;
  try {
    ev = JSON.parse(data);
  } catch (_) {
    return;
  }
  const log = $('#events');
  log.prepend(
    el(
      'li',
      {},
      `${time(ev.at_ms)} `,
      el('span', { class: 'kind' }, ev.kind || 'event'),
      ` ${ev.message || ''}`,
      ev.by ? ` (by ${ev.by})` : '',
    ),
  );
  while (log.children.length > 200) log.lastChild.remove();
  if (ev.migration) {
    const list = state.phases.get(ev.migration) || [];
    list.push({ kind: ev.kind, at_ms: ev.at_ms, message: ev.message });
    state.phases.set(ev.migration, list);
    renderMigrations();
  }
  refreshSoon();
}

// ---- actions: each one call of the /v1 API ----

async function act(what, call) {
  const out = $('#action-result');
  out.className = '';
  out.textContent = `${what}…`;
  try {
    await call();
    out.textContent = `${what}: done`;
  } catch (e) {
    out.className = 'error';
    out.textContent = `${what} failed: ${describe(e)}`;
  }
  refresh();
}

function drain(node, on) {
  act(`${on ? 'Drain' : 'Undrain'} ${node}`, () =>
    api(on ? 'POST' : 'DELETE', `/v1/nodes/${encodeURIComponent(node)}/drain`),
  );
}

function remove(name) {
  if (state.removeArmed !== name) {
    // a second press confirms: no dialog that blocks the page
    state.removeArmed = name;
    renderWorkloads();
    return;
  }
  state.removeArmed = null;
  act(`Remove ${name}`, () => api('DELETE', `/v1/workloads/${encodeURIComponent(name)}`));
}

function openMove(name) {
  const w = state.workloads.find((x) => x.name === name);
  if (!w) return;
  state.moving = w.name;
  $('#move-title').textContent = `Move ${w.name} from ${w.node}`;
  const targets = state.nodes.filter((n) => n.name !== w.node);
  $('#move-target').replaceChildren(
    el('option', { value: '' }, 'best (the broker chooses)'),
    ...targets.map((n) => el('option', { value: n.name }, `${n.name} (${n.tier}, ${n.state})`)),
  );
  $('#move-form').hidden = false;
  $('#move-target').focus();
}

function closeMove() {
  const name = state.moving;
  state.moving = null;
  $('#move-form').hidden = true;
  const back = name && document.getElementById(`move-${name}`);
  if (back) back.focus();
}

async function submitMove(e) {
  e.preventDefault();
  const body = { workload: state.moving };
  const to = $('#move-target').value;
  const mode = $('#move-mode').value;
  if (to) body.to = to;
  if (mode && mode !== 'auto') body.mode = mode;
  closeMove();
  await act(`Move ${body.workload} to ${to || 'the best node'}`, () => api('POST', '/v1/migrations', body));
}

async function submitSpec(e) {
  e.preventDefault();
  const out = $('#submit-result');
  const text = $('#spec').value;
  const dry = $('#dry-run').checked;
  const type = text.trim().startsWith('{') ? 'application/json' : 'application/yaml';
  out.replaceChildren(el('p', {}, 'Submitting…'));
  try {
    const ans = await api('POST', `/v1/workloads${dry ? '?dry_run=true' : ''}`, text, type);
    const p = ans.placement;
    const head = ans.workload
      ? `Placed ${ans.workload.name} on ${ans.workload.node} (${ans.workload.runtime}).`
      : `Dry run: ${p.workload} would go to ${p.chosen || 'no node'}.`;
    out.replaceChildren(
      el('p', { id: 'submit-ok' }, head),
      el('p', {}, `Why: ${p.why}`),
      el(
        'ul',
        {},
        p.scores.map((s) => el('li', {}, `${s.node}: score ${s.total.toFixed(2)}, ${s.runtime.runtime}`)),
        p.filtered.map((f) => el('li', {}, `${f.node}: ruled out: ${f.reasons.join('; ')}`)),
      ),
    );
    refresh();
  } catch (err) {
    const b = err.body && typeof err.body === 'object' ? err.body : {};
    out.replaceChildren(
      el('p', { class: 'error', id: 'submit-error', role: 'alert' }, `Refused: ${describe(err)}`),
      b.placement ? el('p', {}, `Placement: ${b.placement.why}`) : null,
    );
  }
}

// ---- experiment results (read-only files of the broker's --results directory) ----

async function loadResults() {
  const err = $('#results-error');
  err.textContent = '';
  try {
    state.results = await api('GET', '/ui/results');
  } catch (e) {
    err.textContent = describe(e);
    return;
  }
  const select = $('#run');
  const current = select.value;
  select.replaceChildren(...state.results.map((r) => el('option', { value: r.name }, r.name)));
  const preferred = state.results.find((r) => r.name === current) || state.results.find((r) => r.name.endsWith('comparison')) || state.results[0];
  if (!preferred) {
    err.textContent = 'No experiment runs in the results directory.';
    return;
  }
  select.value = preferred.name;
  showRun(preferred.name);
}

async function showRun(name) {
  const run = state.results.find((r) => r.name === name);
  if (!run) return;
  const base = `/ui/results/${encodeURIComponent(name)}`;
  $('#report').textContent = run.files.includes('report.md') ? 'Loading…' : 'This run has no report.md.';
  if (run.files.includes('report.md')) {
    api('GET', `${base}/report.md`)
      .then((t) => ($('#report').textContent = t))
      .catch((e) => ($('#report').textContent = describe(e)));
  }
  const fig = run.files.includes('fig3.svg') ? 'fig3.svg' : run.files.includes('fig3.png') ? 'fig3.png' : null;
  $('#fig3-box').hidden = !fig;
  if (!fig) return;
  // an <img> cannot send the token: fetch it, then show the bytes
  const r = await fetch(`${base}/${fig}`, { headers: { Authorization: `Bearer ${state.token}` } });
  if (!r.ok) {
    $('#results-error').textContent = `${fig}: HTTP ${r.status}`;
    return;
  }
  if (state.figUrl) URL.revokeObjectURL(state.figUrl);
  state.figUrl = URL.createObjectURL(await r.blob());
  $('#fig3').src = state.figUrl;
}

// ---- wiring ----

document.addEventListener('DOMContentLoaded', () => {
  $('#signin-form').addEventListener('submit', (e) => {
    e.preventDefault();
    signIn($('#token').value.trim());
  });
  $('#signout').addEventListener('click', () => signOut('Signed out.'));
  for (const b of document.querySelectorAll('#views button')) b.addEventListener('click', () => show(b.dataset.view));
  $('#move-form').addEventListener('submit', submitMove);
  $('#move-cancel').addEventListener('click', closeMove);
  $('#submit-form').addEventListener('submit', submitSpec);
  $('#spec-file').addEventListener('change', async (e) => {
    const f = e.target.files[0];
    if (f) $('#spec').value = await f.text();
  });
  $('#run').addEventListener('change', (e) => showRun(e.target.value));
  // the rows' buttons, by what they are for (rows are redrawn; this listener stays)
  $('#view-overview').addEventListener('click', (e) => {
    const b = e.target.closest('button[data-action]');
    if (!b) return;
    if (b.dataset.action === 'drain') {
      const n = state.nodes.find((x) => x.name === b.dataset.node);
      if (n) drain(n.name, !n.draining);
    } else if (b.dataset.action === 'move') openMove(b.dataset.workload);
    else if (b.dataset.action === 'remove') remove(b.dataset.workload);
  });
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) signIn(saved);
  else $('#token').focus();
  // wired: what a script driving this page (the end-to-end test) waits for
  document.documentElement.dataset.ready = 'true';
});
