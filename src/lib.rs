//! mm-platform
#![deny(missing_docs)]
pub mod crypto;
pub mod curvecp;
pub mod envelope;
pub mod netstring;
pub mod transport;
