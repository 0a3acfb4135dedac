//! `Range: bytes=…` for resumable downloads: one range (`N-`, `N-M` or the last `-S` bytes);
//! several ranges or another unit are answered with the whole file, as RFC 9110 allows.

/// What to send for a file of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// 200 with the whole file.
    Whole,
    /// 206 with bytes `start..=end`.
    Partial { start: u64, end: u64 },
    /// 416: the range starts at or after the end of the file.
    Unsatisfiable,
}

/// Reads a `Range` header value against a file of `len` bytes.
pub fn parse_range(header: Option<&str>, len: u64) -> RangeAnswer {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else { return RangeAnswer::Whole };
    if spec.contains(',') {
        return RangeAnswer::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else { return RangeAnswer::Whole };
    let (first, last) = (first.trim(), last.trim());
    let parse = |s: &str| s.parse::<u64>().ok();
    match (first.is_empty(), last.is_empty()) {
        // The last `last` bytes.
        (true, false) => match parse(last) {
            Some(0) => RangeAnswer::Unsatisfiable,
            Some(_) if len == 0 => RangeAnswer::Unsatisfiable,
            Some(suffix) => RangeAnswer::Partial { start: len.saturating_sub(suffix), end: len - 1 },
            None => RangeAnswer::Whole,
        },
        (false, _) => {
            let Some(start) = parse(first) else { return RangeAnswer::Whole };
            let end = if last.is_empty() {
                None
            } else {
                match parse(last) {
                    Some(end) if end >= start => Some(end),
                    _ => return RangeAnswer::Whole,
                }
            };
            if start >= len {
                return RangeAnswer::Unsatisfiable;
            }
            RangeAnswer::Partial { start, end: end.map_or(len - 1, |e| e.min(len - 1)) }
        }
        (true, true) => RangeAnswer::Whole,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_download_gets_the_rest_of_the_file() {
        assert_eq!(parse_range(Some("bytes=100-"), 1000), RangeAnswer::Partial { start: 100, end: 999 });
        assert_eq!(parse_range(Some("bytes=0-0"), 1000), RangeAnswer::Partial { start: 0, end: 0 });
        assert_eq!(parse_range(Some("bytes=10-5000"), 1000), RangeAnswer::Partial { start: 10, end: 999 });
        assert_eq!(parse_range(Some("bytes=-10"), 1000), RangeAnswer::Partial { start: 990, end: 999 });
        assert_eq!(parse_range(Some("bytes=-5000"), 1000), RangeAnswer::Partial { start: 0, end: 999 });
    }

    #[test]
    fn a_range_past_the_end_is_unsatisfiable() {
        assert_eq!(parse_range(Some("bytes=1000-"), 1000), RangeAnswer::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-"), 0), RangeAnswer::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), RangeAnswer::Unsatisfiable);
    }

    #[test]
    fn what_is_not_one_byte_range_gets_the_whole_file() {
        for header in [
            None,
            Some("items=1-2"),
            Some("bytes=1-2,4-5"),
            Some("bytes=x-"),
            Some("bytes=5-2"),
            Some("bytes=-"),
        ] {
            assert_eq!(parse_range(header, 1000), RangeAnswer::Whole, "{header:?}");
        }
    }
}
