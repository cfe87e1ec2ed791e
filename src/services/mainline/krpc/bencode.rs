//! Strict bencode for the KRPC codec: a reader that accepts only the canonical encoding of one
//! value and hands out views of the bytes it was given, and the writer the encoder uses.
//!
//! The reader checks the whole input once ([`parse`]) and allocates nothing. It refuses, as
//! [`Invalid`]: dictionary keys that are unsorted, repeated or not byte strings; integers that
//! are empty, have leading zeros, are `-0` or do not fit an `i64`; string lengths with leading
//! zeros or reaching past the end; containers nested deeper than the limit given; anything
//! after the value; any other byte where a value should start. A checked [`Value`] keeps the
//! exact bytes it was read from ([`Value::raw`]), so a signature can be verified over the bytes
//! received.
//!
//! The writer appends to a `Vec<u8>`; [`DictWriter`] checks (in debug builds) that the keys
//! come in canonical order, since it is the caller who orders them.

/// Bytes that are not exactly one canonical bencoded value within the nesting limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid;

/// One checked, canonical bencoded value: a view of the bytes it was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Value<'a> {
    raw: &'a [u8],
}

/// Checks that `bytes` is exactly one canonical bencoded value, with containers nested at most
/// `max_depth` deep (the outermost one counts), and returns it.
pub fn parse(bytes: &[u8], max_depth: usize) -> Result<Value<'_>, Invalid> {
    if skip(bytes, 0, max_depth)? != bytes.len() {
        return Err(Invalid);
    }
    Ok(Value { raw: bytes })
}

/// Checks the value that starts at `pos` and returns where it ends; `depth` is how many more
/// levels of containers are allowed. Recursion is bounded by `depth`.
fn skip(b: &[u8], pos: usize, depth: usize) -> Result<usize, Invalid> {
    match b.get(pos) {
        Some(b'i') => integer(b, pos).map(|(_, end)| end),
        Some(b'0'..=b'9') => string(b, pos).map(|(_, end)| end),
        Some(b'l') => {
            let depth = depth.checked_sub(1).ok_or(Invalid)?;
            let mut p = pos + 1;
            while b.get(p) != Some(&b'e') {
                p = skip(b, p, depth)?;
            }
            Ok(p + 1)
        }
        Some(b'd') => {
            let depth = depth.checked_sub(1).ok_or(Invalid)?;
            let mut p = pos + 1;
            let mut last: Option<&[u8]> = None;
            while b.get(p) != Some(&b'e') {
                let (key, after) = string(b, p)?;
                if last.is_some_and(|l| l >= key) {
                    return Err(Invalid);
                }
                last = Some(key);
                p = skip(b, after, depth)?;
            }
            Ok(p + 1)
        }
        _ => Err(Invalid),
    }
}

/// Reads the integer `i...e` at `pos`: its value and where it ends.
fn integer(b: &[u8], pos: usize) -> Result<(i64, usize), Invalid> {
    let mut p = pos + 1;
    let negative = b.get(p) == Some(&b'-');
    if negative {
        p += 1;
    }
    let first = p;
    let mut n: i64 = 0;
    while let Some(&c @ b'0'..=b'9') = b.get(p) {
        let digit = i64::from(c - b'0');
        n = n.checked_mul(10).ok_or(Invalid)?;
        // Accumulated on the side of its sign, so that i64::MIN fits.
        n = if negative {
            n.checked_sub(digit)
        } else {
            n.checked_add(digit)
        }
        .ok_or(Invalid)?;
        p += 1;
    }
    let digits = p - first;
    // At least one digit; no leading zero; no `-0`.
    if digits == 0 || (b[first] == b'0' && (digits > 1 || negative)) || b.get(p) != Some(&b'e') {
        return Err(Invalid);
    }
    Ok((n, p + 1))
}

