//! mm-platform
#![deny(missing_docs)]
pub(crate) mod bus;
pub mod crypto;
pub mod identity;
pub mod storage;
