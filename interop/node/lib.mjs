// Shared helpers for the Node interop tests.
//
// The server must already be running (interop/run.sh starts it). The TLS trust of the
// server's dev CA comes from NODE_EXTRA_CA_CERTS, which Node reads only at start-up,
// so it must be set in the environment of `node --test` (run.sh does it).
import { createRequire } from 'node:module';
import { createHmac, randomBytes, X509Certificate } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import https from 'node:https';
import { join } from 'node:path';
import assert from 'node:assert/strict';

const require = createRequire(import.meta.url);
export const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');
export const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
export const { Http } = require('azure-iot-provisioning-device-http');
export const { Mqtt, MqttWs } = require('azure-iot-provisioning-device-mqtt');
export const { Amqp, AmqpWs } = require('azure-iot-provisioning-device-amqp');
export const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
export const { X509Security } = require('azure-iot-security-x509');

// ---- fixed test configuration (must match interop/dps.toml) ----------------------------
export const HOST = 'localhost';
export const ID_SCOPE = '0ne00000A0A';
export const HUBS = ['hub-a.example.net', 'hub-b.example.net'];
export const IMMEDIATE_ID_SCOPE = '0ne00000B0B';
export const IMMEDIATE_HUBS = ['hub-c.example.net'];

const OWNER_KEY = 'sn2XjACA5QcDJBoR66ixVXPE8+CjMVuw6UYGFDjyh9o=';
const OWNER_KEY2 = 'IsM511bdZ18ydFVf7Tiq/EwK74oG+ZOsabZaye+WxtI=';
const READER_KEY = 'nI4TG1dBaagZXSjAfdfI3YFofemJN7hMKl/PJzpln5Y=';
const IMMEDIATE_OWNER_KEY = '7Lk2nEWZ0ZcS7bY0hHk1Jm7yK0kqG6bC5m3Q9H0f4eA=';

const cs = (host, policy, key) => `HostName=${host};SharedAccessKeyName=${policy};SharedAccessKey=${key}`;
export const OWNER_CS = cs(HOST, 'provisioningserviceowner', OWNER_KEY);
export const OWNER_SECONDARY_CS = cs(HOST, 'provisioningserviceowner', OWNER_KEY2);
export const READER_CS = cs(HOST, 'reader', READER_KEY);
export const WRONG_KEY_CS = cs(HOST, 'provisioningserviceowner', randomBytes(32).toString('base64'));
export const UNKNOWN_POLICY_CS = cs(HOST, 'nosuchpolicy', OWNER_KEY);
export const IMMEDIATE_OWNER_CS = cs('127.0.0.1', 'provisioningserviceowner', IMMEDIATE_OWNER_KEY);

/** Per-test timeout (ms): a hang fails fast instead of eating the CI budget. */
export const TEST_TIMEOUT = Number(process.env.DPS_INTEROP_TEST_TIMEOUT_MS || 30000);
/** Deadline for one register() call; below the SDK's own 30 s request timeout. */
export const REGISTER_DEADLINE = Number(process.env.DPS_INTEROP_REGISTER_DEADLINE_MS || 20000);

// ---- run.json (written by the server once all listeners are bound) ----------------------
export function runInfo() {
  const path = process.env.DPS_RUN_JSON
    || join(process.env.DPS_DATA_DIR || '/tmp/dps-interop-data', 'run.json');
  if (!existsSync(path)) {
    throw new Error(`${path} not found: start the server first (bash interop/run.sh serve)`);
  }
  return JSON.parse(readFileSync(path, 'utf8'));
}

/** Fails early, with a useful message, when the CA is not trusted. */
export function checkEnvironment() {
  const info = runInfo();
  const extra = process.env.NODE_EXTRA_CA_CERTS;
  const ca = readFileSync(info.ca, 'utf8').trim();
  if (!extra || !existsSync(extra) || !readFileSync(extra, 'utf8').includes(ca)) {
    throw new Error(`NODE_EXTRA_CA_CERTS (${extra}) does not contain the server CA; run with NODE_EXTRA_CA_CERTS=${info.ca}`);
  }
  const inst = (info.instances || []).find((i) => i.name === 'default');
  assert.ok(inst, 'run.json lists the "default" instance');
  assert.equal(inst.id_scope.toLowerCase(), ID_SCOPE.toLowerCase(), 'run.json id_scope matches interop/dps.toml');
  return info;
}

