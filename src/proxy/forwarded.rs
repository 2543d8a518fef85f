//! The forwarding headers the upstream gets: `X-Forwarded-For` (the client
//! address), `X-Forwarded-Proto` (`http`/`https`, as the client connected)
//! and `X-Forwarded-Host` (the client's `Host`).
//!
//! Only a peer in `server.trusted_proxies` (a load balancer in front of
//! the gateway) may speak for the client: its `X-Forwarded-For` is
//! extended with its own address and its `-Proto`/`-Host` are kept. From
//! anyone else, every `X-Forwarded-*`, `Forwarded` and `X-Real-IP` header
//! is dropped and replaced with what the gateway saw, so an app that
//! trusts these headers (rate limits, audit logs, allow-lists) cannot be
//! fooled by a client.

use ipnet::IpNet;
use pingora::http::RequestHeader;
use pingora::Result;
use std::net::IpAddr;

/// What the gateway knows about the connection a request came on.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    /// The TCP peer (`None` on a Unix socket).
    pub addr: Option<IpAddr>,
    /// The client connected with TLS.
    pub https: bool,
}

/// Is `addr` one of the trusted proxies?
pub fn is_trusted(addr: Option<IpAddr>, trusted: &[IpNet]) -> bool {
    match addr {
        Some(ip) => trusted.iter().any(|net| net.contains(&to_canonical(ip))),
        None => false,
    }
}

/// An IPv4 peer may show up as `::ffff:a.b.c.d` on a dual-stack socket.
fn to_canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

fn is_forwarding_header(name: &str) -> bool {
    let name = name.as_bytes();
    name.len() >= 12 && name[..12].eq_ignore_ascii_case(b"x-forwarded-")
        || name.eq_ignore_ascii_case(b"forwarded")
        || name.eq_ignore_ascii_case(b"x-real-ip")
}

/// Set the forwarding headers of a request about to go upstream.
pub fn apply(req: &mut RequestHeader, peer: Peer, trusted: &[IpNet]) -> Result<()> {
    let proto = if peer.https { "https" } else { "http" };
    let host = req.headers.get(http::header::HOST).cloned().or_else(|| {
        req.uri
            .authority()
            .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok())
    });
    let client = peer.addr.map(to_canonical);
    if is_trusted(peer.addr, trusted) {
        // The proxy in front speaks for the client: keep its account and
        // add the hop it came from.
        let mut chain: Vec<u8> = Vec::new();
        for v in req.headers.get_all("x-forwarded-for") {
            if !chain.is_empty() {
                chain.extend_from_slice(b", ");
            }
            chain.extend_from_slice(v.as_bytes());
        }
        if let Some(ip) = client {
            if !chain.is_empty() {
                chain.extend_from_slice(b", ");
            }
            chain.extend_from_slice(ip.to_string().as_bytes());
        }
        if !chain.is_empty() {
            req.insert_header("X-Forwarded-For", chain)?;
        }
        if !req.headers.contains_key("x-forwarded-proto") {
            req.insert_header("X-Forwarded-Proto", proto)?;
        }
        if let (false, Some(host)) = (req.headers.contains_key("x-forwarded-host"), host) {
            req.insert_header("X-Forwarded-Host", host)?;
        }
        return Ok(());
    }
    let forged: Vec<http::HeaderName> = req
        .headers
        .keys()
        .filter(|n| is_forwarding_header(n.as_str()))
        .cloned()
        .collect();
    for name in forged {
        req.remove_header(&name);
    }
    if let Some(ip) = client {
        req.insert_header("X-Forwarded-For", ip.to_string())?;
    }
    req.insert_header("X-Forwarded-Proto", proto)?;
    if let Some(host) = host {
        req.insert_header("X-Forwarded-Host", host)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
        req.insert_header("Host", "app.example").unwrap();
        for (n, v) in headers {
            req.append_header(n.to_string(), *v).unwrap();
        }
        req
    }

    fn get(req: &RequestHeader, name: &str) -> Vec<String> {
        req.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter()
            .map(|s| {
                s.parse()
                    .unwrap_or_else(|_| IpNet::from(s.parse::<IpAddr>().unwrap()))
            })
            .collect()
    }

    #[test]
    fn untrusted_clients_cannot_forge() {
        let mut req = request(&[
            ("X-Forwarded-For", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("X-Forwarded-Host", "evil.example"),
            ("X-Forwarded-Port", "1"),
            ("Forwarded", "for=6.6.6.6"),
            ("X-Real-IP", "6.6.6.6"),
        ]);
        let peer = Peer {
            addr: Some("203.0.113.7".parse().unwrap()),
            https: false,
        };
        apply(&mut req, peer, &nets(&["10.0.0.0/8"])).unwrap();
        assert_eq!(get(&req, "x-forwarded-for"), ["203.0.113.7"]);
        assert_eq!(get(&req, "x-forwarded-proto"), ["http"]);
        assert_eq!(get(&req, "x-forwarded-host"), ["app.example"]);
        for gone in ["x-forwarded-port", "forwarded", "x-real-ip"] {
            assert!(get(&req, gone).is_empty(), "{gone}");
        }
    }

    #[test]
    fn trusted_proxies_extend_the_chain() {
        let mut req = request(&[
            ("X-Forwarded-For", "198.51.100.1"),
            ("X-Forwarded-For", "198.51.100.2"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "public.example"),
            ("Forwarded", "for=198.51.100.1"),
        ]);
        let peer = Peer {
            addr: Some("::ffff:10.1.2.3".parse().unwrap()),
            https: false,
        };
        apply(&mut req, peer, &nets(&["10.0.0.0/8", "2001:db8::/32"])).unwrap();
        assert_eq!(
            get(&req, "x-forwarded-for"),
            ["198.51.100.1, 198.51.100.2, 10.1.2.3"]
        );
        assert_eq!(get(&req, "x-forwarded-proto"), ["https"]);
        assert_eq!(get(&req, "x-forwarded-host"), ["public.example"]);
        assert_eq!(get(&req, "forwarded"), ["for=198.51.100.1"]);
        // A trusted proxy that sent nothing: the gateway's own view.
        let mut bare = request(&[]);
        let v6 = Peer {
            addr: Some("2001:db8::1".parse().unwrap()),
            https: true,
        };
        apply(&mut bare, v6, &nets(&["2001:db8::/32"])).unwrap();
        assert_eq!(get(&bare, "x-forwarded-for"), ["2001:db8::1"]);
        assert_eq!(get(&bare, "x-forwarded-proto"), ["https"]);
    }

    #[test]
    fn no_trust_by_default() {
        assert!(!is_trusted(Some("127.0.0.1".parse().unwrap()), &[]));
        assert!(!is_trusted(None, &nets(&["0.0.0.0/0"])));
        assert!(is_trusted(
            Some("127.0.0.1".parse().unwrap()),
            &nets(&["127.0.0.1"])
        ));
    }
}
