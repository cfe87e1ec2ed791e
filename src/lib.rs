//! mm-platform
#![deny(missing_docs)]
pub mod crypto;
