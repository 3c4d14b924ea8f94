// What Azure's Node device SDK (azure-iot-provisioning-device with -http and -mqtt) does with
// each fault dps can inject (docs/testing-with-dps.md, "What the clients do"). Each case adds
// one rule scoped to its own registration id (`fault-*`, on the `default` instance, which
// allows fault injection in interop/dps.toml), registers once with a short deadline, records
// what happened (assigned / error / hang, how long, how many injections) and asserts it equals
// the observed behaviour in EXPECTED: a change in the SDK shows up as a failing case.
//   NODE_EXTRA_CA_CERTS=<ca.pem> node --test interop/node/device-faults.test.mjs
import { test } from 'node:test';
import assert from 'node:assert/strict';
import https from 'node:https';
import {
  HOST, ID_SCOPE, TRANSPORTS, ProvisioningDeviceClient, SymmetricKeySecurityClient,
  admin, adminCall, checkEnvironment, createSymEnrollment, quietly, randomKey, service, uid,
} from './lib.mjs';

/** How long one register() may take before it counts as a hang (ms). */
const DEADLINE = Number(process.env.DPS_INTEROP_FAULT_DEADLINE_MS || 6000);

/** Cases: name -> rule (registrationId is added), and the transports it applies to. */
const CASES = {
  // First: over HTTPS the SDK keeps connections alive between requests, so a later case could
  // reuse one and never shake hands.
  'slow-tls': { rule: { action: 'slowTls', delayMs: 1500, count: 1 }, slowTls: true },
  'throttle-first': { rule: { action: 'throttle', retryAfter: 1, count: 1 } },
  'delay-polls': { rule: { action: 'delay', delayPolls: 2 } },
  'fail-500': { rule: { action: 'fail', errorCode: 500001, count: 1 } },
  'fail-400': { rule: { action: 'fail', errorCode: 400004, count: 1 } },
  'drop-connect': { rule: { action: 'drop', stage: 'connect', count: 1 }, only: ['mqtt'] },
  'drop-subscribe': { rule: { action: 'drop', stage: 'subscribe', count: 1 }, only: ['mqtt'] },
  'drop-register': { rule: { action: 'drop', stage: 'register', count: 1 } },
  'drop-response': { rule: { action: 'drop', stage: 'response', count: 1 } },
  'hub-down': { rule: { action: 'hubDown', count: 1 } },
};

/**
 * What the SDK did (filled from observed runs): outcome `assigned` | `error` | `hang`
 * (no answer within DEADLINE), `injected` = how many times the rule fired (attempts that met
 * the fault), `minMs` = the least time the register took (retry-after or delay honoured).
 */
const EXPECTED = JSON.parse(process.env.DPS_INTEROP_FAULT_EXPECTED || 'null') ?? {
  // HTTPS (azure-iot-provisioning-device-http)
  'http/throttle-first': { outcome: 'error', injected: 1, error: 'ThrottlingError' }, // a 429 on the first request is fatal
  'http/delay-polls': { outcome: 'assigned', injected: 1, minMs: 2000 },
  'http/fail-500': { outcome: 'error', injected: 1, error: 'InternalServerError' }, // not retried
  'http/fail-400': { outcome: 'error', injected: 1, error: 'ArgumentError' },
  'http/drop-register': { outcome: 'error', injected: 1, error: 'socket hang up' },
  'http/drop-response': { outcome: 'error', injected: 1, error: 'aborted' },
  'http/hub-down': { outcome: 'error', injected: 1, error: 'ServiceUnavailableError' }, // not retried
  'http/slow-tls': { outcome: 'assigned', injected: 1, minMs: 1500 },
  // MQTT (azure-iot-provisioning-device-mqtt)
  'mqtt/throttle-first': { outcome: 'assigned', injected: 1, minMs: 1000 },
  'mqtt/delay-polls': { outcome: 'assigned', injected: 1, minMs: 2000 },
  'mqtt/fail-500': { outcome: 'assigned', injected: 1 }, // retried
  'mqtt/fail-400': { outcome: 'error', injected: 1, error: 'ArgumentError' },
  'mqtt/drop-connect': { outcome: 'error', injected: 1, error: 'NotConnectedError' },
  'mqtt/drop-subscribe': { outcome: 'hang', injected: 1 },
  'mqtt/drop-register': { outcome: 'error', injected: 1, error: 'OperationCancelledError' },
  'mqtt/drop-response': { outcome: 'error', injected: 1, error: 'OperationCancelledError' },
  'mqtt/hub-down': { outcome: 'hang', injected: 1 },
  'mqtt/slow-tls': { outcome: 'assigned', injected: 1, minMs: 1500 },
};

