// Azure's Node service SDK (azure-iot-provisioning-service, pinned) against the dps server.
//   NODE_EXTRA_CA_CERTS=<ca.pem> node --test interop/node/service.test.mjs
import { describe, it, before } from 'node:test';
import assert from 'node:assert/strict';
import {
  OWNER_CS, OWNER_SECONDARY_CS, READER_CS, WRONG_KEY_CS, UNKNOWN_POLICY_CS, HUBS, TEST_TIMEOUT,
  checkEnvironment, uid, randomKey, deriveKey, service, symIndividual, symGroup, createSymEnrollment,
  createSymGroup, drainQuery, runBulk, quietly, registerSym, assertAssigned, errorStatus,
  makeSelfSignedCert,
} from './lib.mjs';

const T = { timeout: TEST_TIMEOUT };
const b64len = (s) => Buffer.from(s, 'base64').length;

async function rejects(promise, name, status) {
  let err;
  try {
    const r = await promise;
    assert.fail(`expected ${name} (HTTP ${status}) but the call succeeded: ${JSON.stringify(r?.responseBody ?? r)}`);
  } catch (e) {
    if (e?.name === 'AssertionError') throw e;
    err = e;
  }
  const st = errorStatus(err);
  assert.equal(st, status, `HTTP status of ${err.name}: ${err.message} / ${err.responseBody}`);
  if (name) assert.equal(err.name, name, `error type (${err.message})`);
  return err;
}

function assertErrorBody(err, status) {
  // §1.5: every non-2xx answer carries {errorCode, trackingId, message, ...} with errorCode/1000 == status.
  let body = err.responseBody;
  if (typeof body === 'string' && body.length) body = JSON.parse(body);
  assert.ok(body && typeof body.errorCode === 'number', `error body has a numeric errorCode: ${JSON.stringify(err.responseBody)}`);
  assert.equal(Math.floor(body.errorCode / 1000), status, `errorCode ${body.errorCode} matches HTTP ${status}`);
}

