//! JSON as the JavaScript side sees it, for the signatures of the original's Kademlia messages.
//!
//! The original signs SHA-512 of `JSON.stringify(message)` and its receiver checks the
//! signature over a *re-serialisation* of what it parsed, so both sides must produce the same
//! text from the same value. `serde_json` does not: its maps sort keys (without
//! `preserve_order`), it keeps integers beyond 2^53 exactly and writes `1.0` for a float one.
//! [`JsValue`] is what `JSON.parse` builds and [`JsValue::stringify`] what `JSON.stringify`
//! writes:
//!
//! - objects keep their keys in insertion order, except that keys that are array indices
//!   (`"0"`, `"17"`: canonical decimal integers below 2^32 - 1) come first in ascending numeric
//!   order, as in every JavaScript object; a repeated key keeps its first position and its last
//!   value;
//! - every number is an IEEE double (parsed with correct rounding, as JavaScript does) and is
//!   written as `Number.prototype.toString` writes it (shortest round-trip digits; exponent form
//!   from 1e21 and below 1e-6; `-0` as `0`);
//! - strings are escaped as `JSON.stringify` escapes them: `"`, `\`, `\b \f \n \r \t`, other
//!   control characters as `\u00xx`, nothing else.
//!
//! The parser is bounded: nesting deeper than [`MAX_DEPTH`] is refused (a JS parser would
//! accept it, but no message of the protocol nests that deep).

use std::fmt::Write as _;

/// Deepest nesting of arrays and objects accepted.
pub const MAX_DEPTH: usize = 32;

/// A JSON value with JavaScript's semantics (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub enum JsValue {
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A number (always a double, as in JavaScript).
    Num(f64),
    /// A string.
    Str(String),
    /// An array.
    Arr(Vec<JsValue>),
    /// An object, keys in JavaScript's property order.
    Obj(Vec<(String, JsValue)>),
}

impl JsValue {
    /// An empty object.
    pub fn obj() -> JsValue {
        JsValue::Obj(Vec::new())
    }

    /// Sets `key` as a JavaScript assignment does (an existing key keeps its position).
    pub fn set(&mut self, key: &str, value: JsValue) {
        if let JsValue::Obj(entries) = self {
            if let Some(e) = entries.iter_mut().find(|(k, _)| k == key) {
                e.1 = value;
                return;
            }
            let at = if let Some(idx) = array_index(key) {
                entries
                    .iter()
                    .position(|(k, _)| array_index(k).is_none_or(|i| i > idx))
                    .unwrap_or(entries.len())
            } else {
                entries.len()
            };
            entries.insert(at, (key.to_owned(), value));
        }
    }

    /// `self` with `key` set (builder style).
    pub fn with(mut self, key: &str, value: JsValue) -> JsValue {
        self.set(key, value);
        self
    }

    /// Removes `key` (JavaScript's `delete`), returning its value.
    pub fn remove(&mut self, key: &str) -> Option<JsValue> {
        if let JsValue::Obj(entries) = self {
            if let Some(i) = entries.iter().position(|(k, _)| k == key) {
                return Some(entries.remove(i).1);
            }
        }
        None
    }

    /// The value at `key` of an object.
    pub fn get(&self, key: &str) -> Option<&JsValue> {
        match self {
            JsValue::Obj(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            JsValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The number, if this is one.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            JsValue::Num(n) => Some(*n),
            _ => None,
        }
    }

    /// JavaScript truthiness (`!!value`).
    pub fn truthy(&self) -> bool {
        match self {
            JsValue::Null => false,
            JsValue::Bool(b) => *b,
            JsValue::Num(n) => *n != 0.0 && !n.is_nan(),
            JsValue::Str(s) => !s.is_empty(),
            JsValue::Arr(_) | JsValue::Obj(_) => true,
        }
    }

    /// `JSON.stringify(value)`.
    pub fn stringify(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) {
        match self {
            JsValue::Null => out.push_str("null"),
            JsValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            JsValue::Num(n) => write_number(*n, out),
            JsValue::Str(s) => write_string(s, out),
            JsValue::Arr(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    v.write(out);
                }
                out.push(']');
            }
            JsValue::Obj(entries) => {
                out.push('{');
                for (i, (k, v)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_string(k, out);
                    out.push(':');
                    v.write(out);
                }
                out.push('}');
            }
        }
    }

    /// `JSON.parse(text)` (bounded to [`MAX_DEPTH`] levels). `None` on any error.
    pub fn parse(text: &[u8]) -> Option<JsValue> {
        let text = std::str::from_utf8(text).ok()?;
        let mut p = Parser {
            s: text.as_bytes(),
            i: 0,
        };
        p.ws();
        let v = p.value(0)?;
        p.ws();
        (p.i == p.s.len()).then_some(v)
    }

