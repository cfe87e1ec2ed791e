//! State stored by an earlier run is read back at start and must never keep the node
//! from starting. A stored listen address this machine does not have (moved machine, changed
//! DHCP lease, corrupted record) is ignored, and the node binds its default addresses.

use mm_platform::storage::{MemStore, Storage};
use mm_platform::Platform;

#[test]
fn a_stored_listen_address_that_cannot_be_bound_does_not_stop_the_node() {
    let mut store = MemStore::new();
    // The earlier run stored its identity too (without it, other state is refused).
    let identity = mm_platform::identity::Identity::generate();
    store
        .put("identity", identity.to_stored().as_bytes())
        .unwrap();
    // 192.0.2.1 is TEST-NET-1: never an address of this machine.
    store
        .put(
            "connectionInfo",
            br#"[{"transportType":"udp","transportInfo":{"address":"192.0.2.1","port":4000,"framing":"native"}},
                {"transportType":"tcp","transportInfo":{"address":"192.0.2.1","port":4000,"framing":"native"}}]"#,
        )
        .unwrap();
    let p = Platform::builder()
        .storage(store)
        .build()
        .expect("the node starts despite the stale stored address");
    let info = p.connection_info();
    let addrs: Vec<&str> = info
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["transportInfo"]["address"].as_str().unwrap())
        .collect();
    assert_eq!(addrs, ["127.0.0.1", "127.0.0.1"]);
}
