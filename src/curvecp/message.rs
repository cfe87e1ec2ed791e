//! CONTRACT SKELETON: message-layer codec (owned by the stream helper).
