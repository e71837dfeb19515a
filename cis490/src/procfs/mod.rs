//! The /proc backend: one row per thread and one process-total row per tick, from
//! `/proc/<pid>/task/<tid>/{stat,schedstat,status,io}` and `/proc/<pid>/{stat,status,io}`.
//!
//! File descriptors stay open between ticks and are re-read with `pread` at offset 0
//! (procfs regenerates the text on every read from offset 0), so a 1 kHz capture does
//! not pay open/close for every file of every thread. One `pread` per file and tick: a
//! read into a buffer larger than the text returns all of it, so no second read is made
//! just to see end-of-file. The task directory stays open too and is re-listed with
//! `getdents64` into a reused buffer.

pub mod parse;

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::clock::EpisodeClock;
use crate::collector::{Collector, Sink, Stream, Tick, TickOutput, VcpuMap};
use crate::error::Error;
use crate::row::{Row, Value};
use parse::{Io, SchedStat, Stat, Status};

pub const SOURCE: &str = "proc";

/// Counters of one thread that are summed into the process row. The process row's
/// `on_cpu_ns` and switch counts are the sum over every thread seen since the capture
/// began: live threads' current values plus the last values of threads that exited, so
/// the total never goes backwards when a thread ends.
#[derive(Debug, Clone, Copy, Default)]
struct ThreadTotals {
    on_cpu_ns: u64,
    runqueue_wait_ns: u64,
    timeslices: u64,
    voluntary_switches: u64,
    involuntary_switches: u64,
}

impl ThreadTotals {
    fn add(&mut self, o: &ThreadTotals) {
        self.on_cpu_ns += o.on_cpu_ns;
        self.runqueue_wait_ns += o.runqueue_wait_ns;
        self.timeslices += o.timeslices;
        self.voluntary_switches += o.voluntary_switches;
        self.involuntary_switches += o.involuntary_switches;
    }
}

struct OpenFiles {
    stat: File,
    schedstat: Option<File>,
    status: Option<File>,
    io: Option<File>,
}

struct ThreadState {
    files: OpenFiles,
    last: ThreadTotals,
    /// The name last read from stat, shared with the rows.
    comm: Option<Arc<str>>,
    /// What the last full read gave, for the next tick to reuse if the thread has not
    /// run since (see [`Unchanged`]).
    unchanged: Option<Unchanged>,
}

/// A thread that has not run since its last full read cannot have changed its status
/// switch counts or its io counters: the kernel updates both only from the thread itself
/// (a switch-out, a syscall) or at a switch-in, and a switch-in would have moved
/// schedstat's timeslice count, a run its on-CPU time. So when schedstat is unchanged
/// and the thread was not runnable at either read (stat's state is not `R`: a thread on
/// a CPU or on a run queue is always read in full), status and io, the dearest files
/// (~7 and ~2 µs of kernel text generation each, of ~14 µs per thread), are not read
/// again and their last values are written. stat (state, CPU, faults, times) and
/// schedstat are read every tick: a wakeup, a migration or a stop signal shows there.
/// Most threads of an idle QEMU are like this most ticks.
#[derive(Clone, Copy)]
struct Unchanged {
    sched: SchedStat,
    state: char,
    status: Option<Status>,
    io: Option<Io>,
}

pub struct ProcCollector {
    pid_dir: PathBuf,
    task_dir: PathBuf,
    /// `task_dir`, open for re-listing each tick.
    task_fd: Option<File>,
    process: Option<OpenFiles>,
    process_comm: Option<Arc<str>>,
    threads: BTreeMap<u32, ThreadState>,
    exited: ThreadTotals,
    vcpus: VcpuMap,
    /// Problems already reported, so a file that stays unreadable gives one event.
    reported: HashSet<String>,
    bufs: Bufs,
    dirents: Vec<u8>,
    seen_this_tick: Vec<u32>,
    /// Thread reads whose status and io were reused (see [`Unchanged`]), for meta.
    reused_reads: u64,
    /// `--rows changed`: thread rows that repeat the thread's last one are left out.
    changed: crate::collector::ChangedRows,
}

