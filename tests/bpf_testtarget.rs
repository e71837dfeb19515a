//! Small target processes for the BPF backend tests (tests/bpf.rs). Each mode prints
//! what the test needs to know on stdout and is driven by lines on stdin, so the test can
//! start a capture first and only then make the target do the work being measured.
//!
//!   spin N          N threads spinning; prints "tids <t1> <t2> ..."; runs until stdin closes
//!   spin-truth      one thread spinning that also records its own counters as the kernel
//!                   gives them to the thread itself, every ~20 µs: (CLOCK_MONOTONIC,
//!                   CLOCK_THREAD_CPUTIME_ID, schedstat run_delay). Prints "tids <t>"; on
//!                   "dump PATH" writes the last 2^20 samples to PATH, one "mono cpu
//!                   run_delay" line each, and prints "dumped"
//!   io PATH         waits for "go", then one new thread does the I/O below on PATH and
//!                   prints "done <tid> <write_bytes> <write_ops> <read_bytes> <read_ops>"
//!   late            waits for "go", then starts 2 threads that spin 0.3 s of CPU each
//!                   and exit;
//!                   prints "late <t1> <t2>" when they are joined
//!   burst N         waits for "go", then two threads each start N/2 sleeping threads as
//!                   fast as they can (thread creation racing on two CPUs); prints
//!                   "burst <t1> <t2> ..." once all run; they sleep until stdin closes
//!   udp-echo ADDR   echoes UDP datagrams on ADDR (used inside a network namespace)
//!   tap NAME        creates tap interface NAME on /dev/net/tun and holds its fd, as QEMU
//!                   does with `-netdev tap,fd=N`; prints "ready"; runs until stdin closes

use std::io::{BufRead, Write};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

fn tid() -> u32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() as u32 }
}

fn wait_line() -> Option<String> {
    let mut line = String::new();
    match std::io::stdin().lock().read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(line.trim().to_owned()),
    }
}

fn spin_for(d: Duration) {
    let end = Instant::now() + d;
    let mut x = 0u64;
    while Instant::now() < end {
        x = std::hint::black_box(x.wrapping_add(1));
    }
}

/// Spin until this thread has used `d` of CPU: unlike a wall-clock spin, it gets the same
/// on-CPU time on a loaded machine, so thresholds on it hold under load.
fn spin_cpu(d: Duration) {
    let end = clock_ns(libc::CLOCK_THREAD_CPUTIME_ID) as u128 + d.as_nanos();
    let mut x = 0u64;
    while (clock_ns(libc::CLOCK_THREAD_CPUTIME_ID) as u128) < end {
        x = std::hint::black_box(x.wrapping_add(1));
    }
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and out pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The spinning thread of `spin-truth`. CLOCK_THREAD_CPUTIME_ID asks the kernel for the
/// thread's runtime brought up to the instant of the call (task_sched_runtime): the exact
/// value a snapshot of the running thread should report, without steal time, which the
/// kernel subtracts. run_delay in the thread's own schedstat is complete whenever the
/// thread runs (a wait is added when it ends), so a sample taken by the running thread is
/// exact too. Between two samples ~20 µs apart the thread ran; a longer gap is time it
/// waited (run_delay grows), was stolen by the host (neither grows) or both.
fn spin_recording(stop: &std::sync::atomic::AtomicBool) -> Vec<(u64, u64, u64)> {
    use std::os::unix::fs::FileExt;
    const KEEP: usize = 1 << 20;
    const MAX_SAMPLE_NS: u64 = 10_000;
    let f = std::fs::File::open("/proc/thread-self/schedstat").expect("own schedstat");
    let mut buf = [0u8; 128];
    let mut ring: Vec<(u64, u64, u64)> = Vec::with_capacity(KEEP);
    let mut next = 0usize;
    let mut last = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let now = clock_ns(libc::CLOCK_MONOTONIC);
        if now < last + 20_000 {
            continue;
        }
        let cpu = clock_ns(libc::CLOCK_THREAD_CPUTIME_ID);
        let n = f.read_at(&mut buf, 0).expect("read own schedstat");
        let text = std::str::from_utf8(&buf[..n]).expect("schedstat text");
        let run_delay: u64 = text
            .split_whitespace()
            .nth(1)
            .and_then(|x| x.parse().ok())
            .expect("schedstat run_delay");
        // The instant is the middle of the two clock reads around the counter reads. A
        // sample whose reads took long (the thread was interrupted, preempted or its vCPU
        // taken between them) has no one instant and is not kept.
        let end = clock_ns(libc::CLOCK_MONOTONIC);
        if end - now > MAX_SAMPLE_NS {
            continue;
        }
        let sample = (now + (end - now) / 2, cpu, run_delay);
        if ring.len() < KEEP {
            ring.push(sample);
        } else {
            ring[next] = sample;
        }
        next = (next + 1) % KEEP;
        last = now;
    }
    if ring.len() == KEEP {
        ring.rotate_left(next);
    }
    ring
}

