//! DNS messages from the guest's traffic, parsed as hostile input (pure).
//!
//! The guest is malware: every length, count and compression pointer is checked. A name
//! must be at most 255 bytes on the wire and its labels at most 63 bytes of letters,
//! digits, `-`, `_` or `*`; a compression pointer must point before every byte of the
//! name read so far (so each jump goes strictly backwards and no loop is possible), and
//! at most 32 may be followed. A message that breaks a rule is an
//! error naming the rule; the caller counts it and goes on. A message is never read past
//! its end, and nothing grows with the input beyond the answers kept (at most
//! [`MAX_ANSWERS`]).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Answers kept per message (A, AAAA and CNAME targets); more are counted, not kept.
pub const MAX_ANSWERS: usize = 32;
const MAX_NAME: usize = 255;
const MAX_POINTERS: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsMessage {
    pub id: u16,
    pub is_response: bool,
    pub opcode: u8,
    pub rcode: u8,
    /// The first question's name (lower-cased, no trailing dot; "." for the root), and
    /// type. None when the message has no question.
    pub qname: Option<String>,
    pub qtype: Option<u16>,
    /// Addresses (A, AAAA) and names (CNAME) of the answer section, in order.
    pub answers: Vec<String>,
    /// Answers beyond [`MAX_ANSWERS`].
    pub answers_not_kept: u16,
}

/// Why a message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsError {
    /// Shorter than the 12-byte header.
    ShortHeader,
    /// A section ends before its records do.
    Truncated,
    NameTooLong,
    /// A label byte outside letters, digits, `-`, `_`, `*`.
    BadLabelByte,
    /// A compression pointer to itself or forward (a loop), or too many pointers.
    PointerLoop,
    /// The label type bits 01 or 10 (reserved; a length byte of 64 to 191, so no label
    /// is longer than 63 bytes).
    BadLabelType,
}

impl DnsError {
    /// The name used in meta.sources[dns].malformed.
    pub fn as_str(self) -> &'static str {
        match self {
            DnsError::ShortHeader => "short_header",
            DnsError::Truncated => "truncated",
            DnsError::NameTooLong => "name_too_long",
            DnsError::BadLabelByte => "bad_label_byte",
            DnsError::PointerLoop => "pointer_loop",
            DnsError::BadLabelType => "bad_label_type",
        }
    }
}

impl fmt::Display for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn u16_at(m: &[u8], at: usize) -> Result<u16, DnsError> {
    match m.get(at..at + 2) {
        Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
        None => Err(DnsError::Truncated),
    }
}

/// Read the name at `at`; returns it and the offset after it (after the first pointer,
/// if the name used one).
fn name_at(m: &[u8], mut at: usize) -> Result<(String, usize), DnsError> {
    let mut out = String::new();
    let mut wire = 0usize;
    let mut end = None;
    let mut pointers = 0;
    // The earliest offset of the name read so far.
    let mut lowest = at;
    loop {
        let len = *m.get(at).ok_or(DnsError::Truncated)? as usize;
        match len >> 6 {
            0 => {}
            3 => {
                let target = (u16_at(m, at)? & 0x3fff) as usize;
                pointers += 1;
                // Only before everything read so far: the jumps strictly decrease, so
                // they end.
                if target >= lowest || pointers > MAX_POINTERS {
                    return Err(DnsError::PointerLoop);
                }
                end.get_or_insert(at + 2);
                at = target;
                lowest = target;
                continue;
            }
            _ => return Err(DnsError::BadLabelType),
        }
        if len == 0 {
            wire += 1;
            if wire > MAX_NAME {
                return Err(DnsError::NameTooLong);
            }
            let next = end.unwrap_or(at + 1);
            if out.is_empty() {
                out.push('.');
            }
            return Ok((out, next));
        }
        wire += len + 1;
        if wire > MAX_NAME {
            return Err(DnsError::NameTooLong);
        }
        let label = m.get(at + 1..at + 1 + len).ok_or(DnsError::Truncated)?;
        if !out.is_empty() {
            out.push('.');
        }
        for &b in label {
            if !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'*') {
                return Err(DnsError::BadLabelByte);
            }
            out.push(b.to_ascii_lowercase() as char);
        }
        at += 1 + len;
    }
}

/// Parse one DNS message (without TCP's 2-byte length prefix).
pub fn parse(m: &[u8]) -> Result<DnsMessage, DnsError> {
    if m.len() < 12 {
        return Err(DnsError::ShortHeader);
    }
    let id = u16_at(m, 0)?;
    let flags = u16_at(m, 2)?;
    let qdcount = u16_at(m, 4)?;
    let ancount = u16_at(m, 6)?;
    let mut msg = DnsMessage {
        id,
        is_response: flags & 0x8000 != 0,
        opcode: ((flags >> 11) & 0x0f) as u8,
        rcode: (flags & 0x0f) as u8,
        qname: None,
        qtype: None,
        answers: Vec::new(),
        answers_not_kept: 0,
    };
    let mut at = 12;
    for i in 0..qdcount {
        let (name, next) = name_at(m, at)?;
        let qtype = u16_at(m, next)?;
        u16_at(m, next + 2)?; // class
        if i == 0 {
            msg.qname = Some(name);
            msg.qtype = Some(qtype);
        }
        at = next + 4;
    }
    for _ in 0..ancount {
        let (_, next) = name_at(m, at)?;
        let rtype = u16_at(m, next)?;
        let rdlen = u16_at(m, next + 8)? as usize;
        let rdata_at = next + 10;
        let rdata = m
            .get(rdata_at..rdata_at + rdlen)
            .ok_or(DnsError::Truncated)?;
        let answer = match (rtype, rdlen) {
            (1, 4) => Some(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]).to_string()),
            (28, 16) => {
                let mut a = [0u8; 16];
                a.copy_from_slice(rdata);
                Some(Ipv6Addr::from(a).to_string())
            }
            (5, _) => Some(name_at(m, rdata_at)?.0),
            _ => None,
        };
        if let Some(a) = answer {
            if msg.answers.len() < MAX_ANSWERS {
                msg.answers.push(a);
            } else {
                msg.answers_not_kept = msg.answers_not_kept.saturating_add(1);
            }
        }
        at = rdata_at + rdlen;
    }
    Ok(msg)
}

