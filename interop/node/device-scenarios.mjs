// Device-registration scenarios shared by device-http.test.mjs, device-mqtt.test.mjs and
// device-amqp.test.mjs.
// Enrollments are created through the service SDK; devices register through
// azure-iot-provisioning-device with the given transport.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  IMMEDIATE_ID_SCOPE, IMMEDIATE_HUBS, IMMEDIATE_OWNER_CS, TEST_TIMEOUT,
  checkEnvironment, uid, randomKey, deriveKey, service, createSymEnrollment, createSymGroup,
  registerSym, registerX509, expectRegisterError, errorStatus, assertAssigned, makeSelfSignedCert, quietly,
} from './lib.mjs';

const T = { timeout: TEST_TIMEOUT };

/**
 * The SDK reported an authentication refusal: a 401 answer (UnauthorizedError), or over MQTT a
 * refused CONNECT ("Connection refused: Not authorized"), depending on where the server checks.
 * Over AMQP: a `rejected` outcome with `amqp:unauthorized-access` (X.509, checked at register),
 * or the SASL outcome `auth` (SAS tokens, checked in SASL), which the Node SDK reports as a bare
 * NotConnectedError; device-amqp.test.mjs checks that dps recorded that refusal.
 */
export function assertRefused(err, transport, { allowNotFound = false } = {}) {
  const st = errorStatus(err);
  const detail = `${err.name}: ${err.message} (status ${st}) ${JSON.stringify(err.result ?? '')} ${err.condition ?? ''}`;
  const unauthorized = err.name === 'UnauthorizedError' || st === 401
    || err.condition === 'amqp:unauthorized-access';
  const notFound = allowNotFound && (err.name === 'DeviceNotFoundError' || st === 404
    || err.condition === 'amqp:not-found');
  const connectRefused = transport !== 'http' && /not authori[sz]ed|refused|bad user ?name or password/i.test(err.message);
  const saslRefused = transport.startsWith('amqp') && err.name === 'NotConnectedError';
  assert.ok(unauthorized || notFound || connectRefused || saslRefused, `expected an authentication refusal, got ${detail}`);
  if (err.result && typeof err.result === 'object' && 'errorCode' in err.result) {
    assert.equal(Math.floor(err.result.errorCode / 1000), st ?? Math.floor(err.result.errorCode / 1000),
      `errorCode/1000 equals the status (${detail})`);
  }
}

/**
 * A disabled enrollment: Azure answers 200 {"status":"disabled"} (digest §9.4), which the Node SDK
 * reports as SyntaxError('status is disabled') carrying the body in err.result.
 */
function assertDisabled(err) {
  const detail = `${err.name}: ${err.message} ${JSON.stringify(err.result ?? null)}`;
  assert.equal(err.result?.status, 'disabled', `answer status "disabled" (${detail})`);
  assert.equal(err.result?.registrationState?.status, 'disabled', `registrationState.status "disabled" (${detail})`);
}

