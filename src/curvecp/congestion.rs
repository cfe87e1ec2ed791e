//! Congestion control for the CurveCP message layer, behind the [`Congestion`] trait.
//!
//! The stream ([`super::stream`]) asks its controller before each transmission: how many
//! blocks may be in flight ([`Congestion::window`]), how long to wait between two blocks on
//! average ([`Congestion::pacing_interval`]) and how many may go back to back after a pause
//! ([`Congestion::burst`]), and when an unacknowledged block counts as timed out
//! ([`Congestion::rto`]). It reports RTT samples, acknowledged blocks, losses detected from
//! acknowledgements and retransmission timeouts. A window *and* pacing are both available, so a
//! rate-based (BBR-like) controller can replace the ones here without touching the stream.
//!
//! Three controllers (docs/ARCHITECTURE.md §4.1):
//! - [`Chicago`]: the reference `curvecpmessage` controller, one block every `nsecperblock`,
//!   faithful to the reference's integer arithmetic. The comparison baseline.
//! - [`FastStart`]: a window-based controller with slow start, additive increase,
//!   multiplicative decrease on loss, a gentler decrease while the RTT stands well above its
//!   minimum (a queue is building), and pacing at 1.25 × window / smoothed RTT. The default:
//!   on loopback it is at full speed within a few round trips.
//! - [`Gentle`]: [`FastStart`] held to a floor on the time between blocks and a cap on blocks
//!   in flight, never two back to back (for the JavaScript nodes' TCP reader).
//!
//! Controllers are made per stream by a [`CongestionFactory`]; see [`chicago`], [`fast`],
//! [`gentle`] and [`default_factory`]. The one constant shared with the stream,
//! [`super::MAX_BLOCKS`], lives in the parent module.

use std::sync::Arc;
use std::time::{Duration, Instant};

/// A congestion controller consulted by one stream. All methods are sans-IO: `now` comes from
/// the caller.
pub trait Congestion: Send {
    /// A short name for logs and benchmarks.
    fn name(&self) -> &'static str;
    /// Called once when the stream is created.
    fn init(&mut self, now: Instant);
    /// A round-trip sample: an acknowledgement named the latest transmission of a block that
    /// was still unacknowledged (Karn's rule is applied by the stream).
    fn on_rtt_sample(&mut self, rtt: Duration, now: Instant);
    /// A round-trip sample of which up to `waited` may be the acknowledgement waiting for the
    /// stream's caller rather than on the path: the caller had not touched the stream since the
    /// block went (an application polling once a frame reads a frame's acknowledgements at
    /// once). `rtt` stays the figure for timeouts; a delay-based controller should read only
    /// `rtt - waited` as a sign of a queue. By default the same as [`Self::on_rtt_sample`].
    fn on_rtt_sample_waited(&mut self, rtt: Duration, waited: Duration, now: Instant) {
        let _ = waited;
        self.on_rtt_sample(rtt, now);
    }
    /// Blocks newly acknowledged by byte ranges (`blocks` > 0), `bytes` of data among them.
    fn on_ack(&mut self, blocks: usize, bytes: usize, now: Instant);
    /// A block was found lost from acknowledgements (later blocks arrived, it did not) and is
    /// about to be retransmitted.
    fn on_loss(&mut self, now: Instant);
    /// The retransmission timer fired for the oldest unacknowledged block.
    fn on_timeout(&mut self, now: Instant);
    /// Minimum time between two transmitted blocks on average (zero: no pacing).
    fn pacing_interval(&self) -> Duration;
    /// How many blocks may go back to back (at one `now`) after a pause, on the pacing
    /// schedule; 1 means strictly one block per interval.
    fn burst(&self) -> u32;
    /// Maximum number of unacknowledged blocks in flight (the stream applies its own cap too).
    fn window(&self) -> usize;
    /// Retransmission timeout before any backoff applied by the stream.
    fn rto(&self) -> Duration;
    /// Smoothed round-trip time, once sampled.
    fn srtt(&self) -> Option<Duration>;
}

/// Makes one controller per stream.
pub type CongestionFactory = Arc<dyn Fn() -> Box<dyn Congestion> + Send + Sync>;

