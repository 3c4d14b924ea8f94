//! Allocation policies over linked hubs (protocol digest §9).
//!
//! - `hashed`: weighted rendezvous (highest random weight) hashing on the registration id.
//!   Deterministic for a given id and hub set, proportional to `allocation_weight`, and stable:
//!   adding a hub moves only the devices that now score highest on the new hub.
//! - `static`: the enrollment's single hub.
//! - `geoLatency`: the hub whose `location` is nearest to the node's own location, by great-circle
//!   distance between Azure region coordinates ([`region_coordinates`]); ties, unknown locations
//!   and equal distances fall back to `hashed` among the nearest.
//! - `custom` is decided by a webhook outside this crate; [`candidates`] gives it the hub list.

use crate::instance::LinkedHub;
use crate::model::{AllocationPolicy, EnrollmentSettings};
use sha2::{Digest, Sha256};

/// Why no hub could be chosen (wire: 400208).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocationError {
    /// No linked hub is eligible.
    #[error("no linked IoT hub is eligible for this enrollment")]
    NoEligibleHub,
    /// `static` needs exactly one hub.
    #[error("static allocation needs exactly one hub on the enrollment, found {0}")]
    StaticNeedsOneHub(usize),
    /// The enrollment names a hub that is not linked.
    #[error("hub '{0}' named by the enrollment is not linked to this instance")]
    UnknownHub(String),
}

/// The effective policy of an enrollment: its own, else legacy `iotHubHostName` means static,
/// else the instance default.
pub fn effective_policy(
    settings: &EnrollmentSettings,
    instance_default: AllocationPolicy,
) -> AllocationPolicy {
    match settings.allocation_policy {
        Some(p) => p,
        None if settings.iot_hub_host_name.is_some()
            && settings.iot_hubs.as_ref().is_none_or(|h| h.is_empty()) =>
        {
            AllocationPolicy::Static
        }
        None => instance_default,
    }
}

/// The hubs an enrollment may be assigned to: its `iotHubs` (or legacy `iotHubHostName`), else
/// every linked hub; for policies other than static, hubs with `apply_allocation_policy = false`
/// are dropped.
pub fn candidates<'a>(
    settings: &EnrollmentSettings,
    policy: AllocationPolicy,
    linked: &'a [LinkedHub],
) -> Result<Vec<&'a LinkedHub>, AllocationError> {
    let named: Vec<String> = match (&settings.iot_hubs, &settings.iot_hub_host_name) {
        (Some(h), _) if !h.is_empty() => h.clone(),
        (_, Some(h)) => vec![h.clone()],
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    if named.is_empty() {
        out.extend(linked.iter());
    } else {
        for n in &named {
            let hub = linked
                .iter()
                .find(|h| h.host.eq_ignore_ascii_case(n))
                .ok_or_else(|| AllocationError::UnknownHub(n.clone()))?;
            out.push(hub);
        }
    }
    if policy == AllocationPolicy::Static {
        if out.len() != 1 {
            return Err(AllocationError::StaticNeedsOneHub(out.len()));
        }
        return Ok(out);
    }
    out.retain(|h| h.apply_allocation_policy);
    if out.is_empty() {
        return Err(AllocationError::NoEligibleHub);
    }
    Ok(out)
}

fn unit_hash(registration_id: &str, hub: &str) -> f64 {
    let mut h = Sha256::new();
    h.update(hub.to_ascii_lowercase().as_bytes());
    h.update([0u8]);
    h.update(registration_id.to_ascii_lowercase().as_bytes());
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    // Map to the open interval (0, 1).
    ((u64::from_be_bytes(b) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// Weighted rendezvous hashing: the hub with the highest `-weight / ln(u)`.
pub fn hashed<'a>(registration_id: &str, hubs: &[&'a LinkedHub]) -> Option<&'a LinkedHub> {
    hubs.iter()
        .map(|h| {
            let u = unit_hash(registration_id, &h.host);
            let score = -(h.allocation_weight.max(1) as f64) / u.ln();
            (score, *h)
        })
        .max_by(|a, b| a.0.total_cmp(&b.0).then_with(|| b.1.host.cmp(&a.1.host)))
        .map(|(_, h)| h)
}

