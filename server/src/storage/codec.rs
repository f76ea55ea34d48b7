//! Byte-level helpers shared by the journal and the sled encodings.
//!
//! **Owns**: the bounds-checked [`Reader`] every on-disk decoder uses, so data read from disk
//! is never indexed without a length check. All integers on disk are big-endian.

/// A cursor over bytes read from disk. Every read is bounds-checked and answers `None` when
/// the input is too short, so decoders turn truncation into an error instead of a panic.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, position: 0 }
    }

    /// Bytes not read yet.
    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.position
    }

    pub(crate) fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let end = self.position.checked_add(len)?;
        let slice = self.bytes.get(self.position..end)?;
        self.position = end;
        Some(slice)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        Some(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.array()?))
    }
}

/// Appends a length that the caller has already bounded (entity types and keys are checked
/// by [`crate::address::EntityId::validate`] before anything is encoded).
pub(crate) fn put_len_u16(out: &mut Vec<u8>, len: usize) {
    debug_assert!(len <= usize::from(u16::MAX), "length {len} exceeds u16");
    out.extend_from_slice(&(len as u16).to_be_bytes());
}

/// Appends a length that the caller has already bounded by a `*_BYTES_MAX` constant.
pub(crate) fn put_len_u32(out: &mut Vec<u8>, len: usize) {
    debug_assert!(len <= u32::MAX as usize, "length {len} exceeds u32");
    out.extend_from_slice(&(len as u32).to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_bounds_checked() {
        let mut r = Reader::new(&[0, 1, 0, 0, 0, 2, 9]);
        assert_eq!(r.u16(), Some(1));
        assert_eq!(r.u32(), Some(2));
        assert_eq!(r.remaining(), 1);
        assert_eq!(r.u16(), None);
        assert_eq!(r.u8(), Some(9));
        assert_eq!(r.take(1), None);
        assert_eq!(r.take(usize::MAX), None);
    }
}
