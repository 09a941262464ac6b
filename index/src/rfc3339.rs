//! RFC 3339 times as Go writes them (`2006-01-02T15:04:05.999999999Z07:00`),
//! to (seconds, nanoseconds) since the epoch.

/// Days from 1970-01-01 to y-m-d (proleptic Gregorian; Howard Hinnant's
/// days_from_civil).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn num(s: &[u8]) -> Option<u32> {
    if s.is_empty() || s.len() > 9 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// Parse; None if it is not RFC 3339.
pub fn parse(s: &str) -> Option<(i64, u32)> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let year = num(&b[0..4])? as i64;
    let (mon, day) = (num(&b[5..7])?, num(&b[8..10])?);
    let (h, mi, sec) = (num(&b[11..13])?, num(&b[14..16])?, num(&b[17..19])?);
    if !(1..=12).contains(&mon) || !(1..=31).contains(&day) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &b[19..];
    let mut nanos = 0u32;
    if rest.first() == Some(&b'.') {
        let digits = rest[1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 || digits > 9 {
            return None;
        }
        nanos = num(&rest[1..1 + digits])? * 10u32.pow(9 - digits as u32);
        rest = &rest[1 + digits..];
    }
    let offset = match rest {
        [b'Z' | b'z'] => 0i64,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let (oh, om) = (num(&[*h1, *h2])?, num(&[*m1, *m2])?);
            if oh > 23 || om > 59 {
                return None;
            }
            let o = (oh * 3600 + om * 60) as i64;
            if *sign == b'-' {
                -o
            } else {
                o
            }
        }
        _ => return None,
    };
    let days = days_from_civil(year, mon, day);
    let secs = days * 86_400 + (h * 3600 + mi * 60 + sec) as i64 - offset;
    Some((secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn go_formats() {
        assert_eq!(parse("1970-01-01T00:00:00Z"), Some((0, 0)));
        assert_eq!(parse("2026-11-30T05:26:59Z"), Some((1_796_016_419, 0)));
        assert_eq!(
            parse("2009-02-13T23:31:30.5Z"),
            Some((1_234_567_890, 500_000_000))
        );
        assert_eq!(
            parse("2009-02-14T00:31:30.000000001+01:00"),
            Some((1_234_567_890, 1))
        );
        assert_eq!(parse("1969-12-31T23:59:59Z"), Some((-1, 0)));
        assert_eq!(parse("0001-01-01T00:00:00Z"), Some((-62_135_596_800, 0)));
        for bad in [
            "",
            "2009-02-13",
            "2009-02-13T23:31:30",
            "2009-13-13T23:31:30Z",
            "2009-02-13T23:31:30.Z",
            "2009-02-13T23:31:30+0100",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