/// A factory of reference-faithful [`Chicago`] controllers.
pub fn chicago() -> CongestionFactory {
    Arc::new(|| Box::new(Chicago::new(crate::crypto::random_u64())) as Box<dyn Congestion>)
}

/// A factory of [`FastStart`] controllers.
pub fn fast() -> CongestionFactory {
    Arc::new(|| Box::new(FastStart::new()) as Box<dyn Congestion>)
}

/// The default controller factory ([`FastStart`]).
pub fn default_factory() -> CongestionFactory {
    fast()
}

/// A factory of [`Gentle`] controllers: [`FastStart`] never faster than one block per
/// `min_interval`, never more than `max_window` blocks in flight, never two blocks back to
/// back.
pub fn gentle(min_interval: Duration, max_window: usize) -> CongestionFactory {
    Arc::new(move || Box::new(Gentle::new(min_interval, max_window)) as Box<dyn Congestion>)
}

/// [`FastStart`] held to a floor on the time between blocks and a cap on blocks in flight, for
/// a peer that loses what arrives in bursts: the JavaScript nodes' TCP reader takes one
/// netstring per read and drops two frames that arrive in one read, so blocks to them must
/// never be sent back to back.
pub struct Gentle {
    inner: FastStart,
    min_interval: Duration,
    max_window: usize,
}

impl Gentle {
    /// A controller with these bounds.
    pub fn new(min_interval: Duration, max_window: usize) -> Gentle {
        Gentle {
            inner: FastStart::new(),
            min_interval,
            max_window: max_window.max(1),
        }
    }
}

impl Congestion for Gentle {
    fn name(&self) -> &'static str {
        "gentle"
    }
    fn init(&mut self, now: Instant) {
        self.inner.init(now);
    }
    fn on_rtt_sample(&mut self, rtt: Duration, now: Instant) {
        self.inner.on_rtt_sample(rtt, now);
    }
    fn on_rtt_sample_waited(&mut self, rtt: Duration, waited: Duration, now: Instant) {
        self.inner.on_rtt_sample_waited(rtt, waited, now);
    }
    fn on_ack(&mut self, blocks: usize, bytes: usize, now: Instant) {
        self.inner.on_ack(blocks, bytes, now);
    }
    fn on_loss(&mut self, now: Instant) {
        self.inner.on_loss(now);
    }
    fn on_timeout(&mut self, now: Instant) {
        self.inner.on_timeout(now);
    }
    fn pacing_interval(&self) -> Duration {
        self.inner.pacing_interval().max(self.min_interval)
    }
    fn burst(&self) -> u32 {
        1
    }
    fn window(&self) -> usize {
        self.inner.window().min(self.max_window)
    }
    fn rto(&self) -> Duration {
        self.inner.rto()
    }
    fn srtt(&self) -> Option<Duration> {
        self.inner.srtt()
    }
}

const SECOND_NS: i64 = 1_000_000_000;
/// Chicago never paces slower than this (the reference has no cap; this only avoids overflow).
const CHICAGO_MAX_NSECPERBLOCK: i64 = 8 * SECOND_NS;

/// The reference controller of `curvecpmessage` (docs/ARCHITECTURE.md §4.1): it sends one
/// block every `nsecperblock` nanoseconds, starting at 1 s, and adapts that interval to the RTT
/// samples.
#[derive(Debug, Clone)]
pub struct Chicago {
    epoch: Option<Instant>,
    rng: u64,
    nsecperblock: i64,
    rtt_timeout: i64,
    rtt_average: i64,
    rtt_deviation: i64,
    rtt_highwater: i64,
    rtt_lowwater: i64,
    seen_recent_high: bool,
    seen_recent_low: bool,
    seen_older_high: bool,
    seen_older_low: bool,
    phase: u8,
    last_speed_adjustment: i64,
    last_edge: Option<i64>,
    last_doubling: Option<i64>,
    last_panic: Option<i64>,
}