// ---- ids and keys ---------------------------------------------------------------------------
const RUN = `${Date.now().toString(36)}${randomBytes(2).toString('hex')}`;
let counter = 0;
/** A registration / group id unique to this run (lowercase, letters digits and '-'). */
export function uid(prefix) {
  counter += 1;
  return `${prefix}-${RUN}-${counter}`.toLowerCase();
}
export const randomKey = (n = 32) => randomBytes(n).toString('base64');
/** Group key derivation: base64(HMAC-SHA256(base64decode(groupKey), registrationId)). */
export function deriveKey(groupKey, registrationId) {
  return createHmac('sha256', Buffer.from(groupKey, 'base64')).update(registrationId, 'utf8').digest('base64');
}

// ---- service SDK helpers -------------------------------------------------------------------
export const service = (connectionString = OWNER_CS) => ProvisioningServiceClient.fromConnectionString(connectionString);

export function symIndividual(registrationId, { primaryKey, secondaryKey, deviceId, provisioningStatus, extra } = {}) {
  const e = {
    registrationId,
    attestation: { type: 'symmetricKey', symmetricKey: {} },
    provisioningStatus: provisioningStatus || 'enabled',
  };
  if (primaryKey) e.attestation.symmetricKey.primaryKey = primaryKey;
  if (secondaryKey) e.attestation.symmetricKey.secondaryKey = secondaryKey;
  if (deviceId) e.deviceId = deviceId;
  return Object.assign(e, extra || {});
}

export function symGroup(enrollmentGroupId, { primaryKey, secondaryKey, provisioningStatus, extra } = {}) {
  const g = {
    enrollmentGroupId,
    attestation: { type: 'symmetricKey', symmetricKey: {} },
    provisioningStatus: provisioningStatus || 'enabled',
  };
  if (primaryKey) g.attestation.symmetricKey.primaryKey = primaryKey;
  if (secondaryKey) g.attestation.symmetricKey.secondaryKey = secondaryKey;
  return Object.assign(g, extra || {});
}

/** Creates an individual symmetric-key enrollment; returns {enrollment, primaryKey, secondaryKey}. */
export async function createSymEnrollment(svc, registrationId, opts = {}) {
  const primaryKey = opts.primaryKey || randomKey();
  const secondaryKey = opts.secondaryKey || randomKey();
  const { responseBody } = await svc.createOrUpdateIndividualEnrollment(
    symIndividual(registrationId, { ...opts, primaryKey, secondaryKey }));
  assert.equal(responseBody.registrationId, registrationId);
  return { enrollment: responseBody, primaryKey, secondaryKey };
}

export async function createSymGroup(svc, groupId, opts = {}) {
  const primaryKey = opts.primaryKey || randomKey(64);
  const secondaryKey = opts.secondaryKey || randomKey(64);
  const { responseBody } = await svc.createOrUpdateEnrollmentGroup(symGroup(groupId, { ...opts, primaryKey, secondaryKey }));
  assert.equal(responseBody.enrollmentGroupId, groupId);
  return { group: responseBody, primaryKey, secondaryKey };
}

/**
 * runBulkEnrollmentOperation through its callback form: in 1.11.2 the promise form never settles
 * (the SDK only calls back when the caller passed a callback).
 */
export function runBulk(svc, bulkOperation) {
  return new Promise((resolve, reject) => {
    svc.runBulkEnrollmentOperation(bulkOperation, (err, responseBody, httpResponse) => {
      if (err) reject(err); else resolve({ responseBody, httpResponse });
    });
  });
}

/** Best-effort clean-up, never fails a test. */
export async function quietly(fn) {
  try { await fn(); } catch { /* ignore */ }
}

/** Collects every page of a service query. Returns { items, pages: [{count, headers}] }. */
export async function drainQuery(query, maxPages = 1000) {
  const items = [];
  const pages = [];
  while (query.hasMoreResults) {
    // The promise form of Query.next() ignores query.continuationToken (SDK quirk: only the
    // callback form falls back to it), so pass the token explicitly.
    const { responseBody, httpResponse } = await query.next(query.continuationToken);
    assert.ok(Array.isArray(responseBody), `query page is a JSON array (got ${JSON.stringify(responseBody)})`);
    items.push(...responseBody);
    pages.push({ count: responseBody.length, headers: httpResponse.headers });
    assert.ok(pages.length <= maxPages, 'query keeps returning x-ms-continuation');
  }
  return { items, pages };
}

// ---- device SDK helpers --------------------------------------------------------------------
export const TRANSPORTS = {
  http: () => new Http(),
  mqtt: () => new Mqtt(),
  mqttws: () => new MqttWs(),
  amqp: () => new Amqp(),
  amqpws: () => new AmqpWs(),
};