/// The name of a query type where it is a common one (else the number is the data).
pub fn qtype_name(t: u16) -> Option<&'static str> {
    Some(match t {
        1 => "A",
        2 => "NS",
        5 => "CNAME",
        6 => "SOA",
        12 => "PTR",
        15 => "MX",
        16 => "TXT",
        28 => "AAAA",
        33 => "SRV",
        64 => "SVCB",
        65 => "HTTPS",
        255 => "ANY",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for l in name.split('.') {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.extend_from_slice(&[0]);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&[0, 1]);
        q
    }

    /// The query answered: QR set, one A and one CNAME answer using compression.
    fn response(id: u16, name: &str) -> Vec<u8> {
        let mut r = query(id, name, 1);
        r[2] = 0x81;
        r[3] = 0x80;
        r[7] = 2; // ancount
                  // CNAME pointing at the question name (pointer 0xc00c), target "cdn" + pointer.
        r.extend_from_slice(&[0xc0, 0x0c, 0, 5, 0, 1, 0, 0, 0, 60, 0, 6]);
        r.extend_from_slice(&[3, b'c', b'd', b'n', 0xc0, 0x0c]);
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 77, 0, 99]);
        r
    }

    #[test]
    fn queries_and_responses_parse() {
        let q = parse(&query(0x1234, "Evil-C2.example.TEST", 28)).unwrap();
        assert_eq!(q.id, 0x1234);
        assert!(!q.is_response);
        assert_eq!(q.qname.as_deref(), Some("evil-c2.example.test"));
        assert_eq!(q.qtype, Some(28));
        assert!(q.answers.is_empty());
        let r = parse(&response(7, "one.test")).unwrap();
        assert!(r.is_response);
        assert_eq!(r.rcode, 0);
        assert_eq!(
            r.answers,
            vec!["cdn.one.test".to_owned(), "10.77.0.99".to_owned()]
        );
        assert_eq!(qtype_name(28), Some("AAAA"));
    }

    #[test]
    fn hostile_messages_are_refused_with_the_rule_they_break() {
        assert_eq!(parse(&[0; 11]), Err(DnsError::ShortHeader));
        // An answer promised and missing (the test peer's `bad.test` response).
        let mut r = query(1, "bad.test", 1);
        r[2] = 0x81;
        r[7] = 1;
        assert_eq!(parse(&r), Err(DnsError::Truncated));
        // A pointer to itself, and a pointer forward.
        let mut p = query(1, "a", 1);
        p.truncate(12);
        p.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(parse(&p), Err(DnsError::PointerLoop));
        let mut p = query(1, "a", 1);
        p.truncate(12);
        p.extend_from_slice(&[0xc0, 20, 0, 1, 0, 1, 0, 0, 1, b'x', 0]);
        assert_eq!(parse(&p), Err(DnsError::PointerLoop));
        // A label, then a pointer back to that label: it would loop forever.
        let mut p = query(1, "a", 1);
        p.truncate(12);
        p.extend_from_slice(&[1, b'x', 0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(parse(&p), Err(DnsError::PointerLoop));
        // A label of 64 bytes (its length byte has the reserved type bits 01); a name of
        // more than 255.
        let long = "x".repeat(64);
        assert_eq!(parse(&query(1, &long, 1)), Err(DnsError::BadLabelType));
        let name = vec!["y".repeat(63); 5].join(".");
        assert_eq!(parse(&query(1, &name, 1)), Err(DnsError::NameTooLong));
        // Bytes no host name has.
        assert_eq!(parse(&query(1, "a b.test", 1)), Err(DnsError::BadLabelByte));
        assert_eq!(
            parse(&query(1, "a\u{7f}.test", 1)),
            Err(DnsError::BadLabelByte)
        );
        // Reserved label types.
        let mut p = query(1, "a", 1);
        p[12] = 0x41;
        assert_eq!(parse(&p), Err(DnsError::BadLabelType));
        // A huge qdcount with one question: truncated, not a long loop on nothing.
        let mut p = query(1, "a.test", 1);
        p[4] = 0xff;
        p[5] = 0xff;
        assert_eq!(parse(&p), Err(DnsError::Truncated));
    }

    #[test]
    fn answers_kept_are_bounded() {
        let mut r = query(1, "many.test", 1);
        r[2] = 0x81;
        let n: u16 = 40;
        r[6..8].copy_from_slice(&n.to_be_bytes());
        for i in 0..n {
            r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 0, 0, i as u8]);
        }
        let m = parse(&r).unwrap();
        assert_eq!(m.answers.len(), MAX_ANSWERS);
        assert_eq!(m.answers_not_kept, n - MAX_ANSWERS as u16);
    }

    #[test]
    fn every_prefix_of_a_response_is_refused_or_parsed_never_a_panic() {
        let r = response(9, "prefix.test");
        for cut in 0..r.len() {
            let _ = parse(&r[..cut]);
        }
        assert!(parse(&r).is_ok());
    }
}
