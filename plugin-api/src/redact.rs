//! Keeping credentials out of logs and errors.

/// `url` with any password replaced by `***` (`redis://user:secret@host` becomes
/// `redis://user:***@host`). Use it for every URL that reaches a log line or an error message.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else { return url.to_string() };
    let authority_start = scheme_end + 3;
    let rest = &url[authority_start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else { return url.to_string() };
    let userinfo = &authority[..at];
    let redacted = match userinfo.find(':') {
        Some(colon) => format!("{}:***", &userinfo[..colon]),
        None if userinfo.is_empty() => String::new(),
        None => "***".to_string(),
    };
    format!("{}{}{}", &url[..authority_start], redacted, &url[authority_start + at..])
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_never_survive() {
        assert_eq!(redact_url("redis://user:s3cret@127.0.0.1:6379/0"), "redis://user:***@127.0.0.1:6379/0");
        assert_eq!(redact_url("amqps://guest:guest@host/%2f"), "amqps://guest:***@host/%2f");
        assert_eq!(redact_url("rediss://:token@host"), "rediss://:***@host");
        assert_eq!(redact_url("redis://token@host"), "redis://***@host");
        assert_eq!(redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(redact_url("redis://host/path@x"), "redis://host/path@x");
    }
}