class DeadlineError extends Error {
  constructor(ms) { super(`register() did not finish within ${ms} ms (hang, not an SDK error)`); this.name = 'DeadlineError'; }
}

async function withDeadline(client, promise, ms) {
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => {
      client.cancel(() => {});
      reject(new DeadlineError(ms));
    }, ms);
  });
  try {
    return await Promise.race([promise, deadline]);
  } finally {
    clearTimeout(timer);
  }
}

/** Registers with a symmetric key; resolves with the SDK's RegistrationResult (registrationState). */
export async function registerSym(transport, registrationId, key, { idScope = ID_SCOPE, payload } = {}) {
  const security = new SymmetricKeySecurityClient(registrationId, key);
  const client = ProvisioningDeviceClient.create(HOST, idScope, TRANSPORTS[transport](), security);
  if (payload !== undefined) client.setProvisioningPayload(payload);
  return withDeadline(client, client.register(), REGISTER_DEADLINE);
}

/** Registers with an X.509 client certificate ({cert, key} PEM). */
export async function registerX509(transport, registrationId, certAndKey, { idScope = ID_SCOPE } = {}) {
  const security = new X509Security(registrationId, certAndKey);
  const client = ProvisioningDeviceClient.create(HOST, idScope, TRANSPORTS[transport](), security);
  return withDeadline(client, client.register(), REGISTER_DEADLINE);
}

/** Runs a register that must fail; returns the SDK's error (a hang is a test failure). */
export async function expectRegisterError(promise) {
  try {
    const result = await promise;
    assert.fail(`registration unexpectedly succeeded: ${JSON.stringify(result)}`);
  } catch (err) {
    if (err instanceof DeadlineError || err?.name === 'AssertionError') throw err;
    // Over AMQP the Node SDK passes a non-retryable `rejected` outcome's AMQP error on as is
    // ({condition, description, info}: azure-iot-provisioning-device-amqp calls back with `err`,
    // not with the translated error); everything else is an Error.
    const amqpError = typeof err?.condition === 'string';
    assert.ok(err instanceof Error || amqpError, `SDK rejected with an Error or an AMQP error (got ${err})`);
    assert.notEqual(err.name, 'TimeoutError', `SDK timed out instead of getting an answer: ${err.message}`);
    return err;
  }
}

/** HTTP status behind a device-SDK or service-SDK error, when the SDK kept it. */
export function errorStatus(err) {
  return err?.transportObject?.statusCode ?? err?.response?.statusCode ?? err?.result?.statusCode
    ?? (typeof err?.result?.errorCode === 'number' ? Math.floor(err.result.errorCode / 1000) : undefined);
}

/** Common assertions on a successful assignment. */
export function assertAssigned(state, { registrationId, deviceId, hubs = HUBS, substatus } = {}) {
  assert.ok(state, 'register() resolved with a registration state');
  assert.equal(state.status, 'assigned', `status (state: ${JSON.stringify(state)})`);
  assert.equal(state.registrationId, registrationId, 'registrationId');
  assert.equal(state.deviceId, deviceId ?? registrationId, 'deviceId');
  assert.ok(hubs.includes(state.assignedHub), `assignedHub ${state.assignedHub} is one of ${hubs}`);
  if (substatus) assert.equal(state.substatus, substatus, 'substatus');
  else assert.ok(['initialAssignment', 'deviceDataMigrated', 'deviceDataReset', 'reprovisionedToInitialAssignment'].includes(state.substatus), `substatus ${state.substatus}`);
}

