//! mm-platform
#![deny(missing_docs)]
pub mod crypto;
pub mod curvecp;
pub mod netstring;
pub mod transport;