/// Read buffers reused every tick: `stat` keeps the stat text that a [`Sample`]'s comm
/// borrows while `other` takes the remaining files in turn.
#[derive(Default)]
struct Bufs {
    stat: Vec<u8>,
    other: Vec<u8>,
    /// A stat text that was not UTF-8 (a hostile comm), made valid.
    lossy: String,
}

impl ProcCollector {
    pub fn new(pid: u32, vcpus: VcpuMap, rows: crate::collector::RowsMode) -> Self {
        let mut c = Self::with_root(pid, Path::new("/proc"), vcpus);
        c.changed = crate::collector::ChangedRows::new(rows);
        c
    }

    /// `proc_root` is `/proc` except in tests.
    pub fn with_root(pid: u32, proc_root: &Path, vcpus: VcpuMap) -> Self {
        let pid_dir = proc_root.join(pid.to_string());
        Self {
            task_dir: pid_dir.join("task"),
            pid_dir,
            task_fd: None,
            process: None,
            process_comm: None,
            threads: BTreeMap::new(),
            exited: ThreadTotals::default(),
            vcpus,
            reported: HashSet::new(),
            bufs: Bufs::default(),
            dirents: Vec::with_capacity(4096),
            seen_this_tick: Vec::new(),
            reused_reads: 0,
            changed: crate::collector::ChangedRows::default(),
        }
    }

    /// The task directory's numeric entries into `seen_this_tick`, sorted.
    fn list_threads(&mut self) -> std::io::Result<()> {
        use rustix::fs::{seek, RawDir, SeekFrom};
        if self.task_fd.is_none() {
            self.task_fd = Some(File::open(&self.task_dir)?);
        }
        let fd = self.task_fd.as_ref().expect("opened above");
        seek(fd, SeekFrom::Start(0))?;
        self.seen_this_tick.clear();
        let mut dir = RawDir::new(fd, self.dirents.spare_capacity_mut());
        while let Some(entry) = dir.next() {
            let entry = entry?;
            if let Some(tid) = parse::tid_of(entry.file_name().to_bytes()) {
                self.seen_this_tick.push(tid);
            }
        }
        self.seen_this_tick.sort_unstable();
        Ok(())
    }

    fn report_once(&mut self, out: &mut TickOutput, key: String, message: String) {
        if self.reported.insert(key) {
            out.problem(message);
        }
    }

    fn open(
        &mut self,
        dir: &Path,
        out: &mut TickOutput,
        who: Who,
    ) -> Result<OpenFiles, std::io::Error> {
        let stat = File::open(dir.join("stat"))?;
        let mut optional = |name: &str| match File::open(dir.join(name)) {
            Ok(f) => Some(f),
            Err(e) => {
                self.report_once(
                    out,
                    format!("{who}/{name}"),
                    format!("{who}: cannot open {name}: {e}; its fields are null"),
                );
                None
            }
        };
        Ok(OpenFiles {
            schedstat: optional("schedstat"),
            status: optional("status"),
            io: optional("io"),
            stat,
        })
    }
}

/// Whose files are read: named only in problem messages, so nothing is formatted on the
/// per-tick path.
#[derive(Debug, Clone, Copy)]
enum Who {
    Thread(u32),
    Process,
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Who::Thread(tid) => write!(f, "tid {tid}"),
            Who::Process => f.write_str("process"),
        }
    }
}

/// Read a whole procfs file from offset 0 with one `pread`. `buf` is kept at its full
/// (initialized) length; the text is the returned prefix. procfs returns the whole text
/// when it fits, so only a full buffer means "maybe more": it then doubles and reads again.
fn pread_whole<'a>(file: &File, buf: &'a mut Vec<u8>) -> std::io::Result<&'a [u8]> {
    if buf.is_empty() {
        buf.resize(4096, 0);
    }
    loop {
        let n = file.read_at(buf, 0)?;
        if n < buf.len() {
            return Ok(&buf[..n]);
        }
        let bigger = buf.len() * 2;
        buf.resize(bigger, 0);
    }
}

