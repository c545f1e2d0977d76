"""The dashboard page: plain HTML and a few lines of JS polling the read API every 2 s.

Each node is a ``tr.node[data-node-id]`` whose cells have the classes ``node-id``,
``state`` (plus ``on`` or ``off``), ``gpus``, ``seq`` and ``telemetry``; the headless
Chromium test in tests/integration/test_dashboard.py reads them. Each job is a
``tr.job[data-job-id]`` whose cells have the classes ``job-id`` (a link to
``/api/jobs/{id}``), ``node``, ``state`` and ``updated``; a job whose stored outputs are not
what its receipt names shows them in a ``span.output-problems`` in its state cell. Each
replica of a deployment is a ``tr.replica[data-deployment][data-job-id]`` whose cells have
the classes ``deployment``, ``ready`` (ready of wanted), ``node`` and ``state``; a
deployment without a live replica is one such row without a job id. Each of the gateway's
newest requests is a ``tr.request`` whose cells have the classes ``at``, ``model``,
``node``, ``job``, ``status`` (the HTTP status, and the gateway's code if any), ``tokens``
(in/out, ``-`` when not reported), ``latency`` and ``ttft`` (in ms).
"""

from __future__ import annotations

__all__ = ["PAGE"]

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>gpu-coordinator</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 2em; }
table { border-collapse: collapse; }
td, th { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
.on { color: #070; } .off { color: #999; }
</style>
</head>
<body>
<h1>gpu-coordinator</h1>
<table>
<thead><tr><th>node</th><th>state</th><th>verified GPUs</th><th>last seq</th>
<th>latest telemetry</th></tr></thead>
<tbody id="nodes"><tr><td colspan="5">loading...</td></tr></tbody>
</table>
<h2>deployments</h2>
<table>
<thead><tr><th>deployment</th><th>ready</th><th>job</th><th>node</th><th>state</th></tr></thead>
<tbody id="deployments"><tr><td colspan="5">loading...</td></tr></tbody>
</table>
<h2>jobs</h2>
<table>
<thead><tr><th>job</th><th>node</th><th>state</th><th>updated</th></tr></thead>
<tbody id="jobs"><tr><td colspan="4">loading...</td></tr></tbody>
</table>
<h2>gateway requests</h2>
<table>
<thead><tr><th>at</th><th>model</th><th>node</th><th>job</th><th>status</th>
<th>tokens in/out</th><th>latency ms</th><th>first token ms</th></tr></thead>
<tbody id="requests"><tr><td colspan="8">loading...</td></tr></tbody>
</table>
<script>
const text = (v) => String(v).replace(/[&<>"]/g, (c) => "&#" + c.charCodeAt(0) + ";");
async function refresh() {
  try {
    const {nodes, total} = await (await fetch("/api/nodes")).json();
    const rows = nodes.map((n) => {
      const t = n.latest_telemetry;
      const last = t ? text(JSON.stringify(t.samples[t.samples.length - 1] || {})) : "-";
      return '<tr class="node" data-node-id="' + text(n.node_id) + '">'
        + '<td class="node-id">' + text(n.node_id) + "</td>"
        + '<td class="state ' + (n.connected ? "on" : "off") + '">'
        + (n.connected ? "connected" : "offline") + "</td>"
        + '<td class="gpus">' + (n.gpus.map(text).join("<br>") || "-") + "</td>"
        + '<td class="seq">' + n.last_agent_seq + "</td>"
        + '<td class="telemetry"><code>' + last + "</code></td></tr>";
    });
    if (total > nodes.length) {  // a page of the most recently seen: the API has the rest
      rows.push("<tr><td colspan=5>and " + (total - nodes.length) + " more: /api/nodes?offset=");
    }
    document.getElementById("nodes").innerHTML = rows.join("") || "<tr><td colspan=5>no nodes";
  } catch (e) {
    document.getElementById("nodes").innerHTML = "<tr><td colspan=5>" + text(e);
  }
  try {
    const {deployments} = await (await fetch("/api/deployments")).json();
    document.getElementById("deployments").innerHTML = deployments.flatMap((d) =>
      (d.live.length ? d.live : [{}]).map((r) =>
        '<tr class="replica" data-deployment="' + text(d.name) + '" data-job-id="'
        + text(r.job_id || "") + '">'
        + '<td class="deployment">' + text(d.name) + "</td>"
        + '<td class="ready">' + d.ready + "/" + d.replicas + "</td>"
        + '<td class="job-id">' + (r.job_id ? '<a href="/api/jobs/'
           + encodeURIComponent(r.job_id) + '">' + text(r.job_id) + "</a>" : "-") + "</td>"
        + '<td class="node ' + (r.connected ? "on" : "off") + '">' + text(r.node_id || "-")
        + "</td>"
        + '<td class="state">' + text(r.state || "placing")
        + (r.code ? " (" + text(r.code) + ")" : "") + "</td></tr>")
    ).join("") || "<tr><td colspan=5>no deployments";
  } catch (e) {
    document.getElementById("deployments").innerHTML = "<tr><td colspan=5>" + text(e);
  }
  try {
    const {jobs} = await (await fetch("/api/jobs")).json();
    document.getElementById("jobs").innerHTML = jobs.map((j) =>
      '<tr class="job" data-job-id="' + text(j.job_id) + '">'
      + '<td class="job-id"><a href="/api/jobs/' + encodeURIComponent(j.job_id) + '">'
      + text(j.job_id) + "</a></td>"
      + '<td class="node">' + text(j.node_id) + "</td>"
      + '<td class="state">' + text(j.state)
      + (j.pull_bytes ? " " + percent(j.pulled_bytes, j.pull_bytes) + "%" : "")
      + (j.fetch_bytes ? " " + percent(j.fetched_bytes, j.fetch_bytes) + "%" : "")
      + (j.code ? " (" + text(j.code) + ")" : "")
      + (j.output_problems ? ' <span class="output-problems">'
         + text(j.output_problems.join(", ")) + "</span>" : "")
      + "</td>"
      + '<td class="updated">' + text(new Date(j.updated * 1000).toISOString()) + "</td></tr>"
    ).join("") || "<tr><td colspan=4>no jobs";
  } catch (e) {
    document.getElementById("jobs").innerHTML = "<tr><td colspan=4>" + text(e);
  }
  try {
    const {requests} = await (await fetch("/api/requests?limit=50")).json();
    const ms = (s) => s === null ? "-" : String(Math.round(s * 1000));
    const n = (v) => v === null ? "-" : text(v);
    document.getElementById("requests").innerHTML = requests.map((r) =>
      '<tr class="request">'
      + '<td class="at">' + text(new Date(r.at * 1000).toISOString()) + "</td>"
      + '<td class="model">' + text(r.model) + "</td>"
      + '<td class="node">' + text(r.node_id) + "</td>"
      + '<td class="job">' + text(r.job_id) + "</td>"
      + '<td class="status">' + text(r.status) + (r.code ? " " + text(r.code) : "") + "</td>"
      + '<td class="tokens">' + n(r.tokens_in) + "/" + n(r.tokens_out) + "</td>"
      + '<td class="latency">' + ms(r.latency_s) + "</td>"
      + '<td class="ttft">' + ms(r.ttft_s) + "</td></tr>"
    ).join("") || "<tr><td colspan=8>no requests";
  } catch (e) {
    document.getElementById("requests").innerHTML = "<tr><td colspan=8>" + text(e);
  }
}
function percent(done, total) {
  return Math.floor(100 * Math.min(done, total) / total);
}
refresh();
setInterval(refresh, 2000);
</script>
</body>
</html>
"""
