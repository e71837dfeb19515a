//! Pure parsers for the /proc files the proc backend reads. No file access here, so every
//! hostile shape (comm with `) (`, newlines, truncated or empty files) is unit-tested.

use crate::error::Error;

/// The fields of `/proc/<pid>/stat` (or `task/<tid>/stat`) that cis490 records. `comm`
/// borrows the text: the collector keeps its own copy and replaces it only when the
/// name changes, so a 1 kHz capture does not allocate a name per thread per tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat<'a> {
    pub pid: u32,
    pub comm: &'a str,
    pub state: char,
    pub minflt: u64,
    pub majflt: u64,
    pub utime_ticks: u64,
    pub stime_ticks: u64,
    pub num_threads: u64,
    pub starttime_ticks: u64,
    pub vsize_bytes: u64,
    pub rss_pages: u64,
    pub processor: Option<u64>,
}

/// Parse a stat line. The comm field may hold spaces, parentheses and even newlines
/// (`prctl(PR_SET_NAME)` accepts any bytes), so it is everything between the first `(`
/// and the LAST `)`; the numeric fields follow that last `)`.
pub fn parse_stat(text: &str) -> Result<Stat<'_>, Error> {
    let open = text
        .find('(')
        .ok_or_else(|| Error::parse("stat", "no '(' before comm"))?;
    let close = text
        .rfind(')')
        .ok_or_else(|| Error::parse("stat", "no ')' after comm"))?;
    if close < open {
        return Err(Error::parse("stat", "')' before '('"));
    }
    let pid = text[..open]
        .trim()
        .parse::<u32>()
        .map_err(|e| Error::parse("stat", format!("pid: {e}")))?;
    let comm = &text[open + 1..close];
    // rest[i] is field i+3 in proc(5) numbering (state is field 3); nothing past
    // `processor` (rest[36]) is used. A fixed array, not a Vec: this runs per thread per tick.
    let mut rest = [""; 37];
    let mut fields = 0;
    for (slot, word) in rest
        .iter_mut()
        .zip(text[close + 1..].split_ascii_whitespace())
    {
        *slot = word;
        fields += 1;
    }
    if fields < 22 {
        return Err(Error::parse(
            "stat",
            format!("{fields} fields after comm, need >= 22"),
        ));
    }
    let num = |i: usize, name: &'static str| -> Result<u64, Error> {
        rest[i]
            .parse::<u64>()
            .map_err(|e| Error::parse("stat", format!("{name} {:?}: {e}", rest[i])))
    };
    let mut state_chars = rest[0].chars();
    let state = match (state_chars.next(), state_chars.next()) {
        (Some(c), None) => c,
        _ => return Err(Error::parse("stat", format!("state {:?}", rest[0]))),
    };
    Ok(Stat {
        pid,
        comm,
        state,
        minflt: num(7, "minflt")?,
        majflt: num(9, "majflt")?,
        utime_ticks: num(11, "utime")?,
        stime_ticks: num(12, "stime")?,
        num_threads: num(17, "num_threads")?,
        starttime_ticks: num(19, "starttime")?,
        vsize_bytes: num(20, "vsize")?,
        rss_pages: num(21, "rss")?,
        processor: (fields > 36).then(|| rest[36].parse().ok()).flatten(),
    })
}

/// A task directory entry's name as a thread id (`.`, `..` and anything else: `None`).
pub fn tid_of(name: &[u8]) -> Option<u32> {
    std::str::from_utf8(name).ok()?.parse().ok()
}

/// `/proc/<pid>/schedstat`: time on CPU, time waiting on a run queue, timeslices run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedStat {
    pub on_cpu_ns: u64,
    pub runqueue_wait_ns: u64,
    pub timeslices: u64,
}

/// A decimal counter (ASCII digits; what procfs prints).
fn number(field: &[u8]) -> Option<u64> {
    std::str::from_utf8(field).ok()?.parse().ok()
}

fn shown(b: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(b))
}

/// `/proc/*/schedstat`, `/proc/*/io` and `/proc/*/status` are parsed as bytes: the values
/// used are ASCII, and skipping UTF-8 validation of ~1.5 KiB of status text per thread per
/// tick is most of what these parsers cost at 1 kHz.
pub fn parse_schedstat(text: &[u8]) -> Result<SchedStat, Error> {
    let mut it = text
        .split(u8::is_ascii_whitespace)
        .filter(|w| !w.is_empty())
        .map(|w| {
            number(w)
                .ok_or_else(|| Error::parse("schedstat", format!("{}: not a counter", shown(w))))
        });
    let mut next = |name: &str| {
        it.next()
            .unwrap_or_else(|| Err(Error::parse("schedstat", format!("missing {name}"))))
    };
    Ok(SchedStat {
        on_cpu_ns: next("on-cpu time")?,
        runqueue_wait_ns: next("run-queue wait")?,
        timeslices: next("timeslices")?,
    })
}

