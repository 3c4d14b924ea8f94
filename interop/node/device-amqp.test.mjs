// Azure's Node device SDK over azure-iot-provisioning-device-amqp: Amqp (AMQP 1.0 over TLS,
// 5671) and AmqpWs (AMQP over WebSocket, wss://host:443/$iothub/websocket, subprotocol AMQPWSB10).
//   NODE_EXTRA_CA_CERTS=<ca.pem> node --test interop/node/device-amqp.test.mjs
//   NODE_EXTRA_CA_CERTS=<ca.pem> node --test --test-name-pattern=amqpws interop/node/device-amqp.test.mjs
import { describe, it, before } from 'node:test';
import assert from 'node:assert/strict';
import { deviceScenarios } from './device-scenarios.mjs';
import {
  TEST_TIMEOUT, checkEnvironment, uid, randomKey, service, createSymEnrollment, registerSym,
  expectRegisterError, refusalReason,
} from './lib.mjs';

deviceScenarios('amqp');
deviceScenarios('amqpws');

// dps checks SAS tokens in SASL (outcome `auth`), which the Node SDK reports as a bare
// NotConnectedError: make sure that error is dps's refusal, not a connection that never worked.
for (const transport of ['amqp', 'amqpws']) {
  describe(`SASL refusal over ${transport}`, () => {
    let svc;
    before(() => { checkEnvironment(); svc = service(); });
    it('a wrong key is refused in SASL and the refusal is recorded', { timeout: TEST_TIMEOUT }, async () => {
      const id = uid(`${transport}-sasl`);
      const { primaryKey } = await createSymEnrollment(svc, id);
      try {
        const err = await expectRegisterError(registerSym(transport, id, randomKey()));
        assert.equal(err.name, 'NotConnectedError', `${err.name}: ${err.message}`);
        const reason = await refusalReason(id);
        assert.ok(typeof reason === 'string' && reason.length > 0, `recorded reason: ${reason}`);
        // and the right key still works on the same listener
        const state = await registerSym(transport, id, primaryKey);
        assert.equal(state.status, 'assigned');
      } finally {
        await svc.deleteIndividualEnrollment(id).catch(() => {});
      }
    });
  });
}
