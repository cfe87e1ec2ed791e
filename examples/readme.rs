//! Two nodes on this machine: alice sends bob a chat line and a note that is never lost.

use mm_platform::{Platform, SendOptions, Shared};
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut alice = Platform::builder().build()?;
    let mut bob = Platform::builder().build()?;
    alice.add_peer(&bob.node_info());
    let heard = Shared::new(Vec::new());
    let h = heard.clone();
    bob.messaging()
        .on("public.chat.*", move |_ctx, msg, text: String| {
            println!("{} says {text}", msg.sender);
            h.borrow_mut().push(text);
        });
    alice.messaging().send("chat.say", bob.sign_id(), "hello")?;
    // Not real-time: persisted, retried until the receiver says it delivered it, never lost;
    // delivered once, except after a receiver crash in the instant between delivering it and
    // storing its id (then again, with the same `Message::id`: see the `offline` module docs).
    let later = SendOptions {
        realtime: false,
        expire_after: None,
    };
    alice
        .messaging()
        .send_with("chat.note", bob.sign_id(), "when you can", later)?;
    // Poll both from the program's own loop (or `run()` each on a thread of its own).
    let give_up = Instant::now() + Duration::from_secs(10);
    while (heard.borrow().len() < 2 || !alice.is_idle()) && Instant::now() < give_up {
        alice.poll(Some(Duration::from_millis(5)))?;
        bob.poll(Some(Duration::from_millis(5)))?;
    }
    // Before dropping a platform: let it finish what it sent (here, nothing is left).
    let report = alice.close(Instant::now() + Duration::from_secs(5))?;
    assert!(report.idle, "{report:?}");
    assert_eq!(heard.get(), ["hello", "when you can"]);
    Ok(())
}
