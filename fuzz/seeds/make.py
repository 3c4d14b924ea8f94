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
