//! `cis490-testload`: a bundled multi-threaded target for the demo, the integration tests
//! and the benchmarks. It mimics the shape of a QEMU process: a few busy "vCPU" threads,
//! threads that block and wake often (I/O or timer threads), optional syscall I/O.
//!
//! usage: cis490-testload [--spin N] [--switch N] [--io N] [--pingpong N] [--iobusy N]
//!                        [--spawn-after S] [--exit-after S] [--measure-from S]
//!                        [--name-prefix P] [--threads N] [--nap-ms MS]
//!
//! --pingpong N: N pairs of threads bouncing one byte over pipes (context-switch heavy)
//! --iobusy N:   N threads doing write(2)/pread(2) back to back (syscall-I/O heavy)
//! --threads N:  add idle threads (each sleeps --nap-ms, default 100 ms, at a time) until
//!               the process has at least N threads, main thread included: a wide target
//!               at little CPU cost
//! At exit (--exit-after) it prints `WORK <units>`: the benchmarks' throughput figure,
//! counted from --measure-from S seconds on (default 0), so a tracer's set-up can be left
//! out of a steady-state comparison.
//! Prints `READY <pid>` on stdout once every thread runs.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Args {
    spin: usize,
    switch: usize,
    io: usize,
    pingpong: usize,
    iobusy: usize,
    spawn_after: Option<f64>,
    exit_after: Option<f64>,
    measure_from: f64,
    prefix: String,
    threads: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        spin: 2,
        switch: 2,
        io: 0,
        pingpong: 0,
        iobusy: 0,
        spawn_after: None,
        exit_after: None,
        measure_from: 0.0,
        prefix: String::new(),
        threads: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--spin" => a.spin = value()?.parse().map_err(|e| format!("--spin: {e}"))?,
            "--switch" => a.switch = value()?.parse().map_err(|e| format!("--switch: {e}"))?,
            "--io" => a.io = value()?.parse().map_err(|e| format!("--io: {e}"))?,
            "--pingpong" => {
                a.pingpong = value()?.parse().map_err(|e| format!("--pingpong: {e}"))?
            }
            "--iobusy" => a.iobusy = value()?.parse().map_err(|e| format!("--iobusy: {e}"))?,
            "--spawn-after" => {
                a.spawn_after = Some(
                    value()?
                        .parse()
                        .map_err(|e| format!("--spawn-after: {e}"))?,
                )
            }
            "--measure-from" => {
                a.measure_from = value()?
                    .parse()
                    .map_err(|e| format!("--measure-from: {e}"))?
            }
            "--exit-after" => {
                a.exit_after = Some(value()?.parse().map_err(|e| format!("--exit-after: {e}"))?)
            }
            "--name-prefix" => a.prefix = value()?,
            "--threads" => a.threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?,
            "--nap-ms" => {
                let ms: u64 = value()?.parse().map_err(|e| format!("--nap-ms: {e}"))?;
                IDLE_NAP_MS.store(ms.max(1), Ordering::Relaxed);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

/// A busy thread, like a vCPU running guest code.
fn spin(stop: Arc<AtomicBool>, work: Arc<AtomicU64>) {
    let mut x = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..10_000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        work.fetch_add(1, Ordering::Relaxed);
    }
    std::hint::black_box(x);
}

/// A thread that sleeps 1 ms at a time: many voluntary switches and wakeups.
fn switch(stop: Arc<AtomicBool>, work: Arc<AtomicU64>) {
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(1));
        work.fetch_add(1, Ordering::Relaxed);
    }
}

/// How long an idle thread sleeps at a time (`--nap-ms`).
static IDLE_NAP_MS: AtomicU64 = AtomicU64::new(100);

/// A thread that is almost always asleep: it makes the process wide, not busy.
fn idle(stop: Arc<AtomicBool>, _work: Arc<AtomicU64>) {
    let nap = Duration::from_millis(IDLE_NAP_MS.load(Ordering::Relaxed));
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(nap);
    }
}

/// A thread doing small write(2)/pread(2) calls on a temp file (unlinked at once),
/// pausing 200 µs between calls.
fn io(stop: Arc<AtomicBool>, work: Arc<AtomicU64>) {
    io_loop(stop, work, Some(Duration::from_micros(200)));
}

/// The same calls back to back.
fn iobusy(stop: Arc<AtomicBool>, work: Arc<AtomicU64>) {
    io_loop(stop, work, None);
}

