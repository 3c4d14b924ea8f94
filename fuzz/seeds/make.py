#!/usr/bin/env python3
"""Writes the committed starting inputs of the fuzz targets (fuzz/seeds/<target>/).

Run from anywhere: python3 fuzz/seeds/make.py. The inputs are what Azure's SDKs send (see
../shared/vectors in the project's workspace), rebuilt here so the seeds do not depend on it.
"""
import base64, json, os, struct

HERE = os.path.dirname(os.path.abspath(__file__))


def put(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def mqtt_str(s):
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def remaining(n):
    out = bytearray()
    while True:
        byte = n % 128
        n //= 128
        if n:
            byte |= 0x80
        out.append(byte)
        if not n:
            return bytes(out)


def packet(first, body):
    return bytes([first]) + remaining(len(body)) + body


SCOPE, REG = "0ne00CAPTURE", "sym-node-mqtt"
TOKEN = ("SharedAccessSignature sr=0ne00CAPTURE%2Fregistrations%2Fsym-node-mqtt"
         "&sig=jU8zq4%2FTKrfIkBxzzyIVXiyNeCB8SaVeTutQ8Ka0Apo%3D&se=1795000000&skn=registration")
USER = f"{SCOPE}/registrations/{REG}/api-version=2019-03-31&ClientVersion=azure-iot-provisioning-device-mqtt%2F1.11.0"


def connect(password=TOKEN):
    flags = 0x02 | 0x80 | (0x40 if password else 0)
    body = mqtt_str("MQTT") + bytes([4, flags]) + struct.pack(">H", 240) + mqtt_str(REG) + mqtt_str(USER)
    if password:
        body += mqtt_str(password)
    return packet(0x10, body)


SUB = packet(0x82, struct.pack(">H", 1) + mqtt_str("$dps/registrations/res/#") + b"\x01")
REGISTER = packet(0x30, mqtt_str("$dps/registrations/PUT/iotdps-register/?$rid=1")
                  + json.dumps({"registrationId": REG, "payload": {"model": "m1"}}).encode())
POLL = packet(0x30, mqtt_str("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId=4.36ea5ea1a7f7d31a.0ba9d4a0-b5a4-4b2b-8f5f-1c9f9dfc7a62"))
DISCONNECT = b"\xe0\x00"
SESSION = connect() + SUB + REGISTER + POLL + DISCONNECT

# mqtt_packet: first byte selects chunking and the canned outcomes.
for i, ctl in enumerate([0x00, 0x07, 0x40, 0x8f]):
    put("mqtt_packet", f"session-{i}", bytes([ctl]) + SESSION)
put("mqtt_packet", "x509-connect", b"\x03" + connect(password=None) + SUB + REGISTER)

put("sas_token", "device", TOKEN)
put("sas_token", "service", "SharedAccessSignature sr=localhost&sig=c2lnbmF0dXJl&se=1795000000&skn=provisioningserviceowner")

put("topic", "username", USER)
put("topic", "register", "$dps/registrations/PUT/iotdps-register/?$rid=1")
put("topic", "poll", "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId=4.abc")
put("topic", "response", "$dps/registrations/res/202/?$rid=1&retry-after=3")

put("device_json", "register", json.dumps({"registrationId": REG, "payload": {"model": "m1"}}))
put("device_json", "csr", json.dumps({"registrationId": REG, "csr": "MIIB", "tpm": {"endorsementKey": "AAA", "storageRootKey": "BBB"}}))

ENR = {"registrationId": "dev-1", "attestation": {"type": "symmetricKey", "symmetricKey": {
    "primaryKey": base64.b64encode(b"k" * 32).decode(), "secondaryKey": base64.b64encode(b"s" * 32).decode()}},
    "provisioningStatus": "enabled", "reprovisionPolicy": {"updateHubAssignment": True, "migrateDeviceData": True},
    "allocationPolicy": "hashed", "iotHubs": ["hub-1.example.net"],
    "initialTwin": {"tags": {"a": 1}, "properties": {"desired": {"b": 2}}},
    "capabilities": {"iotEdge": False}}
GROUP = dict(ENR)
del GROUP["registrationId"]
GROUP["enrollmentGroupId"] = "grp-1"
put("service_json", "individual", b"\x00" + json.dumps(ENR).encode())
put("service_json", "group", b"\x01" + json.dumps(GROUP).encode())
put("service_json", "bulk", b"\x02" + json.dumps({"mode": "create", "enrollments": [ENR]}).encode())
put("service_json", "query", b"\x03" + b"SELECT * FROM enrollments WHERE attestation.type = 'x509'")
put("service_json", "query-spec", b"\x04" + json.dumps({"query": "SELECT * FROM enrollmentGroups"}).encode())

UPGRADE = ("GET /$iothub/websocket HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
           "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: WWaQ1KjqpWF9Rqy5Gc49/Q==\r\n"
           "Sec-WebSocket-Protocol: mqtt\r\n\r\n").encode()


def ws_frame(payload, opcode=2):
    mask = b"\x01\x02\x03\x04"
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


# ws_upgrade: selector 0 = raw bytes; 1 = the valid upgrade head is prepended by the target.
put("ws_upgrade", "raw-upgrade", b"\x00" + UPGRADE + ws_frame(connect()) + ws_frame(SUB))
put("ws_upgrade", "frames", b"\x01" + ws_frame(connect()) + ws_frame(SUB) + ws_frame(REGISTER) + ws_frame(b"", 8))
put("ws_upgrade", "http-get", b"\x00" + b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
put("ws_upgrade", "register", b"\x00" + (
    "PUT /0ne00CAPTURE/registrations/dev-1/register?api-version=2021-06-01 HTTP/1.1\r\nHost: localhost\r\n"
    "Content-Type: application/json\r\nAuthorization: " + TOKEN + "\r\nContent-Length: 27\r\n\r\n"
    '{"registrationId":"dev-1"}\n').encode())

with open(os.path.join(HERE, "..", "..", "config", "dps.example.toml"), "rb") as f:
    put("config", "example", f.read())
put("config", "minimal", '[listen]\nhttps = "127.0.0.1:0"\n[[instance]]\nname = "default"\n'
    '[[instance.linked_hub]]\nhost = "hub-1.example.net"\n')


# amqp_conn: AMQP 1.0 as the SDKs and dps-device send it (hand-encoded; see the target's modes).
def a_str(s):
    b = s.encode()
    return (b"\xa1" + bytes([len(b)]) if len(b) < 256 else b"\xb1" + struct.pack(">I", len(b))) + b


def a_sym(s):
    return b"\xa3" + bytes([len(s)]) + s.encode()


def a_bin(b):
    return (b"\xa0" + bytes([len(b)]) if len(b) < 256 else b"\xb0" + struct.pack(">I", len(b))) + b


def a_uint(n):
    return b"\x43" if n == 0 else b"\x70" + struct.pack(">I", n)


def a_list(items):
    body = b"".join(items)
    return b"\xd0" + struct.pack(">II", len(body) + 4, len(items)) + body


def a_map(pairs):
    body = b"".join(k + v for k, v in pairs)
    return b"\xd1" + struct.pack(">II", len(body) + 4, 2 * len(pairs)) + body


def described(code, value):
    return b"\x00\x53" + bytes([code]) + value


def a_frame(body, ftype=0, channel=0):
    return struct.pack(">IBBH", 8 + len(body), 2, ftype, channel) + body


ADDR = SCOPE + "/registrations/sym-node-amqp"
NULL, TRUE, FALSE = b"\x40", b"\x41", b"\x42"
SASL_HDR, AMQP_HDR = b"AMQP\x03\x01\x00\x00", b"AMQP\x00\x01\x00\x00"
SASL_INIT = a_frame(described(0x41, a_list([a_sym("PLAIN"), a_bin(b"\0" + ADDR.encode() + b"\0" + TOKEN.encode()), a_str("localhost")])), 1)
OPEN = a_frame(described(0x10, a_list([a_str("fuzz-container"), a_str("localhost")])))
BEGIN = a_frame(described(0x11, a_list([NULL, a_uint(0), a_uint(2048), a_uint(2048)])))
ATTACH_RX = a_frame(described(0x12, a_list([a_str("receiver-1"), a_uint(0), TRUE, NULL, NULL,
                                            described(0x28, a_list([a_str(ADDR)])), described(0x29, a_list([]))])))
ATTACH_TX = a_frame(described(0x12, a_list([a_str("sender-1"), a_uint(1), FALSE, NULL, NULL,
                                            described(0x28, a_list([])), described(0x29, a_list([a_str(ADDR)])), NULL, FALSE, a_uint(0)])))
FLOW = a_frame(described(0x13, a_list([NULL, a_uint(2048), a_uint(0), a_uint(2048), a_uint(0), NULL, a_uint(64)])))


def request(op, op_id=None, body=b""):
    app = [(a_str("iotdps-operation-type"), a_str(op))]
    if op_id:
        app.append((a_str("iotdps-operation-id"), a_str(op_id)))
    if op == "iotdps-register":
        app.append((a_str("iotdps-forceRegistration"), FALSE))
    msg = (described(0x73, a_list([NULL, NULL, NULL, NULL, NULL, a_str("corr-1")]))
           + described(0x74, a_map(app)) + described(0x75, a_bin(body)))
    return a_frame(described(0x14, a_list([a_uint(1), a_uint(0), a_bin(b"\0\0\0\0"), a_uint(0), FALSE])) + msg)


CLOSE = a_frame(described(0x18, a_list([])))
SETUP = OPEN + BEGIN + ATTACH_RX + ATTACH_TX + FLOW
AMQP_REG = request("iotdps-register", body=b'{"registrationId":"sym-node-amqp"}')
AMQP_POLL = request("iotdps-get-operationstatus", "4.0123456789abcdef.op")
put("amqp_conn", "decode-sasl", b"\x00" + SASL_INIT + SETUP + AMQP_REG + CLOSE)
put("amqp_conn", "decode-preopen", b"\x02" + SASL_INIT + OPEN)
put("amqp_conn", "sasl-pipelined", b"\x01" + SASL_HDR + SASL_INIT + AMQP_HDR + SETUP + AMQP_REG + AMQP_POLL + CLOSE)
put("amqp_conn", "sasl-refused", b"\x05" + SASL_HDR + SASL_INIT + AMQP_HDR + SETUP + AMQP_REG)
put("amqp_conn", "throttled-chunked", b"\x69" + SASL_HDR + SASL_INIT + AMQP_HDR + SETUP + AMQP_REG + CLOSE)
put("amqp_conn", "x509-no-sasl", b"\x11" + AMQP_HDR + SETUP + AMQP_REG + CLOSE)
put("amqp_conn", "no-credential", b"\x01" + AMQP_HDR + OPEN)
