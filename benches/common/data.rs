//! Session data shared by the micro and load benches: a record of a given
//! size that looks like a real app's session (ids, a CSRF token, roles,
//! short strings), so encode and decode costs are representative.

use serde_json::{Map, Value};
use session_gateway::session::SessionRecord;

/// A permanent record whose `X-Session` value is `bytes` long (within a
/// few bytes).
pub fn record_of(bytes: usize) -> SessionRecord {
    let mut data = Map::new();
    data.insert("user_id".into(), Value::from(123_456));
    data.insert(
        "csrf".into(),
        Value::from("q8ZlR0m3b1c2d3e4f5g6h7i8j9k0LmNo"),
    );
    data.insert("roles".into(), serde_json::json!(["reader", "editor"]));
    data.insert("locale".into(), Value::from("en-GB"));
    let mut record = SessionRecord {
        permanent: true,
        data,
    };
    let mut i = 0;
    while record.header_value().len() < bytes {
        let left = bytes - record.header_value().len();
        // `,"kNN":"..."` costs 9-10 bytes around the value.
        let fill = left.saturating_sub(10).clamp(1, 60);
        record
            .data
            .insert(format!("k{i:02}"), Value::from("x".repeat(fill)));
        i += 1;
    }
    record
}