/// `/proc/<pid>/io`. Every field is optional because kernels differ and a thread that is
/// exiting can return a short file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Io {
    pub rchar: Option<u64>,
    pub wchar: Option<u64>,
    pub syscr: Option<u64>,
    pub syscw: Option<u64>,
    pub read_bytes: Option<u64>,
    pub write_bytes: Option<u64>,
    pub cancelled_write_bytes: Option<u64>,
}

pub fn parse_io(text: &[u8]) -> Result<Io, Error> {
    let mut io = Io::default();
    let mut seen = 0;
    for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Err(Error::parse(
                "io",
                format!("line without ':': {}", shown(line)),
            ));
        };
        let (key, value) = (line[..colon].trim_ascii(), line[colon + 1..].trim_ascii());
        let value = number(value).ok_or_else(|| {
            Error::parse(
                "io",
                format!("{}: {} is not a counter", shown(key), shown(value)),
            )
        })?;
        let slot = match key {
            b"rchar" => &mut io.rchar,
            b"wchar" => &mut io.wchar,
            b"syscr" => &mut io.syscr,
            b"syscw" => &mut io.syscw,
            b"read_bytes" => &mut io.read_bytes,
            b"write_bytes" => &mut io.write_bytes,
            b"cancelled_write_bytes" => &mut io.cancelled_write_bytes,
            _ => continue,
        };
        *slot = Some(value);
        seen += 1;
    }
    if seen == 0 {
        return Err(Error::parse("io", "no known field"));
    }
    Ok(io)
}

/// The `/proc/<pid>/status` fields cis490 records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Status {
    pub rss_kb: Option<u64>,
    pub hwm_kb: Option<u64>,
    pub threads: Option<u64>,
    pub voluntary_switches: Option<u64>,
    pub involuntary_switches: Option<u64>,
}