describe('service SDK: individual enrollments', () => {
  let svc;
  before(() => { checkEnvironment(); svc = service(); });

  it('create with explicit keys returns the enrollment with keys, etag and timestamps', T, async () => {
    const id = uid('svc-ind');
    const primaryKey = randomKey();
    const secondaryKey = randomKey();
    const body = symIndividual(id, { primaryKey, secondaryKey, deviceId: `${id}-dev` });
    body.initialTwin = { tags: { env: 'interop' }, properties: { desired: { x: 1 } } };
    body.capabilities = { iotEdge: false };
    body.reprovisionPolicy = { updateHubAssignment: true, migrateDeviceData: true };
    const { responseBody: e, httpResponse } = await svc.createOrUpdateIndividualEnrollment(body);
    assert.equal(httpResponse.statusCode, 200);
    assert.equal(e.registrationId, id);
    assert.equal(e.deviceId, `${id}-dev`);
    assert.equal(e.provisioningStatus, 'enabled');
    assert.equal(e.attestation.type, 'symmetricKey');
    assert.equal(e.attestation.symmetricKey.primaryKey, primaryKey, 'PUT response carries the primary key');
    assert.equal(e.attestation.symmetricKey.secondaryKey, secondaryKey, 'PUT response carries the secondary key');
    assert.equal(typeof e.etag, 'string');
    assert.ok(e.etag.length > 0);
    assert.ok(!Number.isNaN(Date.parse(e.createdDateTimeUtc)), `createdDateTimeUtc ${e.createdDateTimeUtc}`);
    assert.ok(!Number.isNaN(Date.parse(e.lastUpdatedDateTimeUtc)), `lastUpdatedDateTimeUtc ${e.lastUpdatedDateTimeUtc}`);
    assert.deepEqual(e.initialTwin?.tags, { env: 'interop' });
    assert.deepEqual(e.initialTwin?.properties?.desired?.x, 1);
    assert.equal(e.capabilities?.iotEdge, false);
    await svc.deleteIndividualEnrollment(id);
  });

  it('create without keys generates them and returns them once', T, async () => {
    const id = uid('svc-gen');
    const { responseBody: e } = await svc.createOrUpdateIndividualEnrollment(symIndividual(id));
    const sk = e.attestation?.symmetricKey;
    assert.ok(sk?.primaryKey && sk?.secondaryKey, `generated keys returned on create: ${JSON.stringify(e.attestation)}`);
    assert.notEqual(sk.primaryKey, sk.secondaryKey);
    for (const k of [sk.primaryKey, sk.secondaryKey]) {
      assert.ok(b64len(k) >= 16 && b64len(k) <= 64, `generated key is 16..64 bytes (${b64len(k)})`);
    }
    // The attestation mechanism call returns the same secrets.
    const { responseBody: att } = await svc.getIndividualEnrollmentAttestationMechanism(id);
    assert.equal(att.type, 'symmetricKey');
    assert.equal(att.symmetricKey.primaryKey, sk.primaryKey);
    assert.equal(att.symmetricKey.secondaryKey, sk.secondaryKey);
    await svc.deleteIndividualEnrollment(id);
  });

  it('get returns what was created; get of an unknown id is a 404', T, async () => {
    const id = uid('svc-get');
    const { enrollment: created } = await createSymEnrollment(svc, id, { deviceId: 'custom-dev' });
    const { responseBody: got, httpResponse } = await svc.getIndividualEnrollment(id);
    assert.equal(httpResponse.statusCode, 200);
    assert.equal(got.registrationId, id);
    assert.equal(got.deviceId, 'custom-dev');
    assert.equal(got.etag, created.etag);
    assert.equal(got.attestation.type, 'symmetricKey');
    assert.equal(got.provisioningStatus, 'enabled');
    assert.equal(got.createdDateTimeUtc, created.createdDateTimeUtc);
    const err = await rejects(svc.getIndividualEnrollment(uid('svc-missing')), undefined, 404);
    assertErrorBody(err, 404);
    await svc.deleteIndividualEnrollment(id);
  });

  it('query pages through all enrollments with x-ms-max-item-count / x-ms-continuation', T, async () => {
    const ids = [];
    for (let i = 0; i < 5; i += 1) {
      const id = uid('svc-q');
      ids.push(id);
      await createSymEnrollment(svc, id);
    }
    const query = svc.createIndividualEnrollmentQuery({ query: 'SELECT * FROM enrollments' }, 2);
    const { items, pages } = await drainQuery(query);
    assert.ok(pages.length >= 3, `at least 3 pages of 2 for >= 5 enrollments (got ${pages.length})`);
    for (const [i, p] of pages.entries()) {
      assert.ok(p.count <= 2, `page ${i} has at most 2 items (${p.count})`);
      assert.equal(String(p.headers['x-ms-item-type']).toLowerCase(), 'enrollment', `x-ms-item-type on page ${i}`);
      if (i < pages.length - 1) assert.ok(p.headers['x-ms-continuation'], `x-ms-continuation on page ${i}`);
    }
    assert.equal(pages.at(-1).headers['x-ms-continuation'], undefined, 'no x-ms-continuation on the last page');
    const seen = items.map((e) => e.registrationId);
    assert.equal(new Set(seen).size, seen.length, 'no enrollment appears twice across pages');
    for (const id of ids) assert.ok(seen.includes(id), `${id} is in the query result`);
    const mine = items.find((e) => e.registrationId === ids[0]);
    assert.equal(mine.attestation.type, 'symmetricKey');
    for (const id of ids) await svc.deleteIndividualEnrollment(id);
  });

  it('update with the current etag succeeds; with a stale etag it is a 412; without an etag it replaces', T, async () => {
    const id = uid('svc-etag');
    const { enrollment: v1 } = await createSymEnrollment(svc, id);
    // update with the matching etag (the SDK sends it as If-Match)
    const { responseBody: v2 } = await svc.createOrUpdateIndividualEnrollment({ ...v1, deviceId: 'dev-v2' });
    assert.equal(v2.deviceId, 'dev-v2');
    assert.notEqual(v2.etag, v1.etag, 'a successful write returns a new etag');
    // stale etag
    const err = await rejects(svc.createOrUpdateIndividualEnrollment({ ...v1, deviceId: 'dev-stale' }), 'InvalidEtagError', 412);
    assertErrorBody(err, 412);
    const { responseBody: still } = await svc.getIndividualEnrollment(id);
    assert.equal(still.deviceId, 'dev-v2', 'the stale write changed nothing');
    assert.equal(still.etag, v2.etag);
    // no etag at all: unconditional replace
    const { etag, ...noEtag } = v2;
    const { responseBody: v3 } = await svc.createOrUpdateIndividualEnrollment({ ...noEtag, deviceId: 'dev-v3' });
    assert.equal(v3.deviceId, 'dev-v3');
    assert.notEqual(v3.etag, v2.etag);
    // '*' matches anything
    const { responseBody: v4 } = await svc.createOrUpdateIndividualEnrollment({ ...v3, etag: '*', deviceId: 'dev-v4' });
    assert.equal(v4.deviceId, 'dev-v4');
    await svc.deleteIndividualEnrollment(id);
  });

  it('delete: by id, by object with its etag, with a stale etag (412), and of a missing enrollment (404)', T, async () => {
    const a = uid('svc-del');
    const b = uid('svc-del');
    await createSymEnrollment(svc, a);
    const { enrollment: eb } = await createSymEnrollment(svc, b);
    await svc.deleteIndividualEnrollment(a);
    await rejects(svc.getIndividualEnrollment(a), undefined, 404);
    // stale etag
    const { responseBody: eb2 } = await svc.createOrUpdateIndividualEnrollment({ ...eb, deviceId: 'changed' });
    await rejects(svc.deleteIndividualEnrollment(b, eb.etag), 'InvalidEtagError', 412);
    await svc.getIndividualEnrollment(b); // still there
    // object with the current etag
    await svc.deleteIndividualEnrollment(eb2);
    await rejects(svc.getIndividualEnrollment(b), undefined, 404);
    // missing
    const err = await rejects(svc.deleteIndividualEnrollment(uid('svc-never')), undefined, 404);
    assertErrorBody(err, 404);
  });

  it('bulk create, then bulk create again (errors reported per item), then bulk delete', T, async () => {
    const ids = [uid('svc-bulk'), uid('svc-bulk'), uid('svc-bulk')];
    const enrollments = ids.map((id) => symIndividual(id, { primaryKey: randomKey(), secondaryKey: randomKey() }));
    const { responseBody: r1 } = await runBulk(svc, { mode: 'create', enrollments });
    assert.equal(r1.isSuccessful, true, `bulk create: ${JSON.stringify(r1)}`);
    assert.ok(!r1.errors || r1.errors.length === 0, `no errors: ${JSON.stringify(r1.errors)}`);
    for (const id of ids) {
      const { responseBody: e } = await svc.getIndividualEnrollment(id);
      assert.equal(e.registrationId, id);
    }
    // create of an existing enrollment fails for that item only
    const fresh = uid('svc-bulk');
    const { responseBody: r2 } = await runBulk(svc, {
      mode: 'create',
      enrollments: [enrollments[0], symIndividual(fresh, { primaryKey: randomKey(), secondaryKey: randomKey() })],
    });
    assert.equal(r2.isSuccessful, false, `bulk create of an existing id is not successful: ${JSON.stringify(r2)}`);
    assert.ok(Array.isArray(r2.errors) && r2.errors.length === 1, `one error: ${JSON.stringify(r2.errors)}`);
    assert.equal(r2.errors[0].registrationId, ids[0]);
    assert.equal(typeof r2.errors[0].errorCode, 'number');
    await svc.getIndividualEnrollment(fresh); // the other item went through
    // bulk delete
    const { responseBody: r3 } = await runBulk(svc, {
      mode: 'delete',
      enrollments: [...enrollments, symIndividual(fresh)],
    });
    assert.equal(r3.isSuccessful, true, `bulk delete: ${JSON.stringify(r3)}`);
    for (const id of [...ids, fresh]) await rejects(svc.getIndividualEnrollment(id), undefined, 404);
  });

  it('x509 enrollment with a PEM certificate returns certificate info with thumbprints', T, async () => {
    const id = uid('svc-x509');
    const c = makeSelfSignedCert(id);
    const { responseBody: e } = await svc.createOrUpdateIndividualEnrollment({
      registrationId: id,
      attestation: { type: 'x509', x509: { clientCertificates: { primary: { certificate: c.cert } } } },
    });
    assert.equal(e.attestation.type, 'x509');
    const info = e.attestation?.x509?.clientCertificates?.primary?.info;
    assert.ok(info, `x509 info returned: ${JSON.stringify(e.attestation)}`);
    assert.equal(String(info.sha1Thumbprint).toLowerCase(), c.sha1, 'sha1Thumbprint');
    assert.equal(String(info.sha256Thumbprint).toLowerCase(), c.sha256, 'sha256Thumbprint');
    assert.match(String(info.subjectName), new RegExp(`CN=${id}`), 'subjectName');
    const { responseBody: got } = await svc.getIndividualEnrollment(id);
    assert.equal(String(got.attestation.x509.clientCertificates.primary.info.sha256Thumbprint).toLowerCase(), c.sha256);
    await svc.deleteIndividualEnrollment(id);
  });
});

