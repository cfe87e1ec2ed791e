//! The CurveCP message-layer codec: the 16..1088-byte messages carried inside Initiate and
//! Message packets (docs/ARCHITECTURE.md §4.1).
//!
//! This module owns the byte layout only: [`Message::parse`] borrows a received message and
//! checks every length, [`MessageHeader::encode`] writes a message into a caller's buffer (no
//! allocation), and [`data_message_len`] / [`max_data_for`] give the reference's sizes
//! (64 + D rounded up to 192, 320, 576 or 1088). The reliable stream built from these messages
//! lives in [`super::stream`].
//!
//! Layout (little-endian): ID u32 @0, acknowledged ID u32 @4, range 1 end u64 @8, gap u32 @16 and
//! length u16 @20 of range 2, then (gap u16, length u16) for ranges 3..6 @22..38, flags+D u16
//! @38 (D in the low bits, at most 1024; 2048 = success STOP, 4096 = failure STOP), position u64
//! @40, zero padding, and the D data bytes at the very end of the message.

/// The smallest message the reference processes (shorter ones are skipped entirely).
pub const MIN_MESSAGE: usize = 48;
/// The largest message.
pub const MAX_MESSAGE: usize = 1088;
/// The largest number of data bytes in one message.
pub const MAX_DATA: usize = 1024;
/// Flag: end of stream, success.
pub const FLAG_SUCCESS: u16 = 2048;
/// Flag: end of stream, failure.
pub const FLAG_FAILURE: u16 = 4096;
/// Size of the pure acknowledgements we send (the reference accepts any message of at least 48
/// bytes; the JavaScript implementation itself sends 64-byte acknowledgements).
pub const ACK_LEN: usize = 64;
/// Bytes before the data area (header plus the reference's minimum 16 bytes of padding).
const DATA_OVERHEAD: usize = 64;

/// The end-of-stream flag carried by a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Flag 2048: normal end of stream.
    Success,
    /// Flag 4096: failure.
    Failure,
}

/// One acknowledged range `[start, stop)` of the peer's view of our stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckRange {
    /// First byte acknowledged.
    pub start: u64,
    /// One past the last byte acknowledged.
    pub stop: u64,
}

/// The header fields of a message (everything except the data bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MessageHeader {
    /// Message ID; 0 for a pure acknowledgement that must not be acknowledged.
    pub id: u32,
    /// ID of the message acknowledged (0 = none); used for RTT samples only.
    pub ack_id: u32,
    /// Range 1 is `[0, ack_end)`.
    pub ack_end: u64,
    /// Gap between range 1 and range 2 (u32 on the wire).
    pub gap2: u32,
    /// Length of range 2.
    pub len2: u16,
    /// (gap, length) of ranges 3..6.
    pub more: [(u16, u16); 4],
    /// The raw flags+size field at offset 38.
    pub flags: u16,
    /// Stream position of the first data byte.
    pub pos: u64,
}

impl MessageHeader {
    /// The number of data bytes D claimed by the flags field (not yet validated).
    pub fn data_len(&self) -> usize {
        usize::from(self.flags & !(FLAG_SUCCESS | FLAG_FAILURE))
    }

    /// The STOP flag, if any (failure wins if both bits are set, as a failure must not be
    /// reported as success).
    pub fn stop(&self) -> Option<Stop> {
        if self.flags & FLAG_FAILURE != 0 {
            Some(Stop::Failure)
        } else if self.flags & FLAG_SUCCESS != 0 {
            Some(Stop::Success)
        } else {
            None
        }
    }

    /// The six acknowledged ranges, in wire order, saturating at `u64::MAX` (a hostile peer may
    /// send anything). Empty ranges are included.
    pub fn ranges(&self) -> [AckRange; 6] {
        let mut out = [AckRange { start: 0, stop: 0 }; 6];
        out[0] = AckRange {
            start: 0,
            stop: self.ack_end,
        };
        let start = self.ack_end.saturating_add(u64::from(self.gap2));
        let mut stop = start.saturating_add(u64::from(self.len2));
        out[1] = AckRange { start, stop };
        for (i, &(gap, len)) in self.more.iter().enumerate() {
            let start = stop.saturating_add(u64::from(gap));
            stop = start.saturating_add(u64::from(len));
            out[i + 2] = AckRange { start, stop };
        }
        out
    }

