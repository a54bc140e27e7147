//! `strftime_now` for templates (UTC).
use super::*;

// ---------------------------------------------------------------------------------------
// strftime_now(fmt): Python's datetime.now().strftime(fmt), in UTC.

pub(super) fn strftime_now(fmt: String) -> Result<JValue, Error> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(JValue::from(strftime_utc(
        &fmt,
        now.as_secs() as i64,
        now.subsec_micros(),
    )))
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    // Howard Hinnant's days -> (y, m, d)
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

pub(crate) fn strftime_utc(fmt: &str, unix_secs: i64, micros: u32) -> String {
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let wd = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday; 0 = Monday
    let is_leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(m - 1) as usize] + d + u32::from(is_leap && m > 2);
    let h12 = if hh % 12 == 0 { 12 } else { hh % 12 };

    let mut out = String::new();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let Some(spec) = chars.next() else {
            out.push('%');
            break;
        };
        let num = |n: i64, w: usize| {
            if no_pad {
                n.to_string()
            } else {
                format!("{n:0w$}")
            }
        };
        let s = match spec {
            'Y' => y.to_string(),
            'y' => num(y.rem_euclid(100), 2),
            'm' => num(m as i64, 2),
            'd' => num(d as i64, 2),
            'e' => format!("{d:>2}"),
            'H' => num(hh, 2),
            'I' => num(h12, 2),
            'M' => num(mm, 2),
            'S' => num(ss, 2),
            'f' => format!("{micros:06}"),
            'j' => num(yday as i64, 3),
            'p' => (if hh < 12 { "AM" } else { "PM" }).to_owned(),
            'b' | 'h' => MONTHS[(m - 1) as usize][..3].to_owned(),
            'B' => MONTHS[(m - 1) as usize].to_owned(),
            'a' => DAYS[wd][..3].to_owned(),
            'A' => DAYS[wd].to_owned(),
            'w' => ((wd + 1) % 7).to_string(),
            'u' => (wd + 1).to_string(),
            'Z' => "UTC".to_owned(),
            'z' => "+0000".to_owned(),
            'F' => format!("{y}-{m:02}-{d:02}"),
            'D' => format!("{m:02}/{d:02}/{:02}", y.rem_euclid(100)),
            'T' => format!("{hh:02}:{mm:02}:{ss:02}"),
            'R' => format!("{hh:02}:{mm:02}"),
            'c' => format!(
                "{} {} {d:>2} {hh:02}:{mm:02}:{ss:02} {y}",
                &DAYS[wd][..3],
                &MONTHS[(m - 1) as usize][..3]
            ),
            'x' => format!("{m:02}/{d:02}/{:02}", y.rem_euclid(100)),
            'X' => format!("{hh:02}:{mm:02}:{ss:02}"),
            '%' => "%".to_owned(),
            other => format!("%{}{other}", if no_pad { "-" } else { "" }),
        };
        out.push_str(&s);
    }
    out
}