/// The bytes as text: borrowed when they are UTF-8 (always, but for hostile thread names),
/// else a lossy copy in `lossy`.
fn as_text<'a>(raw: &'a [u8], lossy: &'a mut String) -> &'a str {
    match std::str::from_utf8(raw) {
        Ok(s) => s,
        Err(_) => {
            *lossy = String::from_utf8_lossy(raw).into_owned();
            lossy
        }
    }
}

/// What one read of one thread (or the process) produced.
struct Sample<'a> {
    stat: Stat<'a>,
    sched: Option<SchedStat>,
    status: Option<Status>,
    io: Option<Io>,
}

/// Read and parse the open files. `Err` only when `stat` itself is gone or unparseable
/// (the task exited); the other files degrade to `None` with a problem noted.
fn read_sample<'b>(
    files: &OpenFiles,
    bufs: &'b mut Bufs,
    who: Who,
    problems: &mut Vec<(String, String)>,
) -> Result<Sample<'b>, std::io::Error> {
    read_sample_reusing(files, bufs, who, problems, None).map(|(s, _)| s)
}

/// [`read_sample`], but status and io are taken from `unchanged` when the thread has
/// not run since (see [`Unchanged`]); the bool says whether they were.
fn read_sample_reusing<'b>(
    files: &OpenFiles,
    bufs: &'b mut Bufs,
    who: Who,
    problems: &mut Vec<(String, String)>,
    unchanged: Option<&Unchanged>,
) -> Result<(Sample<'b>, bool), std::io::Error> {
    let Bufs { stat, other, lossy } = bufs;
    let text = as_text(pread_whole(&files.stat, stat)?, lossy);
    let stat = parse::parse_stat(text)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    let sched = read_optional(
        &files.schedstat,
        other,
        who,
        "schedstat",
        problems,
        parse::parse_schedstat,
    );
    if let (Some(u), Some(now)) = (unchanged, sched) {
        if u.sched == now && u.state != 'R' && stat.state != 'R' {
            return Ok((
                Sample {
                    stat,
                    sched,
                    status: u.status,
                    io: u.io,
                },
                true,
            ));
        }
    }
    let status = read_optional(
        &files.status,
        other,
        who,
        "status",
        problems,
        parse::parse_status,
    );
    let io = read_optional(&files.io, other, who, "io", problems, parse::parse_io);
    Ok((
        Sample {
            stat,
            sched,
            status,
            io,
        },
        false,
    ))
}

fn read_optional<T>(
    file: &Option<File>,
    buf: &mut Vec<u8>,
    who: Who,
    name: &str,
    problems: &mut Vec<(String, String)>,
    parse: fn(&[u8]) -> Result<T, Error>,
) -> Option<T> {
    let file = file.as_ref()?;
    let raw = match pread_whole(file, buf) {
        Ok(raw) => raw,
        Err(e) => {
            problems.push((
                format!("{who}/{name}"),
                format!("{who}: reading {name}: {e}; its fields are null"),
            ));
            return None;
        }
    };
    match parse(raw) {
        Ok(v) => Some(v),
        Err(e) => {
            problems.push((
                format!("{who}/{name}/parse"),
                format!("{who}: {e}; its fields are null"),
            ));
            None
        }
    }
}

/// Keep `cached` equal to `name`, allocating only when the name changed.
fn shared_name(cached: &mut Option<Arc<str>>, name: &str) -> Arc<str> {
    match cached {
        Some(c) if **c == *name => c.clone(),
        _ => cached.insert(Arc::from(name)).clone(),
    }
}

fn totals_of(s: &Sample<'_>) -> ThreadTotals {
    ThreadTotals {
        on_cpu_ns: s.sched.map_or(0, |x| x.on_cpu_ns),
        runqueue_wait_ns: s.sched.map_or(0, |x| x.runqueue_wait_ns),
        timeslices: s.sched.map_or(0, |x| x.timeslices),
        voluntary_switches: s.status.and_then(|x| x.voluntary_switches).unwrap_or(0),
        involuntary_switches: s.status.and_then(|x| x.involuntary_switches).unwrap_or(0),
    }
}

