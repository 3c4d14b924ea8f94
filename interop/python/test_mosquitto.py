"""A `mosquitto` linked hub end to end, with Azure's Python device SDK.

The test starts its own Mosquitto 2.x with the dynamic-security plugin on a free loopback port,
adds a provisioning instance (`mosq`) whose linked hub is that broker through the dps admin API,
registers symmetric-key devices with `ProvisioningDeviceClient` against the instance's ID scope,
then connects to the broker **as the device** with paho-mqtt (installed with azure-iot-device):
client id = username = device id, password = base64(HMAC-SHA256(deviceKey, "mosquitto:" + deviceId))
(docs/linked-hubs.md). It publishes on its own topic (delivered), on another device's topic (not
delivered), subscribes to another device's topics (refused), and a wrong password or a foreign
client id is refused at CONNECT.

Needs mosquitto, mosquitto_ctrl and mosquitto_dynamic_security.so; when they are missing the test
fails, unless DPS_INTEROP_SKIP_MOSQUITTO=1 (then it is skipped).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import queue
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from test_provisioning import (  # noqa: F401 - fixtures are used by name
    HOST,
    OWNER_POLICY,
    TEST_TIMEOUT,
    ServiceApi,
    api,
    ca_pem,
    random_key,
    register_sym,
    run_info,
    uid,
)

pytestmark = pytest.mark.timeout(TEST_TIMEOUT)

INSTANCE = "mosq"
MOSQ_ID_SCOPE = "0ne00000C0C"
MOSQ_SERVICE_HOST = "mosq.localhost"
BROKER_HOST = "mosq-broker.local"  # what devices are told (assignedHub); the broker is on 127.0.0.1
ADMIN_USER, ADMIN_PW = "admin", "interop-" + random_key(12).replace("/", "_").replace("+", "-")
MOSQ_OWNER_KEY, MOSQ_OWNER_KEY2 = random_key(), random_key()
ALL_RIGHTS = ["ServiceConfig", "EnrollmentRead", "EnrollmentWrite", "RegistrationStatusRead", "RegistrationStatusWrite"]

PLUGINS = [
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
]


def derive_password(device_key: str, device_id: str) -> str:
    """docs/linked-hubs.md, password_mode = "derived"."""
    mac = hmac.new(base64.b64decode(device_key), f"mosquitto:{device_id}".encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- a small synchronous wrapper around paho-mqtt 1.6 -----------------------------------------
class Mqtt:
    def __init__(self, port: int, client_id: str, username: str, password: str):
        self.port = port
        self.messages: queue.Queue = queue.Queue()
        self.connack: queue.Queue = queue.Queue()
        self.subacks: dict[int, tuple] = {}
        self.pubacks: set[int] = set()
        self.cond = threading.Condition()
        c = mqtt.Client(client_id=client_id, clean_session=True, protocol=mqtt.MQTTv311)
        c.username_pw_set(username, password)
        c.on_connect = lambda _c, _u, _f, rc: self.connack.put(rc)
        c.on_message = lambda _c, _u, m: self.messages.put((m.topic, m.payload.decode(errors="replace")))

        def on_subscribe(_c, _u, mid, granted):
            with self.cond:
                self.subacks[mid] = tuple(granted)
                self.cond.notify_all()

        def on_publish(_c, _u, mid):
            with self.cond:
                self.pubacks.add(mid)
                self.cond.notify_all()

        c.on_subscribe = on_subscribe
        c.on_publish = on_publish
        self.client = c

    def connect(self, timeout: float = 5.0) -> int:
        """Returns the CONNACK return code (0 = accepted), or raises on no answer."""
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        try:
            return self.connack.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no CONNACK within {timeout}s") from None

    def subscribe(self, topic: str, timeout: float = 5.0) -> int:
        """Returns the granted QoS (128 = refused)."""
        rc, mid = self.client.subscribe(topic, qos=1)
        assert rc == mqtt.MQTT_ERR_SUCCESS, rc
        with self.cond:
            assert self.cond.wait_for(lambda: mid in self.subacks, timeout), f"no SUBACK for {topic}"
            return self.subacks[mid][0]

    def publish(self, topic: str, payload: str, timeout: float = 5.0) -> None:
        """QoS 1 publish, waits for the PUBACK (Mosquitto acknowledges denied publishes too)."""
        info = self.client.publish(topic, payload, qos=1)
        with self.cond:
            assert self.cond.wait_for(lambda: info.mid in self.pubacks, timeout), f"no PUBACK for {topic}"

    def wait_for(self, topic: str, timeout: float = 5.0) -> list[tuple[str, str]]:
        """Messages received until one on `topic` (inclusive); fails after `timeout`."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no message on {topic} within {timeout}s; saw {seen}")
            try:
                m = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            seen.append(m)
            if m[0] == topic:
                return seen

    def drain(self, quiet: float = 0.5) -> list[tuple[str, str]]:
        seen = []
        while True:
            try:
                seen.append(self.messages.get(timeout=quiet))
            except queue.Empty:
                return seen

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def try_connect(port: int, client_id: str, username: str, password: str) -> int:
    c = Mqtt(port, client_id, username, password)
    try:
        return c.connect()
    finally:
        c.close()


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """Mosquitto with dynamic security on a free loopback port; killed at the end."""
    binary = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None)
    plugin = next((p for p in PLUGINS if Path(p).exists()), None)
    ctrl = shutil.which("mosquitto_ctrl")
    if not (binary and plugin and ctrl):
        msg = f"mosquitto 2.x with dynamic security is needed (mosquitto={binary}, plugin={plugin}, mosquitto_ctrl={ctrl})"
        if os.environ.get("DPS_INTEROP_SKIP_MOSQUITTO") == "1":
            pytest.skip(msg)
        pytest.fail(msg)
    d = tmp_path_factory.mktemp("mosquitto")
    dynsec = d / "dynsec.json"
    subprocess.run([ctrl, "dynsec", "init", str(dynsec), ADMIN_USER, ADMIN_PW], check=True,
                   capture_output=True, timeout=30)
    port = free_port()
    conf = d / "mosquitto.conf"
    log = d / "mosquitto.log"
    conf.write_text(
        "per_listener_settings false\nuser root\npersistence false\n"
        f"log_dest file {log}\nlog_type error\nlog_type warning\nlog_type notice\n"
        f"listener {port} 127.0.0.1\nallow_anonymous false\n"
        f"plugin {plugin}\nplugin_opt_config_file {dynsec}\n"
    )
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, f"mosquitto exited ({proc.returncode}): {log.read_text() if log.exists() else ''}"
            try:
                if try_connect(port, "probe", ADMIN_USER, ADMIN_PW) == 0:
                    break
            except (OSError, AssertionError):
                pass
            assert time.monotonic() < deadline, "mosquitto did not accept the admin within 10 s"
            time.sleep(0.1)
        yield {"port": port, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def mosq_api(broker, api, ca_pem):
    """Creates the `mosq` instance through the admin API (default instance's owner token) and
    returns a service-API client for it; deletes the instance afterwards."""
    body = {
        "id_scope": MOSQ_ID_SCOPE,
        "hostnames": [MOSQ_SERVICE_HOST],
        "register_response": "accepted",
        "access_policy": [{"name": OWNER_POLICY, "primary_key": MOSQ_OWNER_KEY,
                           "secondary_key": MOSQ_OWNER_KEY2, "rights": ALL_RIGHTS}],
        "linked_hub": [{
            "host": BROKER_HOST,
            "kind": "mosquitto",
            "connection_string": f"mqtt://{ADMIN_USER}:{ADMIN_PW}@127.0.0.1:{broker['port']}",
            "options": {"timeout_ms": 5000},
        }],
    }
    created = api.ok("PUT", f"/admin/instances/{INSTANCE}", body)
    assert created["id_scope"].lower() == MOSQ_ID_SCOPE.lower(), created
    hubs = created.get("linked_hub") or []
    assert [h.get("kind") for h in hubs] == ["mosquitto"], created
    svc = ServiceApi(ca_pem, HOST, resource=MOSQ_SERVICE_HOST, key=MOSQ_OWNER_KEY)
    try:
        yield svc
    finally:
        api.delete_quietly(f"/admin/instances/{INSTANCE}")


def provision(mosq_api, ca_pem, prefix: str) -> tuple[str, str]:
    """Individual symmetric-key enrollment in `mosq`, registered with the Python SDK (MQTT).
    Returns (device id, primary key)."""
    rid = uid(prefix)
    e = mosq_api.individual(rid)
    result = register_sym("mqtt", rid, e["primary"], ca_pem, id_scope=MOSQ_ID_SCOPE)
    assert result.status == "assigned", f"{result}"
    state = result.registration_state
    assert state.assigned_hub == BROKER_HOST, state.assigned_hub
    assert state.device_id == rid
    return rid, e["primary"]


# ---- test ------------------------------------------------------------------------------------
def test_mosquitto_device_uses_its_credentials_and_only_its_topics(broker, mosq_api, ca_pem):
    port = broker["port"]
    dev, key = provision(mosq_api, ca_pem, "py-mosq-a")
    other, other_key = provision(mosq_api, ca_pem, "py-mosq-b")
    password = derive_password(key, dev)

    # wrong password, foreign client id and a password derived for another device: refused
    assert try_connect(port, dev, dev, derive_password(random_key(), dev)) in (4, 5)
    assert try_connect(port, f"{dev}-x", dev, password) != 0, "client id is pinned to the device id"
    assert try_connect(port, dev, dev, derive_password(other_key, other)) in (4, 5)
    assert try_connect(port, dev, dev, key) in (4, 5), "the device key itself is not the password"

    # an admin watches every device topic
    watch = Mqtt(port, f"watch-{dev}", ADMIN_USER, ADMIN_PW)
    a = Mqtt(port, dev, dev, password)
    b = Mqtt(port, other, other, derive_password(other_key, other))
    try:
        assert watch.connect() == 0
        assert watch.subscribe("devices/#") in (0, 1)
        assert a.connect() == 0, "the device logs in with username = client id = device id, derived password"
        assert b.connect() == 0
        assert a.subscribe(f"devices/{dev}/#") in (0, 1), "a device may subscribe to its own topics"
        assert b.subscribe(f"devices/{other}/#") in (0, 1)
        assert a.subscribe(f"devices/{other}/#") == 0x80, "another device's topics: SUBACK 0x80"
        watch.drain(0.3)  # retained twin messages, if any

        # own topic: delivered to the watcher and to the device's own subscription
        a.publish(f"devices/{dev}/telemetry", "hello")
        seen = watch.wait_for(f"devices/{dev}/telemetry")
        assert seen[-1][1] == "hello"
        assert ("hello" in [p for t, p in a.wait_for(f"devices/{dev}/telemetry")])

        # another device's topic, then its own: once the second arrives the first would have too
        a.publish(f"devices/{other}/telemetry", "forbidden")
        a.publish(f"devices/{dev}/twin/desired", '{"spoofed":1}')
        a.publish(f"devices/{dev}/telemetry", "after")
        seen = watch.wait_for(f"devices/{dev}/telemetry")
        assert seen[-1][1] == "after"
        assert not any(t == f"devices/{other}/telemetry" for t, _ in seen), seen
        assert not any("spoofed" in p for _, p in seen), f"devices/{dev}/twin/desired is the service's: {seen}"
        got_b = b.drain(0.5)
        assert not any(p == "forbidden" for _, p in got_b), f"device {other} received {got_b}"

        # the other device still reaches its own topic
        b.publish(f"devices/{other}/telemetry", "mine")
        assert watch.wait_for(f"devices/{other}/telemetry")[-1][1] == "mine"
        got_a = a.drain(0.3)
        assert not any(t.startswith(f"devices/{other}/") for t, _ in got_a), f"device {dev} received {got_a}"
    finally:
        for c in (a, b, watch):
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass

    # the service view of the new instance agrees
    status, rs = mosq_api.call("GET", f"/registrations/{dev}")
    assert status == 200 and rs["assignedHub"] == BROKER_HOST, rs
