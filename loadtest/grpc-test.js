// ProcessTask and GetTaskStatus against api-grpc at a constant arrival rate, with k6/net/grpc
// and the service's own .proto. A second scenario checks that tasks come back COMPLETED (the
// worker ran them and api-grpc consumed task.completed).
//
//   loadtest/run grpc            (or: k6 run loadtest/grpc-test.js)
//   RATE=100 DURATION=20s GRPC_ADDR=127.0.0.1:9090 k6 run loadtest/grpc-test.js
import grpc from 'k6/net/grpc';
import { check, sleep } from 'k6';
import exec from 'k6/execution';
import { Trend } from 'k6/metrics';
import { AUTH, constantRate } from './lib/scenario.js';

const ADDR = __ENV.GRPC_ADDR || '127.0.0.1:9090';
const RUN = __ENV.RUN_ID || `k6-${Date.now()}`;
const completion = new Trend('task_completion_ms', true);

const client = new grpc.Client();
client.load(['../api-grpc/proto'], 'kafkify/task/v1/task.proto');

export const options = {
  scenarios: {
    process: constantRate(),
  },
  thresholds: {
    checks: ['rate>0.99'],
    'grpc_req_duration{method:ProcessTask}': ['p(95)<250'],
    'grpc_req_duration{method:GetTaskStatus}': ['p(95)<100'],
    // From ProcessTask's answer to GetTaskStatus seeing COMPLETED: relay, worker, relay, api-grpc.
    task_completion_ms: ['p(95)<5000'],
    dropped_iterations: ['count<10'],
  },
};

let connected = false;

export default function () {
  if (!connected) {
    client.connect(ADDR, { plaintext: true, timeout: '5s' });
    connected = true;
  }
  const n = exec.scenario.iterationInTest;
  const started = Date.now();
  const created = client.invoke('kafkify.task.v1.TaskService/ProcessTask',
    { type: 'checksum', input: JSON.stringify({ run: RUN, n }) },
    { metadata: { authorization: AUTH.Authorization }, tags: { method: 'ProcessTask' }, timeout: '5s' });
  if (!check(created, { 'ProcessTask is OK': (r) => r && r.status === grpc.StatusOK })) return;
  const id = created.message.id;

  // Every tenth task is followed until it completes; the rest are read once.
  const follow = n % 10 === 0;
  for (let i = 0; i < (follow ? 100 : 1); i++) {
    const got = client.invoke('kafkify.task.v1.TaskService/GetTaskStatus', { id },
      { metadata: { authorization: AUTH.Authorization }, tags: { method: 'GetTaskStatus' } });
    check(got, { 'GetTaskStatus is OK': (r) => r && r.status === grpc.StatusOK && r.message.id === id });
    if (!follow) return;
    if (got.message && got.message.status !== 'TASK_STATUS_PENDING') {
      check(got, { 'task COMPLETED': (r) => r.message.status === 'TASK_STATUS_COMPLETED' });
      completion.add(Date.now() - started);
      return;
    }
    sleep(0.05);
  }
  check(null, { 'task COMPLETED': () => false });
}

export function teardown() {
  client.close();
}
