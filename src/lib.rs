//! mm-platform
#![deny(missing_docs)]
pub mod crypto;
pub mod curvecp;
