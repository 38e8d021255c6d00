// Commit-to-Kafka and end-to-end lag at a constant write rate. k6 creates resources over REST
// at RATE/s; at the end it asks kafkify-lag (loadtest/src/main.rs, started by loadtest/run) for
// what really happened to each of them: the worker's processed_events row gives the Postgres
// commit time, the Kafka record (topic, partition, offset) and when the worker stored it;
// kafkify-lag's own read_committed consumer saw when the record became visible, and the
// record's timestamp says when the relay produced it. Percentiles of
//   commit_to_visible_ms  = first seen by a read_committed consumer - Postgres commit time
//   commit_to_produced_ms = Kafka record timestamp (CreateTime)       - Postgres commit time
//   end_to_end_ms         = worker's stored time                      - Postgres commit time
// become k6 Trend metrics. For the exactly-once relay a record is produced before its Kafka
// transaction commits; a consumer waits for the commit, so visibility carries the threshold.
//
//   loadtest/run cdc-lag         (RATE=200 DURATION=30s for more)
import http from 'k6/http';
import { check } from 'k6';
import exec from 'k6/execution';
import { Trend, Counter } from 'k6/metrics';
import { AUTH, constantRate } from './lib/scenario.js';

const BASE = __ENV.BASE_URL || 'http://127.0.0.1:8080';
const LAG = __ENV.LAG_URL || 'http://127.0.0.1:7878';

const commitToVisible = new Trend('commit_to_visible_ms', true);
const commitToProduced = new Trend('commit_to_produced_ms', true);
const endToEnd = new Trend('end_to_end_ms', true);
const measured = new Counter('lag_events_measured');
const created = new Counter('lag_events_created');

export const options = {
  teardownTimeout: '180s',
  scenarios: {
    writes: constantRate(),
  },
  thresholds: {
    http_req_failed: ['rate<0.01'],
    commit_to_visible_ms: ['p(99)<500'],
    end_to_end_ms: ['p(99)<1000'],
    // Every created event was found on Kafka and in the worker's table.
    lag_events_measured: ['count>0'],
    checks: ['rate>0.99'],
  },
};

// One run id for all VUs (each VU evaluates the init code on its own).
export function setup() {
  return { run: __ENV.RUN_ID || `lag-${Date.now()}` };
}

export default function (data) {
  const r = http.post(`${BASE}/api/v1/resources`,
    JSON.stringify({ name: `${data.run}-${exec.scenario.iterationInTest}` }),
    { headers: Object.assign({ 'Content-Type': 'application/json' }, AUTH), tags: { op: 'create' } });
  if (check(r, { 'create is 201': (x) => x.status === 201 })) created.add(1);
}

export function teardown(data) {
  // The scenario's arrival count is what was created (checks above say each was a 201).
  const expected = Math.round(Number(__ENV.RATE || 100) * parseFloat(__ENV.DURATION || '20'));
  const res = http.get(`${LAG}/lag?prefix=${data.run}-&expect=${expected}&timeout_s=60`, { timeout: '120s' });
  const body = res.json();
  if (!check(body, {
    'kafkify-lag answered': (b) => b && !b.error,
    'every created event reached Kafka and the worker': (b) => b && b.found >= expected && b.commit_to_visible_ms.length === b.found,
  })) {
    console.error(`kafkify-lag: ${res.body}`);
    return;
  }
  body.commit_to_visible_ms.forEach((v) => commitToVisible.add(v));
  body.commit_to_produced_ms.forEach((v) => commitToProduced.add(v));
  body.end_to_end_ms.forEach((v) => endToEnd.add(v));
  measured.add(body.found);
}