export function deviceScenarios(transport) {
  describe(`device SDK over ${transport}`, () => {
    let svc;
    const cleanup = [];
    before(() => { checkEnvironment(); svc = service(); });
    after(async () => { for (const fn of cleanup.reverse()) await quietly(fn); });

    const enroll = async (id, opts) => {
      const r = await createSymEnrollment(svc, id, opts);
      cleanup.push(() => svc.deleteIndividualEnrollment(id));
      return r;
    };
    const group = async (gid, opts) => {
      const r = await createSymGroup(svc, gid, opts);
      cleanup.push(() => svc.deleteEnrollmentGroup(gid));
      return r;
    };

    it('individual enrollment, primary key: assigned to a linked hub', T, async () => {
      const id = uid(`${transport}-ind`);
      const { primaryKey } = await enroll(id);
      const state = await registerSym(transport, id, primaryKey);
      assertAssigned(state, { registrationId: id, substatus: 'initialAssignment' });
      const { responseBody: rs } = await svc.getDeviceRegistrationState(id);
      assert.equal(rs.status, 'assigned');
      assert.equal(rs.assignedHub, state.assignedHub, 'service view agrees with the device view');
    });

    it('individual enrollment, secondary key also works', T, async () => {
      const id = uid(`${transport}-sec`);
      const { secondaryKey } = await enroll(id);
      assertAssigned(await registerSym(transport, id, secondaryKey), { registrationId: id });
    });

    it('group enrollment, derived device key (primary and secondary group key)', T, async () => {
      const gid = uid(`${transport}-grp`);
      const { primaryKey, secondaryKey } = await group(gid);
      const d1 = uid(`${transport}-gdev`);
      const s1 = await registerSym(transport, d1, deriveKey(primaryKey, d1));
      assertAssigned(s1, { registrationId: d1, substatus: 'initialAssignment' });
      const d2 = uid(`${transport}-gdev`);
      assertAssigned(await registerSym(transport, d2, deriveKey(secondaryKey, d2)), { registrationId: d2 });
      cleanup.push(() => svc.deleteDeviceRegistrationState(d1), () => svc.deleteDeviceRegistrationState(d2));
    });

    it('custom deviceId on the enrollment is the assigned deviceId', T, async () => {
      const id = uid(`${transport}-cdev`);
      const deviceId = `custom-${id}`;
      const { primaryKey } = await enroll(id, { deviceId });
      const state = await registerSym(transport, id, primaryKey);
      assertAssigned(state, { registrationId: id, deviceId });
    });

    it('re-registration gives the same hub and device', T, async () => {
      const id = uid(`${transport}-rereg`);
      const { primaryKey } = await enroll(id);
      const first = await registerSym(transport, id, primaryKey);
      assertAssigned(first, { registrationId: id });
      const second = await registerSym(transport, id, primaryKey);
      assertAssigned(second, { registrationId: id });
      assert.equal(second.assignedHub, first.assignedHub, 'same hub on re-registration');
      assert.equal(second.deviceId, first.deviceId, 'same device id on re-registration');
    });

    it('group device re-registration gives the same hub', T, async () => {
      const gid = uid(`${transport}-grr`);
      const { primaryKey } = await group(gid);
      const d = uid(`${transport}-grrdev`);
      const k = deriveKey(primaryKey, d);
      const first = await registerSym(transport, d, k);
      const second = await registerSym(transport, d, k);
      assertAssigned(second, { registrationId: d });
      assert.equal(second.assignedHub, first.assignedHub);
      cleanup.push(() => svc.deleteDeviceRegistrationState(d));
    });

    it('immediate-response instance (200 at once, no polling)', T, async () => {
      const isvc = service(IMMEDIATE_OWNER_CS);
      const id = uid(`${transport}-imm`);
      const { primaryKey } = await createSymEnrollment(isvc, id);
      cleanup.push(() => isvc.deleteIndividualEnrollment(id));
      const state = await registerSym(transport, id, primaryKey, { idScope: IMMEDIATE_ID_SCOPE });
      assertAssigned(state, { registrationId: id, hubs: IMMEDIATE_HUBS });
      // the enrollment lives in the other instance only
      const other = await expectRegisterError(registerSym(transport, id, primaryKey));
      assertRefused(other, transport, { allowNotFound: true });
    });

    it('x509 individual enrollment: registers with its client certificate', T, async () => {
      const id = uid(`${transport}-x509`);
      const c = makeSelfSignedCert(id);
      await svc.createOrUpdateIndividualEnrollment({
        registrationId: id,
        attestation: { type: 'x509', x509: { clientCertificates: { primary: { certificate: c.cert } } } },
      });
      cleanup.push(() => svc.deleteIndividualEnrollment(id));
      assertAssigned(await registerX509(transport, id, { cert: c.cert, key: c.key }), { registrationId: id });
      // another certificate with the same CN is refused
      const other = makeSelfSignedCert(id);
      const err = await expectRegisterError(registerX509(transport, id, { cert: other.cert, key: other.key }));
      assertRefused(err, transport, { allowNotFound: true });
    });

    // ---- negative cases: each must end in the SDK's error, not a timeout ----
    it('wrong key is refused', T, async () => {
      const id = uid(`${transport}-wrongkey`);
      await enroll(id);
      const err = await expectRegisterError(registerSym(transport, id, randomKey()));
      assertRefused(err, transport);
    });

    it('unknown registration id is refused', T, async () => {
      const id = uid(`${transport}-unknown`);
      const err = await expectRegisterError(registerSym(transport, id, randomKey()));
      assertRefused(err, transport, { allowNotFound: true });
    });

    it('group key used without derivation is refused', T, async () => {
      const gid = uid(`${transport}-under`);
      const { primaryKey } = await group(gid);
      const d = uid(`${transport}-underdev`);
      const err = await expectRegisterError(registerSym(transport, d, primaryKey));
      assertRefused(err, transport, { allowNotFound: true });
    });

    it('disabled individual enrollment is refused', T, async () => {
      const id = uid(`${transport}-disabled`);
      const { primaryKey } = await enroll(id, { provisioningStatus: 'disabled' });
      const err = await expectRegisterError(registerSym(transport, id, primaryKey));
      assertDisabled(err);
    });

    it('disabled group enrollment refuses its devices', T, async () => {
      const gid = uid(`${transport}-gdis`);
      const { primaryKey } = await group(gid, { provisioningStatus: 'disabled' });
      const d = uid(`${transport}-gdisdev`);
      const err = await expectRegisterError(registerSym(transport, d, deriveKey(primaryKey, d)));
      assertDisabled(err);
    });

    it('an enrollment deleted after registration refuses the next registration', T, async () => {
      const id = uid(`${transport}-gone`);
      const { primaryKey } = await createSymEnrollment(svc, id);
      assertAssigned(await registerSym(transport, id, primaryKey), { registrationId: id });
      await svc.deleteIndividualEnrollment(id);
      const err = await expectRegisterError(registerSym(transport, id, primaryKey));
      assertRefused(err, transport, { allowNotFound: true });
    });
  });
}

