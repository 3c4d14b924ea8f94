//! Source addresses of the simulated devices of `dps bench`: towards a loopback endpoint, each
//! device connects from its own address, as real devices do.

use std::net::Ipv4Addr;

/// The source address of simulated device `i` towards a loopback (IPv4) endpoint: its own
/// address in 127.64.0.0/10, as every real device has its own address. From one source address
/// the kernel has only its ephemeral port range (about 28,000 ports) towards the server, and a
/// reboot storm holding more connections than that makes every `connect()` search the whole
/// range (measured: two thirds of the load generator's CPU in a 100,000-device storm).
pub(super) fn loopback_source(i: usize) -> Ipv4Addr {
    let i = i % (64 * 250 * 250);
    Ipv4Addr::new(
        127,
        64 + (i / 62_500) as u8,
        ((i / 250) % 250) as u8 + 1,
        (i % 250) as u8 + 2,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_sources_are_distinct_host_addresses() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..1_000_000 {
            let a = loopback_source(i);
            assert!(a.is_loopback(), "{a}");
            let o = a.octets();
            assert!(o[3] != 0 && o[3] != 255 && o[2] != 0, "{a}");
            assert!(seen.insert(a), "device {i} shares {a}");
        }
    }
}