describe('service SDK: enrollment groups', () => {
  let svc;
  before(() => { checkEnvironment(); svc = service(); });

  it('create (keys generated), get, update with etag, attestation mechanism, delete', T, async () => {
    const gid = uid('svc-grp');
    const { responseBody: g } = await svc.createOrUpdateEnrollmentGroup(symGroup(gid));
    assert.equal(g.enrollmentGroupId, gid);
    assert.equal(g.attestation.type, 'symmetricKey');
    const sk = g.attestation.symmetricKey;
    assert.ok(sk?.primaryKey && sk?.secondaryKey, `generated group keys returned on create: ${JSON.stringify(g.attestation)}`);
    assert.ok(b64len(sk.primaryKey) >= 16 && b64len(sk.primaryKey) <= 64);
    assert.ok(g.etag);
    const { responseBody: got } = await svc.getEnrollmentGroup(gid);
    assert.equal(got.enrollmentGroupId, gid);
    assert.equal(got.etag, g.etag);
    assert.equal(got.provisioningStatus, 'enabled');
    const { responseBody: att } = await svc.getEnrollmentGroupAttestationMechanism(gid);
    assert.equal(att.symmetricKey.primaryKey, sk.primaryKey);
    const { responseBody: g2 } = await svc.createOrUpdateEnrollmentGroup({ ...g, initialTwin: { tags: { v: 2 } } });
    assert.notEqual(g2.etag, g.etag);
    assert.deepEqual(g2.initialTwin?.tags, { v: 2 });
    await rejects(svc.createOrUpdateEnrollmentGroup({ ...g, initialTwin: { tags: { v: 3 } } }), 'InvalidEtagError', 412);
    await rejects(svc.deleteEnrollmentGroup(gid, g.etag), 'InvalidEtagError', 412);
    await svc.deleteEnrollmentGroup(g2);
    await rejects(svc.getEnrollmentGroup(gid), undefined, 404);
    await rejects(svc.deleteEnrollmentGroup(gid), undefined, 404);
  });

  it('query groups with paging', T, async () => {
    const gids = [uid('svc-gq'), uid('svc-gq'), uid('svc-gq')];
    for (const gid of gids) await createSymGroup(svc, gid);
    const { items, pages } = await drainQuery(svc.createEnrollmentGroupQuery({ query: 'SELECT * FROM enrollmentGroups' }, 1));
    assert.ok(pages.length >= 3, `>= 3 pages of 1 (got ${pages.length})`);
    for (const p of pages) {
      assert.ok(p.count <= 1);
      assert.equal(String(p.headers['x-ms-item-type']).toLowerCase(), 'enrollmentgroup');
    }
    const seen = items.map((g) => g.enrollmentGroupId);
    for (const gid of gids) assert.ok(seen.includes(gid), `${gid} listed`);
    assert.equal(new Set(seen).size, seen.length);
    for (const gid of gids) await svc.deleteEnrollmentGroup(gid);
  });
});