fn say(s: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{s}");
    let _ = out.flush();
}

fn check(rc: isize, what: &str) -> usize {
    if rc < 0 {
        panic!("{what}: {}", std::io::Error::last_os_error());
    }
    rc as usize
}

/// Buffers allocated and freed by the main thread: a large free in the I/O thread's own
/// malloc arena makes glibc read /proc/sys/vm/overcommit_memory (1 byte) from that
/// thread, which the BPF counters rightly see but the test would not expect.
struct Bufs {
    out: Vec<u8>,
    parts: [Vec<u8>; 3],
    rbuf: Vec<u8>,
    a: Vec<u8>,
    b: Vec<u8>,
}

/// Exactly 100_000 bytes by write(2) and 12_345 by pwritev(2); reads them back with
/// read(2) and preadv(2). Counts what the syscalls returned.
fn do_io(path: &str, bufs: &mut Bufs) -> String {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("open");
    let fd = f.as_raw_fd();
    let (mut wb, mut wo, mut rb, mut ro) = (0usize, 0usize, 0usize, 0usize);
    let buf = &bufs.out;
    let mut off = 0;
    while off < buf.len() {
        let n = check(
            // SAFETY: valid fd and buffer range.
            unsafe { libc::write(fd, buf[off..].as_ptr().cast(), buf.len() - off) },
            "write",
        );
        off += n;
        wb += n;
        wo += 1;
    }
    let parts = &bufs.parts;
    let iov: [libc::iovec; 3] = std::array::from_fn(|i| libc::iovec {
        iov_base: parts[i].as_ptr() as *mut _,
        iov_len: parts[i].len(),
    });
    // SAFETY: iovecs point into live buffers.
    let n = check(
        unsafe { libc::pwritev(fd, iov.as_ptr(), 3, 100_000) },
        "pwritev",
    );
    assert_eq!(n, 12_345);
    wb += n;
    wo += 1;
    // read(2) the first 60_000 bytes from offset 0.
    // SAFETY: plain lseek.
    unsafe { libc::lseek(fd, 0, libc::SEEK_SET) };
    let rbuf = &mut bufs.rbuf;
    let mut got = 0;
    while got < rbuf.len() {
        let n = check(
            // SAFETY: valid buffer range.
            unsafe { libc::read(fd, rbuf[got..].as_mut_ptr().cast(), rbuf.len() - got) },
            "read",
        );
        assert!(n > 0);
        got += n;
        rb += n;
        ro += 1;
    }
    // preadv(2) 4_000 + 3_000 bytes at offset 100_000.
    let (a, b) = (&mut bufs.a, &mut bufs.b);
    let riov = [
        libc::iovec {
            iov_base: a.as_mut_ptr().cast(),
            iov_len: a.len(),
        },
        libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        },
    ];
    // SAFETY: iovecs point into live buffers.
    let n = check(
        unsafe { libc::preadv(fd, riov.as_ptr(), 2, 100_000) },
        "preadv",
    );
    assert_eq!(n, 7_000);
    rb += n;
    ro += 1;
    // A read at EOF returns 0 and must not count.
    // SAFETY: valid buffer.
    let n = unsafe { libc::pread(fd, a.as_mut_ptr().cast(), 10, 1_000_000) };
    assert_eq!(n, 0);
    drop(f);
    format!("done {} {wb} {wo} {rb} {ro}", tid())
}

