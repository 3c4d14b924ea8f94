// Azure's Node device SDK (azure-iot-provisioning-device + azure-iot-provisioning-device-http,
// azure-iot-security-symmetric-key, azure-iot-security-x509) against the dps server.
//   NODE_EXTRA_CA_CERTS=<ca.pem> node --test interop/node/device-http.test.mjs
import { deviceScenarios } from './device-scenarios.mjs';

deviceScenarios('http');
