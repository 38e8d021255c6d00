// The arrival-rate scenario every script uses: RATE iterations a second for DURATION, loopback
// only, small by default so a run takes seconds.
export function constantRate() {
  return {
    executor: 'constant-arrival-rate',
    rate: Number(__ENV.RATE || 100),
    timeUnit: '1s',
    duration: __ENV.DURATION || '20s',
    preAllocatedVUs: 20,
    maxVUs: 100,
  };
}

// The APIs' bearer token: loadtest/run passes ./kafkify's KAFKIFY_API_KEY as API_KEY.
export const AUTH = { Authorization: `Bearer ${__ENV.API_KEY || ''}` };