/// Nearest hub to `node_location`; ties hashed.
pub fn geo_latency<'a>(
    registration_id: &str,
    node_location: Option<&str>,
    hubs: &[&'a LinkedHub],
) -> Option<&'a LinkedHub> {
    let here = node_location.and_then(region_coordinates);
    let Some(here) = here else {
        return hashed(registration_id, hubs);
    };
    let dist = |h: &LinkedHub| {
        h.location
            .as_deref()
            .and_then(region_coordinates)
            .map(|c| distance_km(here, c))
            .unwrap_or(f64::INFINITY)
    };
    let best = hubs.iter().map(|h| dist(h)).fold(f64::INFINITY, f64::min);
    if !best.is_finite() {
        return hashed(registration_id, hubs);
    }
    let nearest: Vec<&LinkedHub> = hubs
        .iter()
        .copied()
        .filter(|h| (dist(h) - best).abs() < 1.0)
        .collect();
    hashed(registration_id, &nearest)
}

/// Choose among candidates with a non-custom policy.
pub fn choose<'a>(
    policy: AllocationPolicy,
    registration_id: &str,
    node_location: Option<&str>,
    hubs: &[&'a LinkedHub],
) -> Result<&'a LinkedHub, AllocationError> {
    let picked = match policy {
        AllocationPolicy::Static => hubs.first().copied(),
        AllocationPolicy::GeoLatency => geo_latency(registration_id, node_location, hubs),
        AllocationPolicy::Hashed | AllocationPolicy::Custom => hashed(registration_id, hubs),
    };
    picked.ok_or(AllocationError::NoEligibleHub)
}

/// Great-circle distance in km.
pub fn distance_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (la1, lo1) = (a.0.to_radians(), a.1.to_radians());
    let (la2, lo2) = (b.0.to_radians(), b.1.to_radians());
    let h = ((la2 - la1) / 2.0).sin().powi(2)
        + la1.cos() * la2.cos() * ((lo2 - lo1) / 2.0).sin().powi(2);
    2.0 * 6371.0 * h.sqrt().asin()
}

/// Approximate coordinates (latitude, longitude) of Azure regions, by region name
/// (case-insensitive, spaces ignored). A location may also be given as `lat,lon`.
pub fn region_coordinates(name: &str) -> Option<(f64, f64)> {
    let n: String = name
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    if let Some((a, b)) = n.split_once(',') {
        if let (Ok(a), Ok(b)) = (a.parse::<f64>(), b.parse::<f64>()) {
            return Some((a, b));
        }
    }
    REGIONS
        .iter()
        .find(|(r, _, _)| *r == n)
        .map(|(_, la, lo)| (*la, *lo))
}

