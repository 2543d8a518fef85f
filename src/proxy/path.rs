//! Path normalization for `session.exclude` matching: query dropped,
//! percent-decoding, dot-segment removal (RFC 3986 5.2.4), and prefix
//! matching at segment boundaries, so `/static` matches `/static` and
//! `/static/x` but not `/staticky`, and `/static/../api` is `/api`.

use percent_encoding::percent_decode;

/// Normalize a request target or configured prefix to a decoded path.
///
/// Decoding is per segment: `%2F` inside a segment is kept as `%2F`, not
/// made a separator (most app servers route `/api/..%2fstatic` under
/// `/api`), while `%2e%2e` is a dot segment. The scheme and authority of
/// an absolute-form target (`http://host/path`) are dropped, and only when
/// the target starts with one.
///
/// The result is its own normal form (`normalize(normalize(x)) ==
/// normalize(x)`): what decoding yields that would mean something else if
/// read again (`%`, `/`, `?`, `#`) is written percent-encoded, so
/// `%252e%252e` is the segment `%2e%2e`, never a `..` on a second look.
pub fn normalize(target: &str) -> String {
    let path = target.split(['?', '#']).next().unwrap_or("");
    let path = match absolute_form_path(path) {
        Some(p) => p,
        None => path,
    };
    let segments: Vec<String> = path
        .split('/')
        .map(|seg| reencode(&percent_decode(seg.as_bytes()).decode_utf8_lossy()))
        .collect();
    remove_dot_segments(&segments)
}

/// A decoded segment with the characters that a path cannot carry
/// literally inside one segment encoded again.
fn reencode(decoded: &str) -> String {
    if !decoded.contains(['%', '/', '?', '#']) {
        return decoded.to_string();
    }
    let mut out = String::with_capacity(decoded.len() + 6);
    for c in decoded.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            '?' => out.push_str("%3F"),
            '#' => out.push_str("%23"),
            c => out.push(c),
        }
    }
    out
}

/// The path of an absolute-form target: `scheme://authority/path`, where
/// the scheme is `[A-Za-z][A-Za-z0-9+.-]*` at the very start.
fn absolute_form_path(target: &str) -> Option<&str> {
    let colon = target.find("://")?;
    let scheme = &target[..colon];
    let mut chars = scheme.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c));
    if !valid {
        return None;
    }
    let rest = &target[colon + 3..];
    Some(rest.find('/').map_or("/", |j| &rest[j..]))
}

fn remove_dot_segments(segments: &[String]) -> String {
    let mut out: Vec<&str> = Vec::new();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        match seg.as_str() {
            "." => trailing_slash = i == last,
            ".." => {
                out.pop();
                trailing_slash = i == last;
            }
            "" if i == 0 => {}
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut result = String::new();
    for s in &out {
        result.push('/');
        result.push_str(s);
    }
    if result.is_empty() || trailing_slash {
        result.push('/');
    }
    result
}

/// Does normalized `path` fall under normalized `prefix`, at a segment
/// boundary?
pub fn under_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    let prefix = prefix.trim_end_matches('/');
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Is the request target excluded by any normalized prefix?
pub fn is_excluded(target: &str, prefixes: &[String]) -> bool {
    if prefixes.is_empty() {
        return false;
    }
    let path = normalize(target);
    prefixes.iter().any(|p| under_prefix(&path, p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes() {
        assert_eq!(normalize("/a/b?x=1"), "/a/b");
        assert_eq!(normalize("/a/./b/../c"), "/a/c");
        assert_eq!(normalize("/%73tatic/x"), "/static/x");
        assert_eq!(normalize("/static/%2e%2e/api"), "/api");
        assert_eq!(normalize("/../../etc"), "/etc");
        assert_eq!(normalize(""), "/");
        assert_eq!(normalize("/a/b/"), "/a/b/");
        assert_eq!(normalize("/a/b/.."), "/a/");
        assert_eq!(normalize("http://h:1/static/x?q"), "/static/x");
    }

    /// Found by the property tests: decoding once could leave text that a
    /// second normalization read differently (`%2e` became a dot segment,
    /// `?` cut the path).
    #[test]
    fn normalized_paths_are_a_fixed_point() {
        for (target, normal) in [
            ("/%252e", "/%252e"),
            ("/a/%252e%252e", "/a/%252e%252e"),
            ("/%2573tatic/x", "/%2573tatic/x"),
            ("/a%3Fb/c", "/a%3Fb/c"),
            ("/a%3fb%23c", "/a%3Fb%23c"),
            ("/100%/x", "/100%25/x"),
            ("/%zz", "/%25zz"),
            ("/api/..%2fstatic", "/api/..%2Fstatic"),
        ] {
            assert_eq!(normalize(target), normal, "{target}");
            assert_eq!(normalize(normal), normal, "{target}");
        }
        // A prefix and a request written differently still meet.
        let ex = vec![normalize("/100%/")];
        assert!(is_excluded("/100%25/x", &ex));
        assert!(!is_excluded("/%2573tatic/x", &[normalize("/static")]));
    }

    #[test]
    fn matches_at_segment_boundaries() {
        let ex = vec![normalize("/static/"), normalize("/health")];
        assert!(is_excluded("/static/app.js", &ex));
        assert!(is_excluded("/static", &ex));
        assert!(is_excluded("/health?full=1", &ex));
        assert!(is_excluded("/x/../static/a", &ex));
        assert!(is_excluded("/%73tatic/a", &ex));
        assert!(!is_excluded("/staticky", &ex));
        assert!(!is_excluded("/healthz", &ex));
        assert!(!is_excluded("/static/../api", &ex));
        assert!(!is_excluded("/api?p=/static/", &ex));
        assert!(is_excluded("/anything", &[normalize("/")]));
    }

    /// The verdicts the README lists, for `exclude: ["/static/"]`.
    #[test]
    fn exclusion_table() {
        let ex = vec![normalize("/static/")];
        let table = [
            ("/static/app.js", true),
            ("/static", true),
            ("/static/", true),
            ("/Static/app.js", false),
            ("/staticky", false),
            ("/static/../api", false),
            ("/api/../static/x", true),
            ("/%73tatic/x", true),
            ("/static/%2e%2e/api", false),
            ("/api/%2e%2e/static/x", true),
            ("/api/..%2fstatic/x", false),
            ("/api%2F..%2Fstatic/x", false),
            ("/static%2fapp.js", false),
            ("/./static/x", true),
            ("//static/x", false),
            ("/static/x?y=/api", true),
            ("/api?next=/static/", false),
            ("http://gw.example/static/x", true),
            ("HTTPS://gw.example:8443/static/x?q", true),
            ("http://gw.example", false),
            ("/api/http://h/static/x", false),
            ("/x/https://static/", false),
        ];
        for (target, excluded) in table {
            assert_eq!(is_excluded(target, &ex), excluded, "{target}");
        }
    }
}