    /// Writes the 48-byte header into `out[..48]`.
    fn write_header(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.id.to_le_bytes());
        out[4..8].copy_from_slice(&self.ack_id.to_le_bytes());
        out[8..16].copy_from_slice(&self.ack_end.to_le_bytes());
        out[16..20].copy_from_slice(&self.gap2.to_le_bytes());
        out[20..22].copy_from_slice(&self.len2.to_le_bytes());
        for (i, &(gap, len)) in self.more.iter().enumerate() {
            let o = 22 + 4 * i;
            out[o..o + 2].copy_from_slice(&gap.to_le_bytes());
            out[o + 2..o + 4].copy_from_slice(&len.to_le_bytes());
        }
        out[38..40].copy_from_slice(&self.flags.to_le_bytes());
        out[40..48].copy_from_slice(&self.pos.to_le_bytes());
    }

    /// Encodes a message of exactly `len` bytes into `out[..len]`: this header, zero padding,
    /// then `data` at the end. The flags field must already hold `data.len()` (see
    /// [`MessageHeader::set_data`]). Returns `None` (writing nothing) when `len` is not a
    /// multiple of 16 in 48..=1088, `out` is too short, `data` is longer than 1024 bytes or does
    /// not fit after the header, or the flags disagree with `data.len()`.
    pub fn encode(&self, data: &[u8], len: usize, out: &mut [u8]) -> Option<usize> {
        if !(MIN_MESSAGE..=MAX_MESSAGE).contains(&len)
            || !len.is_multiple_of(16)
            || out.len() < len
            || data.len() > MAX_DATA
            || MIN_MESSAGE + data.len() > len
            || self.data_len() != data.len()
        {
            return None;
        }
        let out = &mut out[..len];
        self.write_header(out);
        let data_at = len - data.len();
        out[MIN_MESSAGE..data_at].fill(0);
        out[data_at..].copy_from_slice(data);
        Some(len)
    }

    /// Like [`MessageHeader::encode`], but the D data bytes are already in `out[len - D..len]`
    /// (so data can be copied straight from a send buffer): writes the header and the zero
    /// padding only.
    pub fn encode_in_place(&self, len: usize, out: &mut [u8]) -> Option<usize> {
        let d = self.data_len();
        if !(MIN_MESSAGE..=MAX_MESSAGE).contains(&len)
            || !len.is_multiple_of(16)
            || out.len() < len
            || d > MAX_DATA
            || MIN_MESSAGE + d > len
        {
            return None;
        }
        self.write_header(out);
        out[MIN_MESSAGE..len - d].fill(0);
        Some(len)
    }

    /// Sets D and the STOP flag in the flags field.
    pub fn set_data(&mut self, data_len: usize, stop: Option<Stop>) {
        debug_assert!(data_len <= MAX_DATA);
        let d = data_len.min(MAX_DATA) as u16;
        self.flags = d | match stop {
            None => 0,
            Some(Stop::Success) => FLAG_SUCCESS,
            Some(Stop::Failure) => FLAG_FAILURE,
        };
    }
}

/// A parsed message, borrowing its data from the received bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    /// The header fields (always usable once parsing succeeded).
    pub header: MessageHeader,
    /// The data part: `Some(bytes)` when D ≤ 1024 and 48 + D ≤ length, `None` when the data part
    /// must be ignored (the acknowledgement fields are still valid then).
    pub data: Option<&'a [u8]>,
}