    /// Converts from a `serde_json` value (object keys in that value's iteration order, then
    /// JavaScript's array-index rule).
    pub fn from_serde(v: &serde_json::Value) -> JsValue {
        match v {
            serde_json::Value::Null => JsValue::Null,
            serde_json::Value::Bool(b) => JsValue::Bool(*b),
            serde_json::Value::Number(n) => JsValue::Num(n.as_f64().unwrap_or(0.0)),
            serde_json::Value::String(s) => JsValue::Str(s.clone()),
            serde_json::Value::Array(a) => {
                JsValue::Arr(a.iter().map(JsValue::from_serde).collect())
            }
            serde_json::Value::Object(m) => {
                let mut o = JsValue::obj();
                for (k, v) in m {
                    o.set(k, JsValue::from_serde(v));
                }
                o
            }
        }
    }

    /// Converts to a `serde_json` value (integral numbers that fit become integers).
    pub fn to_serde(&self) -> serde_json::Value {
        match self {
            JsValue::Null => serde_json::Value::Null,
            JsValue::Bool(b) => serde_json::Value::Bool(*b),
            JsValue::Num(n) => {
                if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
                    serde_json::Value::from(*n as i64)
                } else {
                    serde_json::Number::from_f64(*n)
                        .map_or(serde_json::Value::Null, serde_json::Value::Number)
                }
            }
            JsValue::Str(s) => serde_json::Value::String(s.clone()),
            JsValue::Arr(a) => serde_json::Value::Array(a.iter().map(JsValue::to_serde).collect()),
            JsValue::Obj(entries) => serde_json::Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_serde()))
                    .collect(),
            ),
        }
    }
}

/// The index of an array-index key (`"0"`..`"4294967294"`, canonical form), else `None`.
fn array_index(key: &str) -> Option<u32> {
    if key.is_empty() || key.len() > 10 || (key.len() > 1 && key.starts_with('0')) {
        return None;
    }
    if !key.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = key.parse().ok()?;
    (n < u64::from(u32::MAX)).then_some(n as u32)
}

fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `Number.prototype.toString()` of a finite double (ECMA-262 Number::toString, radix 10).
fn write_number(n: f64, out: &mut String) {
    if n == 0.0 || !n.is_finite() {
        // -0 prints as 0; NaN and infinities cannot come from JSON and stringify as null.
        out.push_str(if n.is_finite() { "0" } else { "null" });
        return;
    }
    if n < 0.0 {
        out.push('-');
    }
    // Rust's `{:e}` gives the shortest digits that round-trip, as JavaScript requires.
    let sci = format!("{:e}", n.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let e: i32 = exp.parse().unwrap_or(0);
    let k = digits.len() as i32;
    let point = e + 1; // ECMA's n: the decimal point's position after the first digit
    if k <= point && point <= 21 {
        out.push_str(&digits);
        out.extend(std::iter::repeat_n('0', (point - k) as usize));
    } else if 0 < point && point <= 21 {
        out.push_str(&digits[..point as usize]);
        out.push('.');
        out.push_str(&digits[point as usize..]);
    } else if -6 < point && point <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-point) as usize));
        out.push_str(&digits);
    } else {
        out.push_str(&digits[..1]);
        if k > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        out.push('e');
        out.push(if point > 0 { '+' } else { '-' });
        let _ = write!(out, "{}", (point - 1).abs());
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.s.get(self.i) {
            self.i += 1;
        }
    }

    fn eat(&mut self, lit: &[u8]) -> Option<()> {
        if self.s[self.i..].starts_with(lit) {
            self.i += lit.len();
            Some(())
        } else {
            None
        }
    }

    fn value(&mut self, depth: usize) -> Option<JsValue> {
        if depth > MAX_DEPTH {
            return None;
        }
        match *self.s.get(self.i)? {
            b'n' => self.eat(b"null").map(|_| JsValue::Null),
            b't' => self.eat(b"true").map(|_| JsValue::Bool(true)),
            b'f' => self.eat(b"false").map(|_| JsValue::Bool(false)),
            b'"' => self.string().map(JsValue::Str),
            b'[' => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.eat(b"]").is_some() {
                    return Some(JsValue::Arr(items));
                }
                loop {
                    self.ws();
                    items.push(self.value(depth + 1)?);
                    self.ws();
                    match *self.s.get(self.i)? {
                        b',' => self.i += 1,
                        b']' => {
                            self.i += 1;
                            return Some(JsValue::Arr(items));
                        }
                        _ => return None,
                    }
                }
            }
            b'{' => {
                self.i += 1;
                let mut obj = JsValue::obj();
                self.ws();
                if self.eat(b"}").is_some() {
                    return Some(obj);
                }
                loop {
                    self.ws();
                    let key = self.string()?;
                    self.ws();
                    self.eat(b":")?;
                    self.ws();
                    let v = self.value(depth + 1)?;
                    obj.set(&key, v);
                    self.ws();
                    match *self.s.get(self.i)? {
                        b',' => self.i += 1,
                        b'}' => {
                            self.i += 1;
                            return Some(obj);
                        }
                        _ => return None,
                    }
                }
            }
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn number(&mut self) -> Option<JsValue> {
        let start = self.i;
        if self.s.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        match self.s.get(self.i)? {
            b'0' => self.i += 1,
            b'1'..=b'9' => {
                while matches!(self.s.get(self.i), Some(b'0'..=b'9')) {
                    self.i += 1;
                }
            }
            _ => return None,
        }
        if self.s.get(self.i) == Some(&b'.') {
            self.i += 1;
            if !matches!(self.s.get(self.i), Some(b'0'..=b'9')) {
                return None;
            }
            while matches!(self.s.get(self.i), Some(b'0'..=b'9')) {
                self.i += 1;
            }
        }
        if matches!(self.s.get(self.i), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.s.get(self.i), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if !matches!(self.s.get(self.i), Some(b'0'..=b'9')) {
                return None;
            }
            while matches!(self.s.get(self.i), Some(b'0'..=b'9')) {
                self.i += 1;
            }
        }
        let text = std::str::from_utf8(&self.s[start..self.i]).ok()?;
        text.parse::<f64>().ok().map(JsValue::Num)
    }

    fn hex4(&mut self) -> Option<u32> {
        let h = self.s.get(self.i..self.i + 4)?;
        let v = u32::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()?;
        self.i += 4;
        Some(v)
    }

    fn string(&mut self) -> Option<String> {
        self.eat(b"\"")?;
        let mut out = String::new();
        loop {
            let start = self.i;
            while let Some(&b) = self.s.get(self.i) {
                if b == b'"' || b == b'\\' || b < 0x20 {
                    break;
                }
                self.i += 1;
            }
            out.push_str(std::str::from_utf8(&self.s[start..self.i]).ok()?);
            match *self.s.get(self.i)? {
                b'"' => {
                    self.i += 1;
                    return Some(out);
                }
                b'\\' => {
                    self.i += 1;
                    let c = *self.s.get(self.i)?;
                    self.i += 1;
                    match c {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let hi = self.hex4()?;
                            let code = if (0xd800..0xdc00).contains(&hi) {
                                // A surrogate pair; a lone surrogate cannot be held in a Rust
                                // string, and no message of the protocol needs one: refused.
                                self.eat(b"\\u")?;
                                let lo = self.hex4()?;
                                if !(0xdc00..0xe000).contains(&lo) {
                                    return None;
                                }
                                0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
                            } else {
                                hi
                            };
                            out.push(char::from_u32(code)?);
                        }
                        _ => return None,
                    }
                }
                _ => return None, // raw control character
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(text: &str) -> String {
        JsValue::parse(text.as_bytes()).unwrap().stringify()
    }

    #[test]
    fn numbers_print_as_javascript_prints_them() {
        // Each right-hand side is what node 20 prints for JSON.stringify(JSON.parse(lhs)).
        for (i, o) in [
            ("1.0", "1"),
            ("1e21", "1e+21"),
            ("1e20", "100000000000000000000"),
            ("123456789012345678901", "123456789012345680000"),
            ("0.000001", "0.000001"),
            ("0.0000001", "1e-7"),
            ("1.5e-7", "1.5e-7"),
            ("-0", "0"),
            ("-12.50", "-12.5"),
            ("12345678901234567890", "12345678901234567000"),
            ("1733000000000", "1733000000000"),
            ("2.5E+30", "2.5e+30"),
            ("0.1", "0.1"),
        ] {
            assert_eq!(round(i), o, "{i}");
        }
    }

    #[test]
    fn keys_keep_javascript_order() {
        assert_eq!(
            round(r#"{"b":1,"a":2,"10":3,"2":4,"b":5,"01":6}"#),
            r#"{"2":4,"10":3,"b":5,"a":2,"01":6}"#
        );
    }

    #[test]
    fn strings_escape_as_javascript_does() {
        assert_eq!(
            round(r#""a\/b\u0001\u001f\n\"é\u00e9\ud83d\ude00""#),
            "\"a/b\\u0001\\u001f\\n\\\"éé😀\""
        );
        assert!(JsValue::parse(br#""\ud800""#).is_none());
        assert!(JsValue::parse(b"[1,]").is_none());
        assert!(JsValue::parse(b"01").is_none());
        let deep = "[".repeat(MAX_DEPTH + 2) + &"]".repeat(MAX_DEPTH + 2);
        assert!(JsValue::parse(deep.as_bytes()).is_none());
    }
}
