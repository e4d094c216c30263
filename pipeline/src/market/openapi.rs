//! The HTTP API described as OpenAPI 3.1, served at `/openapi.json`.

pub(super) fn document() -> String {
    String::from("{}")
}
