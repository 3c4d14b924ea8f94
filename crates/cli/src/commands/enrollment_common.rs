//! What `dps enrollment …` and `dps enrollment-group …` share: their subcommands (one generic
//! type, [`KindCommand`]), the flags that set an enrollment's fields, the list filters, and the
//! code that lists, shows, creates, updates and deletes both kinds of document. The two noun
//! modules hold only what is their own: the flag one of them has, and the help texts.

use super::certificate::read_pem;
use super::delete_doc;
use crate::output::{done, emit, emit_list};
use crate::service::{enc, svc_path, Service};
use crate::table::{cell, render_object};
use crate::Globals;
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use reqwest::Method;
use serde_json::{json, Map, Value};
use std::path::PathBuf;

/// Attestation kinds the CLI can create.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AttestationArg {
    /// Symmetric keys.
    #[value(name = "symmetricKey", alias = "symmetrickey")]
    SymmetricKey,
    /// X.509 certificates.
    #[value(name = "x509")]
    X509,
    /// TPM 2.0 (individual enrollments; needs --endorsement-key).
    #[value(name = "tpm")]
    Tpm,
}

impl AttestationArg {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AttestationArg::SymmetricKey => "symmetricKey",
            AttestationArg::X509 => "x509",
            AttestationArg::Tpm => "tpm",
        }
    }
}

/// Enrollment status filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StatusArg {
    /// Enabled.
    Enabled,
    /// Disabled.
    Disabled,
}

/// Reprovisioning policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReprovisionArg {
    /// Re-run allocation and migrate the twin.
    #[value(name = "reprovisionandmigratedata")]
    ReprovisionAndMigrateData,
    /// Re-run allocation and reset the twin.
    #[value(name = "reprovisionandresetdata")]
    ReprovisionAndResetData,
    /// Keep the current hub.
    #[value(name = "never")]
    Never,
}

/// Settings shared by enrollments and groups (create and update).
#[derive(Args, Debug, Clone, Default)]
pub struct EnrollmentFields {
    /// Attestation (default symmetricKey, or x509 when a certificate is given).
    #[arg(long, value_enum)]
    pub attestation: Option<AttestationArg>,
    /// Primary symmetric key (generated when omitted).
    #[arg(long)]
    pub primary_key: Option<String>,
    /// Secondary symmetric key (generated when omitted).
    #[arg(long)]
    pub secondary_key: Option<String>,
    /// Certificate, PEM (device certificate for an enrollment, signing certificate for a group).
    #[arg(long)]
    pub certificate_path: Option<PathBuf>,
    /// Secondary certificate, PEM.
    #[arg(long)]
    pub secondary_certificate_path: Option<PathBuf>,
    /// TPM endorsement key: base64 TPM2B_PUBLIC (as `tpm2_createek -u` writes it, base64),
    /// or the path of a file holding the raw TPM2B_PUBLIC.
    #[arg(long)]
    pub endorsement_key: Option<String>,
    /// TPM storage root key, same forms (optional: when given, only this SRK is accepted).
    #[arg(long, requires = "endorsement_key")]
    pub storage_root_key: Option<String>,
    /// Linked hubs this enrollment may use (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub iot_hubs: Option<Vec<String>>,
    /// Allocation policy: hashed, geoLatency, static, custom.
    #[arg(long)]
    pub allocation_policy: Option<String>,
    /// Initial twin tags, JSON.
    #[arg(long)]
    pub initial_twin_tags: Option<String>,
    /// Initial twin desired properties, JSON.
    #[arg(long)]
    pub initial_twin_properties: Option<String>,
    /// IoT Edge device(s) (`--edge` or `--edge false`).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub edge: Option<bool>,
    /// Create or set the enrollment disabled.
    #[arg(long, conflicts_with = "enabled")]
    pub disabled: bool,
    /// Set the enrollment enabled (update).
    #[arg(long)]
    pub enabled: bool,
    /// Reprovisioning policy.
    #[arg(long, value_enum)]
    pub reprovision_policy: Option<ReprovisionArg>,
    /// Custom allocation webhook URL.
    #[arg(long, requires = "api_version")]
    pub webhook_url: Option<String>,
    /// Custom allocation webhook API version.
    #[arg(long, requires = "webhook_url")]
    pub api_version: Option<String>,
}

