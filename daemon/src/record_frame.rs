//! Checksummed records for append-only files: the telemetry spool's segments and the budget journal.
//!
//! A record is `len: u32 LE | crc32(len ‖ payload): u32 LE | payload`. The CRC covers the length
//! too, so a damaged length is caught as well, and a zero length is never a record, so the zeros of
//! a preallocated, not yet written tail read as "no more records".

/// Bytes before each payload: length and CRC.
pub(crate) const HEADER_BYTES: usize = 8;

/// `payload` framed as a record. The caller keeps payloads under its own limit (and under 4 GiB).
pub(crate) fn encode(payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(HEADER_BYTES + payload.len());
    encode_into(&mut frame, payload);
    frame
}

/// Appends `payload`, framed as a record, to `out`.
pub(crate) fn encode_into(out: &mut Vec<u8>, payload: &[u8]) {
    let len_bytes = u32::try_from(payload.len()).expect("a record payload is under 4 GiB").to_le_bytes();
    out.extend_from_slice(&len_bytes);
    out.extend_from_slice(&frame_crc(len_bytes, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// The payload of the record at the start of `buf`, if it is complete, at most `max_payload`
/// bytes long and its CRC matches.
pub(crate) fn decode(buf: &[u8], max_payload: u64) -> Option<&[u8]> {
    let header = buf.get(..HEADER_BYTES)?;
    let len_bytes: [u8; 4] = header[..4].try_into().ok()?;
    let crc = u32::from_le_bytes(header[4..].try_into().ok()?);
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len == 0 || len as u64 > max_payload {
        return None;
    }
    let payload = buf.get(HEADER_BYTES..HEADER_BYTES + len)?;
    (frame_crc(len_bytes, payload) == crc).then_some(payload)
}

/// Offsets of consecutive intact records from the start of `data`, and where they end.
pub(crate) fn scan(data: &[u8], max_payload: u64) -> (Vec<u64>, usize) {
    let mut offsets = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let Some(payload) = decode(&data[at..], max_payload) else { break };
        offsets.push(at as u64);
        at += HEADER_BYTES + payload.len();
    }
    (offsets, at)
}

/// CRC-32 (IEEE 802.3) lookup table.
const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut bit = 0;
        while bit < 8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            bit += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

fn crc32_update(mut crc: u32, bytes: &[u8]) -> u32 {
    for &byte in bytes {
        crc = CRC_TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

fn frame_crc(len_bytes: [u8; 4], payload: &[u8]) -> u32 {
    !crc32_update(crc32_update(!0, &len_bytes), payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_ieee_check_value() {
        let crc32 = |bytes: &[u8]| !crc32_update(!0, bytes);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn scan_stops_at_a_torn_or_corrupt_record() {
        let frame = encode(b"{\"a\":1}");
        let mut data = [frame.clone(), frame.clone()].concat();
        assert_eq!(scan(&data, 64), (vec![0, frame.len() as u64], data.len()));
        data.extend_from_slice(&frame[..frame.len() - 3]);
        assert_eq!(scan(&data, 64).1, 2 * frame.len());
        // A flipped payload byte in the second record invalidates it and everything after it.
        data[frame.len() + HEADER_BYTES + 2] ^= 0x40;
        assert_eq!(scan(&data, 64), (vec![0], frame.len()));
        // Zeros (a preallocated but unwritten tail) are not records; nor is a record over the limit.
        assert_eq!(scan(&[0u8; 64], 64), (vec![], 0));
        assert_eq!(scan(&frame, 3), (vec![], 0));
    }
}
