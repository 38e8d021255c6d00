// CRUD mix against api-rest at a constant arrival rate: each iteration creates a resource,
// reads it, replaces it (If-Match), lists a page, and deletes every fourth one.
//
//   loadtest/run rest            (or: k6 run loadtest/rest-api-test.js)
//   RATE=200 DURATION=30s BASE_URL=http://127.0.0.1:8080 k6 run loadtest/rest-api-test.js
import http from 'k6/http';
import { check } from 'k6';
import exec from 'k6/execution';
import { AUTH, constantRate } from './lib/scenario.js';

const BASE = __ENV.BASE_URL || 'http://127.0.0.1:8080';
const RUN = __ENV.RUN_ID || `k6-${Date.now()}`;
const JSON_HEADERS = Object.assign({ 'Content-Type': 'application/json' }, AUTH);

export const options = {
  scenarios: {
    crud: constantRate(),
  },
  thresholds: {
    http_req_failed: ['rate<0.01'],
    checks: ['rate>0.99'],
    'http_req_duration{op:create}': ['p(95)<250'],
    'http_req_duration{op:get}': ['p(95)<100'],
    'http_req_duration{op:replace}': ['p(95)<250'],
    'http_req_duration{op:list}': ['p(95)<250'],
    'http_req_duration{op:delete}': ['p(95)<250'],
    dropped_iterations: ['count<10'],
  },
};

export default function () {
  const n = exec.scenario.iterationInTest;
  const created = http.post(`${BASE}/api/v1/resources`,
    JSON.stringify({ name: `${RUN}-${n}`, description: 'k6', attributes: { run: RUN } }),
    { headers: JSON_HEADERS, tags: { op: 'create' } });
  if (!check(created, { 'create is 201': (r) => r.status === 201 })) return;
  const id = created.json('id');
  const url = `${BASE}/api/v1/resources/${id}`;

  const got = http.get(url, { headers: AUTH, tags: { op: 'get' } });
  check(got, { 'get is 200': (r) => r.status === 200 && r.json('id') === id });

  const replaced = http.put(url,
    JSON.stringify({ name: `${RUN}-${n}-v2`, description: 'k6, replaced', attributes: { run: RUN } }),
    { headers: Object.assign({ 'If-Match': got.headers['Etag'] || '"1"' }, JSON_HEADERS), tags: { op: 'replace' } });
  check(replaced, { 'replace is 200 with version 2': (r) => r.status === 200 && r.json('version') === 2 });

  const page = http.get(`${BASE}/api/v1/resources?limit=20`, { headers: AUTH, tags: { op: 'list' } });
  check(page, { 'list is 200': (r) => r.status === 200 });

  if (n % 4 === 0) {
    const deleted = http.del(url, null, { headers: AUTH, tags: { op: 'delete' } });
    check(deleted, { 'delete is 204': (r) => r.status === 204 });
  }
}
