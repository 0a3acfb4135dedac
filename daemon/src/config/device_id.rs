//! The default device id: this machine's host name, reduced to characters that are safe in MQTT
//! topics, file names and metric labels.

/// Characters a device id may contain besides ASCII letters and digits.
const ALLOWED_PUNCTUATION: [char; 3] = ['.', '_', '-'];

/// The id used when the configuration sets none.
pub fn default_device_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let id = sanitize_device_id(host.trim());
    if id.is_empty() { "tandem-device".to_string() } else { id }
}

/// Replaces every character outside `[A-Za-z0-9._-]` with `-`.
pub fn sanitize_device_id(raw: &str) -> String {
    raw.chars().map(|c| if is_device_id_char(c) { c } else { '-' }).collect()
}

/// Whether `c` may appear in a device id.
pub fn is_device_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || ALLOWED_PUNCTUATION.contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_reduced_to_topic_safe_characters() {
        assert_eq!(sanitize_device_id("robot-7.lab_a"), "robot-7.lab_a");
        assert_eq!(sanitize_device_id("my robot/#1+é"), "my-robot--1--");
    }

    #[test]
    fn the_default_device_id_is_never_empty_and_always_safe() {
        let id = default_device_id();
        assert!(!id.is_empty());
        assert!(id.chars().all(is_device_id_char), "{id}");
    }
}