describe('service SDK: registration states', () => {
  let svc;
  before(() => { checkEnvironment(); svc = service(); });

  it('get, query by group and delete the registration state after devices register', T, async () => {
    // individual enrollment
    const id = uid('svc-reg');
    const { primaryKey } = await createSymEnrollment(svc, id);
    const state = await registerSym('http', id, primaryKey);
    assertAssigned(state, { registrationId: id });
    const { responseBody: rs } = await svc.getDeviceRegistrationState(id);
    assert.equal(rs.registrationId, id);
    assert.equal(rs.status, 'assigned');
    assert.equal(rs.assignedHub, state.assignedHub);
    assert.equal(rs.deviceId, id);
    assert.ok(rs.etag, 'registration state has an etag');
    // group
    const gid = uid('svc-reg-grp');
    const { primaryKey: gkey } = await createSymGroup(svc, gid);
    const devs = [uid('svc-reg-gdev'), uid('svc-reg-gdev')];
    for (const d of devs) assertAssigned(await registerSym('http', d, deriveKey(gkey, d)), { registrationId: d });
    const { items, pages } = await drainQuery(svc.createEnrollmentGroupDeviceRegistrationStateQuery({ query: 'SELECT * FROM enrollmentGroups' }, gid, 1));
    assert.deepEqual(items.map((r) => r.registrationId).sort(), [...devs].sort(), 'registrations of the group');
    assert.equal(String(pages[0].headers['x-ms-item-type']).toLowerCase(), 'deviceregistration');
    for (const r of items) assert.ok(HUBS.includes(r.assignedHub));
    // delete by object (its etag goes in If-Match), then 404
    await svc.deleteDeviceRegistrationState(rs);
    await rejects(svc.getDeviceRegistrationState(id), undefined, 404);
    await rejects(svc.deleteDeviceRegistrationState(id), undefined, 404);
    // clean up
    for (const d of devs) await quietly(() => svc.deleteDeviceRegistrationState(d));
    await svc.deleteEnrollmentGroup(gid);
    await svc.deleteIndividualEnrollment(id);
  });
});