/// Fields shared by thread rows and the process row, in one fixed order so every row of
/// the stream has the same columns.
fn push_common(row: &mut Row, s: &Sample<'_>) {
    row.push("state", Value::Char(s.stat.state))
        .push("utime_ticks", s.stat.utime_ticks)
        .push("stime_ticks", s.stat.stime_ticks)
        .push("minflt", s.stat.minflt)
        .push("majflt", s.stat.majflt)
        .push("last_cpu", s.stat.processor);
    let io = s.io.unwrap_or_default();
    row.push("rchar", io.rchar)
        .push("wchar", io.wchar)
        .push("syscr", io.syscr)
        .push("syscw", io.syscw)
        .push("read_bytes", io.read_bytes)
        .push("write_bytes", io.write_bytes)
        .push("cancelled_write_bytes", io.cancelled_write_bytes);
}

impl Collector for ProcCollector {
    fn streams(&self) -> Vec<Stream> {
        vec![Stream {
            source: SOURCE,
            available_in_deployment: false,
        }]
    }

    fn summary(&self, _stream: usize) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("reused_status_io_reads".into(), self.reused_reads.into());
        self.changed.summary(&mut m);
        m
    }

    fn collect(
        &mut self,
        tick: Tick,
        clock: &EpisodeClock,
        sink: &mut dyn Sink,
    ) -> Result<(), Error> {
        let out = sink.out();
        if let Err(e) = self.list_threads() {
            // Closed so that a task directory that comes back is opened afresh.
            self.task_fd = None;
            return Err(Error::io(format!("listing {}", self.task_dir.display()), e));
        }

        // Threads that vanished since the last tick: keep their last counters in the total.
        let seen = &self.seen_this_tick;
        let exited = &mut self.exited;
        let changed = &mut self.changed;
        self.threads.retain(|tid, t| {
            let keep = seen.binary_search(tid).is_ok();
            if !keep {
                exited.add(&t.last);
                changed.forget(*tid);
            }
            keep
        });

        let mut problems = Vec::new();
        // The process-total row comes first in the tick, stamped when the process's own
        // files are read; its summed counters are filled in after the threads below. First,
        // so that the columns only the total row has (rss_kb, vsize_bytes, num_threads) are
        // non-null in the stream's first line: readers that infer a column's type from the
        // first rows (polars reads 100) would otherwise see only nulls on a target with
        // many threads and type the column as null.
        let total_row = self.process_row(tick, clock, out, &mut problems);

        let mut live = ThreadTotals::default();
        let tids = std::mem::take(&mut self.seen_this_tick);
        for &tid in &tids {
            if !self.threads.contains_key(&tid) {
                let dir = self.task_dir.join(itoa::Buffer::new().format(tid));
                match self.open(&dir, out, Who::Thread(tid)) {
                    Ok(files) => {
                        self.threads.insert(
                            tid,
                            ThreadState {
                                files,
                                last: ThreadTotals::default(),
                                comm: None,
                                unchanged: None,
                            },
                        );
                    }
                    // Exited between listing and opening: nothing to record.
                    Err(_) => continue,
                }
            }
            let state = self.threads.get_mut(&tid).expect("inserted above");
            let sample = match read_sample_reusing(
                &state.files,
                &mut self.bufs,
                Who::Thread(tid),
                &mut problems,
                state.unchanged.as_ref(),
            ) {
                Ok((s, reused)) => {
                    self.reused_reads += u64::from(reused);
                    state.unchanged = s.sched.map(|sched| Unchanged {
                        sched,
                        state: s.stat.state,
                        status: s.status,
                        io: s.io,
                    });
                    s
                }
                Err(_) => {
                    // Exited after opening: account it now, it will not be listed again.
                    let t = self.threads.remove(&tid).expect("present");
                    self.exited.add(&t.last);
                    self.changed.forget(tid);
                    continue;
                }
            };
            let stamp = clock.stamp();
            state.last = totals_of(&sample);
            live.add(&state.last);
            let comm = shared_name(&mut state.comm, sample.stat.comm);
            let row = out.new_row(stamp, SOURCE, false);
            row.seq = Some(tick.seq);
            row.thread_columns = true;
            row.tid = Some(tid);
            row.vcpu = self.vcpus.get(tid);
            row.comm = Some(comm);
            push_common(row, &sample);
            push_thread_sched(row, &sample.sched, &sample.status);
            row.push("rss_kb", Value::Null)
                .push("vsize_bytes", Value::Null)
                .push("num_threads", Value::Null);
            self.changed.filter_last(out, false);
        }
        self.seen_this_tick = tids;

        let total_row = total_row?;
        let mut total = live;
        total.add(&self.exited);
        let row = out.row_mut(total_row.row);
        for (slot, value) in row.fields[total_row.sums..total_row.sums + 5]
            .iter_mut()
            .zip([
                total.on_cpu_ns,
                total.runqueue_wait_ns,
                total.timeslices,
                total.voluntary_switches,
                total.involuntary_switches,
            ])
        {
            slot.1 = Value::U64(value);
        }

        for (key, message) in problems {
            self.report_once(out, key, message);
        }
        Ok(())
    }
}

