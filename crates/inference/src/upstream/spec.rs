//! What an upstream model version is: `openai+URL[|URL…][?model=NAME&api_key_env=VAR&…]`, e.g.
//! `openai+http://gpu-1:8000/v1|http://gpu-2:8000/v1?model=meta-llama/Llama-3.1-8B-Instruct`.
//! Several URLs are tried in order (failover); the options apply to all of them:
//!
//! - `model` (required): the model name the upstream serves;
//! - `api_key_env`: the environment variable holding the upstream's API key (sent as
//!   `Authorization: Bearer`); the key itself never appears on a command line;
//! - `connect_timeout_ms` (default 2000), `first_byte_timeout_ms` (default 30000: until the first
//!   event of the answer arrives, so a failover still fits before anything was sent).

use std::time::Duration;

/// The prefix that makes a `--model` value an upstream instead of a model folder.
pub const SCHEME: &str = "openai+";

/// A parsed upstream spec (the API key not yet looked up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSpec {
    /// Base URLs (up to and including the API version, e.g. `http://gpu-1:8000/v1`), in failover order.
    pub urls: Vec<String>,
    pub model: String,
    pub api_key_env: Option<String>,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
}

/// Whether `value` names an upstream (it starts with [`SCHEME`]).
pub fn is_upstream(value: &str) -> bool {
    value.starts_with(SCHEME)
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3).ok_or_else(|| format!("'{s}' has a cut-off %-escape"))?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("'{s}' has a bad %-escape"))?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("'{s}' is not UTF-8 once decoded"))
}

fn millis(name: &str, value: &str) -> Result<Duration, String> {
    match value.parse::<u64>() {
        Ok(ms @ 1..=600_000) => Ok(Duration::from_millis(ms)),
        _ => Err(format!("{name} must be 1..=600000 milliseconds, not '{value}'")),
    }
}

impl UpstreamSpec {
    /// Parse the part after `VERSION=`.
    pub fn parse(value: &str) -> Result<Self, String> {
        let rest = value.strip_prefix(SCHEME).ok_or_else(|| format!("an upstream starts with {SCHEME}"))?;
        let (urls, query) = rest.split_once('?').unwrap_or((rest, ""));
        let urls: Vec<String> = urls.split('|').map(|u| u.trim().trim_end_matches('/').to_owned()).collect();
        for url in &urls {
            let host = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
            let host = host.and_then(|h| h.split('/').next()).unwrap_or_default();
            if host.is_empty() || host.contains('@') || url.chars().any(|c| c.is_whitespace() || c == '#') {
                return Err(format!(
                    "'{url}' is not an http:// or https:// base URL like http://gpu-1:8000/v1 (no credentials in it: use api_key_env)"
                ));
            }
        }
        let mut spec = Self {
            urls,
            model: String::new(),
            api_key_env: None,
            connect_timeout: Duration::from_secs(2),
            first_byte_timeout: Duration::from_secs(30),
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, raw) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(raw)?;
            match key {
                "model" => spec.model = value,
                "api_key_env" => {
                    let valid = !value.is_empty()
                        && value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                        && !value.as_bytes()[0].is_ascii_digit();
                    if !valid {
                        return Err(format!("api_key_env '{value}' is not an environment variable name"));
                    }
                    spec.api_key_env = Some(value);
                }
                "connect_timeout_ms" => spec.connect_timeout = millis(key, &value)?,
                "first_byte_timeout_ms" => spec.first_byte_timeout = millis(key, &value)?,
                "api_key" => {
                    return Err("an API key does not belong in a setting: put it in an environment variable and name it with api_key_env".into());
                }
                other => {
                    return Err(format!(
                        "unknown upstream option '{other}' (model, api_key_env, connect_timeout_ms, first_byte_timeout_ms)"
                    ));
                }
            }
        }
        if spec.model.is_empty() {
            return Err("an upstream needs ?model=NAME (the model the upstream serves)".into());
        }
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_options_and_failover_parse() {
        let spec = UpstreamSpec::parse(
            "openai+http://gpu-1:8000/v1/|https://api.example.com/v1?model=meta-llama%2FLlama-3.1-8B-Instruct&api_key_env=UPSTREAM_KEY&first_byte_timeout_ms=5000",
        );
        let spec = spec.unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(spec.urls, ["http://gpu-1:8000/v1", "https://api.example.com/v1"]);
        assert_eq!(spec.model, "meta-llama/Llama-3.1-8B-Instruct");
        assert_eq!(spec.api_key_env.as_deref(), Some("UPSTREAM_KEY"));
        assert_eq!(spec.first_byte_timeout, Duration::from_secs(5));
        assert_eq!(spec.connect_timeout, Duration::from_secs(2));
        assert!(is_upstream("openai+http://x") && !is_upstream("models/a"));
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        let cases = [
            ("openai+http://gpu:8000/v1", "model"),
            ("openai+ftp://gpu/v1?model=m", "http://"),
            ("openai+http:///v1?model=m", "http://"),
            ("openai+http://user:pw@gpu/v1?model=m", "credentials"),
            ("openai+http://gpu/v1?model=m&api_key=sk-1", "environment variable"),
            ("openai+http://gpu/v1?model=m&api_key_env=1BAD", "variable name"),
            ("openai+http://gpu/v1?model=m&colour=red", "unknown upstream option"),
            ("openai+http://gpu/v1?model=m&connect_timeout_ms=0", "connect_timeout_ms"),
            ("openai+http://gpu/v1?model=%zz", "%-escape"),
            ("openai+http://a/v1||http://b?model=m", "http://"),
        ];
        for (spec, says) in cases {
            let error = UpstreamSpec::parse(spec).err().unwrap_or_default();
            assert!(error.contains(says), "{spec}: {error}");
        }
    }
}
