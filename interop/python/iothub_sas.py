"""Prints the IoT Hub service SAS token that Azure's Python service SDK (azure-iot-hub, pinned in
requirements.txt) puts in the Authorization header for a connection string, exactly as
IoTHubRegistryManager.from_connection_string does (ConnectionStringAuthentication, one hour).
Used by the Rust test hubs_azure::sdk_tokens_verify_on_the_stand_in_and_match_the_adapter.

    python3 interop/python/iothub_sas.py 'HostName=...;SharedAccessKeyName=...;SharedAccessKey=...'
"""
import sys

from azure.iot.hub.auth import ConnectionStringAuthentication

if len(sys.argv) != 2:
    sys.exit("usage: iothub_sas.py CONNECTION_STRING")
session = ConnectionStringAuthentication(sys.argv[1]).signed_session()
print(session.headers["Authorization"])
