//! `${VAR}` substitution in every string of the config, before it is
//! interpreted. `$${` stands for a literal `${`. An unset variable is an
//! error naming the key, never silently empty: an empty secret or URL would
//! fail later with a far less useful message.

use super::ConfigError;
use serde_yaml::Value;

pub fn substitute(value: &mut Value, path: &mut String) -> Result<(), ConfigError> {
    match value {
        Value::String(s) if s.contains('$') => {
            *s = expand(s).map_err(|m| ConfigError::new(path.clone(), m))?;
        }
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                substitute(item, path)?;
                path.truncate(len);
            }
        }
        Value::Mapping(map) => {
            for (k, v) in map.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k.as_str().unwrap_or("?"));
                substitute(v, path)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

fn expand(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        rest = &rest[pos..];
        if let Some(after) = rest.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = rest.strip_prefix("${") {
            let end = after
                .find('}')
                .ok_or_else(|| format!("unterminated `${{` in `{s}`"))?;
            let name = &after[..end];
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!("invalid environment variable name `{name}`"));
            }
            let val = std::env::var(name)
                .map_err(|_| format!("environment variable {name} is not set"))?;
            out.push_str(&val);
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_and_escapes() {
        std::env::set_var("SGW_TEST_ENV_A", "alpha");
        assert_eq!(expand("x${SGW_TEST_ENV_A}y").unwrap(), "xalphay");
        assert_eq!(expand("$${SGW_TEST_ENV_A}").unwrap(), "${SGW_TEST_ENV_A}");
        assert_eq!(expand("cost: $5").unwrap(), "cost: $5");
        assert!(expand("${SGW_TEST_ENV_UNSET_XYZ}")
            .unwrap_err()
            .contains("SGW_TEST_ENV_UNSET_XYZ"));
        assert!(expand("${oops").is_err());
    }

    #[test]
    fn error_names_the_key() {
        let mut v: Value =
            serde_yaml::from_str("secret_keys: [\"${SGW_TEST_ENV_UNSET_Q}\"]").unwrap();
        let err = substitute(&mut v, &mut String::new()).unwrap_err();
        assert_eq!(err.key, "secret_keys[0]");
    }
}
