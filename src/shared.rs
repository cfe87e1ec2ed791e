//! [`Shared`]: a value the platform's callbacks and the application share, on any thread.

/// A value shared between the platform's callbacks and the application, on any thread: what
/// `Rc<RefCell<T>>` or `Rc<Cell<T>>` would be in a single-threaded program. Callbacks, storage,
/// directories and services must be `Send` (a platform may move to another thread), and this
/// is the simple `Send` way to let a callback update state the program reads. Services hand
/// out their statistics and state the same way (`stats_handle`, `info_handle`).
///
/// A clone shares the value. [`Shared::get`] and [`Shared::set`] copy it in and out;
/// [`Shared::borrow`] locks it in place (never hold the guard across a `poll`: a callback that
/// borrows the same value would wait for ever).
///
/// ```
/// use std::time::Duration;
/// use mm_platform::{Platform, Shared};
///
/// let mut platform = Platform::builder().build().unwrap();
/// let seen = Shared::new(Vec::new());
/// let s = seen.clone();
/// platform
///     .messaging()
///     .on("self.note", move |_ctx, _msg, text: String| s.borrow_mut().push(text));
/// let _ = platform.messaging().send("note", "local", "hello");
/// platform.poll(Some(Duration::ZERO)).unwrap();
/// platform.poll(Some(Duration::ZERO)).unwrap();
/// assert_eq!(seen.get(), vec!["hello".to_string()]);
/// ```
#[derive(Debug, Default)]
pub struct Shared<T>(std::sync::Arc<std::sync::Mutex<T>>);

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Shared(self.0.clone())
    }
}

impl<T> Shared<T> {
    /// A new shared value.
    pub fn new(value: T) -> Shared<T> {
        Shared(std::sync::Arc::new(std::sync::Mutex::new(value)))
    }

    /// The value, locked for as long as the guard lives (keep it short: the service waits).
    pub fn borrow(&self) -> std::sync::MutexGuard<'_, T> {
        // A panic while holding the lock leaves a value that is still whole (plain data).
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The value, locked for changing it.
    pub fn borrow_mut(&self) -> std::sync::MutexGuard<'_, T> {
        self.borrow()
    }

    /// Replaces the value.
    pub fn set(&self, value: T) {
        *self.borrow() = value;
    }
}

impl<T: Clone> Shared<T> {
    /// A copy of the value now.
    pub fn get(&self) -> T {
        self.borrow().clone()
    }
}