const REGIONS: &[(&str, f64, f64)] = &[
    ("eastus", 37.37, -79.82),
    ("eastus2", 36.68, -78.39),
    ("centralus", 41.59, -93.60),
    ("northcentralus", 41.88, -87.63),
    ("southcentralus", 29.42, -98.49),
    ("westcentralus", 40.89, -110.23),
    ("westus", 37.78, -122.42),
    ("westus2", 47.23, -119.85),
    ("westus3", 33.45, -112.07),
    ("canadacentral", 43.65, -79.38),
    ("canadaeast", 46.82, -71.22),
    ("brazilsouth", -23.55, -46.63),
    ("northeurope", 53.35, -6.26),
    ("westeurope", 52.37, 4.90),
    ("uksouth", 50.94, -0.80),
    ("ukwest", 53.43, -3.08),
    ("francecentral", 46.37, 2.37),
    ("germanywestcentral", 50.11, 8.68),
    ("switzerlandnorth", 47.45, 8.56),
    ("norwayeast", 59.91, 10.75),
    ("swedencentral", 60.67, 17.14),
    ("polandcentral", 52.23, 21.01),
    ("italynorth", 45.46, 9.19),
    ("spaincentral", 40.42, -3.70),
    ("uaenorth", 25.27, 55.31),
    ("southafricanorth", -25.73, 28.22),
    ("centralindia", 18.58, 73.92),
    ("southindia", 12.98, 80.16),
    ("eastasia", 22.27, 114.19),
    ("southeastasia", 1.28, 103.83),
    ("japaneast", 35.68, 139.77),
    ("japanwest", 34.69, 135.50),
    ("koreacentral", 37.57, 126.98),
    ("australiaeast", -33.86, 151.21),
    ("australiasoutheast", -37.81, 144.96),
    ("australiacentral", -35.31, 149.12),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn hubs(n: usize) -> Vec<LinkedHub> {
        (0..n)
            .map(|i| LinkedHub::registry(&format!("hub{i}.example.net")))
            .collect()
    }

    #[test]
    fn hashed_is_deterministic_and_even_over_100k_ids() {
        let hs = hubs(4);
        let refs: Vec<&LinkedHub> = hs.iter().collect();
        let mut counts = [0usize; 4];
        for i in 0..100_000 {
            let id = format!("device-{i}");
            let h = hashed(&id, &refs).unwrap();
            assert_eq!(h.host, hashed(&id, &refs).unwrap().host);
            counts[hs.iter().position(|x| x.host == h.host).unwrap()] += 1;
        }
        for c in counts {
            // 25,000 expected each; allow ±3 %.
            assert!((24_250..=25_750).contains(&c), "spread {counts:?}");
        }
    }

    #[test]
    fn hashed_is_proportional_to_weight() {
        let mut hs = hubs(2);
        hs[1].allocation_weight = 3;
        let refs: Vec<&LinkedHub> = hs.iter().collect();
        let heavy = (0..100_000)
            .filter(|i| hashed(&format!("d{i}"), &refs).unwrap().host == hs[1].host)
            .count();
        assert!((74_000..=76_000).contains(&heavy), "heavy={heavy}");
    }

    #[test]
    fn adding_a_hub_moves_only_devices_that_must_move() {
        let hs = hubs(5);
        let four: Vec<&LinkedHub> = hs[..4].iter().collect();
        let five: Vec<&LinkedHub> = hs.iter().collect();
        let mut moved = 0;
        for i in 0..100_000 {
            let id = format!("device-{i}");
            let a = hashed(&id, &four).unwrap();
            let b = hashed(&id, &five).unwrap();
            if a.host != b.host {
                assert_eq!(b.host, hs[4].host, "a device moved between old hubs");
                moved += 1;
            }
        }
        // One fifth must move to the new hub; allow ±3 %.
        assert!((19_400..=20_600).contains(&moved), "moved={moved}");
    }

    #[test]
    fn geo_latency_picks_the_nearest_region() {
        let mut hs = hubs(3);
        hs[0].location = Some("westeurope".into());
        hs[1].location = Some("eastus".into());
        hs[2].location = Some("japaneast".into());
        let refs: Vec<&LinkedHub> = hs.iter().collect();
        assert_eq!(
            geo_latency("d", Some("northeurope"), &refs).unwrap().host,
            hs[0].host
        );
        assert_eq!(
            geo_latency("d", Some("westus"), &refs).unwrap().host,
            hs[1].host
        );
        assert_eq!(
            geo_latency("d", Some("koreacentral"), &refs).unwrap().host,
            hs[2].host
        );
        assert!(geo_latency("d", None, &refs).is_some());
    }

    #[test]
    fn candidates_respect_enrollment_hubs_and_apply_flag() {
        let mut hs = hubs(3);
        hs[2].apply_allocation_policy = false;
        let mut s: EnrollmentSettings =
            serde_json::from_value(serde_json::json!({"attestation": {"type": "symmetricKey"}}))
                .unwrap();
        let c = candidates(&s, AllocationPolicy::Hashed, &hs).unwrap();
        assert_eq!(c.len(), 2);
        s.iot_hubs = Some(vec!["HUB2.example.net".into()]);
        assert_eq!(
            candidates(&s, AllocationPolicy::Hashed, &hs),
            Err(AllocationError::NoEligibleHub)
        );
        assert_eq!(
            candidates(&s, AllocationPolicy::Static, &hs).unwrap()[0].host,
            hs[2].host
        );
        s.iot_hubs = Some(vec!["nope".into()]);
        assert!(matches!(
            candidates(&s, AllocationPolicy::Hashed, &hs),
            Err(AllocationError::UnknownHub(_))
        ));
        s.iot_hubs = None;
        s.iot_hub_host_name = Some("hub0.example.net".into());
        assert_eq!(
            effective_policy(&s, AllocationPolicy::Hashed),
            AllocationPolicy::Static
        );
    }
}
