// Drives an IoT Hub (the dps test stand-in, crates/dps/tests/it/support_iothub.rs) with Azure's
// Node service SDK, azure-iothub's Registry, unmodified: create a device, read it, replace it,
// read and update its twin with its ETag, update with a stale ETag, try a wrong key, delete it.
// One JSON line per step on stdout. Run by the Rust test
// hubs_azure::sdk_node_registry_manager_drives_the_stand_in.
//
// Env: IOTHUB_CS (connection string), IOTHUB_PORT (the stand-in's HTTPS port on 127.0.0.1),
// IOTHUB_CA (its CA, PEM), IOTHUB_WRONG_KEY (a key the hub does not have).
//
// The SDK always connects to https://{HostName}:443; the only change made here is to Node's own
// https.Agent, which connects that host name to 127.0.0.1:IOTHUB_PORT (TLS still checks
// the certificate for HostName against IOTHUB_CA).
import https from 'node:https';
import tls from 'node:tls';
import fs from 'node:fs';
import iothub from 'azure-iothub';

const { Registry } = iothub;
const port = Number(process.env.IOTHUB_PORT);
const ca = fs.readFileSync(process.env.IOTHUB_CA);

// (The Registry makes its own https.Agent, so the change is made to every https.Agent.)
https.Agent.prototype.createConnection = function createConnection(options, cb) {
  const servername = options.servername || options.host;
  return tls.connect({ ...options, host: '127.0.0.1', port, servername, ca }, cb);
};

const out = (o) => console.log(JSON.stringify(o));
const errName = (e) => (e && e.constructor ? e.constructor.name : String(e));
const key = (n) => Buffer.alloc(32, n).toString('base64');
const id = 'sdk-dev-1';

const cs = process.env.IOTHUB_CS;
const reg = Registry.fromConnectionString(cs);

let r = await reg.create({ deviceId: id, status: 'enabled', authentication: { symmetricKey: { primaryKey: key(1), secondaryKey: key(2) } } });
out({ step: 'create', status: r.responseBody.status, etag: r.responseBody.etag });
r = await reg.get(id);
out({ step: 'get', deviceId: r.responseBody.deviceId, etag: r.responseBody.etag });
const dev = JSON.parse(JSON.stringify(r.responseBody));
dev.status = 'disabled';
r = await reg.update(dev);
out({ step: 'update', status: r.responseBody.status });
r = await reg.getTwin(id);
const etag = r.responseBody.etag;
out({ step: 'getTwin', etag });
r = await reg.updateTwin(id, { tags: { site: 's1' } }, etag);
out({ step: 'updateTwin', tags: r.responseBody.tags, etag: r.responseBody.etag });
try {
  await reg.updateTwin(id, { tags: { site: 's2' } }, etag);
  out({ step: 'staleTwin', error: null });
} catch (e) {
  out({ step: 'staleTwin', error: errName(e) });
}
const wrong = cs.replace(/SharedAccessKey=[^;]*/, `SharedAccessKey=${process.env.IOTHUB_WRONG_KEY}`);
try {
  await Registry.fromConnectionString(wrong).get(id);
  out({ step: 'wrongKey', error: null });
} catch (e) {
  out({ step: 'wrongKey', error: errName(e) });
}
await reg.delete(id);
out({ step: 'delete', ok: true });
try {
  await reg.get(id);
  out({ step: 'getDeleted', error: null });
} catch (e) {
  out({ step: 'getDeleted', error: errName(e), message: e.message });
}
