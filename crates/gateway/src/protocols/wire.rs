//! Parsing shared by the wire formats: integers as JSON Schema counts them, stop sequences with
//! their documented bounds, and a query-string extractor that refuses invalid UTF-8.

use std::future::{Ready, ready};

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpRequest, web};
use serde::de::{self, DeserializeOwned, Deserializer, Unexpected, Visitor};
use serde::{Deserialize, Serialize};
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::{IntoResponses, ToSchema};

use crate::error::{ApiError, ErrorBody};
use crate::generation::{MAX_STOP_CHARS, MAX_STOP_SEQUENCES};
use crate::http::paths::error_for;

/// Stop sequences: one string or a list.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(stop: Option<Self>) -> Vec<String> {
        match stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        }
    }
}

/// The schema of an optional `stop` field, with the bounds the generation service enforces.
pub fn stop_schema() -> impl Into<RefOr<Schema>> {
    let text = || {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(MAX_STOP_CHARS))
            .description(Some(format!("1 to {MAX_STOP_CHARS} characters")))
    };
    OneOfBuilder::new()
        .item(text())
        .item(ArrayBuilder::new().items(text()).max_items(Some(MAX_STOP_SEQUENCES)))
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .description(Some(format!(
            "Up to {MAX_STOP_SEQUENCES} sequences that end generation (not included in the output)"
        )))
}

/// The errors a generation route with a JSON body can answer (every protocol; the OpenAI routes
/// in their style), for the OpenAPI document.
#[derive(IntoResponses)]
pub enum BodyGenerationErrors {
    /// The body is not JSON.
    #[response(status = 400)]
    InvalidJson(ErrorBody),
    /// Unknown model version (`model_not_found` on the OpenAI routes).
    #[response(status = 404)]
    UnknownVersion(ErrorBody),
    /// The body is larger than `--max-body-bytes`.
    #[response(status = 413)]
    PayloadTooLarge(ErrorBody),
    /// The body is not `application/json`.
    #[response(status = 415)]
    UnsupportedMediaType(ErrorBody),
    /// A field is missing, unknown or out of bounds, or the prompt is longer than the context.
    #[response(status = 422)]
    InvalidRequest(ErrorBody),
    /// Rate limited, or too many open streams for this client.
    #[response(status = 429)]
    TooManyRequests(ErrorBody),
    /// The model's queue is full, the server is shutting down, or no upstream model server is
    /// available (an upstream version).
    #[response(status = 503)]
    Unavailable(ErrorBody),
    /// An upstream version's model server failed (`upstream_error`).
    #[response(status = 502)]
    BadGateway(ErrorBody),
    /// An upstream version's model server did not answer in time (`upstream_timeout`).
    #[response(status = 504)]
    GatewayTimeout(ErrorBody),
}

/// The errors of the query-string form (`GET …/inference/stream`).
#[derive(IntoResponses)]
pub enum QueryGenerationErrors {
    /// The query string is not UTF-8 once percent-decoded.
    #[response(status = 400)]
    InvalidQuery(ErrorBody),
    /// Unknown model version.
    #[response(status = 404)]
    UnknownVersion(ErrorBody),
    /// A parameter is missing, unknown or out of bounds, or the prompt is longer than the context.
    #[response(status = 422)]
    InvalidRequest(ErrorBody),
    /// Rate limited, or too many open streams for this client.
    #[response(status = 429)]
    TooManyRequests(ErrorBody),
    /// The model's queue is full, the server is shutting down, or no upstream model server is
    /// available (an upstream version).
    #[response(status = 503)]
    Unavailable(ErrorBody),
    /// An upstream version's model server failed (`upstream_error`).
    #[response(status = 502)]
    BadGateway(ErrorBody),
    /// An upstream version's model server did not answer in time (`upstream_timeout`).
    #[response(status = 504)]
    GatewayTimeout(ErrorBody),
}

/// The longest prompt a query string carries, in characters: percent-encoded (up to 12 bytes a
/// character) it stays under the 64 KiB request line actix-web accepts.
pub const MAX_QUERY_PROMPT_CHARS: usize = 4096;

/// `deserialize_with` for the `prompt` of a query string ([`MAX_QUERY_PROMPT_CHARS`]).
pub fn query_prompt<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let prompt = String::deserialize(d)?;
    if prompt.chars().count() > MAX_QUERY_PROMPT_CHARS {
        return Err(de::Error::custom(format!(
            "a prompt in a query string is at most {MAX_QUERY_PROMPT_CHARS} characters; POST longer ones"
        )));
    }
    Ok(prompt)
}