pub fn parse_status(text: &[u8]) -> Result<Status, Error> {
    let mut st = Status::default();
    let mut seen = 0;
    for line in text.split(|&b| b == b'\n') {
        // Five keys out of ~55 lines: most lines are passed over on their first byte.
        if !matches!(line.first(), Some(b'V' | b'T' | b'v' | b'n')) {
            continue;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (key, value) = line.split_at(colon);
        let slot = match key {
            b"VmRSS" => &mut st.rss_kb,
            b"VmHWM" => &mut st.hwm_kb,
            b"Threads" => &mut st.threads,
            b"voluntary_ctxt_switches" => &mut st.voluntary_switches,
            b"nonvoluntary_ctxt_switches" => &mut st.involuntary_switches,
            _ => continue,
        };
        let value = value[1..].trim_ascii();
        let value = value.strip_suffix(b"kB").unwrap_or(value).trim_ascii();
        *slot = Some(number(value).ok_or_else(|| {
            Error::parse(
                "status",
                format!("{}: {} is not a number", shown(key), shown(value)),
            )
        })?);
        seen += 1;
    }
    if seen == 0 {
        return Err(Error::parse("status", "no known field"));
    }
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/qemu-10.0.2");

    fn fixture(rel: &str) -> String {
        std::fs::read_to_string(format!("{FIX}/{rel}")).unwrap_or_else(|e| panic!("{rel}: {e}"))
    }

    #[test]
    fn real_qemu_process_stat() {
        let text = fixture("tcg/proc/stat");
        let st = parse_stat(&text).unwrap();
        assert_eq!(st.pid, 6842);
        assert_eq!(st.comm, "qemu-system-x86");
        assert_eq!(st.state, 'S');
        assert_eq!((st.minflt, st.majflt), (21477, 1));
        assert_eq!((st.utime_ticks, st.stime_ticks), (656, 56));
        assert_eq!(st.num_threads, 5);
        assert_eq!(st.rss_pages, 62436);
        assert_eq!(st.processor, Some(1));
    }

    #[test]
    fn processor_is_optional_on_short_lines() {
        // 22 fields after comm: enough for everything but `processor` (field 39).
        let st =
            parse_stat("7 (x) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21").unwrap();
        assert_eq!(st.processor, None);
        assert_eq!(st.rss_pages, 21);
    }

    #[test]
    fn real_qemu_thread_names_with_spaces_and_slashes() {
        for (tid, comm) in [
            (6845, "IO mon_iothread"),
            (6846, "CPU 0/TCG"),
            (6847, "CPU 1/TCG"),
        ] {
            let text = fixture(&format!("tcg/proc/task/{tid}/stat"));
            let st = parse_stat(&text).unwrap();
            assert_eq!((st.pid, st.comm), (tid, comm));
        }
        let text = fixture("kvm/proc/stat");
        let kvm = parse_stat(&text).unwrap();
        assert_eq!(kvm.num_threads, 6);
    }

    #[test]
    fn task_entries_to_tids() {
        assert_eq!(tid_of(b"6842"), Some(6842));
        assert_eq!(tid_of(b"."), None);
        assert_eq!(tid_of(b".."), None);
        assert_eq!(tid_of(b""), None);
        assert_eq!(tid_of(b"12a"), None);
        assert_eq!(tid_of(b"99999999999"), None);
    }

    #[test]
    fn real_schedstat_io_status() {
        let s = parse_schedstat(fixture("tcg/proc/schedstat").as_bytes()).unwrap();
        assert_eq!(
            s,
            SchedStat {
                on_cpu_ns: 1024906373,
                runqueue_wait_ns: 459201315,
                timeslices: 12786
            }
        );
        let io = parse_io(fixture("tcg/proc/io").as_bytes()).unwrap();
        assert_eq!(io.write_bytes, Some(33701888));
        assert_eq!(io.syscw, Some(10248));
        let st = parse_status(fixture("tcg/proc/status").as_bytes()).unwrap();
        assert_eq!(st.rss_kb, Some(249916));
        assert_eq!(st.threads, Some(5));
        assert_eq!(st.voluntary_switches, Some(12581));
        assert_eq!(st.involuntary_switches, Some(202));
    }

    fn line_with_comm(comm: &str, state: &str) -> String {
        format!("77 ({comm}) {state} 1 77 77 0 -1 4194560 10 0 2 0 3 4 0 0 20 0 1 0 100 1000 5 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0")
    }

    #[test]
    fn hostile_comm_with_close_paren_open_paren() {
        let text = line_with_comm("a) (b) S 1 2", "R");
        let st = parse_stat(&text).unwrap();
        assert_eq!(st.comm, "a) (b) S 1 2");
        assert_eq!(st.state, 'R');
        assert_eq!(
            (st.minflt, st.majflt, st.utime_ticks, st.stime_ticks),
            (10, 2, 3, 4)
        );
    }

    #[test]
    fn hostile_comm_with_newline_and_truncation() {
        let text = line_with_comm("x\ny", "S");
        let st = parse_stat(&text).unwrap();
        assert_eq!(st.comm, "x\ny");
        // The kernel truncates comm to 15 bytes; a truncated name is still just a name.
        let text = line_with_comm("CPU 12/KVMxxxxx", "S");
        let st = parse_stat(&text).unwrap();
        assert_eq!(st.comm.len(), 15);
    }

    #[test]
    fn zombie_stat_parses() {
        let text = line_with_comm("defunct", "Z");
        let st = parse_stat(&text).unwrap();
        assert_eq!(st.state, 'Z');
    }

    #[test]
    fn empty_and_truncated_files_are_errors_not_panics() {
        assert!(parse_stat("").is_err());
        assert!(parse_stat("12 (x").is_err());
        assert!(parse_stat("12 (x) S 1 2 3").is_err());
        assert!(
            parse_stat("abc (x) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22")
                .is_err()
        );
        assert!(parse_stat(&line_with_comm("x", "SS")).is_err());
        assert!(parse_schedstat(b"").is_err());
        assert!(parse_schedstat(b"12 x 3").is_err());
        assert!(parse_io(b"").is_err());
        assert!(parse_io(b"rchar: lots\n").is_err());
        assert!(parse_status(b"").is_err());
        assert!(parse_status(b"VmRSS:\t  12x kB\n").is_err());
        assert!(parse_status(b"VmRSS:\n").is_err());
        assert!(parse_schedstat(b"1 2").is_err());
        assert!(parse_io(b"rchar 12\n").is_err(), "a line without ':'");
        // Unknown keys and lines are skipped; a known key alone is enough.
        let st = parse_status(b"Name:\tx\nVmRSSx: 1\nThreads:\t3\nweird line\n").unwrap();
        assert_eq!((st.threads, st.rss_kb), (Some(3), None));
        let io = parse_io(b"rchar: 5\nfuture_field: 9\n").unwrap();
        assert_eq!((io.rchar, io.wchar), (Some(5), None));
    }
}