// ---- X.509 test certificates (openssl CLI) ---------------------------------------------------
/** A self-signed EC P-256 client certificate with CN = cn. Returns {cert, key, sha1, sha256}. */
export function makeSelfSignedCert(cn) {
  const dir = mkdtempSync(join(tmpdir(), 'dps-interop-x509-'));
  try {
    execFileSync('openssl', [
      'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
      '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem'), '-days', '2', '-subj', `/CN=${cn}`,
      '-addext', 'extendedKeyUsage=clientAuth', '-addext', 'basicConstraints=critical,CA:FALSE',
    ], { stdio: 'pipe' });
    const cert = readFileSync(join(dir, 'cert.pem'), 'utf8');
    const key = readFileSync(join(dir, 'key.pem'), 'utf8');
    const x = new X509Certificate(cert);
    const hex = (f) => f.replace(/:/g, '').toLowerCase();
    return { cert, key, sha1: hex(x.fingerprint), sha256: hex(x.fingerprint256) };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

// ---- X.509 test PKI (interop/pki.sh: openssl CLI; RSA 2048 or ECDSA P-256) ------------------
const PKI_SH = new URL('../pki.sh', import.meta.url).pathname;
const hexFingerprint = (f) => f.replace(/:/g, '').toLowerCase();

/**
 * A throw-away PKI in a temporary folder. `ca(name, cn, alg, issuer?)` and
 * `leaf(name, cn, alg, issuer|'-', {expired})` return {cert, key, chain, sha1, sha256}: `chain` is
 * the PEM bundle a device presents (its certificate, then its issuers without the root).
 * `dispose()` removes every key.
 */
export function makePki() {
  const dir = mkdtempSync(join(tmpdir(), 'dps-interop-pki-'));
  const read = (name) => {
    const cert = readFileSync(join(dir, `${name}.pem`), 'utf8');
    const x = new X509Certificate(cert);
    return {
      cert,
      key: readFileSync(join(dir, `${name}.key`), 'utf8'),
      chain: readFileSync(join(dir, `${name}.chain.pem`), 'utf8'),
      sha1: hexFingerprint(x.fingerprint),
      sha256: hexFingerprint(x.fingerprint256),
      x509: x,
    };
  };
  const run = (...args) => execFileSync('bash', [PKI_SH, ...args], { stdio: 'pipe' });
  return {
    dir,
    ca(name, cn, alg, issuer) {
      run('ca', dir, name, cn, alg, ...(issuer ? [issuer] : []));
      return read(name);
    },
    leaf(name, cn, alg, issuer, { expired = false } = {}) {
      run('leaf', dir, name, cn, alg, issuer || '-', ...(expired ? ['expired'] : []));
      return read(name);
    },
    dispose() { rmSync(dir, { recursive: true, force: true }); },
  };
}

// ---- admin API (our own; same listener, ServiceConfig right, owner SAS token) ----------------
/** Service/admin API SAS token: sr = the instance's service host name, skn = the policy. */
export function sasToken(resource, key, policy, ttlSeconds = 3600) {
  const sr = encodeURIComponent(resource);
  const se = Math.floor(Date.now() / 1000) + ttlSeconds;
  const sig = createHmac('sha256', Buffer.from(key, 'base64')).update(`${sr}\n${se}`).digest('base64');
  return `SharedAccessSignature sr=${sr}&sig=${encodeURIComponent(sig)}&se=${se}&skn=${policy}`;
}

/**
 * Calls the dps admin API of the `default` instance (`path` relative to /admin/instances/default,
 * or absolute when it starts with /admin/); resolves {status, body}.
 */
export function adminCall(method, path, body) {
  const info = runInfo();
  const data = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
  return new Promise((resolve, reject) => {
    const req = https.request({
      host: HOST, port: 443, method, path: path.startsWith('/admin/') ? path : `/admin/instances/default${path}`,
      ca: readFileSync(info.ca), timeout: 15000,
      headers: {
        Authorization: sasToken(HOST, OWNER_KEY, 'provisioningserviceowner'),
        Accept: 'application/json',
        ...(data ? { 'Content-Type': 'application/json', 'Content-Length': data.length } : {}),
      },
    }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => {
        const raw = Buffer.concat(chunks).toString('utf8');
        let parsed = raw;
        try { parsed = raw ? JSON.parse(raw) : null; } catch { /* keep the text */ }
        resolve({ status: res.statusCode, body: parsed });
      });
    });
    req.on('timeout', () => req.destroy(new Error(`${method} ${path}: timed out`)));
    req.on('error', reject);
    if (data) req.write(data);
    req.end();
  });
}

/** An admin call that must succeed (2xx); returns the body. */
export async function admin(method, path, body) {
  const r = await adminCall(method, path, body);
  assert.ok(r.status >= 200 && r.status < 300, `${method} /admin/instances/default${path} -> ${r.status} ${JSON.stringify(r.body)}`);
  return r.body;
}

/**
 * The reason dps recorded for the last refused registration of `registrationId` (audit log,
 * `registration.refused`; the device itself only gets 401). Polls briefly: the audit entry is
 * written right after the answer.
 */
export async function refusalReason(registrationId, deadlineMs = 3000) {
  const until = Date.now() + deadlineMs;
  for (;;) {
    const q = `/admin/audit?instance=default&action=registration.refused&target=${encodeURIComponent(registrationId)}`;
    const { status, body } = await adminCall('GET', q);
    assert.equal(status, 200, `GET ${q} -> ${status} ${JSON.stringify(body)}`);
    const last = Array.isArray(body) ? body[body.length - 1] : undefined;
    if (last) return String(last.after?.reason ?? JSON.stringify(last));
    if (Date.now() > until) assert.fail(`no registration.refused audit entry for ${registrationId}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}
