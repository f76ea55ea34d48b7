//! The encoding of snapshot and event values in sled.
//!
//! **Owns**: the value layout and its checksum. A value is
//! `format version u8 | behaviour_version u32 | seq u64 | crc32c u32 | payload` (big-endian),
//! and the CRC32C covers the sled key, the version, behaviour version and seq fields and the
//! payload. Covering the key means a value that ends up under another key (another entity,
//! another seq) fails its check as surely as a flipped bit does.

use super::codec::Reader;
use super::StoredRecord;

/// The value format this build writes and reads.
pub const VALUE_FORMAT_VERSION: u8 = 1;

/// Bytes before the payload.
pub const VALUE_HEADER_BYTES: usize = 1 + 4 + 8 + 4;

fn checksum(key: &[u8], version: u8, behaviour_version: u32, seq: u64, payload: &[u8]) -> u32 {
    let mut crc = crc32c::crc32c(key);
    crc = crc32c::crc32c_append(crc, &[version]);
    crc = crc32c::crc32c_append(crc, &behaviour_version.to_be_bytes());
    crc = crc32c::crc32c_append(crc, &seq.to_be_bytes());
    crc32c::crc32c_append(crc, payload)
}

/// Encodes a snapshot or event stored under `key`.
pub fn encode_value(key: &[u8], seq: u64, behaviour_version: u32, payload: &[u8]) -> Vec<u8> {
    let crc = checksum(key, VALUE_FORMAT_VERSION, behaviour_version, seq, payload);
    let mut out = Vec::with_capacity(VALUE_HEADER_BYTES + payload.len());
    out.push(VALUE_FORMAT_VERSION);
    out.extend_from_slice(&behaviour_version.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&crc.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Decodes and verifies a value read from under `key`. The error is a detail for
/// [`super::StoreError::CorruptEntity`].
pub fn decode_value(key: &[u8], value: &[u8]) -> Result<StoredRecord, String> {
    let mut reader = Reader::new(value);
    let (Some(version), Some(behaviour_version), Some(seq), Some(stored_crc)) =
        (reader.u8(), reader.u32(), reader.u64(), reader.u32())
    else {
        return Err(format!(
            "stored value is {} bytes, shorter than its {VALUE_HEADER_BYTES}-byte header",
            value.len()
        ));
    };
    let payload = &value[VALUE_HEADER_BYTES..];
    let crc = checksum(key, version, behaviour_version, seq, payload);
    if crc != stored_crc {
        return Err(format!(
            "stored record (seq {seq}) failed its CRC32C check (stored {stored_crc:#010x}, computed {crc:#010x})"
        ));
    }
    if version != VALUE_FORMAT_VERSION {
        return Err(format!(
            "stored record (seq {seq}) has value format {version}, this server reads {VALUE_FORMAT_VERSION}"
        ));
    }
    Ok(StoredRecord {
        seq,
        behaviour_version,
        payload: payload.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let key = b"jkey-and-seq".to_vec();
        for payload in [&b""[..], b"x", &[0u8; 300][..]] {
            let value = encode_value(&key, 42, 7, payload);
            assert_eq!(
                decode_value(&key, &value).unwrap(),
                StoredRecord {
                    seq: 42,
                    behaviour_version: 7,
                    payload: payload.to_vec()
                }
            );
        }
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let key = b"j\x00\x01t\x00\x01k\x00\x00\x00\x00\x00\x00\x00\x05".to_vec();
        let value = encode_value(&key, 5, 3, b"{\"value\":12}");
        for byte in 0..value.len() {
            for bit in 0..8 {
                let mut damaged = value.clone();
                damaged[byte] ^= 1 << bit;
                assert!(
                    decode_value(&key, &damaged).is_err(),
                    "flip of bit {bit} in byte {byte} not caught"
                );
            }
        }
    }

    #[test]
    fn a_value_under_another_key_is_caught() {
        let value = encode_value(b"key-one", 1, 1, b"payload");
        let err = decode_value(b"key-two", &value).unwrap_err();
        assert!(err.contains("CRC32C"), "{err}");
    }

    #[test]
    fn a_short_value_is_an_error_not_a_panic() {
        for len in 0..VALUE_HEADER_BYTES {
            assert!(decode_value(b"k", &vec![0u8; len]).is_err());
        }
    }
}
