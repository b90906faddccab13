//! Socket addresses from configuration: resolving `host:port` keys, and the address to tell
//! peers when a socket is bound to every interface. Shared by the datagram plugins (the UDP
//! transport, the Kademlia and gossip discoveries).

use crate::{ErrorCode, PluginError};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// `address` (`ip:port`, or `host:port` resolved by the system's resolver, first answer) as a
/// socket address; the error names `what` (e.g. ``"gossip: key `seeds`"``), the address and
/// why it does not resolve.
pub async fn resolve(what: &str, address: &str) -> Result<SocketAddr, PluginError> {
    if let Ok(socket) = address.parse() {
        return Ok(socket);
    }
    let invalid = |why: String| {
        PluginError::new(ErrorCode::INVALID_ADDRESS, format!("{what}: `{address}` is not host:port: {why}"))
    };
    tokio::net::lookup_host(address)
        .await
        .map_err(|error| invalid(error.to_string()))?
        .next()
        .ok_or_else(|| invalid("it resolves to nothing".into()))
}

/// What to tell peers for a socket bound to `bound`: `bound` itself, or, for an unspecified IP
/// (`0.0.0.0`, `[::]`), the IP the kernel would send to `toward_v4` (or `toward_v6`, for an IPv6
/// socket) from, found by connecting a UDP socket, which sends nothing, with `bound`'s port. An
/// IPv6 link-local source would need the receiver's interface index to be usable, so it, like no
/// route at all, gives loopback: then the plugin's `advertise` key has to say what peers should
/// use.
pub fn advertised(bound: SocketAddr, toward_v4: Ipv4Addr, toward_v6: Ipv6Addr) -> SocketAddr {
    if !bound.ip().is_unspecified() {
        return bound;
    }
    // The port of the probe does not matter: nothing is sent.
    let (any, toward, loopback): (SocketAddr, SocketAddr, IpAddr) = match bound {
        SocketAddr::V4(_) => {
            ((Ipv4Addr::UNSPECIFIED, 0).into(), (toward_v4, 9).into(), Ipv4Addr::LOCALHOST.into())
        }
        SocketAddr::V6(_) => {
            ((Ipv6Addr::UNSPECIFIED, 0).into(), (toward_v6, 9).into(), Ipv6Addr::LOCALHOST.into())
        }
    };
    let routed = std::net::UdpSocket::bind(any)
        .and_then(|socket| socket.connect(toward).and_then(|()| socket.local_addr()));
    let usable = |ip: IpAddr| match ip {
        IpAddr::V4(ip) => !ip.is_unspecified(),
        IpAddr::V6(ip) => !ip.is_unspecified() && !ip.is_unicast_link_local(),
    };
    match routed {
        Ok(routed) if usable(routed.ip()) => SocketAddr::new(routed.ip(), bound.port()),
        _ => SocketAddr::new(loopback, bound.port()),
    }
}

/// Appends `address` in the binary form the plugins' own protocols write (Kademlia, TCP NAT
/// traversal, the discoveries' TCP carrier): `u8` family (4 or 6), the IP's 4 or 16 bytes, `u16`
/// big-endian port. Each protocol reads it with its own reader and its own checks.
pub fn encode_binary(out: &mut Vec<u8>, address: SocketAddr) {
    match address.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&address.port().to_be_bytes());
}

/// Why [`decode_binary`] could not read an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryAddressError {
    /// Fewer bytes than the family needs.
    Truncated,
    /// A family byte other than 4 or 6.
    UnknownFamily(u8),
}

/// Reads one address in [`encode_binary`]'s form from the start of `bytes`; the address and
/// the bytes after it. Protocols add their own checks (e.g. no unspecified IP).
pub fn decode_binary(bytes: &[u8]) -> Result<(SocketAddr, &[u8]), BinaryAddressError> {
    let truncated = BinaryAddressError::Truncated;
    let (&family, rest) = bytes.split_first().ok_or(truncated)?;
    let (ip, rest) = match family {
        4 => {
            let (octets, rest) = rest.split_first_chunk::<4>().ok_or(truncated)?;
            (IpAddr::from(*octets), rest)
        }
        6 => {
            let (octets, rest) = rest.split_first_chunk::<16>().ok_or(truncated)?;
            (IpAddr::from(*octets), rest)
        }
        other => return Err(BinaryAddressError::UnknownFamily(other)),
    };
    let (port, rest) = rest.split_first_chunk::<2>().ok_or(truncated)?;
    Ok((SocketAddr::new(ip, u16::from_be_bytes(*port)), rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binary_form_is_family_ip_and_port() {
        let mut out = Vec::new();
        encode_binary(&mut out, "10.1.2.3:258".parse().unwrap());
        assert_eq!(out, [4, 10, 1, 2, 3, 1, 2]);
        out.clear();
        encode_binary(&mut out, "[::1]:7".parse().unwrap());
        assert_eq!((out.len(), out[0], out[16], &out[17..]), (19, 6, 1, &[0u8, 7][..]));
    }

    #[test]
    fn the_binary_form_reads_back_and_short_or_unknown_input_is_refused() {
        for address in ["10.1.2.3:258", "[2001:db8::9]:65535"] {
            let address: SocketAddr = address.parse().unwrap();
            let mut out = Vec::new();
            encode_binary(&mut out, address);
            out.push(0xAA);
            assert_eq!(decode_binary(&out), Ok((address, &[0xAA][..])));
            assert_eq!(decode_binary(&out[..out.len() - 2]), Err(BinaryAddressError::Truncated));
        }
        assert_eq!(decode_binary(&[]), Err(BinaryAddressError::Truncated));
        assert_eq!(decode_binary(&[5, 1, 2, 3, 4, 0, 1]), Err(BinaryAddressError::UnknownFamily(5)));
    }

    #[tokio::test]
    async fn literal_addresses_parse_and_bad_ones_name_the_key() {
        assert_eq!(resolve("key `listen`", "127.0.0.1:7").await.unwrap(), "127.0.0.1:7".parse().unwrap());
        let error = resolve("gossip: key `seeds`", "no port here").await.unwrap_err();
        assert_eq!(error.code, ErrorCode::INVALID_ADDRESS);
        assert!(error.message.starts_with("gossip: key `seeds`: `no port here` is not host:port"), "{error}");
    }

    #[test]
    fn a_bound_ip_is_kept_and_an_unspecified_one_is_replaced_by_a_usable_one() {
        let (v4, v6) = (Ipv4Addr::new(192, 0, 2, 1), "2001:db8::1".parse().unwrap());
        let bound: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(advertised(bound, v4, v6), bound);
        let any: SocketAddr = "0.0.0.0:4000".parse().unwrap();
        let told = advertised(any, v4, v6);
        assert_eq!(told.port(), 4000);
        assert!(!told.ip().is_unspecified(), "{told}");
    }
}