/// List filters.
#[derive(Args, Debug, Clone, Default)]
pub struct ListFilters {
    /// Only enabled or disabled.
    #[arg(long, value_enum)]
    pub status: Option<StatusArg>,
    /// Only this attestation.
    #[arg(long, value_enum)]
    pub attestation: Option<AttestationArg>,
    /// Only ids starting with this.
    #[arg(long)]
    pub prefix: Option<String>,
    /// At most this many.
    #[arg(long)]
    pub top: Option<usize>,
}

/// The subcommands of `dps enrollment …` and `dps enrollment-group …`. They differ only in the
/// flag of `create` and `update` that one of them has (`X`: `--device-id`, `--root-ca-name`)
/// and in their help texts, which `KindHelp` gives per noun. (The texts here are
/// documentation; the help shows the noun's.)
#[derive(Subcommand, Debug)]
pub enum KindCommand<X: Args> {
    /// List the documents.
    List(ListFilters),
    /// Show one document.
    Show {
        /// Its id.
        id: String,
        /// Also show the symmetric keys.
        #[arg(long)]
        show_keys: bool,
    },
    /// Create a document (fails if it exists).
    Create {
        /// Its id.
        id: String,
        #[command(flatten)]
        extra: X,
        #[command(flatten)]
        fields: EnrollmentFields,
    },
    /// Update a document (read, change, write with If-Match).
    Update {
        /// Its id.
        id: String,
        #[command(flatten)]
        extra: X,
        #[command(flatten)]
        fields: EnrollmentFields,
    },
    /// Delete a document.
    Delete {
        /// Its id.
        id: String,
        /// Only if the etag still matches.
        #[arg(long)]
        etag: Option<String>,
    },
}

/// What the code needs of a noun's own flag (`X` of [`KindCommand`]).
pub(crate) trait NounArgs: Args {
    /// The documents the noun is about.
    const KIND: Kind;
    /// A field of the document the flag sets (`deviceId`), if given.
    fn doc_field(&self) -> Option<(&'static str, String)> {
        None
    }
    /// The CA certificate a group trusts (`--root-ca-name`), if given.
    fn root_ca_name(&self) -> Option<&str> {
        None
    }
}

/// A noun's help texts for the subcommands of [`KindCommand`], as the help shows them: without
/// the full stop that clap's derive drops from a one-sentence doc comment.
pub(crate) struct KindHelp {
    pub(crate) list: &'static str,
    pub(crate) show: &'static str,
    pub(crate) create: &'static str,
    pub(crate) update: &'static str,
    pub(crate) delete: &'static str,
    /// The positional id.
    pub(crate) id: &'static str,
    /// The noun's own flag (its argument id) and its help under `create` and under `update`.
    pub(crate) flag: &'static str,
    pub(crate) flag_create: &'static str,
    pub(crate) flag_update: &'static str,
}

/// Gives the noun's command its help texts: `#[command(subcommand, kind_help = &HELP)]` on the
/// variant of [`crate::Command`] (clap calls it once the subcommands are added).
pub(crate) trait ApplyKindHelp {
    fn kind_help(self, h: &KindHelp) -> Self;
}

impl ApplyKindHelp for clap::Command {
    fn kind_help(self, h: &KindHelp) -> Self {
        let id = |c: clap::Command| c.mut_arg("id", |a| a.help(h.id));
        let flag = |c: clap::Command, help| c.mut_arg(h.flag, |a| a.help(help));
        self.mut_subcommand("list", |c| c.about(h.list))
            .mut_subcommand("show", |c| id(c.about(h.show)))
            .mut_subcommand("create", |c| flag(id(c.about(h.create)), h.flag_create))
            .mut_subcommand("update", |c| flag(id(c.about(h.update)), h.flag_update))
            .mut_subcommand("delete", |c| id(c.about(h.delete)))
    }
}