/// Reads the byte string `len:bytes` at `pos`: its content and where it ends.
fn string(b: &[u8], pos: usize) -> Result<(&[u8], usize), Invalid> {
    let mut p = pos;
    let mut len: usize = 0;
    while let Some(&c @ b'0'..=b'9') = b.get(p) {
        len = len
            .checked_mul(10)
            .and_then(|l| l.checked_add(usize::from(c - b'0')))
            .ok_or(Invalid)?;
        p += 1;
    }
    let digits = p - pos;
    if digits == 0 || (b[pos] == b'0' && digits > 1) || b.get(p) != Some(&b':') {
        return Err(Invalid);
    }
    let start = p + 1;
    let end = start.checked_add(len).ok_or(Invalid)?;
    let content = b.get(start..end).ok_or(Invalid)?;
    Ok((content, end))
}

impl<'a> Value<'a> {
    /// The bytes this value was read from, exactly.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// Its value, if it is an integer.
    pub fn int(&self) -> Option<i64> {
        (self.raw.first() == Some(&b'i'))
            .then(|| integer(self.raw, 0).ok().map(|(n, _)| n))
            .flatten()
    }

    /// Its content, if it is a byte string.
    pub fn bytes(&self) -> Option<&'a [u8]> {
        matches!(self.raw.first(), Some(b'0'..=b'9'))
            .then(|| string(self.raw, 0).ok().map(|(s, _)| s))
            .flatten()
    }

    /// Its items, if it is a list.
    pub fn list(&self) -> Option<Items<'a>> {
        self.inner(b'l').map(|rest| Items { rest })
    }

    /// Its entries in key order, if it is a dictionary.
    pub fn dict(&self) -> Option<Entries<'a>> {
        self.inner(b'd').map(|rest| Entries { rest })
    }

    /// What lies between a container's opening byte `open` and its `e`.
    fn inner(&self, open: u8) -> Option<&'a [u8]> {
        match self.raw {
            [o, inner @ .., b'e'] if *o == open => Some(inner),
            _ => None,
        }
    }
}

/// The items of a checked list, in order.
#[derive(Debug, Clone)]
pub struct Items<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Items<'a> {
    type Item = Value<'a>;

    fn next(&mut self) -> Option<Value<'a>> {
        // The bytes were checked by `parse` (nesting included), so `skip` cannot fail here.
        let end = skip(self.rest, 0, usize::MAX).ok()?;
        let (raw, rest) = self.rest.split_at(end);
        self.rest = rest;
        Some(Value { raw })
    }
}

/// The entries of a checked dictionary: each key's content and its value, in key order.
#[derive(Debug, Clone)]
pub struct Entries<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Entries<'a> {
    type Item = (&'a [u8], Value<'a>);

    fn next(&mut self) -> Option<(&'a [u8], Value<'a>)> {
        // As for `Items`: checked already, so neither call can fail.
        let (key, start) = string(self.rest, 0).ok()?;
        let end = skip(self.rest, start, usize::MAX).ok()?;
        let raw = &self.rest[start..end];
        self.rest = &self.rest[end..];
        Some((key, Value { raw }))
    }
}

/// Appends the decimal digits of `n`.
fn put_decimal(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    out.extend_from_slice(crate::netstring::decimal(n, &mut digits));
}

/// Appends the header of a byte string of `len` bytes (`len:`); the caller appends the bytes.
pub fn put_string_header(out: &mut Vec<u8>, len: usize) {
    put_decimal(out, len as u64);
    out.push(b':');
}

/// Appends the byte string `b`.
pub fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_string_header(out, b.len());
    out.extend_from_slice(b);
}

/// Appends the integer `n`.
pub fn put_int(out: &mut Vec<u8>, n: i64) {
    out.push(b'i');
    if n < 0 {
        out.push(b'-');
    }
    put_decimal(out, n.unsigned_abs());
    out.push(b'e');
}

/// Writes one dictionary: `d`, then each [`key`](DictWriter::key) followed by the value the
/// caller appends, then `e` on [`end`](DictWriter::end).
#[derive(Debug)]
pub struct DictWriter<'o> {
    out: &'o mut Vec<u8>,
    last: Option<&'static [u8]>,
}

