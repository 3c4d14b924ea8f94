// Prints the IoT Hub service SAS token that Azure's Node service SDK (azure-iothub, pinned in
// package.json) makes for a connection string and an expiry, exactly as Registry.fromConnectionString
// does (SharedAccessSignature.create(HostName, SharedAccessKeyName, SharedAccessKey, expiry)).
// Used by the Rust test hubs_azure::sdk_tokens_verify_on_the_stand_in_and_match_the_adapter.
//   node interop/node/iothub-sas.mjs 'HostName=…;SharedAccessKeyName=…;SharedAccessKey=…' 1900000000
import iothub from 'azure-iothub';

const [cs, se] = process.argv.slice(2);
if (!cs || !se) {
  console.error('usage: iothub-sas.mjs CONNECTION_STRING EXPIRY');
  process.exit(2);
}
const cn = iothub.ConnectionString.parse(cs);
const sas = iothub.SharedAccessSignature.create(cn.HostName, cn.SharedAccessKeyName, cn.SharedAccessKey, Number(se));
console.log(sas.toString());