impl Chicago {
    /// A fresh controller; `seed` feeds its small internal PRNG (the random back-offs).
    pub fn new(seed: u64) -> Chicago {
        Chicago {
            epoch: None,
            rng: seed | 1,
            nsecperblock: SECOND_NS,
            rtt_timeout: SECOND_NS,
            rtt_average: 0,
            rtt_deviation: 0,
            rtt_highwater: 0,
            rtt_lowwater: 0,
            seen_recent_high: false,
            seen_recent_low: false,
            seen_older_high: false,
            seen_older_low: false,
            phase: 0,
            last_speed_adjustment: 0,
            last_edge: None,
            last_doubling: None,
            last_panic: None,
        }
    }

    /// The current interval between blocks, in nanoseconds.
    pub fn nsecperblock(&self) -> i64 {
        self.nsecperblock
    }

    /// The current retransmission timeout, in nanoseconds.
    pub fn rtt_timeout(&self) -> i64 {
        self.rtt_timeout
    }

    fn rand_below(&mut self, n: i64) -> i64 {
        if n <= 0 {
            return 0;
        }
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) % n as u64) as i64
    }

    fn ns(&mut self, now: Instant) -> i64 {
        let epoch = *self.epoch.get_or_insert(now);
        let d = now.saturating_duration_since(epoch);
        i64::try_from(d.as_nanos()).unwrap_or(i64::MAX / 4)
    }
}

impl Congestion for Chicago {
    fn name(&self) -> &'static str {
        "chicago"
    }

    fn init(&mut self, now: Instant) {
        let t = self.ns(now);
        self.last_speed_adjustment = t;
    }

    fn on_rtt_sample(&mut self, rtt: Duration, now: Instant) {
        let recent = self.ns(now);
        let rtt = i64::try_from(rtt.as_nanos())
            .unwrap_or(i64::MAX / 4)
            .clamp(1, 60 * SECOND_NS);
        if self.rtt_average == 0 {
            self.nsecperblock = rtt;
            self.rtt_average = rtt;
            self.rtt_deviation = rtt / 2;
            self.rtt_highwater = rtt;
            self.rtt_lowwater = rtt;
        }
        // Jacobson/Karels.
        let mut delta = rtt - self.rtt_average;
        self.rtt_average += delta / 8;
        delta = delta.abs() - self.rtt_deviation;
        self.rtt_deviation += delta / 4;
        self.rtt_timeout = self.rtt_average + 4 * self.rtt_deviation + 8 * self.nsecperblock;
        // Top and bottom of the congestion cycle.
        self.rtt_highwater += (rtt - self.rtt_highwater) / 1024;
        let d = rtt - self.rtt_lowwater;
        if d > 0 {
            self.rtt_lowwater += d / 8192;
        } else {
            self.rtt_lowwater += d / 256;
        }
        if self.rtt_average > self.rtt_highwater + 5_000_000 {
            self.seen_recent_high = true;
        } else if self.rtt_average < self.rtt_lowwater {
            self.seen_recent_low = true;
        }
        // Periodic adjustment.
        if recent >= self.last_speed_adjustment + 16 * self.nsecperblock {
            if recent - self.last_speed_adjustment > 10 * SECOND_NS {
                self.nsecperblock = SECOND_NS + self.rand_below(SECOND_NS / 8);
            }
            self.last_speed_adjustment = recent;
            if self.nsecperblock >= 131_072 {
                if self.nsecperblock < 16_777_216 {
                    let u = self.nsecperblock / 131_072;
                    self.nsecperblock -= u * u * u;
                } else {
                    let d = self.nsecperblock as f64;
                    self.nsecperblock = (d / (1.0 + d * d / 2_251_799_813_685_248.0)) as i64;
                }
            }
            if self.phase == 0 {
                if self.seen_older_high {
                    self.phase = 1;
                    self.last_edge = Some(recent);
                    let r = self.rand_below(self.nsecperblock / 4);
                    self.nsecperblock += r;
                }
            } else if self.seen_older_low {
                self.phase = 0;
            }
            self.seen_older_high = self.seen_recent_high;
            self.seen_older_low = self.seen_recent_low;
            self.seen_recent_high = false;
            self.seen_recent_low = false;
        }
        // Doubling (halving nsecperblock).
        let ready = match (self.last_edge, self.last_doubling) {
            (_, None) => true,
            (Some(edge), Some(ld)) if recent - edge < 60 * SECOND_NS => {
                recent >= ld + 4 * self.nsecperblock + 64 * self.rtt_timeout + 5 * SECOND_NS
            }
            (_, Some(ld)) => recent >= ld + 4 * self.nsecperblock + 2 * self.rtt_timeout,
        };
        if ready && self.nsecperblock > 65_535 {
            self.nsecperblock /= 2;
            self.last_doubling = Some(recent);
            if self.last_edge.is_some() {
                self.last_edge = Some(recent);
            }
        }
        self.nsecperblock = self.nsecperblock.clamp(1, CHICAGO_MAX_NSECPERBLOCK);
    }

    fn on_ack(&mut self, _blocks: usize, _bytes: usize, _now: Instant) {}

    fn on_loss(&mut self, _now: Instant) {}

    fn on_timeout(&mut self, now: Instant) {
        let recent = self.ns(now);
        let first = match self.last_panic {
            None => true,
            Some(p) => recent > p + 4 * self.rtt_timeout,
        };
        if first {
            self.nsecperblock = (self.nsecperblock * 2).min(CHICAGO_MAX_NSECPERBLOCK);
            self.last_panic = Some(recent);
            self.last_edge = Some(recent);
        }
    }

    fn pacing_interval(&self) -> Duration {
        Duration::from_nanos(self.nsecperblock.max(0) as u64)
    }

    fn burst(&self) -> u32 {
        1
    }

    fn window(&self) -> usize {
        usize::MAX
    }

    fn rto(&self) -> Duration {
        Duration::from_nanos(self.rtt_timeout.max(1) as u64)
    }

    fn srtt(&self) -> Option<Duration> {
        (self.rtt_average > 0).then(|| Duration::from_nanos(self.rtt_average as u64))
    }
}