/// Where the tick's process-total row is and where its five summed counters start.
struct TotalRow {
    row: usize,
    sums: usize,
}

impl ProcCollector {
    /// Read the process's own files and add its total row, with the summed counters
    /// (on_cpu_ns … involuntary_switches) as placeholders the caller fills in.
    fn process_row(
        &mut self,
        tick: Tick,
        clock: &EpisodeClock,
        out: &mut TickOutput,
        problems: &mut Vec<(String, String)>,
    ) -> Result<TotalRow, Error> {
        if self.process.is_none() {
            let pid_dir = self.pid_dir.clone();
            match self.open(&pid_dir, out, Who::Process) {
                Ok(f) => self.process = Some(f),
                Err(e) => return Err(Error::io(format!("opening {}/stat", pid_dir.display()), e)),
            }
        }
        let files = self.process.as_ref().expect("opened above");
        let sample = read_sample(files, &mut self.bufs, Who::Process, problems)
            .map_err(|e| Error::io(format!("reading {}/stat", self.pid_dir.display()), e))?;
        let stamp = clock.stamp();
        let comm = shared_name(&mut self.process_comm, sample.stat.comm);
        let index = out.rows().len();
        let row = out.new_row(stamp, SOURCE, false);
        row.seq = Some(tick.seq);
        row.thread_columns = true;
        row.comm = Some(comm);
        push_common(row, &sample);
        let sums = row.fields.len();
        for name in [
            "on_cpu_ns",
            "runqueue_wait_ns",
            "timeslices_count",
            "voluntary_switches",
            "involuntary_switches",
        ] {
            row.push(name, 0u64);
        }
        let status = sample.status.unwrap_or_default();
        row.push("rss_kb", status.rss_kb)
            .push("vsize_bytes", sample.stat.vsize_bytes)
            .push("num_threads", sample.stat.num_threads);
        Ok(TotalRow { row: index, sums })
    }
}