async function register(transport, registrationId, key) {
  const security = new SymmetricKeySecurityClient(registrationId, key);
  const t = TRANSPORTS[transport]();
  // Observed: after a dropped MQTT connection the SDK also emits an `error` event
  // (NotConnectedError) on its MQTT base; without a listener it is an uncaught exception.
  const events = [];
  for (const emitter of [t, t._mqttBase]) {
    if (emitter && typeof emitter.on === 'function') emitter.on('error', (e) => events.push(e?.name ?? String(e)));
  }
  const client = ProvisioningDeviceClient.create(HOST, ID_SCOPE, t, security);
  const started = Date.now();
  let timer;
  const deadline = new Promise((resolve) => {
    timer = setTimeout(() => { client.cancel(() => {}); resolve({ outcome: 'hang' }); }, DEADLINE);
  });
  const run = client.register().then(
    (r) => ({ outcome: r?.registrationState?.status === 'assigned' || r?.status === 'assigned' ? 'assigned' : `status ${r?.status}` }),
    (e) => ({ outcome: 'error', error: `${e?.name ?? 'Error'}: ${String(e?.message ?? e?.description ?? e).slice(0, 160)}` }),
  );
  try {
    const r = await Promise.race([run, deadline]);
    return { ...r, ms: Date.now() - started, ...(events.length ? { events } : {}) };
  } finally {
    clearTimeout(timer);
  }
}

const observed = {};

for (const transport of ['http', 'mqtt']) {
  for (const [name, c] of Object.entries(CASES)) {
    if (c.only && !c.only.includes(transport)) continue;
    test(`${transport}: ${name}`, { timeout: DEADLINE + 15000 }, async () => {
      checkEnvironment();
      const svc = service();
      const registrationId = uid(`fault-${name}`);
      const key = randomKey();
      await createSymEnrollment(svc, registrationId, { primaryKey: key });
      const id = `n-${transport}-${name}`;
      const rule = { id, ...c.rule };
      if (c.slowTls) rule.transport = transport === 'http' ? 'https' : 'mqtt';
      else rule.registrationId = registrationId;
      await quietly(() => adminCall('DELETE', `/faults/${id}`));
      // Observed: the SDKs share Node's keep-alive agent, so the device would reuse the
      // service client's connection and never shake hands; close the pooled ones first.
      if (c.slowTls) https.globalAgent.destroy();
      await admin('POST', '/faults', rule);
      let seen;
      try {
        seen = await register(transport, registrationId, key);
      } finally {
        const list = await admin('GET', '/faults');
        const left = (list.items || []).find((r) => r.id === id);
        // A rule with `count` is removed once spent; then it fired `count` times.
        const injected = left ? left.injected : c.rule.count;
        await quietly(() => adminCall('DELETE', `/faults/${id}`));
        await quietly(() => svc.deleteIndividualEnrollment(registrationId));
        if (seen) seen.injected = injected;
      }
      observed[`${transport}/${name}`] = seen;
      console.log(`[faults] ${transport}/${name}: ${JSON.stringify(seen)}`);
      const want = EXPECTED[`${transport}/${name}`];
      assert.ok(want, `no expectation for ${transport}/${name}; observed ${JSON.stringify(seen)}`);
      assert.equal(seen.outcome, want.outcome, `${transport}/${name}: ${JSON.stringify(seen)}`);
      if (want.injected !== undefined) assert.equal(seen.injected, want.injected, `injections: ${JSON.stringify(seen)}`);
      if (want.minMs !== undefined) assert.ok(seen.ms >= want.minMs, `took ${seen.ms} ms, expected >= ${want.minMs}: ${JSON.stringify(seen)}`);
      if (want.error !== undefined) assert.match(seen.error ?? '', new RegExp(want.error), JSON.stringify(seen));
    });
  }
}