/// Initial window of [`FastStart`], in blocks.
const FAST_INITIAL_WINDOW: f64 = 32.0;
/// Smallest window of [`FastStart`], in blocks.
const FAST_MIN_WINDOW: f64 = 2.0;
/// Largest window of [`FastStart`], in blocks: twice the stream's cap on blocks in flight
/// ([`super::MAX_BLOCKS`]), so that a window the stream cannot use does not inflate
/// without bound (and take many round trips to come down when the path congests).
const FAST_MAX_WINDOW: f64 = 2.0 * super::MAX_BLOCKS as f64;
/// Fewest blocks [`FastStart`] lets go back to back (a driver turn sends several blocks at one
/// `now`).
const FAST_BURST: u32 = 16;
/// Most blocks [`FastStart`] lets go back to back, when a millisecond at its pacing rate holds
/// that many.
const FAST_MAX_BURST: u32 = 64;
/// [`FastStart`]'s bursts hold about this much time at its pacing rate (as Linux sizes TCP
/// segmentation-offload bursts), within `FAST_BURST..=FAST_MAX_BURST` blocks.
const FAST_BURST_TIME: Duration = Duration::from_millis(1);
/// Retransmission timeout before the first RTT sample (the reference's).
const FAST_INITIAL_RTO: Duration = Duration::from_secs(1);
/// Lower bound of the retransmission timeout (room for a slow peer's delayed acknowledgements).
const FAST_MIN_RTO: Duration = Duration::from_millis(25);
/// Queueing delay (smoothed RTT above the minimum) that counts as congestion is the larger of
/// the minimum RTT itself and this floor (so scheduler noise on a 50 µs loopback path does not
/// count).
const FAST_DELAY_FLOOR: Duration = Duration::from_millis(4);
/// The minimum RTT is forgotten after this long without a new minimum (the path changed).
const FAST_MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
/// Smallest window a delay signal alone brings [`FastStart`] to, in blocks.
const FAST_DELAY_MIN_WINDOW: f64 = 8.0;
/// Window factor on a delay signal (gentler than the halving on a loss).
const FAST_DELAY_BACKOFF: f64 = 0.85;

