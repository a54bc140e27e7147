//! The SSRF guard: which resolved addresses an `http(s)://` image URL may
//! reach. A pure function on [`IpAddr`] plus a resolver hook, so the table of
//! refused addresses is tested without a network.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};

/// Why an address is refused, or `None` when a public address may be fetched.
/// IPv4-mapped (`::ffff:a.b.c.d`) and IPv4-compatible (`::a.b.c.d`) IPv6
/// addresses are judged as the IPv4 address they carry.
pub fn refused_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => refused_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return refused_v4(v4);
            }
            refused_v6(v6)
        }
    }
}

fn refused_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_unspecified() || o[0] == 0 {
        Some("unspecified (0.0.0.0/8)")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private (RFC 1918)")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_broadcast() || o[0] >= 240 {
        Some("reserved/broadcast")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("shared address space (100.64.0.0/10)")
    } else {
        None
    }
}

fn refused_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if (s[0] & 0xfe00) == 0xfc00 {
        Some("unique local (fc00::/7)")
    } else if (s[0] & 0xffc0) == 0xfe80 {
        Some("link-local")
    } else if s[0..6] == [0, 0, 0, 0, 0, 0] {
        // IPv4-compatible ::a.b.c.d (deprecated): judge the embedded address.
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        refused_v4(v4).or(Some("IPv4-compatible IPv6"))
    } else {
        None
    }
}

/// Resolves `host:port` to socket addresses. The default uses the system
/// resolver; tests pass a closure with a fixed table.
pub type Resolver = dyn Fn(&str, u16) -> std::io::Result<Vec<SocketAddr>> + Send + Sync;

/// The system resolver (`getaddrinfo` via `ToSocketAddrs`). Blocking: call it
/// from `spawn_blocking` in async code.
pub fn system_resolver(host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    Ok((host, port).to_socket_addrs()?.collect())
}

/// Resolves `host` and checks every address it resolves to (one refused
/// address refuses the host, so a name cannot mix a public and a private
/// answer). Returns the first address, which the fetch then pins, so a second
/// lookup (DNS rebinding) cannot swap in another one.
pub fn check_host(
    host: &str,
    port: u16,
    allow_private: bool,
    resolve: &Resolver,
) -> Result<SocketAddr, String> {
    // A literal address needs no lookup.
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => resolve(bare, port).map_err(|e| format!("cannot resolve host {host:?}: {e}"))?,
    };
    let first = *addrs
        .first()
        .ok_or_else(|| format!("host {host:?} resolves to no address"))?;
    if !allow_private {
        for a in &addrs {
            if let Some(why) = refused_reason(a.ip()) {
                return Err(format!(
                    "host {host:?} resolves to {} ({why}); fetching non-public addresses is disabled",
                    a.ip()
                ));
            }
        }
    }
    Ok(first)
}
