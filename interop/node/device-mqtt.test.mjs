// Azure's Node device SDK over azure-iot-provisioning-device-mqtt: Mqtt (8883) and
// MqttWs (MQTT over WebSocket, wss://host:443/$iothub/websocket).
//   NODE_EXTRA_CA_CERTS=<ca.pem> node --test interop/node/device-mqtt.test.mjs
//   NODE_EXTRA_CA_CERTS=<ca.pem> node --test --test-name-pattern=mqttws interop/node/device-mqtt.test.mjs
import { deviceScenarios } from './device-scenarios.mjs';

deviceScenarios('mqtt');
deviceScenarios('mqttws');
