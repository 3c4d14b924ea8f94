// X.509 attestation with Azure's Node device SDK (azure-iot-security-x509 + the HTTP, MQTT and MqttWs
// transports): certificates issued by a group's intermediate CA (the device sends its chain), by a
// verified CA (proof of possession through the admin API), and the negative cases: unenrolled
// self-signed certificate, CN != registration id, expired certificate, unverified CA, revoked
// (deny-listed) certificate. Every certificate is generated here (interop/pki.sh, RSA 2048 and
// ECDSA P-256) in a temporary folder.
//   NODE_EXTRA_CA_CERTS=<ca.pem> node --test interop/node/device-x509.test.mjs
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  TEST_TIMEOUT, checkEnvironment, uid, service, registerX509, expectRegisterError, assertAssigned,
  makePki, admin, adminCall, refusalReason, quietly,
} from './lib.mjs';
import { assertRefused } from './device-scenarios.mjs';

const T = { timeout: TEST_TIMEOUT };

/** Registers with the device's chain (leaf + intermediates) and key. */
const register = (transport, rid, leaf) => registerX509(transport, rid, { cert: leaf.chain, key: leaf.key });

/** The refusal is for the expected reason (dps's audit log; the device only gets 401). */
async function assertReason(rid, pattern) {
  const reason = await refusalReason(rid);
  assert.match(reason, pattern, `recorded reason for ${rid}`);
}