/// A whole, non-negative JSON number: `7482` or `7482.0` (JSON Schema's `integer` is both).
struct Whole(u64);

impl<'de> Deserialize<'de> for Whole {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct WholeVisitor;
        impl Visitor<'_> for WholeVisitor {
            type Value = Whole;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a non-negative integer")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Whole, E> {
                Ok(Whole(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Whole, E> {
                u64::try_from(v).map(Whole).map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Whole, E> {
                // 2^64 is the first whole f64 past u64::MAX.
                if v.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&v) {
                    Ok(Whole(v as u64))
                } else {
                    Err(E::invalid_value(Unexpected::Float(v), &self))
                }
            }
        }
        d.deserialize_any(WholeVisitor)
    }
}

/// `deserialize_with` for an optional `u32` field (use with `#[serde(default)]`).
pub fn opt_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    Option::<Whole>::deserialize(d)?
        .map(|Whole(v)| {
            u32::try_from(v).map_err(|_| {
                de::Error::invalid_value(Unexpected::Unsigned(v), &"an integer from 0 to 4294967295")
            })
        })
        .transpose()
}

/// `deserialize_with` for an optional `u64` field (use with `#[serde(default)]`).
pub fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(Option::<Whole>::deserialize(d)?.map(|Whole(v)| v))
}

/// A query string deserialized into `T`, refusing (400) one that is not UTF-8 after
/// percent-decoding instead of silently replacing bytes with U+FFFD.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned> FromRequest for Query<T> {
    type Error = actix_web::Error;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let query = req.query_string();
        let parsed = match check_utf8(query) {
            Err(e) => Err(ApiError::InvalidQuery(e)),
            Ok(()) => {
                web::Query::<T>::from_query(query).map(|q| Self(q.into_inner())).map_err(ApiError::from)
            }
        };
        ready(parsed.map_err(|e| error_for(req.path(), e)))
    }
}

/// Every name and value of `query`, percent-decoded (`+` is a space), must be UTF-8.
fn check_utf8(query: &str) -> Result<(), String> {
    for part in query.split('&').flat_map(|pair| pair.splitn(2, '=')) {
        let bytes = percent_decode(part);
        if std::str::from_utf8(&bytes).is_err() {
            let name = part.split('=').next().unwrap_or_default();
            return Err(format!(
                "'{}' is not UTF-8 once percent-decoded",
                name.chars().take(64).collect::<String>()
            ));
        }
    }
    Ok(())
}

/// `%XX` escapes decoded, `+` as space; a malformed escape is kept as it is.
fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes.get(i..i + 3) {
            Some([b'%', h, l]) => hex(*h).zip(hex(*l)).map(|(h, l)| (h * 16 + l) as u8),
            _ => None,
        };
        match (escaped, bytes[i]) {
            (Some(byte), _) => {
                out.push(byte);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Ints {
        #[serde(default, deserialize_with = "opt_u32")]
        a: Option<u32>,
        #[serde(default, deserialize_with = "opt_u64")]
        b: Option<u64>,
    }

    fn ints(json: &str) -> Result<Ints, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn integers_may_be_written_as_whole_floats() {
        assert!(
            ints(r#"{"a":7482.0,"b":18446744073709551615}"#)
                .is_ok_and(|v| v.a == Some(7482) && v.b == Some(u64::MAX))
        );
        assert!(ints(r#"{"a":null}"#).is_ok_and(|v| v.a.is_none() && v.b.is_none()));
        for bad in [
            r#"{"a":1.5}"#,
            r#"{"a":-1}"#,
            r#"{"a":4294967296}"#,
            r#"{"a":1e30}"#,
            r#"{"a":"5"}"#,
            r#"{"b":-0.5}"#,
        ] {
            let err = ints(bad).err();
            assert!(err.as_ref().is_some_and(serde_json::Error::is_data), "{bad}: {err:?}");
        }
    }

    #[test]
    fn queries_must_be_utf8_once_decoded() {
        assert!(check_utf8("prompt=%ff%fe").is_err());
        assert!(check_utf8("%ff=1").is_err());
        assert!(check_utf8("prompt=caf%C3%A9+au+lait&max_tokens=3").is_ok());
        assert!(check_utf8("prompt=100%&x=%zz%").is_ok(), "malformed escapes stay literal");
        assert_eq!(percent_decode("a+b%20c%4"), b"a b c%4");
    }
}