/// Run `dps enrollment …` or `dps enrollment-group …`.
pub(crate) async fn run<X: NounArgs>(g: &Globals, svc: &Service, c: KindCommand<X>) -> Result<()> {
    let k = X::KIND;
    match c {
        KindCommand::List(f) => list_enrollments(g, svc, k, f).await,
        KindCommand::Show { id, show_keys } => show_enrollment(g, svc, k, &id, show_keys).await,
        KindCommand::Create { id, extra, fields } => {
            put_enrollment(g, svc, &id, &fields, &extra, false).await
        }
        KindCommand::Update { id, extra, fields } => {
            put_enrollment(g, svc, &id, &fields, &extra, true).await
        }
        KindCommand::Delete { id, etag } => {
            delete_doc(svc, &format!("{}/{}", k.collection(), enc(&id)), etag).await?;
            done(g, format!("{} '{id}' deleted", k.noun()));
            Ok(())
        }
    }
}

/// Which documents: individual enrollments or enrollment groups.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    Enrollment,
    Group,
}

impl Kind {
    fn collection(self) -> &'static str {
        match self {
            Kind::Enrollment => "/enrollments",
            Kind::Group => "/enrollmentGroups",
        }
    }
    fn id_field(self) -> &'static str {
        match self {
            Kind::Enrollment => "registrationId",
            Kind::Group => "enrollmentGroupId",
        }
    }
    fn noun(self) -> &'static str {
        match self {
            Kind::Enrollment => "enrollment",
            Kind::Group => "enrollment group",
        }
    }
    fn query(self) -> Value {
        match self {
            Kind::Enrollment => json!({"query": "SELECT * FROM enrollments"}),
            Kind::Group => json!({"query": "SELECT * FROM enrollmentGroups"}),
        }
    }
}

fn parse_json_arg(flag: &str, s: &str) -> Result<Value> {
    let v: Value =
        serde_json::from_str(s).with_context(|| format!("{flag} is not valid JSON: {s}"))?;
    if !v.is_object() {
        bail!("{flag} must be a JSON object");
    }
    Ok(v)
}

/// A TPM key flag: a file with the raw TPM2B_PUBLIC, or base64 of it; checked locally so that
/// a wrong file is named before the service refuses it.
fn tpm_key(flag: &str, v: &str) -> Result<String> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let text = match std::fs::read(v) {
        Ok(raw) => b64.encode(raw),
        Err(_) => v.trim().to_string(),
    };
    dps_core::tpm::PublicArea::from_base64(&text, "key")
        .map_err(|e| anyhow!("{flag}: not a TPM2B_PUBLIC file or base64 of one: {e}"))?;
    Ok(text)
}

