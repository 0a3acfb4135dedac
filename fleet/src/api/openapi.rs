//! The OpenAPI document, written by hand (`openapi.json` next to this file) and checked by a test
//! against the routes the router really serves.

/// The document.
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The paths `routes.rs` registers, read from its source.
    fn routed_paths() -> BTreeSet<String> {
        let source = include_str!("routes.rs");
        source
            .split(".route(\"")
            .skip(1)
            .map(|rest| rest.split('"').next().expect("a quoted path").to_string())
            .collect()
    }

    #[test]
    fn the_document_lists_exactly_the_routed_paths() {
        let document: serde_json::Value = serde_json::from_str(OPENAPI_JSON).expect("valid JSON");
        let documented: BTreeSet<String> =
            document["paths"].as_object().expect("paths").keys().cloned().collect();
        assert_eq!(documented, routed_paths());
        for (path, item) in document["paths"].as_object().unwrap() {
            let operations = item.as_object().expect("a path item");
            assert!(!operations.is_empty(), "{path}");
            let device_facing = super::super::routes::DEVICE_PATHS.contains(&path.as_str());
            for (method, operation) in operations {
                assert!(["get", "post"].contains(&method.as_str()), "{path}: {method}");
                let expected = if device_facing {
                    Some(serde_json::json!([{ "device": [] }, { "bearer": [] }]))
                } else if path.starts_with("/v1/") {
                    Some(serde_json::json!([{ "bearer": [] }]))
                } else {
                    None
                };
                assert_eq!(
                    operation.get("security").cloned(),
                    expected,
                    "{path} {method}: the operator's /v1/ routes need the token, the device routes a device's \
                     credentials or the token, the others nothing"
                );
            }
        }
    }
}
