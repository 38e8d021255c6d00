// Where the pipeline stops keeping up. k6 creates resources over REST at a rising rate, a step
// at a time (RATES, default 100,200,400,800; STEP_SECONDS each, default 10). At the end it asks
// kafkify-lag (loadtest/src/main.rs, started by loadtest/run) what happened to every resource,
// step by step: commit → the worker's row (end to end) and commit → Kafka. A step keeps up
// if its end-to-end p99 is under LAG_LIMIT_MS (default 1000); past the rate the pipeline can
// sustain, the backlog, and with it the lag, grows through the step. It reports, per step, the
// rate asked and the rate k6 managed to write (on a small machine k6 and api-rest run out of
// CPU first), and the highest written rate that kept up; the threshold fails the run if that is
// below MIN_RATE (default 100).
//
//   loadtest/run throughput      (RATES=500,1000,2000,4000 STEP_SECONDS=20 for more)
import http from 'k6/http';
import { check, sleep } from 'k6';
import exec from 'k6/execution';
import { Trend, Gauge } from 'k6/metrics';
import { AUTH } from './lib/scenario.js';

const BASE = __ENV.BASE_URL || 'http://127.0.0.1:8080';
const LAG = __ENV.LAG_URL || 'http://127.0.0.1:7878';
const RATES = (__ENV.RATES || '100,200,400,800').split(',').map(Number);
const STEP = Number(__ENV.STEP_SECONDS || 10);
const LIMIT = Number(__ENV.LAG_LIMIT_MS || 1000);
// Each step ramps for one second, then holds its rate for STEP seconds.
const SPAN = STEP + 1;

const endToEnd = new Trend('throughput_end_to_end_ms', true);
const sustained = new Gauge('throughput_sustained_rate');

export const options = {
  teardownTimeout: '300s',
  scenarios: {
    rising: {
      executor: 'ramping-arrival-rate',
      startRate: RATES[0],
      timeUnit: '1s',
      preAllocatedVUs: 50,
      maxVUs: 400,
      stages: RATES.flatMap((r) => [
        { target: r, duration: '1s' },
        { target: r, duration: `${STEP}s` },
      ]),
    },
  },
  thresholds: {
    http_req_failed: ['rate<0.01'],
    checks: ['rate>0.99'],
    throughput_sustained_rate: [`value>=${Number(__ENV.MIN_RATE || 100)}`],
  },
};

export function setup() {
  return { run: __ENV.RUN_ID || `tp-${Date.now()}` };
}

export default function (data) {
  // The step this iteration belongs to, from the time since the scenario started.
  const elapsed = (Date.now() - exec.scenario.startTime) / 1000;
  const step = Math.min(RATES.length - 1, Math.floor(elapsed / SPAN));
  const r = http.post(`${BASE}/api/v1/resources`,
    JSON.stringify({ name: `${data.run}-s${step}-${exec.scenario.iterationInTest}` }),
    { headers: Object.assign({ 'Content-Type': 'application/json' }, AUTH), tags: { op: 'create' } });
  check(r, { 'create is 201': (x) => x.status === 201 });
}

function pct(sorted, p) {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))];
}

export function teardown(data) {
  // Everything written must reach the worker first (a backlog from the last steps may take a
  // while): wait until the count of arrived events stops growing, then look at each step.
  // k6 may not reach a step's rate (dropped iterations), so what was written is counted, not
  // computed from RATES.
  let arrived = -1;
  for (let i = 0; i < 120; i++) {
    const n = http.get(`${LAG}/lag?prefix=${data.run}-&expect=0&timeout_s=1`, { timeout: '60s' }).json('found');
    if (n === arrived) break;
    arrived = n;
    sleep(3);
  }
  let best = 0;
  let broken = false;
  const lines = ['asked/s  written/s  end-to-end p50 / p99 ms  commit→visible on Kafka p99 ms'];
  RATES.forEach((rate, i) => {
    const res = http.get(`${LAG}/lag?prefix=${data.run}-s${i}-&expect=0&timeout_s=1`, { timeout: '60s' });
    const body = res.json();
    if (!check(body, { 'kafkify-lag answered': (b) => b && !b.error })) {
      console.error(`kafkify-lag: ${res.body}`);
      return;
    }
    const e2e = body.end_to_end_ms.slice().sort((a, b) => a - b);
    const kafka = body.commit_to_visible_ms.slice().sort((a, b) => a - b);
    e2e.forEach((v) => endToEnd.add(v, { rate: String(rate) }));
    const p99 = pct(e2e, 0.99);
    const kept = e2e.length > 0 && p99 < LIMIT;
    // What k6 managed to write in the step (its ramp second included).
    const written = Math.round(e2e.length / SPAN);
    // Steps rise: the first that does not keep up ends the search.
    if (kept && !broken) best = written;
    else broken = true;
    lines.push(`${String(rate).padStart(7)}  ${String(written).padStart(9)}  ${pct(e2e, 0.5).toFixed(1)} / ${p99.toFixed(1)}${kept ? '' : '  ← lag grows'}  ${pct(kafka, 0.99).toFixed(1)}`);
  });
  sustained.add(best);
  lines.push(`highest written rate that kept up (end-to-end p99 < ${LIMIT} ms): ${best}/s`);
  // One console line per row: k6 escapes newlines inside one message.
  lines.forEach((l) => console.log(l));
}