/// Apply the flags to an enrollment or group document. `existing_attestation` (with secrets) is
/// kept unless the flags change it.
fn apply_fields(
    kind: Kind,
    doc: &mut Map<String, Value>,
    f: &EnrollmentFields,
    root_ca_name: Option<&str>,
    creating: bool,
) -> Result<()> {
    let wants_x509 = f.attestation == Some(AttestationArg::X509)
        || f.certificate_path.is_some()
        || root_ca_name.is_some();
    let wants_sym = f.attestation == Some(AttestationArg::SymmetricKey)
        || f.primary_key.is_some()
        || f.secondary_key.is_some();
    let wants_tpm = f.attestation == Some(AttestationArg::Tpm) || f.endorsement_key.is_some();
    if wants_tpm && kind == Kind::Group {
        bail!("TPM attestation is not allowed for enrollment groups (as in Azure)");
    }
    if [wants_x509, wants_sym, wants_tpm]
        .iter()
        .filter(|w| **w)
        .count()
        > 1
    {
        bail!("choose one attestation: symmetric keys, an X.509 certificate or a TPM");
    }
    if wants_tpm {
        let Some(ek) = &f.endorsement_key else {
            bail!("tpm attestation needs --endorsement-key");
        };
        let mut tpm = json!({"endorsementKey": tpm_key("--endorsement-key", ek)?});
        if let Some(srk) = &f.storage_root_key {
            tpm["storageRootKey"] = json!(tpm_key("--storage-root-key", srk)?);
        }
        doc.insert("attestation".into(), json!({"type": "tpm", "tpm": tpm}));
    } else if wants_x509 {
        let mut x509 = Map::new();
        if let Some(ca) = root_ca_name {
            if kind == Kind::Enrollment {
                bail!("--root-ca-name applies to enrollment groups only");
            }
            x509.insert("caReferences".into(), json!({"primary": ca}));
        } else {
            let Some(p) = &f.certificate_path else {
                bail!(
                    "x509 attestation needs --certificate-path{}",
                    if kind == Kind::Group {
                        " or --root-ca-name"
                    } else {
                        ""
                    }
                );
            };
            let mut certs = json!({"primary": {"certificate": read_pem(p)?}});
            if let Some(s) = &f.secondary_certificate_path {
                certs["secondary"] = json!({"certificate": read_pem(s)?});
            }
            let field = match kind {
                Kind::Enrollment => "clientCertificates",
                Kind::Group => "signingCertificates",
            };
            x509.insert(field.into(), certs);
        }
        doc.insert("attestation".into(), json!({"type": "x509", "x509": x509}));
    } else if wants_sym || creating {
        let mut sk = match doc.get("attestation") {
            Some(a) if a.get("type").and_then(Value::as_str) == Some("symmetricKey") => {
                a.get("symmetricKey").cloned().unwrap_or_else(|| json!({}))
            }
            _ => json!({}),
        };
        if let Some(k) = &f.primary_key {
            check_key("--primary-key", k)?;
            sk["primaryKey"] = json!(k);
        }
        if let Some(k) = &f.secondary_key {
            check_key("--secondary-key", k)?;
            sk["secondaryKey"] = json!(k);
        }
        doc.insert(
            "attestation".into(),
            json!({"type": "symmetricKey", "symmetricKey": sk}),
        );
    }
    if let Some(h) = &f.iot_hubs {
        doc.insert("iotHubs".into(), json!(h));
    }
    if let Some(p) = &f.allocation_policy {
        let v: dps_core::model::AllocationPolicy =
            serde_json::from_value(json!(p)).map_err(|e| anyhow!("--allocation-policy: {e}"))?;
        doc.insert("allocationPolicy".into(), json!(v.as_str()));
    }
    if f.initial_twin_tags.is_some() || f.initial_twin_properties.is_some() {
        let mut twin = doc
            .get("initialTwin")
            .cloned()
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({}));
        if let Some(t) = &f.initial_twin_tags {
            twin["tags"] = parse_json_arg("--initial-twin-tags", t)?;
        }
        if let Some(p) = &f.initial_twin_properties {
            twin["properties"] =
                json!({"desired": parse_json_arg("--initial-twin-properties", p)?});
        }
        doc.insert("initialTwin".into(), twin);
    }
    if let Some(e) = f.edge {
        doc.insert("capabilities".into(), json!({"iotEdge": e}));
    }
    if f.disabled {
        doc.insert("provisioningStatus".into(), json!("disabled"));
    } else if f.enabled || creating {
        doc.insert("provisioningStatus".into(), json!("enabled"));
    }
    if let Some(r) = f.reprovision_policy {
        let (u, m) = match r {
            ReprovisionArg::ReprovisionAndMigrateData => (true, true),
            ReprovisionArg::ReprovisionAndResetData => (true, false),
            ReprovisionArg::Never => (false, false),
        };
        doc.insert(
            "reprovisionPolicy".into(),
            json!({"updateHubAssignment": u, "migrateDeviceData": m}),
        );
    }
    if let (Some(u), Some(v)) = (&f.webhook_url, &f.api_version) {
        doc.insert(
            "customAllocationDefinition".into(),
            json!({"webhookUrl": u, "apiVersion": v}),
        );
        if f.allocation_policy.is_none() {
            doc.insert("allocationPolicy".into(), json!("custom"));
        }
    }
    Ok(())
}

fn check_key(flag: &str, k: &str) -> Result<()> {
    if !dps_core::sas::valid_key(k) {
        bail!("{flag} must be base64 of 16 to 64 bytes");
    }
    Ok(())
}

