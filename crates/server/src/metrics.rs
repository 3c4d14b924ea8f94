//! Metric names and descriptions. Labels come from small fixed sets (instance, hub, protocol,
//! attestation, result) and never carry device ids.

/// Describe every metric (shown as `# HELP` lines).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("RegistrationAttempts", "Device registrations attempted after attestation (Azure Monitor name), by instance, hub, protocol, attestation and result");
    describe_counter!(
        "DeviceAssignments",
        "Devices assigned to a hub (Azure Monitor name)"
    );
    describe_counter!(
        "AttestationAttempts",
        "Device attestations (Azure Monitor name), by result"
    );
    describe_counter!(
        "CertificatesIssued",
        "Certificates issued to devices from their CSR, by instance, credential policy and kind (issued: first certificate of the device; renewed)"
    );
    describe_counter!(
        "dps_certificates_revoked_total",
        "Issued certificates revoked through the admin API or the CLI"
    );
    describe_counter!(
        "dps_certificate_requests_throttled_total",
        "CSRs answered 429 because the device's last certificate is more recent than its policy's min_renewal_interval_secs"
    );
    describe_histogram!(
        "dps_register_duration_seconds",
        Unit::Seconds,
        "Latency of the register call as the device sees it"
    );
    describe_histogram!(
        "dps_assignment_duration_seconds",
        Unit::Seconds,
        "Time from attestation to the final registration record"
    );
    describe_histogram!(
        "dps_hub_call_duration_seconds",
        Unit::Seconds,
        "Latency of linked-hub calls"
    );
    describe_counter!(
        "dps_hub_writes_total",
        "Device identity writes sent to linked hubs during registration, by hub kind"
    );
    describe_counter!(
        "dps_hub_writes_skipped_total",
        "Registrations whose hub write was skipped because it would write what the hub already holds (same fingerprint), by hub kind"
    );
    describe_counter!(
        "dps_sas_group_keys_tried_total",
        "Symmetric-key enrollment group keys tried by device attestation (a key derivation and up to two signature checks each); divided by AttestationAttempts of symmetric-key devices, the groups tried per attestation"
    );
    describe_counter!(
        "dps_store_group_commits_total",
        "PostgreSQL: transactions that committed the writes of more than one registration (group commit)"
    );
    describe_counter!(
        "dps_store_grouped_writes_total",
        "PostgreSQL: registration writes committed in a group commit (divided by dps_store_group_commits_total: the mean batch)"
    );
    describe_gauge!(
        "dps_hub_cleanup_pending",
        "Old hub identities queued for removal (the device moved, changed device id or was deregistered) and not yet confirmed gone"
    );
    describe_counter!(
        "dps_hub_cleanup_attempts_total",
        "Attempts to remove an old hub identity, by result (success, failure, cancelled: the device came back or the hub is no longer linked)"
    );
    describe_counter!(
        "dps_broker_auth_checks_total",
        "Questions of brokers that ask dps (broker-auth hubs), by kind (connect, vhost, resource, topic, publish, subscribe, superuser) and result (allow, deny, ignore, unauthorized, error)"
    );
    describe_histogram!(
        "dps_broker_auth_check_duration_seconds",
        Unit::Seconds,
        "Time to answer a broker-auth question, by kind"
    );
    describe_counter!(
        "dps_broker_auth_cache_total",
        "Broker-auth cache lookups by result (hit, miss)"
    );
    describe_histogram!(
        "dps_http_request_duration_seconds",
        Unit::Seconds,
        "HTTPS request latency by API area"
    );
    describe_gauge!(
        "dps_registrations_in_flight",
        "Registrations being processed on this node"
    );
    describe_gauge!(
        "dps_hub_healthy",
        "1 when the linked hub is healthy, 0 while allocation avoids it"
    );
    describe_gauge!(
        "dps_mqtt_connections",
        "Open MQTT connections (TLS and WebSocket)"
    );
    describe_gauge!(
        "dps_connections_open",
        "Open connections by listener (https, mqtt, mqtt_ws)"
    );
    describe_counter!(
        "dps_connections_refused_total",
        "Connections closed at once because the listener's connection limit was reached, by listener and reason"
    );
    describe_counter!(
        "dps_connections_closed_total",
        "HTTPS connections closed, by listener and reason (closed, error, header_limit, head_timeout, idle_timeout, body_timeout, write_timeout)"
    );
    describe_counter!(
        "dps_audit_pruned_total",
        "Audit log entries deleted by the retention prune (audit.retention_days, audit.max_rows)"
    );
    describe_counter!(
        "dps_audit_refusals_dropped_total",
        "Refused device attempts not written to the audit log, by the limit that dropped them (source, node)"
    );
    describe_counter!(
        "dps_tls_handshakes_total",
        "TLS handshakes by listener and result"
    );
    describe_histogram!(
        "dps_store_operation_duration_seconds",
        Unit::Seconds,
        "Store operation latency"
    );
}
