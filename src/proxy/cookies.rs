//! The session cookie: finding it in `Cookie` request headers, removing it
//! from what the upstream sees, and building `Set-Cookie` values.

use crate::config::{CookieSettings, SameSite};
use cookie::time::{Duration as CookieDuration, OffsetDateTime};
use cookie::Cookie;
use std::sync::Mutex;
use std::time::Duration;

/// The session cookie as the client sent it.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    Absent,
    One(String),
    /// More than one cookie of our name: ambiguous, so treated as no valid
    /// session (a cookie planted for a parent domain or a longer path must
    /// not be able to choose the session).
    Duplicated,
}

impl Found {
    pub fn is_present(&self) -> bool {
        !matches!(self, Found::Absent)
    }
}

/// The `name=value` pairs of one `Cookie` header. Trimming is ASCII
/// whitespace only, exactly as [`without`] trims: a name that one of them
/// read as ours and the other did not would let the session cookie through
/// to the upstream (`session\x0b=...`, `\u{a0}session=...`).
fn pairs(header: &[u8]) -> impl Iterator<Item = (&str, &str)> {
    header
        .split(|&b| b == b';')
        .filter_map(|part| std::str::from_utf8(part).ok())
        .filter_map(|part| {
            let (name, value) = part.split_once('=')?;
            Some((name.trim_ascii(), value.trim_ascii().trim_matches('"')))
        })
}

/// Look for the cookie `name` in all `Cookie` header values.
pub fn find<'a>(headers: impl Iterator<Item = &'a [u8]>, name: &str) -> Found {
    let mut found = Found::Absent;
    for header in headers {
        for (n, v) in pairs(header) {
            if n == name {
                found = match found {
                    Found::Absent => Found::One(v.to_string()),
                    _ => Found::Duplicated,
                };
            }
        }
    }
    found
}

/// The `Cookie` header the upstream should get: every cookie but ours,
/// with multiple headers merged into one. `None` when nothing is left.
pub fn without<'a>(headers: impl Iterator<Item = &'a [u8]>, name: &str) -> Option<Vec<u8>> {
    let mut out: Vec<u8> = Vec::new();
    for header in headers {
        for part in header.split(|&b| b == b';') {
            let trimmed = part.trim_ascii();
            if trimmed.is_empty() {
                continue;
            }
            let cookie_name = trimmed
                .split(|&b| b == b'=')
                .next()
                .unwrap_or(b"")
                .trim_ascii();
            if cookie_name == name.as_bytes() {
                continue;
            }
            if !out.is_empty() {
                out.extend_from_slice(b"; ");
            }
            out.extend_from_slice(trimmed);
        }
    }
    (!out.is_empty()).then_some(out)
}

fn base<'c>(settings: &CookieSettings, value: String) -> cookie::CookieBuilder<'c> {
    let mut b = Cookie::build((settings.name.clone(), value))
        .path(settings.path.clone())
        .secure(settings.secure)
        .http_only(settings.http_only)
        .same_site(match settings.same_site {
            SameSite::Lax => cookie::SameSite::Lax,
            SameSite::Strict => cookie::SameSite::Strict,
            SameSite::None => cookie::SameSite::None,
        });
    if let Some(domain) = &settings.domain {
        b = b.domain(domain.clone());
    }
    b
}

/// `Set-Cookie` for a session: with Max-Age and Expires when permanent, a
/// browser-session cookie otherwise.
pub fn set_cookie(
    settings: &CookieSettings,
    value: String,
    permanent: bool,
    lifetime: Duration,
) -> String {
    set_cookie_at(
        settings,
        value,
        permanent,
        lifetime,
        OffsetDateTime::now_utc(),
    )
}

fn set_cookie_at(
    settings: &CookieSettings,
    value: String,
    permanent: bool,
    lifetime: Duration,
    now: OffsetDateTime,
) -> String {
    let mut b = base(settings, value);
    if permanent {
        let secs = i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX / 2);
        b = b
            .max_age(CookieDuration::seconds(secs))
            .expires(now + CookieDuration::seconds(secs));
    }
    b.build().to_string()
}

/// Builds the same `Set-Cookie` values as [`set_cookie`] for one cookie
/// configuration, but formats the attributes (which change only through
/// `Expires`, once a second) once per second instead of on every response:
/// with `refresh_each_request` every response sets the cookie, and the
/// date formatting was a visible share of a request's CPU.
pub struct SetCookieCache {
    settings: CookieSettings,
    lifetime: Duration,
    /// `; HttpOnly; ...` of a browser-session cookie (never changes).
    transient: String,
    /// The unix second and the attributes of a permanent cookie then.
    permanent: Mutex<(i64, String)>,
}

impl SetCookieCache {
    pub fn new(settings: &CookieSettings, lifetime: Duration) -> Self {
        SetCookieCache {
            transient: Self::suffix(settings, false, lifetime, OffsetDateTime::UNIX_EPOCH),
            settings: settings.clone(),
            lifetime,
            permanent: Mutex::new((i64::MIN, String::new())),
        }
    }

