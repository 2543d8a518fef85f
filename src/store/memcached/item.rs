//! What one memcached item holds, and the item's own expiration.
//!
//! An item is `SGW1` + the session's expiry (u64 big-endian, milliseconds
//! since the Unix epoch) + the [stored form] the engine gave us. The
//! expiry lives in the value because a read must report it (the refresh
//! throttle runs on it) to the millisecond, and memcached only keeps whole
//! seconds; the item's own expiration is set as well, a little later, so
//! memcached evicts what nobody reads again.
//!
//! [stored form]: crate::session::SessionRecord::encode

use std::time::{Duration, SystemTime, UNIX_EPOCH};

const MAGIC: &[u8; 4] = b"SGW1";
/// Bytes in front of the stored form.
pub const HEADER: usize = 12;

/// Memcached reads an expiration above this many seconds (30 days) as an
/// absolute Unix time rather than a duration.
pub const MAX_RELATIVE_SECS: u64 = 30 * 24 * 3600;

/// Memcached's item size limit with its default `-I 1m`.
pub const ITEM_SIZE_MAX: usize = 1 << 20;
/// What an item costs beyond its key and value: 59 bytes measured on
/// memcached 1.6.18 (64-bit, CAS on, flags 0), the rest is headroom for
/// other builds. A store refused as too large *deletes* the item already
/// under the key, so sizes are checked here, before anything is sent.
pub const ITEM_OVERHEAD: usize = 128;

/// Milliseconds since the epoch.
pub fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The item for `data` expiring at `expires_ms`.
pub fn encode(expires_ms: u64, data: &[u8]) -> Vec<u8> {
    let mut item = Vec::with_capacity(HEADER + data.len());
    item.extend_from_slice(MAGIC);
    item.extend_from_slice(&expires_ms.to_be_bytes());
    item.extend_from_slice(data);
    item
}

/// What an item read back holds.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    /// A live session: its expiry, and its stored form at `[HEADER..]`.
    Live { expires_ms: u64 },
    /// A session whose expiry has passed; memcached has not dropped the
    /// item yet (its own expiration is rounded up to whole seconds).
    Expired,
    /// Not written by this store (another client shares the key prefix,
    /// or corruption).
    Foreign,
}

pub fn decode(item: &[u8], now_ms: u64) -> Decoded {
    if item.len() < HEADER || &item[..4] != MAGIC {
        return Decoded::Foreign;
    }
    let expires_ms = u64::from_be_bytes(item[4..HEADER].try_into().expect("8 bytes"));
    if expires_ms <= now_ms {
        Decoded::Expired
    } else {
        Decoded::Live { expires_ms }
    }
}

/// The item expiration to send for a session expiring at `expires_ms`:
/// relative seconds up to 30 days, an absolute Unix time beyond (a
/// relative 31 days would be read as a date in February 1970: gone at
/// once). Rounded up, plus one second because memcached's clock ticks in
/// whole seconds and may lag, so the item never vanishes before the expiry
/// the store reports; a late second is hidden by the read-time check.
pub fn exptime(expires_ms: u64, now_ms: u64) -> u32 {
    let relative = expires_ms.saturating_sub(now_ms).div_ceil(1000) + 1;
    let secs = if relative <= MAX_RELATIVE_SECS {
        relative
    } else {
        expires_ms.div_ceil(1000) + 1
    };
    // u32 seconds reach the year 2106.
    u32::try_from(secs).unwrap_or(u32::MAX)
}

/// The session's expiry `ttl` from `now_ms`.
pub fn expiry(now_ms: u64, ttl: Duration) -> u64 {
    now_ms.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
}

/// The longest item value a key of `key_len` bytes can have.
pub fn max_value_len(key_len: usize) -> usize {
    ITEM_SIZE_MAX.saturating_sub(ITEM_OVERHEAD + key_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000; // 2027-01-15, in ms

    #[test]
    fn layout_round_trips() {
        let item = encode(NOW + 5, b"P{\"a\":1}");
        assert_eq!(&item[..4], b"SGW1");
        assert_eq!(item.len(), HEADER + 8);
        assert_eq!(
            decode(&item, NOW),
            Decoded::Live {
                expires_ms: NOW + 5
            }
        );
        assert_eq!(&item[HEADER..], b"P{\"a\":1}");
        assert_eq!(decode(&item, NOW + 5), Decoded::Expired);
        assert_eq!(
            decode(&encode(NOW + 5, b""), NOW),
            Decoded::Live {
                expires_ms: NOW + 5
            }
        );
        assert_eq!(decode(b"P{\"a\":1}", NOW), Decoded::Foreign);
        assert_eq!(decode(b"SGW1", NOW), Decoded::Foreign);
    }

    #[test]
    fn short_lifetimes_are_relative_and_rounded_up() {
        assert_eq!(exptime(NOW + 2_000, NOW), 3);
        assert_eq!(exptime(NOW + 1, NOW), 2);
        assert_eq!(exptime(NOW, NOW), 1, "never 0 (0 = never expires)");
        assert_eq!(exptime(NOW - 5_000, NOW), 1);
        assert_eq!(exptime(NOW + 3_600_000, NOW), 3601);
        // Exactly 30 days minus the slack second is still relative.
        let limit = (MAX_RELATIVE_SECS - 1) * 1000;
        assert_eq!(exptime(NOW + limit, NOW), 2_592_000);
    }

    #[test]
    fn long_lifetimes_are_absolute_unix_times() {
        // The default lifetime, 31 days: a relative 2 678 400 would be
        // read as 1970-02-01 and expire the item at once.
        let expires = expiry(NOW, Duration::from_secs(31 * 86_400));
        let t = exptime(expires, NOW);
        assert!(u64::from(t) > MAX_RELATIVE_SECS);
        assert_eq!(u64::from(t), (NOW / 1000) + 31 * 86_400 + 1);
        // Rounded up from a fractional second.
        assert_eq!(
            exptime(NOW + 40 * 86_400_000 + 1, NOW),
            (NOW / 1000 + 40 * 86_400 + 2) as u32
        );
        // Beyond 2106 saturates instead of wrapping into the past.
        assert_eq!(exptime(u64::MAX, NOW), u32::MAX);
    }

    #[test]
    fn size_limit_leaves_room_for_key_and_overhead() {
        assert_eq!(max_value_len(50), (1 << 20) - ITEM_OVERHEAD - 50);
        // Measured on 1.6.18: 1 048 576 - 59 - key_len fits.
        assert!(max_value_len(250) < 1_048_576 - 59 - 250);
    }
}