fn list_cols(kind: Kind) -> (Vec<&'static str>, Vec<&'static [&'static str]>) {
    match kind {
        Kind::Enrollment => (
            vec![
                "REGISTRATION ID",
                "ATTESTATION",
                "STATUS",
                "ALLOCATION",
                "HUBS",
                "REGISTRATION",
                "ASSIGNED HUB",
                "UPDATED",
            ],
            vec![
                &["/registrationId"],
                &["/attestation/type"],
                &["/provisioningStatus"],
                &["/allocationPolicy"],
                &["/iotHubs"],
                &["/registrationState/status"],
                &["/registrationState/assignedHub"],
                &["/lastUpdatedDateTimeUtc"],
            ],
        ),
        Kind::Group => (
            vec![
                "GROUP ID",
                "ATTESTATION",
                "STATUS",
                "ALLOCATION",
                "HUBS",
                "EDGE",
                "UPDATED",
            ],
            vec![
                &["/enrollmentGroupId"],
                &["/attestation/type"],
                &["/provisioningStatus"],
                &["/allocationPolicy"],
                &["/iotHubs"],
                &["/capabilities/iotEdge"],
                &["/lastUpdatedDateTimeUtc"],
            ],
        ),
    }
}

async fn list_enrollments(g: &Globals, svc: &Service, kind: Kind, f: ListFilters) -> Result<()> {
    let path = svc_path(
        &format!("{}/query", kind.collection()),
        &[
            (
                "status",
                f.status.map(|s| match s {
                    StatusArg::Enabled => "enabled".to_string(),
                    StatusArg::Disabled => "disabled".to_string(),
                }),
            ),
            ("attestation", f.attestation.map(|a| a.as_str().to_string())),
            ("prefix", f.prefix),
        ],
    );
    let items = svc.query_all(&path, &kind.query(), f.top).await?;
    let (h, c) = list_cols(kind);
    emit_list(g, &items, &h, &c);
    Ok(())
}

async fn attestation_with_keys(svc: &Service, kind: Kind, id: &str) -> Result<Value> {
    Ok(svc
        .call(
            Method::POST,
            &svc_path(
                &format!("{}/{}/attestationmechanism", kind.collection(), enc(id)),
                &[],
            ),
            None,
            &[],
        )
        .await?
        .body)
}

async fn show_enrollment(
    g: &Globals,
    svc: &Service,
    kind: Kind,
    id: &str,
    show_keys: bool,
) -> Result<()> {
    let mut v = svc
        .get(&svc_path(
            &format!("{}/{}", kind.collection(), enc(id)),
            &[],
        ))
        .await?;
    if show_keys {
        let a = attestation_with_keys(svc, kind, id).await?;
        if a.is_object() {
            v["attestation"] = a;
        }
    }
    emit(g, &v, render_object);
    Ok(())
}

async fn put_enrollment<X: NounArgs>(
    g: &Globals,
    svc: &Service,
    id: &str,
    fields: &EnrollmentFields,
    extra: &X,
    update: bool,
) -> Result<()> {
    let kind = X::KIND;
    let path = svc_path(&format!("{}/{}", kind.collection(), enc(id)), &[]);
    let mut headers = Vec::new();
    let mut doc = if update {
        let current = svc.get(&path).await?;
        let mut m = current
            .as_object()
            .cloned()
            .ok_or_else(|| anyhow!("the service returned no {} document", kind.noun()))?;
        if let Some(e) = m.get("etag").and_then(Value::as_str) {
            headers.push(("If-Match", e.to_string()));
        }
        // GET hides the keys: fetch them so that a PUT does not regenerate them.
        if m.get("attestation")
            .and_then(|a| a.get("type"))
            .and_then(Value::as_str)
            == Some("symmetricKey")
        {
            let a = attestation_with_keys(svc, kind, id).await?;
            if a.is_object() {
                m.insert("attestation".into(), a);
            }
        }
        for ro in [
            "registrationState",
            "createdDateTimeUtc",
            "lastUpdatedDateTimeUtc",
        ] {
            m.remove(ro);
        }
        m
    } else {
        let mut m = Map::new();
        m.insert(kind.id_field().into(), json!(id));
        m
    };
    if let Some((k, v)) = extra.doc_field() {
        doc.insert(k.into(), json!(v));
    }
    apply_fields(kind, &mut doc, fields, extra.root_ca_name(), !update)?;
    if !update {
        // Create must not replace: refuse when it already exists.
        match svc.get(&path).await {
            Ok(_) => bail!(
                "{} '{id}' already exists (use 'update' to change it)",
                kind.noun()
            ),
            Err(e) => match e.downcast_ref::<crate::ApiError>() {
                Some(a) if a.status == 404 => {}
                _ => return Err(e),
            },
        }
    }
    let r = svc
        .call(Method::PUT, &path, Some(&Value::Object(doc)), &headers)
        .await?;
    emit(g, &r.body, |v| {
        let mut out = format!(
            "{} '{id}' {}\n",
            kind.noun(),
            if update { "updated" } else { "created" }
        );
        if !update {
            for (label, ptr) in [
                ("primary key", "/attestation/symmetricKey/primaryKey"),
                ("secondary key", "/attestation/symmetricKey/secondaryKey"),
            ] {
                if let Some(k) = v.pointer(ptr).and_then(Value::as_str) {
                    out.push_str(&format!("{label}: {k}\n"));
                }
            }
        }
        out.push_str(&format!("etag: {}\n", cell(v, &["/etag"])));
        out
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_build_documents() {
        let f = EnrollmentFields {
            iot_hubs: Some(vec!["h1".into()]),
            allocation_policy: Some("geolatency".into()),
            initial_twin_tags: Some(r#"{"site":"a"}"#.into()),
            initial_twin_properties: Some(r#"{"fw":"1.0"}"#.into()),
            edge: Some(true),
            reprovision_policy: Some(ReprovisionArg::ReprovisionAndResetData),
            webhook_url: Some("https://w".into()),
            api_version: Some("2021-10-01".into()),
            ..Default::default()
        };
        let mut doc = Map::new();
        apply_fields(Kind::Enrollment, &mut doc, &f, None, true).unwrap();
        let v = Value::Object(doc);
        assert_eq!(v["attestation"]["type"], "symmetricKey");
        assert_eq!(v["allocationPolicy"], "geoLatency");
        assert_eq!(v["initialTwin"]["properties"]["desired"]["fw"], "1.0");
        assert_eq!(v["reprovisionPolicy"]["migrateDeviceData"], false);
        assert_eq!(v["provisioningStatus"], "enabled");
        assert_eq!(v["customAllocationDefinition"]["webhookUrl"], "https://w");

        // Update keeps existing keys unless new ones are given.
        let mut doc = serde_json::from_value::<Map<String, Value>>(json!({
            "registrationId": "d",
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "old1", "secondaryKey": "old2"}}
        }))
        .unwrap();
        let f = EnrollmentFields {
            disabled: true,
            ..Default::default()
        };
        apply_fields(Kind::Enrollment, &mut doc, &f, None, false).unwrap();
        assert_eq!(doc["attestation"]["symmetricKey"]["primaryKey"], "old1");
        assert_eq!(doc["provisioningStatus"], "disabled");

        let mut doc = Map::new();
        apply_fields(
            Kind::Group,
            &mut doc,
            &EnrollmentFields::default(),
            Some("myca"),
            true,
        )
        .unwrap();
        assert_eq!(
            doc["attestation"]["x509"]["caReferences"]["primary"],
            "myca"
        );
        let mut doc = Map::new();
        assert!(apply_fields(
            Kind::Enrollment,
            &mut doc,
            &EnrollmentFields {
                attestation: Some(AttestationArg::X509),
                ..Default::default()
            },
            None,
            true
        )
        .is_err());
        assert!(apply_fields(
            Kind::Enrollment,
            &mut Map::new(),
            &EnrollmentFields {
                primary_key: Some("short".into()),
                ..Default::default()
            },
            None,
            true
        )
        .is_err());
    }
}