function x509Scenarios(transport) {
  describe(`X.509 device SDK over ${transport}`, () => {
    let svc;
    let pki;
    const cleanup = [];
    before(() => { checkEnvironment(); svc = service(); pki = makePki(); });
    after(async () => {
      for (const fn of cleanup.reverse()) await quietly(fn);
      pki?.dispose();
    });

    /** Enrollment group whose signing certificate is `ca` (PEM). */
    const signingGroup = async (gid, ca) => {
      const { responseBody } = await svc.createOrUpdateEnrollmentGroup({
        enrollmentGroupId: gid,
        attestation: { type: 'x509', x509: { signingCertificates: { primary: { certificate: ca.cert } } } },
        provisioningStatus: 'enabled',
      });
      assert.equal(responseBody.enrollmentGroupId, gid);
      cleanup.push(() => svc.deleteEnrollmentGroup(gid));
      return responseBody;
    };
    /** Enrollment group that references the uploaded CA certificate `name`. */
    const caRefGroup = async (gid, name) => {
      await svc.createOrUpdateEnrollmentGroup({
        enrollmentGroupId: gid,
        attestation: { type: 'x509', x509: { caReferences: { primary: name } } },
        provisioningStatus: 'enabled',
      });
      cleanup.push(() => svc.deleteEnrollmentGroup(gid));
    };
    /** Uploads a CA certificate (unverified). */
    const uploadCa = async (name, ca) => {
      const c = await admin('PUT', `/certificates/${name}`, { certificate: ca.cert });
      cleanup.push(() => adminCall('DELETE', `/certificates/${name}`));
      assert.equal(c.name, name);
      assert.equal(c.isVerified, false, `a new CA is unverified: ${JSON.stringify(c)}`);
      return c;
    };
    /** A root CA (RSA) -> intermediate (ECDSA P-256) and a group on the intermediate. */
    const intermediateGroup = async (tag) => {
      const root = pki.ca(`${tag}-root`, `${tag} root CA`, 'rsa');
      const inter = pki.ca(`${tag}-inter`, `${tag} intermediate CA`, 'ec', `${tag}-root`);
      const gid = uid(`${transport}-x5g-${tag}`);
      await signingGroup(gid, inter);
      return { root, inter, gid, issuer: `${tag}-inter` };
    };

    it('group on an intermediate CA: a device sending leaf + intermediate is assigned', T, async () => {
      const g = await intermediateGroup('a');
      const rid = uid(`${transport}-x5i`);
      const leaf = pki.leaf(rid, rid, 'ec', g.issuer);
      assert.equal((leaf.chain.match(/BEGIN CERTIFICATE/g) || []).length, 2, 'the device sends leaf + intermediate');
      const state = await register(transport, rid, leaf);
      assertAssigned(state, { registrationId: rid, substatus: 'initialAssignment' });
      cleanup.push(() => svc.deleteDeviceRegistrationState(rid));
      const { responseBody: rs } = await svc.getDeviceRegistrationState(rid);
      assert.equal(rs.status, 'assigned');
      assert.equal(rs.assignedHub, state.assignedHub, 'service view agrees with the device view');
      assert.equal(rs.x509?.enrollmentGroupId, g.gid, `registration record names the group: ${JSON.stringify(rs)}`);
      // registering again with the same certificate: same hub and device
      const again = await register(transport, rid, leaf);
      assertAssigned(again, { registrationId: rid });
      assert.equal(again.assignedHub, state.assignedHub);
    });

    it('group on a root CA: a device sending leaf + intermediate (no root) is assigned', T, async () => {
      const root = pki.ca('b-root', 'b root CA', 'ec');
      pki.ca('b-inter', 'b intermediate CA', 'rsa', 'b-root');
      const gid = uid(`${transport}-x5r`);
      await signingGroup(gid, root);
      const rid = uid(`${transport}-x5rdev`);
      const leaf = pki.leaf(rid, rid, 'rsa', 'b-inter');
      assertAssigned(await register(transport, rid, leaf), { registrationId: rid });
      cleanup.push(() => svc.deleteDeviceRegistrationState(rid));
    });

    it('verified CA (proof of possession) admits a group device through caReferences', T, async () => {
      const ca = pki.ca('v-root', `verified CA ${uid('v')}`, 'rsa');
      const name = uid(`${transport}-ca-ok`);
      await uploadCa(name, ca);
      const { verificationCode } = await admin('POST', `/certificates/${name}/generateVerificationCode`);
      assert.ok(verificationCode, 'a verification code');
      // a wrong proof (signed by another key) is refused with 400
      pki.ca('v-other', 'someone else', 'ec');
      const wrong = pki.leaf('v-wrong', verificationCode, 'ec', 'v-other');
      const bad = await adminCall('POST', `/certificates/${name}/verify`, { certificate: wrong.cert });
      assert.equal(bad.status, 400, `proof signed by another key: ${JSON.stringify(bad)}`);
      const proof = pki.leaf('v-proof', verificationCode, 'rsa', 'v-root');
      const verified = await admin('POST', `/certificates/${name}/verify`, { certificate: proof.cert });
      assert.equal(verified.isVerified, true, JSON.stringify(verified));
      const gid = uid(`${transport}-x5ca`);
      await caRefGroup(gid, name);
      const rid = uid(`${transport}-x5cadev`);
      const leaf = pki.leaf(rid, rid, 'rsa', 'v-root');
      const state = await register(transport, rid, leaf);
      assertAssigned(state, { registrationId: rid, substatus: 'initialAssignment' });
      cleanup.push(() => svc.deleteDeviceRegistrationState(rid));
      const { responseBody: rs } = await svc.getDeviceRegistrationState(rid);
      assert.equal(rs.x509?.enrollmentGroupId, gid, JSON.stringify(rs));
    });

    // ---- negative cases: each must end in the SDK's error, not a timeout ----
    it('unenrolled self-signed certificate is refused', T, async () => {
      const rid = uid(`${transport}-x5un`);
      const self = pki.leaf(rid, rid, 'ec', '-');
      const err = await expectRegisterError(register(transport, rid, self));
      assertRefused(err, transport, { allowNotFound: true });
      await assertReason(rid, /no enrollment matches/);
    });

    it('certificate whose CN is not the registration id is refused', T, async () => {
      const g = await intermediateGroup('cn');
      const rid = uid(`${transport}-x5cn`);
      const leaf = pki.leaf(`${rid}-leaf`, `${rid}-other`, 'ec', g.issuer);
      const err = await expectRegisterError(register(transport, rid, leaf));
      assertRefused(err, transport, { allowNotFound: true });
      await assertReason(rid, /common name .* does not match the registration id/);
      // the same chain with the matching registration id is fine (the group itself is good)
      const other = `${rid}-other`;
      assertAssigned(await register(transport, other, leaf), { registrationId: other });
      cleanup.push(() => svc.deleteDeviceRegistrationState(other));
    });

    it('expired certificate (2020-01-01..2020-02-01) under an enrolled CA is refused', T, async () => {
      const g = await intermediateGroup('exp');
      const rid = uid(`${transport}-x5exp`);
      const leaf = pki.leaf(rid, rid, 'ec', g.issuer, { expired: true });
      assert.ok(new Date(leaf.x509.validTo) < new Date(), `expired: ${leaf.x509.validTo}`);
      const err = await expectRegisterError(register(transport, rid, leaf));
      assertRefused(err, transport, { allowNotFound: true });
      await assertReason(rid, /expired at 2020-02-01/);
    });

    it('a CA that was uploaded but never verified admits nobody', T, async () => {
      const ca = pki.ca('u-root', `unverified CA ${uid('u')}`, 'ec');
      const name = uid(`${transport}-ca-unv`);
      await uploadCa(name, ca);
      await admin('POST', `/certificates/${name}/generateVerificationCode`);
      const gid = uid(`${transport}-x5unv`);
      await caRefGroup(gid, name);
      const rid = uid(`${transport}-x5unvdev`);
      const leaf = pki.leaf(rid, rid, 'ec', 'u-root');
      const err = await expectRegisterError(register(transport, rid, leaf));
      assertRefused(err, transport, { allowNotFound: true });
      await assertReason(rid, /is not verified/);
      const { body } = await adminCall('GET', `/certificates/${name}`);
      assert.equal(body?.isVerified, false, JSON.stringify(body));
    });

    it('a revoked (deny-listed SHA-256 thumbprint) certificate is refused after a first success', T, async () => {
      const g = await intermediateGroup('rev');
      const rid = uid(`${transport}-x5rev`);
      const leaf = pki.leaf(rid, rid, 'ec', g.issuer);
      assertAssigned(await register(transport, rid, leaf), { registrationId: rid });
      cleanup.push(() => svc.deleteDeviceRegistrationState(rid));
      const entry = await admin('PUT', `/denylist/${leaf.sha256}`, { kind: 'thumbprint', reason: 'interop test' });
      cleanup.push(() => adminCall('DELETE', `/denylist/${leaf.sha256}`));
      assert.equal(entry.kind, 'thumbprint', JSON.stringify(entry));
      const err = await expectRegisterError(register(transport, rid, leaf));
      assertRefused(err, transport, { allowNotFound: true });
      await assertReason(rid, new RegExp(`revoked.*${leaf.sha256}`, 'i'));
      // a sibling certificate from the same intermediate is still admitted
      const sib = uid(`${transport}-x5sib`);
      assertAssigned(await register(transport, sib, pki.leaf(sib, sib, 'ec', g.issuer)), { registrationId: sib });
      cleanup.push(() => svc.deleteDeviceRegistrationState(sib));
    });
  });
}

x509Scenarios('http');
x509Scenarios('mqtt');
x509Scenarios('mqttws');
x509Scenarios('amqp');
x509Scenarios('amqpws');