/// A window-based controller: slow start from 16 blocks, then one block more per window per
/// RTT; on a loss the window halves (at most once per RTT), on a timeout it drops to 2 blocks,
/// and while the smoothed RTT stands above the minimum RTT by more than max(minimum RTT, 4 ms)
/// (a queue is building: rising RTT) it shrinks by 15% per RTT. Blocks are paced at
/// 1.25 × window / smoothed RTT, and go back to back in bursts of about a millisecond at that
/// rate, at least 16 and at most 64 blocks, so that a window is not sent as one burst: 16 on
/// any path slower than 16 blocks per millisecond (about 17 MB/s), more only where the rate is
/// high, where larger bursts mean fewer system calls (UDP segmentation offload batches:
/// `curvecp_bulk_udp_100MB` 940 -> 1059 MB/s with bursts of 64 against 16, six interleaved
/// runs on loopback). On loopback it is at full speed after a few round trips (well under a millisecond);
/// at 10 ms RTT, slow start reaches the stream's 128-block cap in three round trips.
#[derive(Debug, Clone)]
pub struct FastStart {
    cwnd: f64,
    ssthresh: f64,
    srtt_ns: f64,
    rttvar_ns: f64,
    sampled: bool,
    recovery_until: Option<Instant>,
    min_rtt_ns: f64,
    min_rtt_at: Option<Instant>,
    /// Smoothed RTT less the time acknowledgements waited for the caller
    /// ([`Congestion::on_rtt_sample_waited`]): what the queue estimate compares with the
    /// minimum, so an application's poll interval does not read as a queue.
    srtt_path_ns: f64,
    delay_backoffs: u64,
    loss_backoffs: u64,
    /// `pacing_interval` and `rto`, recomputed whenever what they depend on changes (the
    /// stream asks for them several times per packet; each computation is a float division
    /// and a `Duration` conversion).
    pacing: Duration,
    rto: Duration,
    /// `burst`, recomputed with `pacing`.
    burst: u32,
}

impl Default for FastStart {
    fn default() -> Self {
        FastStart::new()
    }
}

impl FastStart {
    /// A fresh controller.
    pub fn new() -> FastStart {
        FastStart {
            cwnd: FAST_INITIAL_WINDOW,
            ssthresh: f64::INFINITY,
            srtt_ns: 0.0,
            rttvar_ns: 0.0,
            sampled: false,
            recovery_until: None,
            min_rtt_ns: 0.0,
            min_rtt_at: None,
            srtt_path_ns: 0.0,
            delay_backoffs: 0,
            loss_backoffs: 0,
            pacing: Duration::ZERO,
            rto: FAST_INITIAL_RTO,
            burst: FAST_BURST,
        }
    }

    fn pacing_now(&self) -> Duration {
        if !self.sampled {
            return Duration::ZERO;
        }
        Duration::from_nanos((self.srtt_ns / (1.25 * self.cwnd)) as u64)
    }

    fn rto_now(&self) -> Duration {
        if !self.sampled {
            return FAST_INITIAL_RTO;
        }
        let ns = self.srtt_ns + 4.0 * self.rttvar_ns;
        Duration::from_nanos(ns as u64).max(FAST_MIN_RTO)
    }

    /// Recomputes the cached pacing interval and timeout.
    fn refresh(&mut self) {
        self.pacing = self.pacing_now();
        self.rto = self.rto_now();
        self.burst = self.burst_now();
    }

    fn burst_now(&self) -> u32 {
        if self.pacing.is_zero() {
            return FAST_BURST;
        }
        let per_ms = FAST_BURST_TIME.as_nanos() / self.pacing.as_nanos();
        per_ms.clamp(FAST_BURST as u128, FAST_MAX_BURST as u128) as u32
    }