/// Open /dev/net/tun and attach it to a new tap interface `name` (TUNSETIFF).
fn open_tap(name: &str) -> std::fs::File {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun");
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF with a correctly laid out struct ifreq.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        panic!("TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    }
    f
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("spin") => {
            let n: usize = args[2].parse().expect("thread count");
            let (tx, rx) = std::sync::mpsc::channel();
            for _ in 0..n {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    tx.send(tid()).unwrap();
                    spin_for(Duration::from_secs(3600));
                });
            }
            let tids: Vec<String> = (0..n).map(|_| rx.recv().unwrap().to_string()).collect();
            say(&format!("tids {}", tids.join(" ")));
            while wait_line().is_some() {}
        }
        Some("spin-truth") => {
            use std::sync::atomic::{AtomicBool, Ordering};
            use std::sync::Arc;
            let stop = Arc::new(AtomicBool::new(false));
            let (tx, rx) = std::sync::mpsc::channel();
            let spinner = {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    tx.send(tid()).unwrap();
                    spin_recording(&stop)
                })
            };
            say(&format!("tids {}", rx.recv().unwrap()));
            let mut spinner = Some(spinner);
            while let Some(line) = wait_line() {
                if let (Some(path), Some(h)) = (line.strip_prefix("dump "), spinner.take()) {
                    stop.store(true, Ordering::Relaxed);
                    let samples = h.join().unwrap();
                    let mut out = std::io::BufWriter::new(
                        std::fs::File::create(path.trim()).expect("truth file"),
                    );
                    for (m, c, r) in samples {
                        writeln!(out, "{m} {c} {r}").unwrap();
                    }
                    out.flush().unwrap();
                    say("dumped");
                }
            }
        }
        Some("burst") => {
            let n: usize = args[2].parse().expect("thread count");
            say("ready");
            if wait_line().as_deref() == Some("go") {
                let (tx, rx) = std::sync::mpsc::channel();
                let spawners: Vec<_> = (0..2)
                    .map(|_| {
                        let tx = tx.clone();
                        std::thread::spawn(move || {
                            for _ in 0..n / 2 {
                                let tx = tx.clone();
                                std::thread::spawn(move || {
                                    tx.send(tid()).unwrap();
                                    loop {
                                        std::thread::sleep(Duration::from_secs(3600));
                                    }
                                });
                            }
                        })
                    })
                    .collect();
                for h in spawners {
                    h.join().unwrap();
                }
                let tids: Vec<String> = (0..n / 2 * 2)
                    .map(|_| rx.recv().unwrap().to_string())
                    .collect();
                say(&format!("burst {}", tids.join(" ")));
            }
            while wait_line().is_some() {}
        }
        Some("io") => {
            let path = args[2].clone();
            let mut bufs = Bufs {
                out: vec![0xab; 100_000],
                parts: [vec![1; 5_000], vec![2; 7_000], vec![3; 345]],
                rbuf: vec![0; 60_000],
                a: vec![0; 4_000],
                b: vec![0; 3_000],
            };
            say("ready");
            if wait_line().as_deref() == Some("go") {
                let (msg, bufs) = std::thread::spawn(move || {
                    let msg = do_io(&path, &mut bufs);
                    (msg, bufs)
                })
                .join()
                .unwrap();
                drop(bufs);
                let _ = std::fs::remove_file(&args[2]);
                say(&msg);
            }
            while wait_line().is_some() {}
        }
        Some("late") => {
            say("ready");
            if wait_line().as_deref() == Some("go") {
                let hs: Vec<_> = (0..2)
                    .map(|_| {
                        std::thread::spawn(|| {
                            let t = tid();
                            spin_cpu(Duration::from_millis(300));
                            t
                        })
                    })
                    .collect();
                let tids: Vec<String> = hs
                    .into_iter()
                    .map(|h| h.join().unwrap().to_string())
                    .collect();
                say(&format!("late {}", tids.join(" ")));
            }
            while wait_line().is_some() {}
        }
        Some("mem") => {
            // `grow N`: allocate N MiB and touch every page (kept until exit).
            let mut kept: Vec<Vec<u8>> = Vec::new();
            say("ready");
            while let Some(line) = wait_line() {
                if let Some(n) = line.strip_prefix("grow ") {
                    let mib: usize = n.trim().parse().expect("MiB");
                    let mut v = vec![0u8; mib << 20];
                    for page in v.chunks_mut(4096) {
                        page[0] = 1;
                    }
                    kept.push(std::hint::black_box(v));
                    say("grown");
                }
            }
        }
        Some("tap") => {
            let _fd = open_tap(&args[2]);
            say("ready");
            while wait_line().is_some() {}
        }
        Some("udp-echo") => {
            let sock = std::net::UdpSocket::bind(&args[2]).expect("bind");
            say("ready");
            let mut buf = [0u8; 65536];
            loop {
                let (n, from) = sock.recv_from(&mut buf).expect("recv");
                let _ = sock.send_to(&buf[..n], from);
            }
        }
        _ => {
            eprintln!("usage: cis490-bpf-testtarget spin N | io PATH | late | mem | tap NAME | udp-echo ADDR");
            std::process::exit(2);
        }
    }
}
