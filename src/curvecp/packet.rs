//! CONTRACT SKELETON (owned by the handshake helper).

/// A server name in DNS wire format, 256 bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ServerName(pub [u8; 256]);

/// Why a server name cannot be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameError {
    /// A label longer than 63 bytes.
    LabelTooLong,
    /// The encoding does not fit in 256 bytes.
    TooLong,
}

impl ServerName {
    /// The empty name (256 zero bytes), the default, as the JS nodes use.
    pub fn empty() -> ServerName { ServerName([0; 256]) }
    /// Encodes a dotted DNS name (empty labels dropped).
    pub fn from_dns(name: &str) -> Result<ServerName, NameError> { todo!() }
}
