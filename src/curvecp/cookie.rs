//! CONTRACT SKELETON: minute keys and cookies (owned by the handshake helper).
