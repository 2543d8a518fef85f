//! Reading stored sessions, for every form a store may hold: the current
//! stored form (`P`/`T` + header JSON), the legacy form (`{"p":..,"d":..}`),
//! both as memory, Redis and SQL keep them (the bare value) and inside the
//! filesystem store's file (`SGW1` + expiry + value). The input is the
//! stored bytes.
//!
//! Invariants: a value that [`StoredSession::decode`] accepts is served as
//! a printable-ASCII `{...}`; where it parses, to the same record
//! [`SessionRecord::from_stored`] reads (reads do not parse JSON: a
//! current-form value that does not parse is only refused by updates);
//! what encode writes always decodes back; a file that decodes is
//! re-encoded to the same bytes.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use session_gateway::session::record::parse_object;
use session_gateway::session::{SessionRecord, StoredSession};
use session_gateway::store::filesystem::{decode_file, encode_file};

fn check_value(value: &[u8]) {
    if let Ok(stored) = StoredSession::decode(Bytes::copy_from_slice(value)) {
        let header = stored.header();
        assert_eq!(header.len(), stored.header_len());
        assert!(
            header.len() >= 2 && header[0] == b'{' && header[header.len() - 1] == b'}',
            "{header:?}"
        );
        assert!(
            header.iter().all(|b| (0x20..0x7f).contains(b)),
            "{header:?}"
        );
        assert_eq!(
            stored.bytes()[0],
            if stored.permanent() { b'P' } else { b'T' }
        );
        // A read does not parse the JSON (see `StoredSession::decode`);
        // where it does parse, what is served is the JSON of the data.
        match stored.record() {
            Ok(record) => {
                assert_eq!(record.permanent, stored.permanent());
                let served = parse_object(&header).expect("the served header is JSON");
                assert_eq!(served, record.data);
                assert_eq!(SessionRecord::from_stored(value).as_ref(), Ok(&record));
                if value.first() == Some(&b'{') {
                    // A legacy value is converted to the current form.
                    assert_eq!(stored.bytes(), &record.encode());
                }
            }
            Err(_) => {
                // Only the current form is accepted without parsing, and
                // an update treats it as no session.
                assert!(matches!(value.first(), Some(b'P' | b'T')), "{value:?}");
                assert!(SessionRecord::from_stored(value).is_err());
            }
        }
    }
    if let Ok(record) = SessionRecord::from_stored(value) {
        let again = StoredSession::decode(record.encode()).expect("encode always decodes");
        assert_eq!(again.record().as_ref(), Ok(&record));
        assert_eq!(&again.header()[..], record.header_value().as_bytes());
    }
}

fuzz_target!(|data: &[u8]| {
    check_value(data);
    if let Some(loaded) = decode_file(data.to_vec()) {
        assert_eq!(
            encode_file(&loaded.value, loaded.expires_at),
            data,
            "file format does not round-trip"
        );
        check_value(&loaded.value);
    }
});