impl<'o> DictWriter<'o> {
    /// Opens a dictionary at the end of `out`.
    pub fn begin(out: &'o mut Vec<u8>) -> DictWriter<'o> {
        out.push(b'd');
        DictWriter { out, last: None }
    }

    /// Appends `key` (which must sort after the previous key) and returns the output for its
    /// value, which the caller appends next.
    pub fn key(&mut self, key: &'static [u8]) -> &mut Vec<u8> {
        debug_assert!(
            self.last.is_none_or(|l| l < key),
            "bencode keys out of order"
        );
        self.last = Some(key);
        put_bytes(self.out, key);
        self.out
    }

    /// Closes the dictionary.
    pub fn end(self) {
        self.out.push(b'e');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// An owned value, to generate canonical encodings from.
    #[derive(Debug, Clone)]
    enum Owned {
        Int(i64),
        Bytes(Vec<u8>),
        List(Vec<Owned>),
        Dict(BTreeMap<Vec<u8>, Owned>),
    }

    /// The canonical encoding of `v` (a `BTreeMap` iterates in key order).
    fn encode(v: &Owned, out: &mut Vec<u8>) {
        match v {
            Owned::Int(n) => put_int(out, *n),
            Owned::Bytes(b) => put_bytes(out, b),
            Owned::List(l) => {
                out.push(b'l');
                l.iter().for_each(|i| encode(i, out));
                out.push(b'e');
            }
            Owned::Dict(d) => {
                out.push(b'd');
                for (k, v) in d {
                    put_bytes(out, k);
                    encode(v, out);
                }
                out.push(b'e');
            }
        }
    }

    /// Rebuilds the encoding of a checked value from its parts, through the views only.
    fn reencode(v: Value<'_>, out: &mut Vec<u8>) {
        if let Some(n) = v.int() {
            put_int(out, n);
        } else if let Some(b) = v.bytes() {
            put_bytes(out, b);
        } else if let Some(items) = v.list() {
            out.push(b'l');
            items.for_each(|i| reencode(i, out));
            out.push(b'e');
        } else {
            let entries = v.dict().expect("a value is one of the four");
            out.push(b'd');
            for (k, v) in entries {
                put_bytes(out, k);
                reencode(v, out);
            }
            out.push(b'e');
        }
    }

    fn owned() -> impl Strategy<Value = Owned> {
        let leaf = prop_oneof![
            any::<i64>().prop_map(Owned::Int),
            prop::collection::vec(any::<u8>(), 0..12).prop_map(Owned::Bytes),
        ];
        leaf.prop_recursive(6, 48, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Owned::List),
                prop::collection::btree_map(prop::collection::vec(any::<u8>(), 0..4), inner, 0..5)
                    .prop_map(Owned::Dict),
            ]
        })
    }

    fn depth(v: &Owned) -> usize {
        match v {
            Owned::Int(_) | Owned::Bytes(_) => 0,
            Owned::List(l) => 1 + l.iter().map(depth).max().unwrap_or(0),
            Owned::Dict(d) => 1 + d.values().map(depth).max().unwrap_or(0),
        }
    }

    #[test]
    fn known_forms() {
        let d = parse(b"d1:ai-12e1:bl0:4:spamee", 2).unwrap();
        let mut e = d.dict().unwrap();
        let (k, a) = e.next().unwrap();
        assert_eq!((k, a.int(), a.raw()), (&b"a"[..], Some(-12), &b"i-12e"[..]));
        let (k, b) = e.next().unwrap();
        assert_eq!((k, b.raw()), (&b"b"[..], &b"l0:4:spame"[..]));
        let items: Vec<_> = b.list().unwrap().map(|i| i.bytes().unwrap()).collect();
        assert_eq!(items, [&b""[..], &b"spam"[..]]);
        assert!(e.next().is_none());
        for (text, n) in [
            (&b"i0e"[..], 0),
            (b"i9223372036854775807e", i64::MAX),
            (b"i-9223372036854775808e", i64::MIN),
        ] {
            assert_eq!(parse(text, 0).unwrap().int(), Some(n));
            let mut out = Vec::new();
            put_int(&mut out, n);
            assert_eq!(out, text);
        }
        // A view is only what it is.
        let s = parse(b"3:abc", 0).unwrap();
        assert_eq!(
            (s.int(), s.list().is_none(), s.dict().is_none()),
            (None, true, true)
        );
    }

    #[test]
    fn non_canonical_and_broken_forms_are_refused() {
        let cases: &[&[u8]] = &[
            b"",
            b"e",
            b"x",
            b" i1e",
            // integers: empty, lone minus, leading zeros, -0, overflow both ways, unterminated
            b"ie",
            b"i-e",
            b"i01e",
            b"i-01e",
            b"i-0e",
            b"i00e",
            b"i9223372036854775808e",
            b"i-9223372036854775809e",
            b"i99999999999999999999999e",
            b"i1",
            b"i+1e",
            b"i1.0e",
            // strings: leading zero, past the end, no colon, length overflowing usize
            b"01:a",
            b"00:",
            b"4:abc",
            b"3abc",
            b"99999999999999999999999:a",
            // dictionaries: unsorted, repeated, non-string key, missing value, unterminated
            b"d1:bi1e1:ai2ee",
            b"d1:ai1e1:ai2ee",
            b"d2:abi1e1:ai2ee",
            b"di1ei2ee",
            b"d1:ae",
            b"d1:ai1e",
            // lists: unterminated, bad item
            b"l",
            b"li1e",
            b"lxe",
            // trailing bytes
            b"i1ei2e",
            b"dee",
            b"3:abce",
        ];
        for c in cases {
            assert_eq!(
                parse(c, 4),
                Err(Invalid),
                "{:?}",
                String::from_utf8_lossy(c)
            );
        }
        // Depth: the outermost container counts.
        assert!(parse(b"llee", 2).is_ok());
        assert_eq!(parse(b"llee", 1), Err(Invalid));
        assert_eq!(parse(b"d1:ad1:bleee", 2), Err(Invalid));
        assert!(parse(b"i1e", 0).is_ok());
        assert_eq!(parse(b"le", 0), Err(Invalid));
        // Deep input far past the limit is refused without deep recursion.
        let mut deep = vec![b'l'; 100_000];
        deep.extend(vec![b'e'; 100_000]);
        assert_eq!(parse(&deep, 12), Err(Invalid));
    }

    proptest! {
        #[test]
        fn canonical_round_trip(v in owned()) {
            let mut bytes = Vec::new();
            encode(&v, &mut bytes);
            let parsed = parse(&bytes, depth(&v)).unwrap();
            prop_assert_eq!(parsed.raw(), &bytes[..]);
            let mut again = Vec::new();
            reencode(parsed, &mut again);
            prop_assert_eq!(&again, &bytes);
            if depth(&v) > 0 {
                prop_assert_eq!(parse(&bytes, depth(&v) - 1), Err(Invalid));
            }
        }

        #[test]
        fn nested_views_are_the_input_slices(v in owned()) {
            let mut bytes = Vec::new();
            encode(&v, &mut bytes);
            let parsed = parse(&bytes, 16).unwrap();
            let base = bytes.as_ptr() as usize;
            let children: Vec<Value<'_>> = match (parsed.list(), parsed.dict()) {
                (Some(items), _) => items.collect(),
                (_, Some(entries)) => entries.map(|(_, v)| v).collect(),
                _ => Vec::new(),
            };
            let mut last_end = 0;
            for c in children {
                // Each child is a sub-slice of the input, in order, and parses alone.
                let start = c.raw().as_ptr() as usize - base;
                prop_assert!(start >= last_end && start + c.raw().len() < bytes.len());
                prop_assert_eq!(&bytes[start..start + c.raw().len()], c.raw());
                prop_assert_eq!(parse(c.raw(), 16).unwrap(), c);
                last_end = start + c.raw().len();
            }
        }

        #[test]
        fn random_and_mutated_bytes_never_panic(
            junk in prop::collection::vec(any::<u8>(), 0..64),
            v in owned(),
            at in any::<usize>(),
            byte in prop::sample::select(&b"0123456789:-ildex"[..]),
        ) {
            let _ = parse(&junk, 12);
            let mut bytes = Vec::new();
            encode(&v, &mut bytes);
            let i = at % bytes.len();
            bytes[i] = byte;
            // Whatever is accepted is canonical: walking it rebuilds the same bytes.
            for b in [&bytes[..], &bytes[..i]] {
                if let Ok(p) = parse(b, 12) {
                    let mut again = Vec::new();
                    reencode(p, &mut again);
                    prop_assert_eq!(&again[..], b);
                }
            }
        }
    }
}
