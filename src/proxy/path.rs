//! Path normalization for `session.exclude` matching: query dropped,
//! percent-decoding, dot-segment removal (RFC 3986 5.2.4), and prefix
//! matching at segment boundaries, so `/static` matches `/static` and
//! `/static/x` but not `/staticky`, and `/static/../api` is `/api`.

use percent_encoding::percent_decode;

/// Normalize a request target or configured prefix to a decoded path.
pub fn normalize(target: &str) -> String {
    let path = target.split(['?', '#']).next().unwrap_or("");
    // Absolute-form targets (`http://host/path`) carry the path after the authority.
    let path = match path.find("://") {
        Some(i) => path[i + 3..].find('/').map_or("/", |j| &path[i + 3 + j..]),
        None => path,
    };
    let decoded = percent_decode(path.as_bytes()).decode_utf8_lossy();
    remove_dot_segments(&decoded)
}

fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
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
    let mut result = String::with_capacity(path.len() + 1);
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
}
