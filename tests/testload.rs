//! `cis490-testload`: a bundled multi-threaded target for the demo, the integration tests
//! and the benchmarks. It mimics the shape of a QEMU process: a few busy "vCPU" threads,
//! threads that block and wake often (I/O or timer threads), optional syscall I/O.
//!
//! usage: cis490-testload [--spin N] [--switch N] [--io N] [--spawn-after S]
//!                        [--exit-after S] [--name-prefix P]
//! Prints `READY <pid>` on stdout once every thread runs.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Args {
    spin: usize,
    switch: usize,
    io: usize,
    spawn_after: Option<f64>,
    exit_after: Option<f64>,
    prefix: String,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        spin: 2,
        switch: 2,
        io: 0,
        spawn_after: None,
        exit_after: None,
        prefix: String::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--spin" => a.spin = value()?.parse().map_err(|e| format!("--spin: {e}"))?,
            "--switch" => a.switch = value()?.parse().map_err(|e| format!("--switch: {e}"))?,
            "--io" => a.io = value()?.parse().map_err(|e| format!("--io: {e}"))?,
            "--spawn-after" => {
                a.spawn_after = Some(
                    value()?
                        .parse()
                        .map_err(|e| format!("--spawn-after: {e}"))?,
                )
            }
            "--exit-after" => {
                a.exit_after = Some(value()?.parse().map_err(|e| format!("--exit-after: {e}"))?)
            }
            "--name-prefix" => a.prefix = value()?,
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

/// A thread doing small write(2)/pread(2) calls on a temp file (unlinked at once).
fn io(stop: Arc<AtomicBool>, work: Arc<AtomicU64>) {
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
        if n % 256 == 0 {
            let _ = f.set_len(0);
            let _ = std::io::Seek::rewind(&mut f);
        }
        work.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_micros(200));
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
    println!("READY {}", std::process::id());
    let _ = std::io::stdout().flush();
    let started = Instant::now();
    let mut spawned = false;
    loop {
        std::thread::sleep(Duration::from_millis(10));
        let t = started.elapsed().as_secs_f64();
        if !spawned && args.spawn_after.is_some_and(|s| t >= s) {
            handles.push(start(format!("{}late-0", args.prefix), spin, &stop, &work));
            spawned = true;
        }
        if args.exit_after.is_some_and(|s| t >= s) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    println!("WORK {}", work.load(Ordering::Relaxed));
}
