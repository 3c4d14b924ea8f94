// A bridge from the Microsoft TPM 2.0 simulator's TCP protocol, which Azure's Node TPM client
// (azure-iot-security-tpm, through tss.js `new Tpm(true)`) speaks, to swtpm, which takes raw TPM
// commands on its data socket (`swtpm socket --server type=tcp,port=P`).
//
// Simulator protocol (TSS.MSR TpmTcpDevice / the simulator's TcpServer):
// - command port (2321): u32 request code, big-endian.
//     15 HandShake: u32 client version → u32 server version (1), u32 TPM properties, u32 0 (ack)
//      8 SendCommand: u8 locality, u32 size, command → u32 size, response, u32 0 (ack)
//     20 SessionEnd, 21 Stop: close the connection
// - platform port (2322): u32 signals (1 power on, 11 NV on, ...) → u32 0 each. swtpm is started
//   with `--flags not-need-init,startup-clear`, so power and NV signals need no forwarding; the
//   client's own TPM2_Startup then answers TPM_RC_INITIALIZE, which tss.js accepts.
//
//   node tpm-shim.mjs [--swtpm-port 2331] [--port 2321]     (standalone)
//   import { startTpmShim } from './tpm-shim.mjs'            (tests)
import net from 'node:net';

const HANDSHAKE = 15;
const SEND_COMMAND = 8;
const SESSION_END = 20;
const STOP = 21;
const MAX_COMMAND = 64 * 1024;

function u32(n) {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0);
  return b;
}

/** Forward one raw command to swtpm's data socket and resolve with the raw response. */
function makeTpmLink(host, port) {
  const sock = net.connect(port, host);
  let buf = Buffer.alloc(0);
  let pending = null;
  const queue = [];
  const link = { closed: false };
  const failAll = (err) => {
    link.closed = true;
    if (pending) pending.reject(err);
    pending = null;
    while (queue.length) queue.shift().reject(err);
  };
  sock.on('error', failAll);
  sock.on('close', () => failAll(new Error('swtpm closed the connection')));
  sock.on('data', (d) => {
    buf = Buffer.concat([buf, d]);
    if (!pending || buf.length < 6) return;
    const size = buf.readUInt32BE(2);
    if (buf.length < size) return;
    const resp = buf.subarray(0, size);
    buf = buf.subarray(size);
    const p = pending;
    pending = null;
    p.resolve(resp);
    next();
  });
  function next() {
    if (pending || !queue.length) return;
    pending = queue.shift();
    sock.write(pending.command);
  }
  link.send = (command) => new Promise((resolve, reject) => {
    if (link.closed) return reject(new Error('swtpm link closed'));
    queue.push({ command, resolve, reject });
    next();
  });
  link.close = () => { link.closed = true; sock.destroy(); };
  return link;
}

function commandConnection(client, link, log) {
  let buf = Buffer.alloc(0);
  let busy = false;
  const done = () => client.destroy();
  client.on('error', done);
  async function pump() {
    if (busy) return;
    busy = true;
    try {
      while (buf.length >= 4) {
        const code = buf.readUInt32BE(0);
        if (code === HANDSHAKE) {
          if (buf.length < 8) break;
          buf = buf.subarray(8);
          client.write(Buffer.concat([u32(1), u32(0), u32(0)]));
        } else if (code === SEND_COMMAND) {
          if (buf.length < 9) break;
          const size = buf.readUInt32BE(5);
          if (size > MAX_COMMAND) { log(`command of ${size} bytes refused`); done(); return; }
          if (buf.length < 9 + size) break;
          const command = Buffer.from(buf.subarray(9, 9 + size));
          buf = buf.subarray(9 + size);
          const resp = await link().send(command);
          client.write(Buffer.concat([u32(resp.length), resp, u32(0)]));
        } else if (code === SESSION_END || code === STOP) {
          done();
          return;
        } else {
          log(`command port: unsupported request ${code}`);
          done();
          return;
        }
      }
    } catch (err) {
      log(`command failed: ${err.message}`);
      done();
    } finally {
      busy = false;
    }
  }
  client.on('data', (d) => { buf = Buffer.concat([buf, d]); pump(); });
}

function platformConnection(client) {
  let buf = Buffer.alloc(0);
  client.on('error', () => client.destroy());
  client.on('data', (d) => {
    buf = Buffer.concat([buf, d]);
    while (buf.length >= 4) {
      const code = buf.readUInt32BE(0);
      buf = buf.subarray(4);
      if (code === SESSION_END || code === STOP) { client.end(); return; }
      client.write(u32(0));
    }
  });
}

/**
 * Listen on `port` (simulator command port) and `port + 1` (platform port) on 127.0.0.1,
 * forwarding TPM commands to swtpm's data port. Resolves with `{ close() }` once listening.
 */
export async function startTpmShim({ port = 2321, swtpmHost = '127.0.0.1', swtpmPort = 2331, log = () => {} } = {}) {
  // swtpm serves one data connection at a time: every simulator client shares one link, and
  // commands are queued on it (a TPM runs one command at a time anyway).
  let shared = null;
  const link = () => {
    if (!shared || shared.closed) {
      const l = makeTpmLink(swtpmHost, swtpmPort);
      shared = l;
    }
    return shared;
  };
  const sockets = new Set();
  const track = (handler) => (c) => {
    sockets.add(c);
    c.on('close', () => sockets.delete(c));
    handler(c);
  };
  const cmd = net.createServer(track((c) => commandConnection(c, link, log)));
  const plat = net.createServer(track(platformConnection));
  const listen = (srv, p) => new Promise((resolve, reject) => {
    srv.once('error', reject);
    srv.listen(p, '127.0.0.1', resolve);
  });
  await listen(cmd, port);
  await listen(plat, port + 1);
  return {
    close: () => {
      for (const c of sockets) c.destroy();
      shared?.close();
      return Promise.all([cmd, plat].map((s) => new Promise((r) => s.close(r))));
    },
  };
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const arg = (name, dflt) => {
    const i = process.argv.indexOf(name);
    return i > 0 ? Number(process.argv[i + 1]) : dflt;
  };
  const port = arg('--port', 2321);
  const swtpmPort = arg('--swtpm-port', 2331);
  await startTpmShim({ port, swtpmPort, log: (m) => console.error(`[tpm-shim] ${m}`) });
  console.error(`[tpm-shim] simulator protocol on 127.0.0.1:${port}/${port + 1} -> swtpm 127.0.0.1:${swtpmPort}`);
}
