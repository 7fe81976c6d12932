"""The page's stylesheet and script, inlined into every page (no build chain, no files to serve, no CDN)."""

CSS = """
body{font-family:system-ui,sans-serif;margin:0;background:#111;color:#eee}
nav{padding:8px 12px;background:#222}nav a{color:#9cf;margin-right:14px}.who{float:right}
main{padding:12px}a{color:#9cf}.live{display:flex;gap:16px}.view{flex:0 0 600px}.side{flex:1 1 400px;min-width:0}
.view img{width:100%;border:1px solid #444}.status{table-layout:fixed;width:100%}.status td{word-break:break-all}
.verdict{font-size:96px;font-weight:800;text-align:center;border-radius:8px;padding:8px 24px}
.v-OK{background:#1b5e20}.v-NG{background:#b71c1c}.v-REVIEW{background:#e65100}.v-FAULT{background:#4a148c}.v--{background:#333}
.verdict-s{padding:2px 10px;border-radius:4px}.score{font-size:22px;margin:8px 0}
canvas{background:#1a1a1a;border:1px solid #333;display:block;margin:6px 0;max-width:100%}
.status td{padding:2px 8px;border-bottom:1px solid #333;font-size:14px}
.grid{display:flex;flex-wrap:wrap;gap:8px}.card{display:flex;flex-direction:column;color:#eee;text-decoration:none;
padding:4px;border-radius:4px;font-size:13px}.card img{width:160px}
.filters a{margin-right:8px;color:#9cf}.filters a.on{font-weight:800;text-decoration:underline}
img.full{max-width:100%;border:1px solid #444}button{font-size:18px;padding:8px 16px;margin:4px}
dialog{background:#222;color:#eee;border:1px solid #666;max-width:900px}dialog table td,dialog table th{padding:2px 8px}
.versions td,.versions th{padding:3px 8px;border-bottom:1px solid #333}.versions tr.active{background:#223}
.audit li{font-family:monospace;font-size:12px}.err{color:#f88}
"""