impl<'a> Message<'a> {
    /// Parses a message. Returns `None` when its length is below 48, above 1088 or not a multiple
    /// of 16 (the whole message is skipped then).
    pub fn parse(msg: &'a [u8]) -> Option<Message<'a>> {
        let len = msg.len();
        if !(MIN_MESSAGE..=MAX_MESSAGE).contains(&len) || !len.is_multiple_of(16) {
            return None;
        }
        let u16_at = |o: usize| u16::from_le_bytes([msg[o], msg[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([msg[o], msg[o + 1], msg[o + 2], msg[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&msg[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let mut more = [(0u16, 0u16); 4];
        for (i, m) in more.iter_mut().enumerate() {
            let o = 22 + 4 * i;
            *m = (u16_at(o), u16_at(o + 2));
        }
        let header = MessageHeader {
            id: u32_at(0),
            ack_id: u32_at(4),
            ack_end: u64_at(8),
            gap2: u32_at(16),
            len2: u16_at(20),
            more,
            flags: u16_at(38),
            pos: u64_at(40),
        };
        let d = header.data_len();
        let data = if d > MAX_DATA || MIN_MESSAGE + d > len {
            None
        } else {
            Some(&msg[len - d..])
        };
        Some(Message { header, data })
    }
}

/// The size of a data message carrying `data_len` bytes, as the reference sizes it: 64 + D
/// rounded up to 192, 320, 576 or 1088. `None` when `data_len` > 1024.
pub fn data_message_len(data_len: usize) -> Option<usize> {
    let need = DATA_OVERHEAD + data_len;
    [192, 320, 576, 1088].into_iter().find(|&s| need <= s)
}

/// The most data bytes a data message of at most `max_len` bytes can carry with the
/// reference's sizes (0 when not even a 192-byte message fits, i.e. no data message fits).
pub fn max_data_for(max_len: usize) -> usize {
    [1088usize, 576, 320, 192]
        .into_iter()
        .find(|&s| s <= max_len)
        .map_or(0, |s| s - DATA_OVERHEAD)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes_follow_the_reference() {
        assert_eq!(data_message_len(0), Some(192));
        assert_eq!(data_message_len(12), Some(192));
        assert_eq!(data_message_len(128), Some(192));
        assert_eq!(data_message_len(129), Some(320));
        assert_eq!(data_message_len(256), Some(320));
        assert_eq!(data_message_len(257), Some(576));
        assert_eq!(data_message_len(512), Some(576));
        assert_eq!(data_message_len(513), Some(1088));
        assert_eq!(data_message_len(1024), Some(1088));
        assert_eq!(data_message_len(1025), None);
        assert_eq!(max_data_for(1088), 1024);
        assert_eq!(max_data_for(640), 512);
        assert_eq!(max_data_for(320), 256);
        assert_eq!(max_data_for(191), 0);
    }

    #[test]
    fn hello_world_with_stop_layout() {
        let data = b"hello world\n";
        let mut h = MessageHeader {
            id: 1,
            ..Default::default()
        };
        h.set_data(data.len(), Some(Stop::Success));
        let mut buf = [0xAAu8; 1088];
        let n = h
            .encode(data, data_message_len(data.len()).unwrap(), &mut buf)
            .unwrap();
        assert_eq!(n, 192);
        assert_eq!(&buf[0..4], &[1, 0, 0, 0]);
        assert_eq!(u16::from_le_bytes([buf[38], buf[39]]), 2048 + 12);
        assert!(buf[48..180].iter().all(|&b| b == 0));
        assert_eq!(&buf[180..192], data);
        let m = Message::parse(&buf[..n]).unwrap();
        assert_eq!(m.data, Some(&data[..]));
        assert_eq!(m.header.stop(), Some(Stop::Success));
        assert_eq!(m.header.pos, 0);
    }

    #[test]
    fn length_rules() {
        let buf = [0u8; 1104];
        assert!(Message::parse(&buf[..32]).is_none());
        assert!(Message::parse(&buf[..47]).is_none());
        assert!(Message::parse(&buf[..48]).is_some());
        assert!(Message::parse(&buf[..50]).is_none());
        assert!(Message::parse(&buf[..1088]).is_some());
        assert!(Message::parse(&buf[..1104]).is_none());
    }

    #[test]
    fn bad_data_part_keeps_ack_fields() {
        // D = 1025: data rejected, ack fields usable.
        let mut buf = [0u8; 1088];
        buf[8..16].copy_from_slice(&77u64.to_le_bytes());
        buf[38..40].copy_from_slice(&1025u16.to_le_bytes());
        let m = Message::parse(&buf).unwrap();
        assert_eq!(m.data, None);
        assert_eq!(m.header.ack_end, 77);
        // 48 + D > len.
        let mut buf = [0u8; 64];
        buf[38..40].copy_from_slice(&(17u16 | FLAG_SUCCESS).to_le_bytes());
        let m = Message::parse(&buf).unwrap();
        assert_eq!(m.data, None);
        // 48 + D == len is fine.
        buf[38..40].copy_from_slice(&16u16.to_le_bytes());
        assert_eq!(
            Message::parse(&buf).unwrap().data.map(|d| d.len()),
            Some(16)
        );
    }

    #[test]
    fn ranges_use_u32_then_u16_gaps() {
        let h = MessageHeader {
            ack_end: 100,
            gap2: 70_000,
            len2: 10,
            more: [(5, 20), (0, 1), (65535, 65535), (1, 2)],
            ..Default::default()
        };
        let mut buf = [0u8; 48];
        h.encode(&[], 48, &mut buf).unwrap();
        let p = Message::parse(&buf).unwrap().header;
        assert_eq!(p, h);
        let r = p.ranges();
        assert_eq!(
            r[0],
            AckRange {
                start: 0,
                stop: 100
            }
        );
        assert_eq!(
            r[1],
            AckRange {
                start: 70_100,
                stop: 70_110
            }
        );
        assert_eq!(
            r[2],
            AckRange {
                start: 70_115,
                stop: 70_135
            }
        );
        assert_eq!(
            r[3],
            AckRange {
                start: 70_135,
                stop: 70_136
            }
        );
        assert_eq!(
            r[4],
            AckRange {
                start: 135_671,
                stop: 201_206
            }
        );
        assert_eq!(
            r[5],
            AckRange {
                start: 201_207,
                stop: 201_209
            }
        );
        // Saturation instead of overflow.
        let h = MessageHeader {
            ack_end: u64::MAX - 3,
            gap2: u32::MAX,
            len2: 9,
            ..Default::default()
        };
        assert!(h.ranges().iter().all(|r| r.start <= r.stop));
    }

    #[test]
    fn encode_rejects_inconsistent_input() {
        let mut out = [0u8; 1088];
        let mut h = MessageHeader::default();
        h.set_data(10, None);
        assert!(h.encode(&[0; 9], 192, &mut out).is_none());
        assert!(h.encode(&[0; 10], 200, &mut out).is_none());
        assert!(h.encode(&[0; 10], 1104, &mut out).is_none());
        assert!(h.encode(&[0; 10], 192, &mut out[..100]).is_none());
        assert_eq!(h.encode(&[0; 10], 64, &mut out), Some(64));
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
            if let Some(m) = Message::parse(&bytes) {
                prop_assert!(bytes.len() >= 48 && bytes.len() <= 1088 && bytes.len() % 16 == 0);
                if let Some(d) = m.data {
                    prop_assert!(d.len() <= 1024);
                    prop_assert_eq!(d.len(), m.header.data_len());
                }
                let _ = m.header.ranges();
                let _ = m.header.stop();
            }
        }

        #[test]
        fn round_trip(id in any::<u32>(), ack_id in any::<u32>(), ack_end in any::<u64>(),
                      gap2 in any::<u32>(), len2 in any::<u16>(),
                      more in proptest::array::uniform4((any::<u16>(), any::<u16>())),
                      pos in any::<u64>(), stop in 0u8..3,
                      data in proptest::collection::vec(any::<u8>(), 0..=1024)) {
            let mut h = MessageHeader { id, ack_id, ack_end, gap2, len2, more, flags: 0, pos };
            let stop = match stop { 0 => None, 1 => Some(Stop::Success), _ => Some(Stop::Failure) };
            h.set_data(data.len(), stop);
            let len = data_message_len(data.len()).unwrap();
            let mut buf = vec![0xEEu8; 1088];
            prop_assert_eq!(h.encode(&data, len, &mut buf), Some(len));
            let m = Message::parse(&buf[..len]).unwrap();
            prop_assert_eq!(m.header, h);
            prop_assert_eq!(m.header.stop(), stop);
            prop_assert_eq!(m.data, Some(&data[..]));
        }
    }
}