fn push_thread_sched(row: &mut Row, sched: &Option<SchedStat>, status: &Option<Status>) {
    row.push("on_cpu_ns", sched.map(|s| s.on_cpu_ns))
        .push("runqueue_wait_ns", sched.map(|s| s.runqueue_wait_ns))
        .push("timeslices_count", sched.map(|s| s.timeslices))
        .push(
            "voluntary_switches",
            status.and_then(|s| s.voluntary_switches),
        )
        .push(
            "involuntary_switches",
            status.and_then(|s| s.involuntary_switches),
        );
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIX: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/data/qemu-10.0.2/tcg/proc"
    );

    /// A fake /proc with the real QEMU snapshot as pid 6842.
    fn fake_proc() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let pid_dir = root.path().join("6842");
        std::fs::create_dir_all(pid_dir.join("task")).unwrap();
        for f in ["stat", "io", "status", "schedstat"] {
            std::fs::copy(format!("{FIX}/{f}"), pid_dir.join(f)).unwrap();
        }
        for tid in ["6842", "6843", "6845", "6846", "6847"] {
            let d = pid_dir.join("task").join(tid);
            std::fs::create_dir_all(&d).unwrap();
            for f in ["stat", "io", "status", "schedstat"] {
                std::fs::copy(format!("{FIX}/task/{tid}/{f}"), d.join(f)).unwrap();
            }
        }
        root
    }

    fn collect(c: &mut ProcCollector, seq: u64) -> TickOutput {
        let mut out = TickOutput::default();
        c.collect(
            Tick {
                seq,
                scheduled_ns: 0,
            },
            &EpisodeClock::start(),
            &mut out,
        )
        .unwrap();
        out
    }

    #[test]
    fn real_snapshot_gives_thread_rows_vcpu_column_and_a_total() {
        let root = fake_proc();
        let vcpus = VcpuMap::default();
        vcpus.set([(6846, 0), (6847, 1)].into_iter().collect());
        let mut c = ProcCollector::with_root(6842, root.path(), vcpus);
        let out = collect(&mut c, 0);
        assert!(out.problems.is_empty(), "{:?}", out.problems);
        assert_eq!(out.rows().len(), 6);
        let cpu1 = out
            .rows()
            .iter()
            .find(|r| r.comm.as_deref() == Some("CPU 1/TCG"))
            .unwrap();
        assert_eq!((cpu1.tid, cpu1.vcpu), (Some(6847), Some(1)));
        // The total row comes first, so its process-only columns lead the stream.
        let total = &out.rows()[0];
        assert_eq!(total.tid, None);
        assert!(out.rows()[1..].iter().all(|r| r.tid.is_some()));
        assert_eq!(total.get("num_threads"), Some(&Value::U64(5)));
        // The total is the sum of the threads' schedstat on-CPU times.
        let sum: u64 = out.rows()[1..]
            .iter()
            .map(|r| match r.get("on_cpu_ns") {
                Some(Value::U64(v)) => *v,
                other => panic!("{other:?}"),
            })
            .sum();
        assert_eq!(total.get("on_cpu_ns"), Some(&Value::U64(sum)));
        assert_eq!(total.get("write_bytes"), Some(&Value::U64(33701888)));
    }

    /// The value of column `col` in thread `tid`'s row.
    fn col(out: &TickOutput, tid: u32, col: &str) -> Value {
        out.rows()
            .iter()
            .find(|r| r.tid == Some(tid))
            .and_then(|r| r.get(col).cloned())
            .unwrap_or_else(|| panic!("no {col} for {tid}"))
    }

    fn set_field(path: &std::path::Path, key: &str, value: u64) {
        let text = std::fs::read_to_string(path).unwrap();
        let out: Vec<String> = text
            .lines()
            .map(|l| match l.split_once(':') {
                Some((k, _)) if k == key => format!("{k}:\t{value}"),
                _ => l.to_owned(),
            })
            .collect();
        std::fs::write(path, out.join("\n") + "\n").unwrap();
    }

    #[test]
    fn a_thread_that_has_not_run_keeps_its_status_and_io_without_rereading_them() {
        let root = fake_proc();
        let t = root.path().join("6842/task/6845");
        let mut c = ProcCollector::with_root(6842, root.path(), VcpuMap::default());
        let first = collect(&mut c, 0);
        let v0 = col(&first, 6845, "voluntary_switches");
        // status and io change while schedstat and the state (S) stay: the thread has not
        // run, so the files are not read again (a kernel never shows this combination; the
        // test uses it to see which files were read).
        set_field(&t.join("status"), "voluntary_ctxt_switches", 999_999);
        set_field(&t.join("io"), "rchar", 777);
        let second = collect(&mut c, 1);
        assert_eq!(col(&second, 6845, "voluntary_switches"), v0);
        assert_ne!(col(&second, 6845, "rchar"), Value::U64(777));
        assert_eq!(c.summary(0)["reused_status_io_reads"], 5);
        // The thread ran (its on-CPU time moved): everything is read afresh.
        let sched = std::fs::read_to_string(t.join("schedstat")).unwrap();
        let f: Vec<u64> = sched
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        std::fs::write(
            t.join("schedstat"),
            format!("{} {} {}\n", f[0] + 1000, f[1], f[2] + 1),
        )
        .unwrap();
        let third = collect(&mut c, 2);
        assert_eq!(col(&third, 6845, "voluntary_switches"), Value::U64(999_999));
        assert_eq!(col(&third, 6845, "rchar"), Value::U64(777));
        // A thread that is runnable is read in full even with schedstat unchanged.
        let stat = std::fs::read_to_string(t.join("stat")).unwrap();
        let (head, tail) = stat.rsplit_once(") ").unwrap();
        std::fs::write(t.join("stat"), format!("{head}) R{}", &tail[1..])).unwrap();
        set_field(&t.join("status"), "voluntary_ctxt_switches", 1_000_000);
        let fourth = collect(&mut c, 3);
        assert_eq!(col(&fourth, 6845, "state"), Value::Char('R'));
        assert_eq!(
            col(&fourth, 6845, "voluntary_switches"),
            Value::U64(1_000_000)
        );
        // ... and at the next tick too (it was runnable at the last read).
        std::fs::write(t.join("stat"), &stat).unwrap();
        set_field(&t.join("status"), "voluntary_ctxt_switches", 1_000_001);
        let fifth = collect(&mut c, 4);
        assert_eq!(
            col(&fifth, 6845, "voluntary_switches"),
            Value::U64(1_000_001)
        );
    }

    #[test]
    fn missing_io_file_gives_null_fields_and_one_problem() {
        let root = fake_proc();
        std::fs::remove_file(root.path().join("6842/task/6846/io")).unwrap();
        let mut c = ProcCollector::with_root(6842, root.path(), VcpuMap::default());
        let first = collect(&mut c, 0);
        assert_eq!(first.problems.len(), 1, "{:?}", first.problems);
        assert!(first.problems[0].contains("tid 6846") && first.problems[0].contains("io"));
        let row = first.rows().iter().find(|r| r.tid == Some(6846)).unwrap();
        assert_eq!(row.get("read_bytes"), Some(&Value::Null));
        assert!(
            matches!(row.get("on_cpu_ns"), Some(Value::U64(_))),
            "other files still read"
        );
        let second = collect(&mut c, 1);
        assert!(second.problems.is_empty(), "reported once, not every tick");
    }

    #[test]
    fn malformed_and_empty_files_degrade_to_nulls() {
        let root = fake_proc();
        std::fs::write(root.path().join("6842/task/6845/schedstat"), b"").unwrap();
        std::fs::write(
            root.path().join("6842/task/6845/status"),
            b"garbage without colons\n",
        )
        .unwrap();
        let mut c = ProcCollector::with_root(6842, root.path(), VcpuMap::default());
        let out = collect(&mut c, 0);
        let row = out.rows().iter().find(|r| r.tid == Some(6845)).unwrap();
        assert_eq!(row.get("on_cpu_ns"), Some(&Value::Null));
        assert_eq!(row.get("voluntary_switches"), Some(&Value::Null));
        assert_eq!(out.problems.len(), 2, "{:?}", out.problems);
    }

    #[test]
    fn vanished_thread_keeps_its_time_in_the_total() {
        let root = fake_proc();
        let mut c = ProcCollector::with_root(6842, root.path(), VcpuMap::default());
        let total = |out: &TickOutput| out.rows()[0].get("on_cpu_ns").cloned();
        let before = total(&collect(&mut c, 0));
        std::fs::remove_dir_all(root.path().join("6842/task/6847")).unwrap();
        let out = collect(&mut c, 1);
        assert_eq!(out.rows().len(), 5);
        assert_eq!(
            total(&out),
            before,
            "the exited thread's time stays counted"
        );
        // A stat file that turns into garbage (a task being torn down) drops the thread.
        std::fs::write(root.path().join("6842/task/6846/stat"), b"").unwrap();
        let out = collect(&mut c, 2);
        assert_eq!(out.rows().len(), 4);
        assert_eq!(total(&out), before);
    }
}