JS = r"""
(function(){
const csrf = document.querySelector('meta[name=csrf]').content;
const B = document.querySelector('meta[name=base]').content;   // '/line/<name>', or '' (single line at /)
async function post(url, data){
  const r = await fetch(url, {method:'POST', credentials:'same-origin',
    headers:{'Content-Type':'application/json','X-CSRF-Token':csrf}, body:JSON.stringify(data||{})});
  const j = await r.json().catch(()=>({error:'HTTP '+r.status}));
  if(!r.ok) throw new Error(j.error || ('HTTP '+r.status));
  return j;
}
const esc = s => String(s).replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
const f3 = x => (x===null||x===undefined) ? '-' : Number(x).toFixed(3);
const lo = document.getElementById('logout');
if(lo) lo.onclick = () => post('/logout').then(()=>location.href='/');

// ---- lines: the selector in the navigation, and the overview table ------------------------------------------
const sel = document.getElementById('lineselect');
if(sel) sel.onchange = () => { if(sel.value) location.href = '/line/'+encodeURIComponent(sel.value)+'/'; };
const pct = y => (y===null||y===undefined) ? '-' : (100*y).toFixed(1)+' %';
function showLines(lines){
  if(!lines) return;
  if(sel) lines.forEach(l => { const o = Array.from(sel.options).find(o=>o.value===l.name);
    if(o) o.textContent = l.name+' - '+l.state+' - '+(l.last_verdict||'-'); });
  const t = document.getElementById('overview'); if(!t) return;
  t.querySelectorAll('tr[data-line]').forEach(tr => tr.remove());
  lines.forEach(l => { const tr = t.insertRow(); tr.dataset.line = l.name; const v = l.last_verdict||'-';
    tr.innerHTML = '<td><a href="'+esc(l.url)+'">'+esc(l.name)+'</a></td><td class="state">'+esc(l.state)+(l.reason?' ('+esc(l.reason)+')':'')+
      '</td><td><span class="verdict-s v-'+esc(v)+'">'+esc(v)+'</span></td><td>'+pct(l.yield)+'</td><td>'+l.rate_per_min+' /min</td><td>'+
      l.frames+'</td><td>'+esc(l.bundle_id)+'</td>'; });
}
if(document.getElementById('overview')){
  const poll = () => fetch('/api/lines').then(r=>r.json()).then(showLines).catch(()=>{}).finally(()=>setTimeout(poll, 2000));
  setTimeout(poll, 2000);
}

// ---- live view -------------------------------------------------------------------------------------------
let scores = [], threshold = null, lastId = null;
function drawTrend(){
  const c = document.getElementById('trend'); if(!c) return;
  const g = c.getContext('2d'), W = c.width, H = c.height; g.clearRect(0,0,W,H);
  const vals = scores.map(s=>s[1]);
  const top = Math.max(threshold||0, ...vals, 1) * 1.1;
  const y = v => H - 4 - (H-8) * v / top;
  if(threshold){ g.strokeStyle='#f44'; g.setLineDash([6,4]); g.beginPath(); g.moveTo(0,y(threshold)); g.lineTo(W,y(threshold)); g.stroke(); g.setLineDash([]);
    g.fillStyle='#f44'; g.fillText('threshold '+threshold.toFixed(2), 4, y(threshold)-3); }
  g.strokeStyle='#9cf'; g.beginPath();
  vals.forEach((v,i)=>{ const x = vals.length>1 ? i*(W-8)/(vals.length-1)+4 : W/2; i? g.lineTo(x,y(v)) : g.moveTo(x,y(v)); });
  g.stroke();
  vals.forEach((v,i)=>{ const x = vals.length>1 ? i*(W-8)/(vals.length-1)+4 : W/2; g.fillStyle = v>=threshold ? '#f44' : '#7f7'; g.fillRect(x-2,y(v)-2,4,4); });
  g.fillStyle='#aaa'; g.fillText('score trend (last '+vals.length+')', W-150, 12);
  c.dataset.points = vals.length;
}
function drawHist(){
  const c = document.getElementById('hist'); if(!c) return;
  const g = c.getContext('2d'), W = c.width, H = c.height; g.clearRect(0,0,W,H);
  const vals = scores.map(s=>s[1]); if(!vals.length){ c.dataset.points = 0; return; }
  const top = Math.max(threshold||0, ...vals) * 1.1, bins = 30, n = new Array(bins).fill(0);
  vals.forEach(v => n[Math.min(bins-1, Math.floor(v/top*bins))]++);
  const m = Math.max(...n), bw = W/bins;
  n.forEach((k,i)=>{ const h = (H-16)*k/m; g.fillStyle = (i+1)*top/bins > threshold ? '#c55' : '#5a5'; g.fillRect(i*bw+1, H-h, bw-2, h); });
  if(threshold){ const x = W*threshold/top; g.strokeStyle='#f44'; g.beginPath(); g.moveTo(x,0); g.lineTo(x,H); g.stroke(); }
  g.fillStyle='#aaa'; g.fillText('score histogram', W-110, 12);
  c.dataset.points = vals.length;
}
function showStatus(st){
  const t = document.getElementById('status'); if(!t || !st) return;
  const sh = st.shift, y = sh.yield===null ? '-' : (100*sh.yield).toFixed(1)+' %';
  const lat = Object.entries(st.latency_ms).map(([k,v])=>k+' '+v.p50.toFixed(1)).join(', ');
  const lf = st.health.last_fault;
  const rows = [['state', st.state + (st.reason? ' ('+st.reason+')':'')], ['bundle', st.bundle_id + ' (self-test ' + st.health.self_test + ')'],
    ['shift', Object.entries(sh.counts).map(([k,v])=>k+' '+v).join(', ')], ['yield', y],
    ['rate', st.rate_per_min+' parts/min'], ['latency p50 ms', lat],
    ['drift', st.drift && st.drift.length ? st.drift.join('; ') : 'none'],
    ['faults', st.health.faults + (lf ? '; last: part '+lf.frame_id+': '+lf.error : '')], ['outputs', JSON.stringify(st.health.outputs)]];
  t.innerHTML = rows.map(r=>'<tr><td>'+esc(r[0])+'</td><td>'+esc(r[1])+'</td></tr>').join('');
}
function showLatest(p){
  if(!p || p.frame_id===lastId) return;
  lastId = p.frame_id;
  const v = document.getElementById('verdict'); v.textContent = p.verdict; v.className = 'verdict v-'+p.verdict;
  document.getElementById('score').textContent = f3(p.score);
  document.getElementById('threshold').textContent = f3(p.threshold);
  document.getElementById('overlay').src = B+'/img/'+p.frame_id+'/overlay.jpg';
  document.getElementById('partlink').innerHTML = '<a href="'+B+'/part/'+p.frame_id+'">part '+p.frame_id+'</a>';
  threshold = p.threshold;
  if(p.score!==null && !scores.some(s=>s[0]===p.frame_id)){ scores.push([p.frame_id, p.score]); if(scores.length>200) scores.shift(); }
  drawTrend(); drawHist();
}
if(document.getElementById('trend')){
  fetch(B+'/api/parts?limit=200').then(r=>r.json()).then(parts=>{
    parts.reverse().forEach(p=>{ if(p.score!==null) scores.push([p.frame_id,p.score]); threshold = p.threshold; });
    if(parts.length) lastId = parts[parts.length-1].frame_id;
    drawTrend(); drawHist();
    const es = new EventSource(B+'/events');
    es.onmessage = e => { const d = JSON.parse(e.data); showLatest(d.latest); showStatus(d.status); showLines(d.lines); };
  });
}

const ns = document.getElementById('newshift');
if(ns) ns.onclick = () => { if(confirm('Reset the shift counters?')) post(B+'/api/shift').catch(e=>alert(e.message)); };

// ---- feedback dialogs ------------------------------------------------------------------------------------------
const dlg = document.getElementById('dlg'), body = document.getElementById('dlgbody'), applyB = document.getElementById('apply');
let pending = null;
function planTable(p){
  let h = '';
  for(const [name, ch] of Object.entries(p.variants)){
    h += '<h4>variant '+esc(name)+'</h4><p>memory bank '+ch.bank_before+' &rarr; '+ch.bank_after+' vectors; threshold '+
      f3(ch.threshold_before)+' &rarr; '+f3(ch.threshold_after)+'</p><table><tr><th>image</th><th>kind</th><th>before</th><th></th><th>after</th><th></th></tr>'+
      ch.images.map(i=>'<tr><td>'+esc(i.name)+'</td><td>'+esc(i.kind)+'</td><td>'+f3(i.before)+'</td><td>'+i.verdict_before+
        '</td><td>'+f3(i.after)+'</td><td class="after">'+i.verdict_after+'</td></tr>').join('')+'</table>';
  }
  if(p.conflicts.length) h += '<p class="err">'+p.conflicts.map(esc).join('<br>')+'</p>';
  return h;
}
function openPreview(title, promise, applyUrl){
  body.innerHTML = '<h3>'+esc(title)+'</h3><p>computing the effect&hellip;</p>'; applyB.disabled = true; dlg.showModal();
  promise.then(p=>{
    pending = {url: applyUrl, plan: p.plan};
    let extra = '';
    if(p.recent) extra = '<p>recent parts: '+p.recent.parts+'; newly rejected at the new threshold: '+p.recent.newly_rejected.length+'</p>';
    body.innerHTML = '<h3>'+esc(title)+'</h3>'+planTable(p)+extra+'<p>Stored defects keep the verdicts shown; apply makes a new bundle version, effective at once.</p>';
    applyB.disabled = p.conflicts.length > 0;
  }).catch(e=>{ body.innerHTML = '<p class="err">'+esc(e.message)+'</p>'; });
}
if(applyB) applyB.onclick = () => {
  applyB.disabled = true;
  post(pending.url, {plan: pending.plan}).then(r=>{
    body.innerHTML = '<p id="applied">new version '+r.bundle_version+' ('+esc(r.bundle_id)+') is in service.</p>';
    setTimeout(()=>location.reload(), 1500);
  }).catch(e=>{ body.innerHTML = '<p class="err">'+esc(e.message)+'</p>'; });
};
const cancel = document.getElementById('cancel'); if(cancel) cancel.onclick = () => dlg.close();
const good = document.getElementById('good');
if(good) good.onclick = () => openPreview('This part is good: learn it', post(B+'/api/feedback/good/preview', {frame_id: +good.dataset.frame}), B+'/api/feedback/good/apply');
const bad = document.getElementById('bad');
if(bad) bad.onclick = () => post(B+'/api/feedback/bad', {frame_id: +bad.dataset.frame}).then(r=>{
  document.getElementById('notes').innerHTML += '<li>stored as a calibration defect ('+r.pending+' waiting for recalibration on the Versions page)</li>'; bad.disabled = true;
}).catch(e=>alert(e.message));
const recal = document.getElementById('recal');
if(recal) recal.onclick = () => openPreview('Recalibrate from stored defects', post(B+'/api/recalibrate/preview'), B+'/api/recalibrate/apply');
document.querySelectorAll('button.rollback').forEach(b => b.onclick = () => {
  if(!confirm('Roll back to '+b.dataset.name+'? It is re-issued as a new version.')) return;
  post(B+'/api/rollback', {name: b.dataset.name}).then(()=>location.reload()).catch(e=>alert(e.message));
});
})();
"""