describe('service SDK: authorization', () => {
  before(() => { checkEnvironment(); });

  it('the secondary key of the policy works too', T, async () => {
    const id = uid('svc-sec');
    const svc2 = service(OWNER_SECONDARY_CS);
    await createSymEnrollment(svc2, id);
    await svc2.deleteIndividualEnrollment(id);
  });

  it('a wrong key is refused with 401 on read and write', T, async () => {
    const bad = service(WRONG_KEY_CS);
    const e1 = await rejects(bad.getIndividualEnrollment(uid('svc-wk')), 'UnauthorizedError', 401);
    assertErrorBody(e1, 401);
    await rejects(bad.createOrUpdateIndividualEnrollment(symIndividual(uid('svc-wk'))), 'UnauthorizedError', 401);
    await rejects(bad.createIndividualEnrollmentQuery({ query: 'SELECT * FROM enrollments' }).next(), 'UnauthorizedError', 401);
  });

  it('an unknown policy name is refused with 401', T, async () => {
    await rejects(service(UNKNOWN_POLICY_CS).getIndividualEnrollment(uid('svc-up')), 'UnauthorizedError', 401);
  });

  it('the EnrollmentRead-only policy can read but not write (401)', T, async () => {
    const owner = service();
    const reader = service(READER_CS);
    const id = uid('svc-rd');
    await createSymEnrollment(owner, id);
    const { responseBody: got } = await reader.getIndividualEnrollment(id);
    assert.equal(got.registrationId, id);
    await reader.createIndividualEnrollmentQuery({ query: 'SELECT * FROM enrollments' }, 5).next();
    const err = await rejects(reader.createOrUpdateIndividualEnrollment(symIndividual(uid('svc-rd'))), 'UnauthorizedError', 401);
    assertErrorBody(err, 401);
    await rejects(reader.deleteIndividualEnrollment(id), 'UnauthorizedError', 401);
    await rejects(reader.createOrUpdateEnrollmentGroup(symGroup(uid('svc-rd-g'))), 'UnauthorizedError', 401);
    await rejects(runBulk(reader, { mode: 'create', enrollments: [symIndividual(uid('svc-rd'))] }), 'UnauthorizedError', 401);
    await owner.getIndividualEnrollment(id); // not deleted by the reader
    await owner.deleteIndividualEnrollment(id);
  });
});
