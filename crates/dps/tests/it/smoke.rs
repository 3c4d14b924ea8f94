use crate::support::*;

#[tokio::test]
async fn an_individual_symmetric_key_device_registers_and_is_assigned() {
    let s = TestServer::spawn().await;
    let key = s.enroll("smoke-dev-1", serde_json::json!({})).await;
    let r = s.register("smoke-dev-1", &key, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "assigned");
    let hub = r.body["registrationState"]["assignedHub"].as_str().unwrap();
    assert!(
        hub == "hub-a.example.net" || hub == "hub-b.example.net",
        "{hub}"
    );
    assert_eq!(r.body["registrationState"]["deviceId"], "smoke-dev-1");
}
