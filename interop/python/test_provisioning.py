"""Azure's Python device SDK (azure-iot-device 2.14.0, ProvisioningDeviceClient) against dps.

Over MQTT (8883) and MQTT over WebSocket (wss://localhost:443/$iothub/websocket).
Enrollments are created through the dps service REST API (Azure-compatible) with the
standard library only: urllib + a SAS token signed here.

The server must be running (interop/run.sh starts it). One test at a time:
    DPS_DATA_DIR=/tmp/dps-interop-data python -m pytest interop/python -k "mqtt and group"
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from azure.iot.device import X509, ProvisioningDeviceClient
from azure.iot.device.exceptions import ClientError, CredentialError

# ---- fixed test configuration (must match interop/dps.toml) --------------------------------
HOST = "localhost"
ID_SCOPE = "0ne00000A0A"
HUBS = {"hub-a.example.net", "hub-b.example.net"}
OWNER_POLICY = "provisioningserviceowner"
OWNER_KEY = "sn2XjACA5QcDJBoR66ixVXPE8+CjMVuw6UYGFDjyh9o="
API_VERSION = "2021-10-01"
TEST_TIMEOUT = int(os.environ.get("DPS_INTEROP_TEST_TIMEOUT_S", "30"))

TRANSPORTS = ["mqtt", "websockets"]
RUN = f"{int(time.time()):x}{secrets.token_hex(2)}"
_counter = 0

# Every test gets a hard deadline: a hang fails fast (pytest-timeout, SIGALRM).
pytestmark = pytest.mark.timeout(TEST_TIMEOUT)


def uid(prefix: str) -> str:
    global _counter
    _counter += 1
    return f"{prefix}-{RUN}-{_counter}".lower()


def random_key(n: int = 32) -> str:
    return base64.b64encode(secrets.token_bytes(n)).decode()


def derive_key(group_key: str, registration_id: str) -> str:
    mac = hmac.new(base64.b64decode(group_key), registration_id.encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


def sas_token(resource: str, key: str, policy: str | None, ttl: int = 3600) -> str:
    sr = urllib.parse.quote(resource, safe="")
    se = str(int(time.time()) + ttl)
    sig = hmac.new(base64.b64decode(key), f"{sr}\n{se}".encode(), hashlib.sha256).digest()
    token = f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(base64.b64encode(sig).decode(), safe='')}&se={se}"
    if policy:
        token += f"&skn={policy}"
    return token


# ---- server discovery ----------------------------------------------------------------------
def _run_json_path() -> Path:
    if os.environ.get("DPS_RUN_JSON"):
        return Path(os.environ["DPS_RUN_JSON"])
    return Path(os.environ.get("DPS_DATA_DIR", "/tmp/dps-interop-data")) / "run.json"


@pytest.fixture(scope="session")
def run_info() -> dict:
    path = _run_json_path()
    if not path.exists():
        pytest.fail(f"{path} not found: start the server first (bash interop/run.sh serve)")
    info = json.loads(path.read_text())
    inst = next((i for i in info.get("instances", []) if i.get("name") == "default"), None)
    assert inst, f"run.json lists the default instance: {info}"
    assert inst["id_scope"].lower() == ID_SCOPE.lower()
    return info


@pytest.fixture(scope="session")
def ca_pem(run_info) -> str:
    return Path(run_info["ca"]).read_text()


class ServiceApi:
    """Minimal client of the dps service API (Azure DPS REST, api-version 2021-10-01)."""

    def __init__(self, ca: str, host: str = HOST, port: int = 443, *, resource: str | None = None,
                 policy: str = OWNER_POLICY, key: str = OWNER_KEY):
        self.base = f"https://{host}:{port}"
        self.host = host
        # the SAS token's `sr` selects the instance (default: the host name, i.e. `default`)
        self.resource = resource or host
        self.policy, self.key = policy, key
        self.ctx = ssl.create_default_context(cadata=ca)

    def call(self, method: str, path: str, body=None, headers=None):
        url = f"{self.base}{path}{'&' if '?' in path else '?'}api-version={API_VERSION}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Authorization", sas_token(self.resource, self.key, self.policy))
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json; charset=utf-8")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=15) as resp:
                raw = resp.read()
                return resp.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                payload = json.loads(raw) if raw else None
            except ValueError:
                payload = raw.decode(errors="replace")
            return e.code, payload

    def ok(self, method: str, path: str, body=None):
        status, payload = self.call(method, path, body)
        assert 200 <= status < 300, f"{method} {path} -> {status} {payload}"
        return payload

    def individual(self, registration_id: str, *, status: str = "enabled", **extra) -> dict:
        key1, key2 = random_key(), random_key()
        body = {
            "registrationId": registration_id,
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key1, "secondaryKey": key2}},
            "provisioningStatus": status,
            **extra,
        }
        created = self.ok("PUT", f"/enrollments/{registration_id}", body)
        assert created["registrationId"] == registration_id
        return {"primary": key1, "secondary": key2, "enrollment": created}

    def group(self, group_id: str, *, status: str = "enabled") -> dict:
        key1, key2 = random_key(64), random_key(64)
        body = {
            "enrollmentGroupId": group_id,
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key1, "secondaryKey": key2}},
            "provisioningStatus": status,
        }
        created = self.ok("PUT", f"/enrollmentGroups/{group_id}", body)
        assert created["enrollmentGroupId"] == group_id
        return {"primary": key1, "secondary": key2}

    def delete_quietly(self, path: str) -> None:
        try:
            self.call("DELETE", path)
        except Exception:  # noqa: BLE001 - best-effort clean-up
            pass


@pytest.fixture(scope="session")
def api(ca_pem) -> ServiceApi:
    return ServiceApi(ca_pem)


@pytest.fixture
def cleanup(api):
    paths: list[str] = []
    yield paths
    for p in reversed(paths):
        api.delete_quietly(p)


# ---- device helpers --------------------------------------------------------------------------
def register_sym(transport: str, registration_id: str, key: str, ca: str, id_scope: str = ID_SCOPE):
    client = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=HOST,
        registration_id=registration_id,
        id_scope=id_scope,
        symmetric_key=key,
        server_verification_cert=ca,
        websockets=(transport == "websockets"),
    )
    return client.register()


def register_x509(transport: str, registration_id: str, cert_file: str, key_file: str, ca: str):
    client = ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host=HOST,
        registration_id=registration_id,
        id_scope=ID_SCOPE,
        x509=X509(cert_file=cert_file, key_file=key_file),
        server_verification_cert=ca,
        websockets=(transport == "websockets"),
    )
    return client.register()


def assert_assigned(result, registration_id: str, device_id: str | None = None, substatus: str | None = None):
    assert result is not None
    assert result.status == "assigned", f"status {result.status}: {result}"
    state = result.registration_state
    assert state is not None
    assert state.device_id == (device_id or registration_id)
    assert state.assigned_hub in HUBS, f"assigned_hub {state.assigned_hub} not in {HUBS}"
    if substatus:
        assert state.sub_status == substatus
    assert result.operation_id, "operation id is set"
    return state


def expect_error(fn, *exc_types):
    """The SDK must raise (not hang): returns the exception."""
    started = time.monotonic()
    with pytest.raises(exc_types) as info:
        fn()
    assert time.monotonic() - started < TEST_TIMEOUT
    return info.value


def expect_auth_refused(fn, allow_not_found: bool = False):
    """Refused at MQTT CONNECT (CONNACK 5 -> CredentialError, as in the py connect-refused vector),
    or by a 401 (or, for an unknown id, 404) answer to the register publish (ClientError caused by
    ServiceError "... status code 401", as in the py 401/404 vectors)."""
    err = expect_error(fn, CredentialError, ClientError)
    if not isinstance(err, CredentialError):
        codes = ("401", "404") if allow_not_found else ("401",)
        assert any(c in repr(err.__cause__) for c in codes), f"{err!r} caused by {err.__cause__!r}"
    return err


def expect_disabled(fn):
    """Azure answers 200 {"status": "disabled"}; the SDK accepts only assigning/assigned/failed and
    raises ClientError caused by ServiceError naming the status."""
    err = expect_error(fn, ClientError)
    assert "disabled" in str(err.__cause__), f"{err!r} caused by {err.__cause__!r}"
    return err


# ---- tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_individual_key(transport, api, ca_pem, cleanup):
    rid = uid(f"py-{transport}-ind")
    e = api.individual(rid)
    cleanup.append(f"/enrollments/{rid}")
    state = assert_assigned(register_sym(transport, rid, e["primary"], ca_pem), rid, substatus="initialAssignment")
    status, rs = api.call("GET", f"/registrations/{rid}")
    assert status == 200, rs
    assert rs["status"] == "assigned"
    assert rs["assignedHub"] == state.assigned_hub


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_individual_secondary_key(transport, api, ca_pem, cleanup):
    rid = uid(f"py-{transport}-sec")
    e = api.individual(rid)
    cleanup.append(f"/enrollments/{rid}")
    assert_assigned(register_sym(transport, rid, e["secondary"], ca_pem), rid)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_custom_device_id(transport, api, ca_pem, cleanup):
    rid = uid(f"py-{transport}-cdev")
    e = api.individual(rid, deviceId=f"custom-{rid}")
    cleanup.append(f"/enrollments/{rid}")
    assert_assigned(register_sym(transport, rid, e["primary"], ca_pem), rid, device_id=f"custom-{rid}")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_group_derived_key(transport, api, ca_pem, cleanup):
    gid = uid(f"py-{transport}-grp")
    g = api.group(gid)
    cleanup.append(f"/enrollmentGroups/{gid}")
    for group_key in (g["primary"], g["secondary"]):
        rid = uid(f"py-{transport}-gdev")
        cleanup.append(f"/registrations/{rid}")
        assert_assigned(register_sym(transport, rid, derive_key(group_key, rid), ca_pem), rid, substatus="initialAssignment")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_reregistration_same_result(transport, api, ca_pem, cleanup):
    rid = uid(f"py-{transport}-rereg")
    e = api.individual(rid)
    cleanup.append(f"/enrollments/{rid}")
    first = assert_assigned(register_sym(transport, rid, e["primary"], ca_pem), rid)
    second = assert_assigned(register_sym(transport, rid, e["primary"], ca_pem), rid)
    assert second.assigned_hub == first.assigned_hub
    assert second.device_id == first.device_id


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_x509_individual(transport, api, ca_pem, cleanup, tmp_path):
    rid = uid(f"py-{transport}-x509")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={rid}",
         "-addext", "extendedKeyUsage=clientAuth"],
        check=True, capture_output=True,
    )
    api.ok("PUT", f"/enrollments/{rid}", {
        "registrationId": rid,
        "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": cert.read_text()}}}},
    })
    cleanup.append(f"/enrollments/{rid}")
    assert_assigned(register_x509(transport, rid, str(cert), str(key), ca_pem), rid)


# ---- negative cases: each must end in the SDK's exception, not a timeout ----
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_wrong_key(transport, api, ca_pem, cleanup):
    rid = uid(f"py-{transport}-wrongkey")
    api.individual(rid)
    cleanup.append(f"/enrollments/{rid}")
    expect_auth_refused(lambda: register_sym(transport, rid, random_key(), ca_pem))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unknown_registration_id(transport, ca_pem):
    rid = uid(f"py-{transport}-unknown")
    expect_auth_refused(lambda: register_sym(transport, rid, random_key(), ca_pem), allow_not_found=True)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_underived_group_key(transport, api, ca_pem, cleanup):
    gid = uid(f"py-{transport}-under")
    g = api.group(gid)
    cleanup.append(f"/enrollmentGroups/{gid}")
    rid = uid(f"py-{transport}-underdev")
    expect_auth_refused(lambda: register_sym(transport, rid, g["primary"], ca_pem), allow_not_found=True)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_disabled_enrollment(transport, api, ca_pem, cleanup):
    rid = uid(f"py-{transport}-disabled")
    e = api.individual(rid, status="disabled")
    cleanup.append(f"/enrollments/{rid}")
    expect_disabled(lambda: register_sym(transport, rid, e["primary"], ca_pem))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_disabled_group(transport, api, ca_pem, cleanup):
    gid = uid(f"py-{transport}-gdis")
    g = api.group(gid, status="disabled")
    cleanup.append(f"/enrollmentGroups/{gid}")
    rid = uid(f"py-{transport}-gdisdev")
    expect_disabled(lambda: register_sym(transport, rid, derive_key(g["primary"], rid), ca_pem))


def test_service_api_wrong_key_is_refused(ca_pem):
    ctx = ssl.create_default_context(cadata=ca_pem)
    req = urllib.request.Request(
        f"https://{HOST}/enrollments/{uid('py-svc')}?api-version={API_VERSION}", method="GET",
        headers={"Authorization": sas_token(HOST, random_key(), OWNER_POLICY)},
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, context=ctx, timeout=15)
    assert info.value.code == 401
    body = json.loads(info.value.read())
    assert body["errorCode"] // 1000 == 401
