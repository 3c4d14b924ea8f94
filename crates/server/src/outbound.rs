//! What dps may call on the network, and how much of the answer it reads.
//!
//! Every outbound HTTP call (the custom allocation webhook, `webhook` linked hubs, the Azure IoT
//! Hub adapter) goes through a client built here: no proxy taken from the environment, no
//! redirect followed, and a DNS resolver that drops the addresses the policy refuses, so that a
//! name that resolves (or re-resolves, "DNS rebinding") to a refused address is never connected
//! to. Answers are read with [`read_limited`], at most `[outbound] max_response_bytes`.
//!
//! The address policy ([`Policy`]):
//!
//! * always refused: link-local addresses (169.254.0.0/16, fe80::/10), cloud metadata
//!   addresses and names (169.254.169.254, fd00:ec2::254, 100.100.100.200,
//!   `metadata.google.internal`, …), unspecified, multicast and reserved addresses;
//! * loopback and private addresses (127.0.0.0/8, ::1, RFC 1918, 100.64.0.0/10, fc00::/7, …):
//!   refused unless `[outbound] allow_private_addresses = true`, for webhook URLs; the Azure
//!   IoT Hub adapter may reach them (an IoT hub behind a private endpoint resolves to one);
//! * `[outbound] allowed_webhook_hosts`, when not empty, lists the only hosts webhook URLs may
//!   name (`*.example.com` matches every subdomain of `example.com`).
//!
//! URLs are checked when they are configured (enrollments, linked hubs) and again when called;
//! host names are checked on the addresses they resolve to, at connect time.

use dps_core::instance::{HubKind, LinkedHub};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// The default of `[outbound] max_response_bytes`.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// Names of cloud metadata services (compared lower-case, without a trailing dot).
const METADATA_NAMES: &[&str] = &[
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "metadata.azure.internal",
    "instance-data",
    "instance-data.ec2.internal",
    "metadata.tencentyun.com",
    "metadata.platformequinix.com",
];

/// Why an outbound call or URL was refused, or its answer not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboundError {
    /// Not a URL.
    #[error("invalid URL: {0}")]
    InvalidUrl(String),
    /// Not `http://` or `https://`.
    #[error("the URL must be http:// or https://, not {0}://")]
    Scheme(String),
    /// The URL has no host.
    #[error("the URL has no host")]
    NoHost,
    /// A cloud metadata service: never called.
    #[error("{0} is a cloud metadata address; dps never calls it")]
    Metadata(String),
    /// An address class that is never called (link-local, multicast, unspecified, reserved).
    #[error("{addr} is a {class} address; dps never calls it")]
    Forbidden {
        /// The address (or host).
        addr: String,
        /// Its class.
        class: &'static str,
    },
    /// Loopback or private, and `allow_private_addresses` is off.
    #[error(
        "{addr} is a {class} address; set [outbound] allow_private_addresses = true to allow it"
    )]
    Private {
        /// The address (or host).
        addr: String,
        /// Its class.
        class: &'static str,
    },
    /// Not in `allowed_webhook_hosts`.
    #[error("host '{0}' is not in [outbound] allowed_webhook_hosts")]
    HostNotAllowed(String),
    /// The name resolved to no address.
    #[error("{0} resolves to no address")]
    NoAddress(String),
    /// The answer is larger than `max_response_bytes`.
    #[error("the answer is larger than [outbound] max_response_bytes ({limit} bytes)")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// Reading the answer failed (or timed out).
    #[error("reading the answer failed: {0}")]
    Read(String),
}