    /// The smallest recent RTT sample, once sampled.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt_at
            .map(|_| Duration::from_nanos(self.min_rtt_ns as u64))
    }

    /// How many times the window shrank because the RTT rose.
    pub fn delay_backoffs(&self) -> u64 {
        self.delay_backoffs
    }

    /// How many times the window shrank on a loss or a timeout.
    pub fn loss_backoffs(&self) -> u64 {
        self.loss_backoffs
    }

    /// The current window in blocks (fractional).
    pub fn cwnd(&self) -> f64 {
        self.cwnd
    }

    fn in_recovery(&self, now: Instant) -> bool {
        self.recovery_until.is_some_and(|t| now < t)
    }

    fn reduce(&mut self, now: Instant, to_min: bool) {
        self.loss_backoffs += 1;
        self.ssthresh = (self.cwnd / 2.0).max(FAST_MIN_WINDOW);
        self.cwnd = if to_min {
            FAST_MIN_WINDOW
        } else {
            self.ssthresh
        };
        let srtt = self.srtt().unwrap_or(FAST_MIN_RTO);
        self.recovery_until = Some(now + srtt);
    }
}

impl Congestion for FastStart {
    fn name(&self) -> &'static str {
        "faststart"
    }

    fn init(&mut self, _now: Instant) {}

    fn on_rtt_sample(&mut self, rtt: Duration, now: Instant) {
        self.on_rtt_sample_waited(rtt, Duration::ZERO, now);
    }

    fn on_rtt_sample_waited(&mut self, rtt: Duration, waited: Duration, now: Instant) {
        let r = rtt.as_nanos().min(60_000_000_000) as f64;
        let path = rtt.saturating_sub(waited).as_nanos().min(60_000_000_000) as f64;
        if !self.sampled {
            self.sampled = true;
            self.srtt_ns = r;
            self.rttvar_ns = r / 2.0;
            self.srtt_path_ns = path;
        } else {
            let delta = (r - self.srtt_ns).abs();
            self.rttvar_ns += (delta - self.rttvar_ns) / 4.0;
            self.srtt_ns += (r - self.srtt_ns) / 8.0;
            self.srtt_path_ns += (path - self.srtt_path_ns) / 8.0;
        }
        let expired = self
            .min_rtt_at
            .is_none_or(|at| now.saturating_duration_since(at) > FAST_MIN_RTT_WINDOW);
        if expired || r <= self.min_rtt_ns {
            self.min_rtt_ns = r;
            self.min_rtt_at = Some(now);
        }
        // Rising RTT: a queue builds up somewhere on the path (not in the caller's poll loop).
        let queue = self.srtt_path_ns - self.min_rtt_ns;
        let threshold = self.min_rtt_ns.max(FAST_DELAY_FLOOR.as_nanos() as f64);
        if queue > threshold && !self.in_recovery(now) {
            self.delay_backoffs += 1;
            // Never below a few blocks for delay alone: the RTT may have risen for reasons
            // this flow cannot fix (another flow's queue, a longer route).
            self.cwnd = (self.cwnd * FAST_DELAY_BACKOFF).max(FAST_DELAY_MIN_WINDOW.min(self.cwnd));
            self.ssthresh = self.cwnd;
            let srtt = Duration::from_nanos(self.srtt_ns as u64);
            self.recovery_until = Some(now + srtt);
        }
        self.refresh();
    }

    fn on_ack(&mut self, blocks: usize, _bytes: usize, now: Instant) {
        if self.in_recovery(now) {
            return;
        }
        let b = blocks as f64;
        if self.cwnd < self.ssthresh {
            self.cwnd += b;
        } else {
            self.cwnd += b / self.cwnd;
        }
        self.cwnd = self.cwnd.min(FAST_MAX_WINDOW);
        self.refresh();
    }

    fn on_loss(&mut self, now: Instant) {
        if !self.in_recovery(now) {
            self.reduce(now, false);
        }
        self.refresh();
    }

    fn on_timeout(&mut self, now: Instant) {
        if !self.in_recovery(now) {
            self.reduce(now, true);
        }
        self.refresh();
    }

    fn pacing_interval(&self) -> Duration {
        debug_assert_eq!(self.pacing, self.pacing_now());
        self.pacing
    }

    fn burst(&self) -> u32 {
        debug_assert_eq!(self.burst, self.burst_now());
        self.burst
    }

    fn window(&self) -> usize {
        self.cwnd as usize
    }

    fn rto(&self) -> Duration {
        debug_assert_eq!(self.rto, self.rto_now());
        self.rto
    }

    fn srtt(&self) -> Option<Duration> {
        self.sampled
            .then(|| Duration::from_nanos(self.srtt_ns as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn chicago_first_sample_sets_rate_then_halves() {
        let t0 = Instant::now();
        let mut c = Chicago::new(7);
        c.init(t0);
        assert_eq!(c.nsecperblock(), SECOND_NS);
        assert_eq!(c.rto(), Duration::from_secs(1));
        c.on_rtt_sample(10 * MS, t0 + 10 * MS);
        // First sample: nsecperblock = rtt, and the first doubling is allowed at once.
        assert_eq!(c.nsecperblock(), 5_000_000);
        assert_eq!(c.srtt(), Some(10 * MS));
        // avg = 10 ms, dev = 5 ms - 5/4 ms = 3.75 ms, and rtt_timeout = avg + 4 dev
        // + 8 * nsecperblock (before the halving) = 10 + 15 + 80 ms.
        assert_eq!(c.rtt_timeout(), 105_000_000);
    }

    #[test]
    fn chicago_timeout_doubles_once_per_four_rto() {
        let t0 = Instant::now();
        let mut c = Chicago::new(7);
        c.init(t0);
        c.on_rtt_sample(10 * MS, t0 + 10 * MS);
        let npb = c.nsecperblock();
        c.on_timeout(t0 + 200 * MS);
        assert_eq!(c.nsecperblock(), 2 * npb);
        // A second timeout soon after does not double again.
        c.on_timeout(t0 + 300 * MS);
        assert_eq!(c.nsecperblock(), 2 * npb);
        // After 4 * rtt_timeout it does.
        let later = t0 + 200 * MS + Duration::from_nanos(4 * c.rtt_timeout() as u64) + MS;
        c.on_timeout(later);
        assert_eq!(c.nsecperblock(), 4 * npb);
    }

    #[test]
    fn chicago_speeds_up_with_steady_rtt() {
        let t0 = Instant::now();
        let mut c = Chicago::new(1);
        c.init(t0);
        let mut t = t0;
        for _ in 0..2000 {
            t += 2 * MS;
            c.on_rtt_sample(2 * MS, t);
        }
        assert!(c.nsecperblock() < 1_000_000, "{}", c.nsecperblock());
        assert!(c.nsecperblock() > 65_535 / 2);
    }

    /// Bursts hold about a millisecond at the pacing rate, 16 to 64 blocks: 16 before any
    /// sample and on slow paths, 64 on a fast one.
    #[test]
    fn fast_burst_scales_with_the_rate() {
        let t0 = Instant::now();
        let mut f = FastStart::new();
        f.init(t0);
        assert_eq!(f.burst(), 16, "no sample yet");
        // 20 ms RTT, window 32: 1.6 blocks per ms.
        f.on_rtt_sample(20 * MS, t0);
        assert_eq!(f.burst(), 16);
        // Loopback: a 70 us RTT makes thousands of blocks per ms.
        let mut g = FastStart::new();
        g.init(t0);
        g.on_rtt_sample(Duration::from_micros(70), t0);
        assert_eq!(g.burst(), 64);
        // 1 ms RTT, window 32: 40 blocks per ms.
        let mut h = FastStart::new();
        h.init(t0);
        h.on_rtt_sample(MS, t0);
        assert_eq!(h.burst(), 40);
    }

    #[test]
    fn fast_slow_start_then_halving_on_loss() {
        let t0 = Instant::now();
        let mut f = FastStart::new();
        f.init(t0);
        assert_eq!(f.window(), 32);
        assert_eq!(f.rto(), FAST_INITIAL_RTO);
        f.on_rtt_sample(10 * MS, t0);
        f.on_ack(32, 32 * 1024, t0 + 10 * MS);
        assert_eq!(f.window(), 64);
        f.on_loss(t0 + 20 * MS);
        assert_eq!(f.window(), 32);
        // Losses within one RTT count once.
        f.on_loss(t0 + 21 * MS);
        assert_eq!(f.window(), 32);
        // Congestion avoidance: one block per window.
        f.on_ack(32, 32 * 1024, t0 + 40 * MS);
        assert_eq!(f.window(), 33);
        f.on_timeout(t0 + 100 * MS);
        assert_eq!(f.window(), 2);
        assert!(f.rto() >= FAST_MIN_RTO);
        // Pacing spreads the window over the RTT.
        assert!(f.pacing_interval() > Duration::ZERO);
        assert!(f.pacing_interval() < 10 * MS);
    }

    #[test]
    fn fast_backs_off_while_the_rtt_stands_high_and_grows_again() {
        let t0 = Instant::now();
        let mut f = FastStart::new();
        f.init(t0);
        let mut t = t0;
        // A steady 10 ms path: the window grows.
        for _ in 0..50 {
            t += 10 * MS;
            f.on_rtt_sample(10 * MS, t);
            f.on_ack(8, 8 * 1024, t);
        }
        let before = f.window();
        assert_eq!(before, 2 * crate::curvecp::MAX_BLOCKS);
        assert_eq!(f.delay_backoffs(), 0);
        assert_eq!(f.min_rtt(), Some(10 * MS));
        // The RTT rises to 40 ms (a queue of 30 ms > max(10 ms, 4 ms)): the window shrinks,
        // once per RTT.
        for _ in 0..40 {
            t += 40 * MS;
            f.on_rtt_sample(40 * MS, t);
            f.on_ack(4, 4 * 1024, t);
        }
        let during = f.window();
        assert!(during * 4 < before, "{before} -> {during}");
        assert!(f.delay_backoffs() >= 5);
        assert!(f.delay_backoffs() <= 40);
        assert_eq!(f.loss_backoffs(), 0);
        // Back to 10 ms: no more back-off, the window grows again.
        let backoffs = f.delay_backoffs();
        for _ in 0..200 {
            t += 10 * MS;
            f.on_rtt_sample(10 * MS, t);
            f.on_ack(8, 8 * 1024, t);
        }
        assert!(f.delay_backoffs() <= backoffs + 2);
        assert!(f.window() > during * 2, "{during} -> {}", f.window());
        // Jitter on a fast path (50 us base, spikes to 2 ms) is not a delay signal.
        let mut g = FastStart::new();
        for i in 0..1000u32 {
            t += MS;
            let r = if i % 10 == 0 {
                2 * MS
            } else {
                Duration::from_micros(50)
            };
            g.on_rtt_sample(r, t);
            g.on_ack(1, 1024, t);
        }
        assert_eq!(g.delay_backoffs(), 0);
    }

    #[test]
    fn fast_reads_time_spent_waiting_for_the_caller_as_no_queue() {
        let t0 = Instant::now();
        let mut t = t0;
        // A 1 ms path while the caller polls often, then a caller that polls once a frame
        // (16 ms): every acknowledgement waited up to a frame for it. Not a queue.
        let mut f = FastStart::new();
        f.init(t0);
        for _ in 0..20 {
            t += MS;
            f.on_rtt_sample_waited(MS, Duration::ZERO, t);
            f.on_ack(4, 4 * 1024, t);
        }
        for _ in 0..50 {
            t += 16 * MS;
            f.on_rtt_sample_waited(16 * MS, 15 * MS, t);
            f.on_ack(32, 32 * 1024, t);
        }
        assert_eq!(f.delay_backoffs(), 0);
        assert_eq!(f.window(), 2 * crate::curvecp::MAX_BLOCKS);
        // The timeout still covers the RTT the stream sees.
        assert!(f.rto() > 16 * MS, "{:?}", f.rto());
        // The same samples without the waiting read as a queue of 15 ms over a 1 ms path.
        let mut g = FastStart::new();
        g.init(t0);
        let mut t = t0;
        for _ in 0..20 {
            t += MS;
            g.on_rtt_sample(MS, t);
            g.on_ack(4, 4 * 1024, t);
        }
        for _ in 0..50 {
            t += 16 * MS;
            g.on_rtt_sample(16 * MS, t);
            g.on_ack(32, 32 * 1024, t);
        }
        assert!(g.delay_backoffs() > 0);
    }

    #[test]
    fn factories_make_fresh_controllers() {
        assert_eq!(chicago()().name(), "chicago");
        assert_eq!(default_factory()().name(), "faststart");
    }
}