    /// Everything after `name=value`, exactly as the cookie crate writes it.
    fn suffix(
        settings: &CookieSettings,
        permanent: bool,
        lifetime: Duration,
        now: OffsetDateTime,
    ) -> String {
        let full = set_cookie_at(settings, String::new(), permanent, lifetime, now);
        full[settings.name.len() + 1..].to_string()
    }

    /// `Set-Cookie` for `value`, identical to [`set_cookie`] at this second.
    pub fn set_cookie(&self, value: &str, permanent: bool) -> String {
        let name = &self.settings.name;
        let mut out = String::with_capacity(name.len() + 1 + value.len() + 160);
        out.push_str(name);
        out.push('=');
        out.push_str(value);
        if !permanent {
            out.push_str(&self.transient);
            return out;
        }
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let mut cached = self.permanent.lock().unwrap_or_else(|p| p.into_inner());
        if cached.0 != now {
            let at = OffsetDateTime::from_unix_timestamp(now).unwrap_or(OffsetDateTime::UNIX_EPOCH);
            *cached = (now, Self::suffix(&self.settings, true, self.lifetime, at));
        }
        out.push_str(&cached.1);
        out
    }
}

/// `Set-Cookie` that makes the browser drop the session cookie.
pub fn expire_cookie(settings: &CookieSettings) -> String {
    base(settings, String::new())
        .max_age(CookieDuration::ZERO)
        .expires(OffsetDateTime::UNIX_EPOCH)
        .build()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> CookieSettings {
        CookieSettings {
            name: "session".into(),
            domain: Some("example.com".into()),
            path: "/".into(),
            secure: true,
            http_only: true,
            same_site: SameSite::Strict,
        }
    }

    #[test]
    fn finds_one_or_flags_duplicates() {
        let h1: &[u8] = b"a=1; session=abc.def; b=2";
        assert_eq!(
            find([h1].into_iter(), "session"),
            Found::One("abc.def".into())
        );
        let h2: &[u8] = b"session=zzz";
        assert_eq!(find([h1, h2].into_iter(), "session"), Found::Duplicated);
        let h3: &[u8] = b"sessionx=1; xsession=2";
        assert_eq!(find([h3].into_iter(), "session"), Found::Absent);
        let garbage: &[u8] = b"\xff\xfe;;;=;session";
        assert_eq!(find([garbage].into_iter(), "session"), Found::Absent);
    }

    /// Found by fuzzing: `find` trimmed Unicode whitespace, `without` only
    /// ASCII, so these were used as the session cookie and also forwarded
    /// to the upstream.
    #[test]
    fn find_and_without_agree_on_names() {
        for header in [
            &b"session\x0b=x"[..],
            "\u{a0}session=x".as_bytes(),
            "session\u{3000}=x; a=1".as_bytes(),
            b"\x0csession=x",
            b" session =x",
        ] {
            let found = find([header].into_iter(), "session");
            let kept = without([header].into_iter(), "session");
            let leaked = kept
                .as_deref()
                .is_some_and(|k| find([k].into_iter(), "session").is_present());
            assert!(!leaked, "{header:?} reaches the upstream");
            assert_eq!(
                found.is_present(),
                kept.as_deref() != Some(header.trim_ascii()),
                "{header:?}: found {found:?}, kept {kept:?}"
            );
        }
    }

    #[test]
    fn strips_only_our_cookie() {
        let h1: &[u8] = b"a=1; session=abc.def; b=2";
        let h2: &[u8] = b"c=3";
        assert_eq!(
            without([h1, h2].into_iter(), "session").unwrap(),
            b"a=1; b=2; c=3"
        );
        let only: &[u8] = b"session=x";
        assert_eq!(without([only].into_iter(), "session"), None);
    }

    #[test]
    fn cached_set_cookie_matches_the_cookie_crate() {
        let lifetime = Duration::from_secs(3600);
        let mut plain = settings();
        plain.domain = None;
        plain.secure = false;
        plain.same_site = SameSite::Lax;
        for s in [settings(), plain] {
            let cache = SetCookieCache::new(&s, lifetime);
            for permanent in [true, false] {
                // Retry across a second boundary: both must see the same second.
                let (fast, slow) = loop {
                    let before = OffsetDateTime::now_utc().unix_timestamp();
                    let fast = cache.set_cookie("v.s", permanent);
                    let slow = set_cookie(&s, "v.s".into(), permanent, lifetime);
                    if OffsetDateTime::now_utc().unix_timestamp() == before {
                        break (fast, slow);
                    }
                };
                assert_eq!(fast, slow);
            }
        }
    }

    #[test]
    fn set_cookie_attributes() {
        let s = set_cookie(&settings(), "v.s".into(), true, Duration::from_secs(3600));
        for part in [
            "session=v.s",
            "HttpOnly",
            "SameSite=Strict",
            "Secure",
            "Path=/",
            "Domain=example.com",
            "Max-Age=3600",
            "Expires=",
        ] {
            assert!(s.contains(part), "{s} lacks {part}");
        }
        let transient = set_cookie(&settings(), "v.s".into(), false, Duration::from_secs(3600));
        assert!(
            !transient.contains("Max-Age") && !transient.contains("Expires"),
            "{transient}"
        );
        let gone = expire_cookie(&settings());
        assert!(
            gone.contains("Max-Age=0") && gone.contains("1970"),
            "{gone}"
        );
    }
}