/// One side of a ping-pong pair: read a byte, write it back. Every round trip is two
/// context switches on each side.
fn pingpong_pair(
    name: String,
    stop: &Arc<AtomicBool>,
    work: &Arc<AtomicU64>,
) -> Vec<std::thread::JoinHandle<()>> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0i32; 4];
    // SAFETY: pipe(2) fills two fds per call; each becomes owned below.
    unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        assert_eq!(libc::pipe(fds.as_mut_ptr().add(2)), 0);
    }
    // SAFETY: each fd was just returned by pipe(2) and is owned exactly once.
    let own = |fd: i32| std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let (a_read, b_write, b_read, a_write) = (own(fds[0]), own(fds[1]), own(fds[2]), own(fds[3]));
    let side = |mut rx: std::fs::File,
                mut tx: std::fs::File,
                serve: bool,
                stop: Arc<AtomicBool>,
                work: Arc<AtomicU64>| {
        move || {
            use std::io::Read;
            let mut b = [0u8; 1];
            if !serve && tx.write_all(&b).is_err() {
                return;
            }
            while !stop.load(Ordering::Relaxed) {
                if rx.read_exact(&mut b).is_err() || tx.write_all(&b).is_err() {
                    return;
                }
                if serve {
                    work.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    };
    let ping = side(a_read, a_write, false, stop.clone(), work.clone());
    let pong = side(b_read, b_write, true, stop.clone(), work.clone());
    vec![
        std::thread::Builder::new()
            .name(format!("{name}-a"))
            .spawn(ping)
            .expect("spawn"),
        std::thread::Builder::new()
            .name(format!("{name}-b"))
            .spawn(pong)
            .expect("spawn"),
    ]
}

fn io_loop(stop: Arc<AtomicBool>, work: Arc<AtomicU64>, pause: Option<Duration>) {
    use std::os::unix::fs::FileExt;
    let path = std::env::temp_dir().join(format!(
        "cis490-testload-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
    else {
        return;
    };
    let _ = std::fs::remove_file(&path);
    let block = [0x5au8; 4096];
    let mut back = [0u8; 4096];
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if f.write_all(&block).is_err() {
            return;
        }
        let _ = f.read_at(&mut back, (n % 256) * 4096);
        n += 1;
        if n.is_multiple_of(256) {
            let _ = f.set_len(0);
            let _ = std::io::Seek::rewind(&mut f);
        }
        work.fetch_add(1, Ordering::Relaxed);
        if let Some(p) = pause {
            std::thread::sleep(p);
        }
    }
}

fn start(
    name: String,
    f: fn(Arc<AtomicBool>, Arc<AtomicU64>),
    stop: &Arc<AtomicBool>,
    work: &Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    let (s, w) = (stop.clone(), work.clone());
    std::thread::Builder::new()
        .name(name)
        .spawn(move || f(s, w))
        .expect("spawn thread")
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cis490-testload: {e}");
            std::process::exit(2);
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let work = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for i in 0..args.spin {
        handles.push(start(
            format!("{}spin-{i}", args.prefix),
            spin,
            &stop,
            &work,
        ));
    }
    for i in 0..args.switch {
        handles.push(start(
            format!("{}switch-{i}", args.prefix),
            switch,
            &stop,
            &work,
        ));
    }
    for i in 0..args.io {
        handles.push(start(format!("{}io-{i}", args.prefix), io, &stop, &work));
    }
    for i in 0..args.iobusy {
        handles.push(start(
            format!("{}iobusy-{i}", args.prefix),
            iobusy,
            &stop,
            &work,
        ));
    }
    let mut pingpong_handles = Vec::new();
    for i in 0..args.pingpong {
        pingpong_handles.extend(pingpong_pair(format!("{}pp{i}", args.prefix), &stop, &work));
    }
    // Main thread + every thread started so far (a ping-pong pair is two).
    let running = 1 + handles.len() + pingpong_handles.len();
    for i in 0..args.threads.saturating_sub(running) {
        handles.push(start(
            format!("{}idle-{i}", args.prefix),
            idle,
            &stop,
            &work,
        ));
    }
    println!("READY {}", std::process::id());
    let _ = std::io::stdout().flush();
    let started = Instant::now();
    let mut spawned = false;
    let mut work_before: Option<u64> = (args.measure_from <= 0.0).then_some(0);
    loop {
        std::thread::sleep(Duration::from_millis(10));
        let t = started.elapsed().as_secs_f64();
        if work_before.is_none() && t >= args.measure_from {
            work_before = Some(work.load(Ordering::Relaxed));
        }
        if !spawned && args.spawn_after.is_some_and(|s| t >= s) {
            handles.push(start(format!("{}late-0", args.prefix), spin, &stop, &work));
            spawned = true;
        }
        if args.exit_after.is_some_and(|s| t >= s) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    // Read the figure before joining: ping-pong threads may sit in a blocking read.
    println!(
        "WORK {}",
        work.load(Ordering::Relaxed) - work_before.unwrap_or(0)
    );
    let _ = std::io::stdout().flush();
    for h in handles {
        let _ = h.join();
    }
    drop(pingpong_handles);
}
