//! The help marker: the text the on-device policy emits at the end of a response it cannot finish.

/// What the policy writes to ask the cloud for help.
pub const HELP_MARKER: &str = "<unknown> I need external assistance </unknown>";
