//! A reader over untrusted bytes, shared by the mesh's decoders (Hello, sync messages,
//! receipts, announcements): every read is bounds-checked and fails with the decoder's
//! own error, never a panic.

use crate::net::MeshError;

/// Reads fields from the front of a byte slice.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    /// Builds the decoder's error from a reason.
    error: fn(String) -> MeshError,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8], error: fn(String) -> MeshError) -> Self {
        Self { bytes, error }
    }

    /// The decoder's error for `reason`.
    pub(crate) fn fail(&self, reason: impl Into<String>) -> MeshError {
        (self.error)(reason.into())
    }

    /// The next `count` bytes.
    pub(crate) fn take(&mut self, count: usize) -> Result<&'a [u8], MeshError> {
        if self.bytes.len() < count {
            return Err(self.fail("truncated"));
        }
        let (head, rest) = self.bytes.split_at(count);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], MeshError> {
        let mut array = [0u8; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, MeshError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16_len(&mut self) -> Result<usize, MeshError> {
        Ok(usize::from(u16::from_le_bytes(self.array()?)))
    }

    pub(crate) fn u32_len(&mut self) -> Result<usize, MeshError> {
        let value = u32::from_le_bytes(self.array()?);
        usize::try_from(value).map_err(|_| self.fail("an impossible length"))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, MeshError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub(crate) fn i64(&mut self) -> Result<i64, MeshError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    pub(crate) fn array32(&mut self) -> Result<[u8; 32], MeshError> {
        self.array()
    }

    pub(crate) fn array16(&mut self) -> Result<[u8; 16], MeshError> {
        self.array()
    }

    /// `magic` then `version`, or an error naming the version found.
    pub(crate) fn header(&mut self, magic: &[u8], version: u8) -> Result<(), MeshError> {
        if self.take(magic.len())? != magic {
            return Err(self.fail("bad magic"));
        }
        let found = self.u8()?;
        if found != version {
            return Err(self.fail(format!(
                "version {found}; this forge reads version {version}"
            )));
        }
        Ok(())
    }

    /// A UTF-8 string after its u16 length (`what` names it in the error).
    pub(crate) fn str16(&mut self, what: &str) -> Result<String, MeshError> {
        let len = self.u16_len()?;
        std::str::from_utf8(self.take(len)?)
            .map(str::to_owned)
            .map_err(|_| self.fail(format!("a {what} that is not UTF-8")))
    }

    /// Bytes after their u32 length.
    pub(crate) fn blob32(&mut self) -> Result<Vec<u8>, MeshError> {
        let len = self.u32_len()?;
        Ok(self.take(len)?.to_vec())
    }

    /// How many bytes are left.
    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len()
    }

    /// Nothing may follow.
    pub(crate) fn end(&self) -> Result<(), MeshError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(self.fail("trailing bytes"))
        }
    }
}

/// Appends `text` after its u16 length. Names are validated to far less than 64 KiB
/// before they reach a message; a longer one is cut there (and then fails its decoder's
/// checks), never a panic.
pub(crate) fn put_str16(bytes: &mut Vec<u8>, text: &str) {
    let len = u16::try_from(text.len()).unwrap_or(u16::MAX);
    bytes.extend_from_slice(&len.to_le_bytes());
    bytes.extend_from_slice(&text.as_bytes()[..usize::from(len)]);
}

/// Appends `blob` after its u32 length (bodies are capped far below 4 GiB).
pub(crate) fn put_blob32(bytes: &mut Vec<u8>, blob: &[u8]) {
    bytes.extend_from_slice(&u32::try_from(blob.len()).unwrap_or(u32::MAX).to_le_bytes());
    bytes.extend_from_slice(blob);
}