/// What an address is, for the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// Globally routable.
    Public,
    /// Loopback or private (allowed with `allow_private_addresses`).
    Private(&'static str),
    /// Never called.
    Forbidden(&'static str),
    /// A cloud metadata service: never called.
    Metadata,
}

fn v4_in(ip: Ipv4Addr, net: [u8; 4], bits: u32) -> bool {
    let mask = if bits == 0 {
        0
    } else {
        u32::MAX << (32 - bits)
    };
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

fn v6_in(ip: Ipv6Addr, net: Ipv6Addr, bits: u32) -> bool {
    let mask = if bits == 0 {
        0
    } else {
        u128::MAX << (128 - bits)
    };
    u128::from(ip) & mask == u128::from(net) & mask
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    use AddressClass::*;
    if ip == Ipv4Addr::new(169, 254, 169, 254)
        || ip == Ipv4Addr::new(169, 254, 170, 2)
        || ip == Ipv4Addr::new(100, 100, 100, 200)
    {
        return Metadata;
    }
    let table: &[([u8; 4], u32, AddressClass)] = &[
        ([0, 0, 0, 0], 8, Forbidden("unspecified")),
        ([169, 254, 0, 0], 16, Forbidden("link-local")),
        ([224, 0, 0, 0], 4, Forbidden("multicast")),
        ([240, 0, 0, 0], 4, Forbidden("reserved")),
        ([127, 0, 0, 0], 8, Private("loopback")),
        ([10, 0, 0, 0], 8, Private("private")),
        ([172, 16, 0, 0], 12, Private("private")),
        ([192, 168, 0, 0], 16, Private("private")),
        ([100, 64, 0, 0], 10, Private("shared (carrier-grade NAT)")),
        ([192, 0, 0, 0], 24, Private("IETF protocol")),
        ([198, 18, 0, 0], 15, Private("benchmarking")),
        ([192, 0, 2, 0], 24, Private("documentation")),
        ([198, 51, 100, 0], 24, Private("documentation")),
        ([203, 0, 113, 0], 24, Private("documentation")),
    ];
    table
        .iter()
        .find(|(net, bits, _)| v4_in(ip, *net, *bits))
        .map(|(_, _, c)| *c)
        .unwrap_or(Public)
}

/// The class of an address. IPv4 addresses embedded in IPv6 ones (mapped, compatible, NAT64
/// `64:ff9b::/96`, 6to4 `2002::/16`) are judged as the IPv4 address.
pub fn classify(ip: IpAddr) -> AddressClass {
    use AddressClass::*;
    let ip6 = match ip {
        IpAddr::V4(v4) => return classify_v4(v4),
        IpAddr::V6(v6) => v6,
    };
    if ip6.is_unspecified() {
        return Forbidden("unspecified");
    }
    if ip6.is_loopback() {
        return Private("loopback");
    }
    let o = ip6.octets();
    if let Some(v4) = ip6.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    if o[..12].iter().all(|b| *b == 0) {
        // IPv4-compatible (deprecated): ::a.b.c.d.
        return classify_v4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    let seg = |s: &str| s.parse::<Ipv6Addr>().unwrap_or(Ipv6Addr::UNSPECIFIED);
    if v6_in(ip6, seg("64:ff9b::"), 96) {
        return classify_v4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    if v6_in(ip6, seg("2002::"), 16) {
        return classify_v4(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    if ip6 == seg("fd00:ec2::254") {
        return Metadata;
    }
    let table: &[(&str, u32, AddressClass)] = &[
        ("fe80::", 10, Forbidden("link-local")),
        ("ff00::", 8, Forbidden("multicast")),
        ("fc00::", 7, Private("unique local (private)")),
        ("fec0::", 10, Private("site-local (private)")),
        ("100::", 64, Private("discard")),
        ("2001:db8::", 32, Private("documentation")),
    ];
    table
        .iter()
        .find(|(net, bits, _)| v6_in(ip6, seg(net), *bits))
        .map(|(_, _, c)| *c)
        .unwrap_or(Public)
}

fn is_metadata_name(host: &str) -> bool {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    METADATA_NAMES.contains(&h.as_str())
}

/// What a URL is for: webhooks get the whole policy, linked IoT hubs only the always-refused
/// classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A custom allocation webhook or a `webhook` linked hub.
    Webhook,
    /// The Azure IoT Hub adapter's endpoint.
    Hub,
}

/// The address policy (pure: no network).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    allow_private: bool,
    allowed_hosts: Vec<String>,
}

impl Policy {
    /// From `[outbound]`.
    pub fn new(allow_private: bool, allowed_hosts: &[String]) -> Self {
        Policy {
            allow_private,
            allowed_hosts: allowed_hosts
                .iter()
                .map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase())
                .collect(),
        }
    }

    /// Is `ip` acceptable for `target`?
    pub fn check_ip(&self, ip: IpAddr, target: Target) -> Result<(), OutboundError> {
        let addr = ip.to_string();
        match classify(ip) {
            AddressClass::Public => Ok(()),
            AddressClass::Metadata => Err(OutboundError::Metadata(addr)),
            AddressClass::Forbidden(class) => Err(OutboundError::Forbidden { addr, class }),
            AddressClass::Private(class) => {
                if self.allow_private || target == Target::Hub {
                    Ok(())
                } else {
                    Err(OutboundError::Private { addr, class })
                }
            }
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        self.allowed_hosts.is_empty()
            || self
                .allowed_hosts
                .iter()
                .any(|a| match a.strip_prefix("*.") {
                    Some(suffix) => host
                        .strip_suffix(suffix)
                        .is_some_and(|rest| rest.ends_with('.') && rest.len() > 1),
                    None => a == host,
                })
    }

    /// Check a URL as written: scheme, metadata names, allowed hosts (webhooks), and address
    /// literals. Names are judged on their addresses when dps connects.
    pub fn check_url(&self, url: &str, target: Target) -> Result<reqwest::Url, OutboundError> {
        let parsed =
            reqwest::Url::parse(url).map_err(|e| OutboundError::InvalidUrl(e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(OutboundError::Scheme(parsed.scheme().to_string()));
        }
        let raw = parsed.host_str().ok_or(OutboundError::NoHost)?;
        // The URL parser writes every IPv4 spelling (2852039166, 0xa9.0xfe.0xa9.0xfe, …) as
        // dotted decimal and IPv6 in brackets.
        let literal = raw
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok();
        let host = match literal {
            Some(ip) => (ip.to_string(), Some(ip)),
            None => {
                let d = raw.trim_end_matches('.').to_ascii_lowercase();
                if d.is_empty() {
                    return Err(OutboundError::NoHost);
                }
                if is_metadata_name(&d) {
                    return Err(OutboundError::Metadata(d));
                }
                (d, None)
            }
        };
        if let Some(ip) = host.1 {
            // Never-called classes first: the allow-list cannot open them.
            if let Err(e @ (OutboundError::Metadata(_) | OutboundError::Forbidden { .. })) =
                self.check_ip(ip, Target::Hub)
            {
                return Err(e);
            }
        }
        if target == Target::Webhook && !self.host_allowed(&host.0) {
            return Err(OutboundError::HostNotAllowed(host.0));
        }
        if let Some(ip) = host.1 {
            self.check_ip(ip, target)?;
        }
        Ok(parsed)
    }

    /// Check the URLs a linked hub calls (webhook URL, Azure endpoint). Unparsable settings are
    /// left to the adapter, which reports them on every call.
    pub fn check_linked_hub(&self, hub: &LinkedHub) -> Result<(), String> {
        let at = |e: OutboundError| format!("linked hub '{}': {e}", hub.host);
        match hub.kind {
            HubKind::Webhook => {
                if let Some(url) = &hub.connection_string {
                    self.check_url(url, Target::Webhook).map_err(at)?;
                }
            }
            HubKind::AzureIotHub => {
                if let Some(base) = crate::hubs::azure::endpoint_of(hub) {
                    self.check_url(&base, Target::Hub).map_err(at)?;
                }
            }
            HubKind::BrokerAuth => {
                crate::hubs::broker_auth::check_settings(hub)
                    .map_err(|e| format!("linked hub '{}': {e}", hub.host))?;
            }
            HubKind::Registry | HubKind::Mosquitto => {}
        }
        Ok(())
    }
}

/// The resolver of the outbound clients: drops the addresses the policy refuses.
struct PolicyResolver {
    policy: Policy,
    target: Target,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        let policy = self.policy.clone();
        let target = self.target;
        Box::pin(async move {
            if is_metadata_name(&host) {
                return Err(Box::new(OutboundError::Metadata(host)) as _);
            }
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let ok: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| match policy.check_ip(a.ip(), target) {
                    Ok(()) => true,
                    Err(e) => {
                        refused.get_or_insert(e);
                        false
                    }
                })
                .collect();
            if ok.is_empty() {
                let e = match refused {
                    Some(e) => named(e, &host),
                    None => OutboundError::NoAddress(host),
                };
                return Err(Box::new(e) as _);
            }
            Ok(Box::new(ok.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The refusal of an address, naming the host it came from.
fn named(e: OutboundError, host: &str) -> OutboundError {
    match e {
        OutboundError::Private { addr, class } => OutboundError::Private {
            addr: format!("{host} ({addr})"),
            class,
        },
        OutboundError::Forbidden { addr, class } => OutboundError::Forbidden {
            addr: format!("{host} ({addr})"),
            class,
        },
        OutboundError::Metadata(addr) => OutboundError::Metadata(format!("{host} ({addr})")),
        other => other,
    }
}

/// The policy, the limit on answers and the HTTP clients that enforce them.
pub struct Outbound {
    policy: Policy,
    max_response_bytes: usize,
    webhook: reqwest::Client,
    hub: reqwest::Client,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("policy", &self.policy)
            .field("max_response_bytes", &self.max_response_bytes)
            .finish_non_exhaustive()
    }
}

impl Outbound {
    /// Clients for `policy`; `timeout` bounds every request of the shared clients.
    pub fn new(
        policy: Policy,
        max_response_bytes: usize,
        timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        let webhook = builder(&policy, Target::Webhook).timeout(timeout).build()?;
        let hub = builder(&policy, Target::Hub).timeout(timeout).build()?;
        Ok(Outbound {
            policy,
            max_response_bytes,
            webhook,
            hub,
        })
    }

    /// From the `[outbound]` configuration.
    pub fn from_config(
        cfg: &crate::config::Outbound,
        timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        Self::new(
            Policy::new(cfg.allow_private_addresses, &cfg.allowed_webhook_hosts),
            cfg.max_response_bytes,
            timeout,
        )
    }

    /// Private addresses allowed (the local emulator's setting, and tests' with doubles on
    /// 127.0.0.1), the default limit.
    pub fn permissive() -> Arc<Self> {
        Arc::new(
            Self::new(
                Policy::new(true, &[]),
                DEFAULT_MAX_RESPONSE_BYTES,
                Duration::from_secs(10),
            )
            .expect("building an HTTP client with no custom TLS settings"),
        )
    }

    /// The address policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The most bytes of an answer read.
    pub fn max_response_bytes(&self) -> usize {
        self.max_response_bytes
    }

    /// The shared client for `target`.
    pub fn client(&self, target: Target) -> &reqwest::Client {
        match target {
            Target::Webhook => &self.webhook,
            Target::Hub => &self.hub,
        }
    }

    /// A client builder for `target` with the policy's settings (for a client with its own
    /// trusted CAs).
    pub fn builder(&self, target: Target) -> reqwest::ClientBuilder {
        builder(&self.policy, target)
    }
}

fn builder(policy: &Policy, target: Target) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(Arc::new(PolicyResolver {
            policy: policy.clone(),
            target,
        }))
}

/// The policy's refusal inside a failed request, if that is why it failed.
pub fn refusal(e: &reqwest::Error) -> Option<OutboundError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<OutboundError>() {
            return Some(r.clone());
        }
        cur = err.source();
    }
    None
}

/// Why a request got no answer, with its causes (the URL left out: it may carry secrets).
pub fn describe(e: reqwest::Error) -> String {
    if e.is_timeout() {
        return "request timed out".to_string();
    }
    if let Some(r) = refusal(&e) {
        return format!("refused by the outbound policy: {r}");
    }
    let e = e.without_url();
    let mut text = format!("request failed: {e}");
    let mut cur = std::error::Error::source(&e);
    while let Some(s) = cur {
        text.push_str(": ");
        text.push_str(&s.to_string());
        cur = s.source();
    }
    text
}

/// Read an answer's body, at most `limit` bytes: a larger answer (announced or sent) is an
/// error, not a larger allocation.
pub async fn read_limited(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, OutboundError> {
    if resp
        .content_length()
        .is_some_and(|n| n > u64::try_from(limit).unwrap_or(u64::MAX))
    {
        return Err(OutboundError::TooLarge { limit });
    }
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if body.len().saturating_add(chunk.len()) > limit {
                    return Err(OutboundError::TooLarge { limit });
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) if e.is_timeout() => {
                return Err(OutboundError::Read("timed out".into()));
            }
            Err(e) => return Err(OutboundError::Read(e.without_url().to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_are_classified() {
        use AddressClass::*;
        for (a, want) in [
            ("169.254.169.254", Metadata),
            ("fd00:ec2::254", Metadata),
            ("100.100.100.200", Metadata),
            ("::ffff:169.254.169.254", Metadata),
            ("64:ff9b::a9fe:a9fe", Metadata),
            ("169.254.1.1", Forbidden("link-local")),
            ("fe80::1", Forbidden("link-local")),
            ("febf::1", Forbidden("link-local")),
            ("0.0.0.0", Forbidden("unspecified")),
            ("::", Forbidden("unspecified")),
            ("224.0.0.1", Forbidden("multicast")),
            ("ff02::1", Forbidden("multicast")),
            ("255.255.255.255", Forbidden("reserved")),
            ("127.0.0.1", Private("loopback")),
            ("127.1.2.3", Private("loopback")),
            ("::1", Private("loopback")),
            ("::ffff:127.0.0.1", Private("loopback")),
            ("2002:7f00:1::", Private("loopback")),
            ("10.1.2.3", Private("private")),
            ("172.16.0.1", Private("private")),
            ("172.31.255.255", Private("private")),
            ("192.168.1.1", Private("private")),
            ("fd12:3456::1", Private("unique local (private)")),
            ("8.8.8.8", Public),
            ("172.32.0.1", Public),
            ("2606:4700::1111", Public),
        ] {
            assert_eq!(classify(ip(a)), want, "{a}");
        }
    }

    #[test]
    fn urls_follow_the_policy() {
        let strict = Policy::new(false, &[]);
        let open = Policy::new(true, &[]);
        let w = Target::Webhook;
        for url in [
            "http://169.254.169.254/latest/meta-data/",
            "http://[fd00:ec2::254]/",
            "http://metadata.google.internal/computeMetadata/v1/",
            "http://METADATA.GOOGLE.INTERNAL./",
            "http://[fe80::1]/",
            "http://169.254.10.10/",
            // Other spellings of 169.254.169.254 that URL parsers accept.
            "http://2852039166/",
            "http://0xa9.0xfe.0xa9.0xfe/",
            "http://[::ffff:a9fe:a9fe]/",
        ] {
            assert!(open.check_url(url, w).is_err(), "{url}");
            assert!(open.check_url(url, Target::Hub).is_err(), "{url}");
        }
        for url in [
            "http://127.0.0.1:8080/x",
            "http://[::1]/",
            "https://10.0.0.1/",
            "http://0x7f.1/",
        ] {
            let e = strict.check_url(url, w).unwrap_err();
            assert!(matches!(e, OutboundError::Private { .. }), "{url}: {e}");
            assert!(
                e.to_string().contains("allow_private_addresses"),
                "{url}: {e}"
            );
            assert!(open.check_url(url, w).is_ok(), "{url}");
            // The IoT hub adapter may reach private endpoints.
            assert!(strict.check_url(url, Target::Hub).is_ok(), "{url}");
        }
        assert!(strict
            .check_url("https://hooks.example.com/a?b=c", w)
            .is_ok());
        assert!(matches!(
            strict.check_url("ftp://example.com/", w),
            Err(OutboundError::Scheme(_))
        ));
        assert!(matches!(
            strict.check_url("not a url", w),
            Err(OutboundError::InvalidUrl(_))
        ));
    }

    #[test]
    fn the_allow_list_narrows_webhook_hosts() {
        let p = Policy::new(true, &["hooks.example.com".into(), "*.corp.example".into()]);
        let w = Target::Webhook;
        assert!(p.check_url("https://HOOKS.example.com/x", w).is_ok());
        assert!(p.check_url("https://a.corp.example/x", w).is_ok());
        assert!(p.check_url("https://a.b.corp.example/x", w).is_ok());
        for url in [
            "https://corp.example/x",
            "https://evilcorp.example/x",
            "https://other.example.com/x",
            "http://127.0.0.1/",
        ] {
            assert!(
                matches!(p.check_url(url, w), Err(OutboundError::HostNotAllowed(_))),
                "{url}"
            );
        }
        // The list does not apply to IoT hub endpoints, and cannot open metadata addresses.
        assert!(p
            .check_url("https://hub.azure-devices.net", Target::Hub)
            .is_ok());
        let p = Policy::new(true, &["169.254.169.254".into()]);
        assert!(matches!(
            p.check_url("http://169.254.169.254/", w),
            Err(OutboundError::Metadata(_))
        ));
    }

    #[tokio::test]
    async fn names_resolving_to_refused_addresses_are_not_connected_to() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let strict = Outbound::new(
            Policy::new(false, &[]),
            DEFAULT_MAX_RESPONSE_BYTES,
            Duration::from_secs(5),
        )
        .unwrap();
        let e = strict
            .client(Target::Webhook)
            .get(format!("http://localhost:{port}/"))
            .send()
            .await
            .unwrap_err();
        let r = refusal(&e).expect("refused by the policy");
        assert!(matches!(r, OutboundError::Private { .. }), "{r}");
        assert!(describe(e).contains("localhost"));
        // Nothing connected: the first connection the listener holds is this one.
        let ours = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_, peer) = listener.accept().await.unwrap();
        assert_eq!(
            peer,
            ours.local_addr().unwrap(),
            "the policy let a connection through"
        );
    }

    /// `HTTP_PROXY` in the environment is not used: the request goes to its URL.
    #[test]
    fn proxies_from_the_environment_are_not_used() {
        // Figment's Jail serializes the tests that touch the process environment.
        figment::Jail::expect_with(|jail| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
                for k in ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"] {
                    jail.set_env(k, &proxy_url);
                }
                jail.set_env("NO_PROXY", "");
                jail.set_env("no_proxy", "");
                let out = Outbound::new(
                    Policy::new(true, &[]),
                    DEFAULT_MAX_RESPONSE_BYTES,
                    Duration::from_secs(5),
                )
                .unwrap();
                let url = format!("http://{}/", target.local_addr().unwrap());
                let call =
                    tokio::spawn(async move { out.client(Target::Webhook).get(url).send().await });
                // Whichever listener the client reaches first tells where the request went.
                tokio::select! {
                    r = target.accept() => { r.unwrap(); }
                    r = proxy.accept() => { r.unwrap(); panic!("the request went to the proxy"); }
                }
                call.abort();
            });
            Ok(())
        });
    }
}
