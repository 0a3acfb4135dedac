//! Names of a decoder's inputs and outputs in the standard KV-cache layout.
//!
//! The exporter writes these names and the engine matches them, always by name and never by
//! position (other exporters order the cache inputs differently).

/// Token ids, `[batch, sequence]`, int64.
pub const INPUT_IDS: &str = "input_ids";
/// 1 for real tokens and 0 for padding over past and current positions, `[batch, total]`, int64.
pub const ATTENTION_MASK: &str = "attention_mask";
/// Absolute position of each current token, `[batch, sequence]`, int64. Optional in other exports.
pub const POSITION_IDS: &str = "position_ids";
/// Next-token logits, `[batch, sequence, vocab]`.
pub const LOGITS: &str = "logits";

const PAST_PREFIX: &str = "past_key_values.";
const PRESENT_PREFIX: &str = "present.";

/// Whether a cache tensor holds keys or values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvKind {
    Key,
    Value,
}

impl KvKind {
    fn suffix(self) -> &'static str {
        match self {
            KvKind::Key => "key",
            KvKind::Value => "value",
        }
    }
}

/// `past_key_values.{layer}.key` / `.value`: the cache fed into a step.
pub fn past_name(layer: usize, kind: KvKind) -> String {
    format!("{PAST_PREFIX}{layer}.{}", kind.suffix())
}

/// `present.{layer}.key` / `.value`: the cache a step returns, fed back as the next past.
pub fn present_name(layer: usize, kind: KvKind) -> String {
    format!("{PRESENT_PREFIX}{layer}.{}", kind.suffix())
}

/// Parses a past-cache input name into its layer and kind; `None` for any other name.
pub fn parse_past_name(name: &str) -> Option<(usize, KvKind)> {
    parse_cache_name(name.strip_prefix(PAST_PREFIX)?)
}

/// Parses a present-cache output name into its layer and kind; `None` for any other name.
pub fn parse_present_name(name: &str) -> Option<(usize, KvKind)> {
    parse_cache_name(name.strip_prefix(PRESENT_PREFIX)?)
}

fn parse_cache_name(rest: &str) -> Option<(usize, KvKind)> {
    let (layer, kind) = rest.split_once('.')?;
    let kind = match kind {
        "key" => KvKind::Key,
        "value" => KvKind::Value,
        _ => return None,
    };
    Some((layer.parse().ok()?, kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_names_round_trip_through_the_parser() {
        for layer in [0, 7, 23] {
            for kind in [KvKind::Key, KvKind::Value] {
                assert_eq!(parse_past_name(&past_name(layer, kind)), Some((layer, kind)));
                assert_eq!(parse_present_name(&present_name(layer, kind)), Some((layer, kind)));
            }
        }
    }

    #[test]
    fn names_outside_the_cache_layout_are_not_cache_names() {
        assert_eq!(parse_past_name("input_ids"), None);
        assert_eq!(parse_past_name("past_key_values.x.key"), None);
        assert_eq!(parse_past_name("past_key_values.0.query"), None);
        assert_eq!(parse_present_name("past_key_values.0.key"), None);
    }
}
