//! `docs/protocol.md` carries the JSON Schemas generated from the core types; this keeps it current.
//! Regenerate with `TANDEM_BLESS=1 cargo test -p tandem-core --test protocol_doc`.

use std::path::PathBuf;

const BEGIN: &str = "<!-- BEGIN GENERATED SCHEMAS: do not edit, run TANDEM_BLESS=1 cargo test -p tandem-core --test protocol_doc -->";
const END: &str = "<!-- END GENERATED SCHEMAS -->";

fn generated_section() -> String {
    let mut out = String::from(BEGIN);
    out.push('\n');
    for (name, schema) in tandem_core::protocol::json_schemas() {
        out.push_str(&format!(
            "\n### {name}\n\n```json\n{}\n```\n",
            serde_json::to_string_pretty(&schema).unwrap()
        ));
    }
    out.push('\n');
    out.push_str(END);
    out
}

#[test]
fn protocol_doc_holds_the_current_json_schemas() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/protocol.md");
    let doc = std::fs::read_to_string(&path).expect("docs/protocol.md exists");
    let (start, end) = (doc.find(BEGIN).expect("begin marker"), doc.find(END).expect("end marker"));
    let current = &doc[start..end + END.len()];
    let expected = generated_section();
    if current != expected {
        if std::env::var_os("TANDEM_BLESS").is_some() {
            std::fs::write(&path, doc.replace(current, &expected)).unwrap();
        } else {
            panic!(
                "docs/protocol.md is stale: run TANDEM_BLESS=1 cargo test -p tandem-core --test protocol_doc"
            );
        }
    }
}
