//! The `flow` and `flows` sources against real packets: a veth pair whose far end lives in
//! a network namespace this test creates (addresses 10.248.x.y/30 on this pair only,
//! IPv6 off and static neighbours, so no packet but the test's crosses it), carrying known
//! traffic: UDP datagrams of a known size to one port, one TCP connection opened, used and
//! closed, and DNS queries (one answered with a truncated message, which the dns source
//! must count and skip). The interface's own counters (/sys/class/net) are the ground
//! truth for the packet totals. The same capture writes `--pcap`: capture.pcapng must
//! hold exactly the packets the flow rows counted, each with its direction.
//!
//! Under CI=true a missing capability (root, `ip`, python3) is a failure, never a skip.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cis490_tests::*;
use serde_json::Value;

const UDP_PACKETS: u64 = 25;
const UDP_PAYLOAD: usize = 200;
/// Ethernet 14 + IPv4 20 + UDP 8.
const UDP_OVERHEAD: u64 = 42;
const DNS_NAMES: [&str; 3] = ["one.test", "two.test", "bad.test"];

fn capable() -> bool {
    // SAFETY: geteuid has no preconditions.
    let missing = if unsafe { libc::geteuid() } != 0 {
        Some("not root")
    } else if Command::new("ip").arg("-V").output().is_err() {
        Some("no `ip` (iproute2)")
    } else if Command::new("python3").arg("-V").output().is_err() {
        Some("no python3")
    } else {
        None
    };
    match missing {
        None => true,
        Some(why) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but {why}: the flow source cannot be tested"
            );
            eprintln!("SKIPPED: {why}");
            false
        }
    }
}

fn sh(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(st.success(), "{args:?} failed");
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .to_owned()
}

/// The veth pair and the namespace; both removed on drop.
struct Pair {
    ns: String,
    host_if: String,
    host_ip: String,
    peer_ip: String,
    peer: Option<Child>,
}

impl Pair {
    /// `tag`: one letter per test, so tests running at once get pairs of their own.
    fn create(tag: char) -> Pair {
        let id = std::process::id();
        let n = (id + tag as u32) % 60;
        let ns = format!("cis490f{tag}{id}");
        let host_if = format!("c490f{tag}{}", id % 100000);
        let peer_if = format!("c490g{tag}{}", id % 100000);
        let host_ip = format!("10.248.{n}.1");
        let peer_ip = format!("10.248.{n}.2");
        for leftover in [["netns", "del", &ns], ["link", "del", &host_if]] {
            let _ = Command::new("ip")
                .args(leftover)
                .stderr(Stdio::null())
                .status();
        }
        sh(&["ip", "netns", "add", &ns]);
        let pair = Pair {
            ns: ns.clone(),
            host_if: host_if.clone(),
            host_ip: host_ip.clone(),
            peer_ip: peer_ip.clone(),
            peer: None,
        };
        sh(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if,
        ]);
        sh(&["ip", "link", "set", &peer_if, "netns", &ns]);
        // No IPv6 (no router solicitations or DAD) and static neighbours (no ARP): the
        // test's packets are the only ones on the pair.
        sh(&[
            "sh",
            "-c",
            &format!("echo 1 > /proc/sys/net/ipv6/conf/{host_if}/disable_ipv6"),
        ]);
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "sh",
            "-c",
            &format!("echo 1 > /proc/sys/net/ipv6/conf/{peer_if}/disable_ipv6"),
        ]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &host_if,
        ]);
        sh(&["ip", "link", "set", &host_if, "up"]);
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "ip",
            "addr",
            "add",
            &format!("{peer_ip}/30"),
            "dev",
            &peer_if,
        ]);
        sh(&[
            "ip", "netns", "exec", &ns, "ip", "link", "set", &peer_if, "up",
        ]);
        sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
        let host_mac = read(&format!("/sys/class/net/{host_if}/address"));
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "cat",
                &format!("/sys/class/net/{peer_if}/address"),
            ])
            .output()
            .unwrap();
        let peer_mac = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        sh(&[
            "ip",
            "neigh",
            "replace",
            &peer_ip,
            "lladdr",
            &peer_mac,
            "dev",
            &host_if,
            "nud",
            "permanent",
        ]);
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "ip",
            "neigh",
            "replace",
            &host_ip,
            "lladdr",
            &host_mac,
            "dev",
            &peer_if,
            "nud",
            "permanent",
        ]);
        pair
    }

    fn start_peer(&mut self) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "python3"])
            .arg(root().join("tests/net/peer.py"))
            .arg(&self.peer_ip)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        self.peer = Some(child);
    }

    /// Stop the peer; the datagrams its UDP sink received.
    fn stop_peer(&mut self) -> u64 {
        let mut child = self.peer.take().unwrap();
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix("udp="))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("peer said {text:?}"))
    }

    /// (rx_packets, tx_packets, rx_bytes, tx_bytes) of the host end, from the kernel.
    fn counters(&self) -> [u64; 4] {
        let get = |f: &str| -> u64 {
            read(&format!("/sys/class/net/{}/statistics/{f}", self.host_if))
                .parse()
                .unwrap()
        };
        [
            get("rx_packets"),
            get("tx_packets"),
            get("rx_bytes"),
            get("tx_bytes"),
        ]
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        if let Some(mut c) = self.peer.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// A DNS query for `name` (type A, recursion desired).
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// A BPF capture of `target` watching `ifname` (`--no-qmp`; `extra` after), running
/// once its first flow rows are written.
fn trace_interface(data: &Path, target: &Child, ifname: &str, extra: &[&str]) -> Child {
    let pid = target.id().to_string();
    let mut args = vec![
        "--qemu-pid",
        pid.as_str(),
        "--backend",
        "bpf",
        "--net-if",
        ifname,
        "--no-qmp",
    ];
    args.extend_from_slice(extra);
    let child = spawn_trace(data, &args);
    assert!(wait_for(Duration::from_secs(20), || {
        first_episode_has_rows(data, "telemetry-flow.jsonl")
    }));
    child
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// The test's traffic: UDP datagrams, one TCP connection, DNS queries (each answered).
fn traffic(pair: &Pair) {
    let udp = UdpSocket::bind((pair.host_ip.as_str(), 0)).unwrap();
    let sink: SocketAddr = format!("{}:9999", pair.peer_ip).parse().unwrap();
    for _ in 0..UDP_PACKETS {
        udp.send_to(&[0x5a; UDP_PAYLOAD], sink).unwrap();
    }
    let mut tcp = TcpStream::connect_timeout(
        &format!("{}:8080", pair.peer_ip).parse().unwrap(),
        Duration::from_secs(5),
    )
    .unwrap();
    tcp.write_all(b"hello over tcp").unwrap();
    drop(tcp);
    let dns = UdpSocket::bind((pair.host_ip.as_str(), 0)).unwrap();
    dns.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let server: SocketAddr = format!("{}:53", pair.peer_ip).parse().unwrap();
    for (i, name) in DNS_NAMES.iter().enumerate() {
        dns.send_to(&dns_query(0x4000 + i as u16, name), server)
            .unwrap();
        let mut buf = [0u8; 512];
        let (n, _) = dns.recv_from(&mut buf).expect("a DNS answer");
        assert!(n >= 12 && buf[2] & 0x80 != 0, "not a response");
    }
    // Let the TCP close finish on both sides before the counters are read.
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
fn known_traffic_gives_exact_flow_counts_and_is_never_dropped() {
    if !capable() {
        return;
    }
    let mut pair = Pair::create('a');
    pair.start_peer();
    let target = Command::new("sleep").arg("30").spawn().unwrap();
    let data = tempfile::tempdir().unwrap();
    let child = trace_interface(
        data.path(),
        &target,
        &pair.host_if,
        &[
            "--rate-hz",
            "20",
            "--duration",
            "6",
            "--pcap",
            "--pcap-snaplen",
            "128",
        ],
    );
    let before = pair.counters();
    traffic(&pair);
    let after = pair.counters();
    let (ok, dir, stderr) = wait_trace(child, Duration::from_secs(30));
    assert!(ok, "trace failed: {stderr}");
    let mut target = target;
    let _ = target.kill();
    // Every datagram arrived: the programs only observe.
    assert_eq!(pair.stop_peer(), UDP_PACKETS, "the peer lost datagrams");

    let meta = read_json(&dir.join("meta.json"));
    let src = source_meta(&meta, "flow");
    assert_eq!(src["status"], "attached", "{src}");
    let rows = read_jsonl(&dir.join("telemetry-flow.jsonl"));
    assert!(rows.iter().all(|r| r["ifname"] == pair.host_if.as_str()));
    let first = &rows[0];
    let last = rows.last().unwrap();
    let d = |col: &str| u(&last[col]) - u(&first[col]);
    // The kernel's own interface counters, over the same traffic (nothing else crosses
    // the pair; the first row came before the traffic).
    assert_eq!(d("rx_packets"), after[0] - before[0], "rx packets vs /sys");
    assert_eq!(d("tx_packets"), after[1] - before[1], "tx packets vs /sys");
    assert_eq!(d("rx_bytes"), after[2] - before[2], "rx bytes vs /sys");
    assert_eq!(d("tx_bytes"), after[3] - before[3], "tx bytes vs /sys");
    // Per tick: the `net` source counts the same packets at other hooks (net_dev_xmit and
    // netif_receive_skb tracepoints, read by the snapshot itself), so the two agree at every
    // tick, but for a packet between the hooks while the snapshot is taken.
    let net: BTreeMap<u64, Value> = read_jsonl(&dir.join("telemetry-net.jsonl"))
        .into_iter()
        .map(|r| (u(&r["seq"]), r))
        .collect();
    let mut compared = 0;
    for r in &rows {
        let Some(n) = net.get(&u(&r["seq"])) else {
            continue;
        };
        for col in ["rx_packets", "tx_packets"] {
            let (a, b) = (u(&r[col]), u(&n[col]));
            assert!(
                a.abs_diff(b) <= 1,
                "seq {}: {col} flow {a}, net {b}",
                r["seq"]
            );
        }
        compared += 1;
    }
    assert!(
        compared + 2 >= rows.len(),
        "{compared} of {} ticks in both",
        rows.len()
    );
    let net_last = net.values().last().unwrap();
    assert_eq!(u(&last["rx_packets"]), u(&net_last["rx_packets"]));
    assert_eq!(u(&last["tx_packets"]), u(&net_last["tx_packets"]));
    let m = DNS_NAMES.len() as u64;
    assert_eq!(u(&last["udp_packets"]), UDP_PACKETS + 2 * m);
    assert_eq!(u(&last["dns_queries"]), m);
    assert_eq!(u(&last["dns_responses"]), m);
    assert_eq!(u(&last["tcp_syn"]), 1);
    assert_eq!(u(&last["tcp_synack"]), 1);
    assert_eq!(u(&last["tcp_fin"]), 2);
    assert_eq!(u(&last["tcp_rst"]), 0);
    assert_eq!(u(&last["icmp_packets"]), 0);
    assert_eq!(u(&last["other_packets"]), 0);
    assert_eq!(u(&last["untracked_packets"]), 0);
    // UDP sink, TCP connection, DNS socket.
    assert_eq!(u(&last["flows_new"]), 3);
    assert_eq!(u(&last["distinct_dst_addrs"]), 1);
    assert_eq!(u(&last["distinct_dst_ports"]), 3);
    assert_eq!(
        u(&last["rx_packets"]) + u(&last["tx_packets"]),
        u(&last["tcp_packets"]) + u(&last["udp_packets"])
    );

    // flows: one series per flow, cumulative; the sums agree with the interface rows at
    // every tick.
    let flows = read_jsonl(&dir.join("telemetry-flows.jsonl"));
    // (proto, src_port, dst_port) → (packets fwd, rev, bytes fwd, rev, tcp flags).
    type Latest = BTreeMap<(String, u64, u64), (u64, u64, u64, u64, u64)>;
    let mut latest = Latest::new();
    let mut flow_rows = flows.iter().peekable();
    for r in &rows {
        let seq = u(&r["seq"]);
        while let Some(f) = flow_rows.next_if(|f| u(&f["seq"]) <= seq) {
            latest.insert(
                (
                    f["proto"].as_str().unwrap().to_owned(),
                    u(&f["src_port"]),
                    u(&f["dst_port"]),
                ),
                (
                    u(&f["packets_fwd"]),
                    u(&f["packets_rev"]),
                    u(&f["bytes_fwd"]),
                    u(&f["bytes_rev"]),
                    u(&f["tcp_flags"]),
                ),
            );
        }
        let packets: u64 = latest.values().map(|v| v.0 + v.1).sum();
        assert_eq!(
            packets,
            u(&r["tcp_packets"]) + u(&r["udp_packets"]),
            "seq {seq}"
        );
    }
    assert_eq!(latest.len(), 3, "{latest:?}");
    let udp = latest
        .iter()
        .find(|((p, _, dport), _)| p == "udp" && *dport == 9999)
        .map(|(_, v)| *v)
        .unwrap();
    assert_eq!(udp.0, UDP_PACKETS);
    assert_eq!(udp.2, UDP_PACKETS * (UDP_OVERHEAD + UDP_PAYLOAD as u64));
    assert_eq!((udp.1, udp.3), (0, 0));
    let dns = latest
        .iter()
        .find(|((p, _, dport), _)| p == "udp" && *dport == 53)
        .map(|(_, v)| *v)
        .unwrap();
    assert_eq!((dns.0, dns.1), (m, m));
    let tcp = latest
        .iter()
        .find(|((p, _, dport), _)| p == "tcp" && *dport == 8080)
        .map(|(_, v)| *v)
        .unwrap();
    // SYN, ACK, FIN seen; no RST.
    assert_eq!(tcp.4 & 0x17, 0x13, "tcp flags {:#x}", tcp.4);
    for f in &flows {
        assert_eq!(f["src_addr"], pair.host_ip.as_str());
        assert_eq!(f["dst_addr"], pair.peer_ip.as_str());
        assert!(u(&f["first_seen_ns"]) <= u(&f["last_seen_ns"]));
        // Counted under the tick whose snapshot came after the packet (within the
        // instant the snapshot takes to publish its tick).
        assert!(u(&f["last_seen_ns"]) <= u(&f["t_mono_ns"]) + 1_000_000);
    }

    // dns: every query and every well-formed response, parsed; the truncated answer to
    // bad.test counted and skipped.
    assert_eq!(u(&last["dns_dropped"]), 0);
    let dns = read_jsonl(&dir.join("telemetry-dns.jsonl"));
    let queries: Vec<&Value> = dns.iter().filter(|r| r["is_response"] == false).collect();
    let answers: Vec<&Value> = dns.iter().filter(|r| r["is_response"] == true).collect();
    assert_eq!(queries.len(), DNS_NAMES.len(), "{dns:?}");
    assert_eq!(answers.len(), DNS_NAMES.len() - 1, "{dns:?}");
    for (i, (q, name)) in queries.iter().zip(DNS_NAMES).enumerate() {
        assert_eq!(q["qname"], name);
        assert_eq!(q["qtype"], 1);
        assert_eq!(q["qtype_name"], "A");
        assert_eq!(q["id"], 0x4000 + i as u64);
        assert_eq!(q["direction"], "tx");
        assert_eq!(q["transport"], "udp");
        assert_eq!(q["dst_port"], 53);
        assert_eq!(q["dst_addr"], pair.peer_ip.as_str());
    }
    for (a, name) in answers.iter().zip(DNS_NAMES) {
        assert_eq!(a["qname"], name);
        assert_eq!(a["answers"], "10.77.0.99");
        assert_eq!(a["direction"], "rx");
        assert_eq!(a["rcode"], 0);
        assert_eq!(a["src_port"], 53);
    }
    let dns_meta = source_meta(&meta, "dns");
    assert_eq!(dns_meta["malformed"]["truncated"], 1, "{dns_meta}");
    let events = read_jsonl(&dir.join("events.jsonl"));
    assert!(has_source_error(&events, "dns", "malformed (truncated)"));

    assert_valid(&dir);

    // --pcap: the same packets, each with its direction, cut at the snap length.
    let pcap = read_pcap(&dir.join("capture.pcapng"));
    assert!(
        pcap.packets.iter().all(|p| p.ethertype == 0x0800),
        "IPv4 only on the pair"
    );
    assert_eq!(pcap.ifaces, vec![pair.host_if.clone()]);
    let outbound = pcap.packets.iter().filter(|p| p.outbound).count() as u64;
    assert_eq!(
        outbound,
        u(&last["tx_packets"]),
        "outbound packets vs flow tx"
    );
    assert_eq!(
        pcap.packets.len() as u64 - outbound,
        u(&last["rx_packets"]),
        "inbound packets vs flow rx"
    );
    let count =
        |f: &dyn Fn(&PcapPacket) -> bool| pcap.packets.iter().filter(|p| f(p)).count() as u64;
    assert_eq!(
        count(&|p| p.proto == 17
            && p.dst_port == 9999
            && p.original_len == UDP_OVERHEAD + UDP_PAYLOAD as u64),
        UDP_PACKETS
    );
    assert_eq!(count(&|p| p.proto == 17 && p.dst_port == 53), m);
    assert_eq!(count(&|p| p.proto == 17 && p.src_port == 53), m);
    assert_eq!(
        count(&|p| p.proto == 6 && (p.dst_port == 8080 || p.src_port == 8080)),
        tcp.0 + tcp.1
    );
    assert!(pcap.packets.iter().all(|p| p.captured <= 128));
    assert!(
        pcap.packets.iter().any(|p| p.original_len > 128),
        "a datagram longer than the snap length"
    );
    let man = read_json(&dir.join("manifest.json"));
    assert!(
        man["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["name"] == "capture.pcapng"),
        "{man}"
    );
    let pm = &meta["result"]["pcap"];
    assert_eq!(pm["status"], "written", "{pm}");
    assert_eq!(u(&pm["packets_written"]), pcap.packets.len() as u64, "{pm}");
    assert_eq!(u(&pm["packets_dropped_kernel"]), 0, "{pm}");
    assert_eq!(u(&pm["packets_over_cap"]), 0, "{pm}");
    let ts = pcap.packets.iter().map(|p| p.wall_ns).collect::<Vec<_>>();
    let origin = u(&meta["clock"]["wall_origin_ns"]);
    assert!(
        ts.iter().all(|&t| t > origin),
        "pcap timestamps are wall-clock time after the start"
    );

    // A capture killed while writing leaves a torn last block and its start meta.json
    // (no result, so no result.pcap): recover cuts the block and describes the file, and
    // the episode validates again (on a copy without its closing files).
    let killed_root = tempfile::tempdir().unwrap();
    let killed = killed_root.path().join(dir.file_name().unwrap());
    std::fs::create_dir(&killed).unwrap();
    for e in std::fs::read_dir(&dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if name != "done.marker" && name != "manifest.json" {
            std::fs::copy(e.path(), killed.join(&name)).unwrap();
        }
    }
    let mut start_meta = read_json(&killed.join("meta.json"));
    start_meta["result"] = Value::Null;
    start_meta["ended_at_wall"] = Value::Null;
    std::fs::write(
        killed.join("meta.json"),
        serde_json::to_vec(&start_meta).unwrap(),
    )
    .unwrap();
    let whole = std::fs::metadata(killed.join("capture.pcapng"))
        .unwrap()
        .len();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(killed.join("capture.pcapng"))
        .unwrap();
    f.write_all(&[6, 0, 0, 0, 0x40, 0, 0, 0, 1, 2, 3]).unwrap();
    drop(f);
    let out = cis490().arg("recover").arg(&killed).output().unwrap();
    assert!(
        out.status.success(),
        "recover: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::metadata(killed.join("capture.pcapng"))
            .unwrap()
            .len(),
        whole
    );
    assert_valid(&killed);
    assert_eq!(
        read_json(&killed.join("meta.json"))["result"]["pcap"]["status"],
        "written"
    );

    // The Parquet export types the three streams and reads them back value for value.
    let dataset = tempfile::tempdir().unwrap();
    let x = cis490()
        .arg("export")
        .arg(&dir)
        .arg("--out")
        .arg(dataset.path())
        .arg("--verify")
        .output()
        .unwrap();
    assert!(
        x.status.success(),
        "export: {}",
        String::from_utf8_lossy(&x.stderr)
    );
    for stream in ["flow", "flows", "dns"] {
        assert!(
            dataset.path().join(stream).is_dir(),
            "no {stream} in the dataset"
        );
    }

    // The report plots the interface and counts the phase's flows and queries.
    let png = data.path().join("report.png");
    let out = cis490()
        .arg("report")
        .arg(&dir)
        .arg("--output")
        .arg(&png)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(table.contains("network: "), "{table}");
    let row = table
        .lines()
        .skip_while(|l| !l.starts_with("network per phase"))
        .nth(2)
        .unwrap_or_else(|| panic!("no network table:\n{table}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    // new_flows, dst_addrs, dst_ports, dns_queries, dns_names
    assert_eq!(
        &cols[cols.len() - 5..],
        ["3", "1", "3", "3", "3"],
        "{table}"
    );
}

/// IPv6: the programs parse the IPv6 header, so a UDP flow over IPv6 has its addresses
/// and exact counts. (IPv6 on: the kernel may add its own ICMPv6 on the pair, so only the
/// test's flow is checked exactly.)
#[test]
fn udp_over_ipv6_is_a_flow_with_exact_counts() {
    if !capable() {
        return;
    }
    const N: u64 = 7;
    const PAYLOAD: usize = 100;
    let pair = Pair::create('b');
    let peer_if = pair.host_if.replacen("c490f", "c490g", 1);
    let (a6, b6) = ("fd77:490::1", "fd77:490::2");
    sh(&[
        "sh",
        "-c",
        &format!(
            "echo 0 > /proc/sys/net/ipv6/conf/{}/disable_ipv6",
            pair.host_if
        ),
    ]);
    sh(&[
        "ip",
        "netns",
        "exec",
        &pair.ns,
        "sh",
        "-c",
        &format!("echo 0 > /proc/sys/net/ipv6/conf/{peer_if}/disable_ipv6"),
    ]);
    sh(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{a6}/64"),
        "dev",
        &pair.host_if,
        "nodad",
    ]);
    sh(&[
        "ip",
        "netns",
        "exec",
        &pair.ns,
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{b6}/64"),
        "dev",
        &peer_if,
        "nodad",
    ]);
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pair.ns,
            "cat",
            &format!("/sys/class/net/{peer_if}/address"),
        ])
        .output()
        .unwrap();
    let peer_mac = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    sh(&[
        "ip",
        "-6",
        "neigh",
        "replace",
        b6,
        "lladdr",
        &peer_mac,
        "dev",
        &pair.host_if,
        "nud",
        "permanent",
    ]);
    let target = Command::new("sleep").arg("30").spawn().unwrap();
    let data = tempfile::tempdir().unwrap();
    let child = trace_interface(data.path(), &target, &pair.host_if, &["--duration", "3"]);
    let s = UdpSocket::bind(format!("[{a6}]:0")).unwrap();
    for _ in 0..N {
        s.send_to(&[1u8; PAYLOAD], format!("[{b6}]:9999")).unwrap();
    }
    let (ok, dir, stderr) = wait_trace(child, Duration::from_secs(30));
    assert!(ok, "trace failed: {stderr}");
    let mut target = target;
    let _ = target.kill();
    let flows = read_jsonl(&dir.join("telemetry-flows.jsonl"));
    let ours: Vec<&Value> = flows
        .iter()
        .filter(|f| f["proto"] == "udp" && f["dst_addr"] == b6 && f["dst_port"] == 9999)
        .collect();
    let last = ours.last().expect("no row of the IPv6 flow");
    assert_eq!(last["src_addr"], a6);
    assert_eq!(u(&last["packets_fwd"]), N);
    // Ethernet 14 + IPv6 40 + UDP 8 + payload.
    assert_eq!(u(&last["bytes_fwd"]), N * (62 + PAYLOAD as u64));
    assert_valid(&dir);
}

/// Frames written straight onto the host end through a packet socket, so their headers
/// are exactly the test's: VLAN and QinQ tags, ICMP, both kinds of IPv4 fragment, DNS over
/// TCP, a frame that is not IP, then a flood of 40,000 new flows that overflows the
/// kernel's per-tick flow table. Every frame goes to an address the peer does not have and
/// to a MAC that is not its own, so it drops them all and answers none: the counts are the
/// frames' own.
#[test]
fn crafted_frames_cover_every_parser_path_and_a_full_flow_table_loses_no_packet() {
    if !capable() {
        return;
    }
    let pair = Pair::create('c');
    let target = Command::new("sleep").arg("30").spawn().unwrap();
    let data = tempfile::tempdir().unwrap();
    let child = trace_interface(
        data.path(),
        &target,
        &pair.host_if,
        &[
            // One-second ticks: the flood's flows land in one or two ticks, each far over
            // the table's 16,384 entries.
            "--rate-hz",
            "1",
            "--duration",
            "7",
            "--no-perf",
        ],
    );
    let before = pair.counters();
    let raw = RawSender::open(&pair.host_if);
    let udp = |sport: u16, dport: u16| ipv4(17, &udp_header(sport, dport, b"0123456789"), 0);
    for _ in 0..5 {
        raw.send(&eth(
            0x0800,
            &ipv4(1, &[8, 0, 0, 0, 0, 1, 0, 1, 1, 2, 3, 4], 0),
        ));
    }
    for _ in 0..3 {
        raw.send(&eth_tagged(&[(0x8100, 100)], 0x0800, &udp(1000, 2000)));
    }
    for _ in 0..2 {
        raw.send(&eth_tagged(
            &[(0x88a8, 7), (0x8100, 100)],
            0x0800,
            &udp(1001, 2001),
        ));
    }
    // A first fragment (more fragments, offset 0) and a later one (offset 185 × 8).
    raw.send(&eth(
        0x0800,
        &ipv4(17, &udp_header(1002, 2002, &[7; 24]), 0x2000),
    ));
    raw.send(&eth(0x0800, &ipv4(17, &[7; 24], 185)));
    // DNS over TCP: the 2-byte length, then the message.
    let query = dns_query(0x5151, "tcp.test");
    let mut stream = (query.len() as u16).to_be_bytes().to_vec();
    stream.extend_from_slice(&query);
    raw.send(&eth(
        0x0800,
        &ipv4(6, &tcp_header(40000, 53, 0x18, &stream), 0),
    ));
    raw.send(&eth(0x88b5, &[0u8; 46]));
    // The flood starts in a tick of its own.
    std::thread::sleep(Duration::from_millis(1500));
    const FLOOD: u64 = 40_000;
    for i in 0..FLOOD {
        raw.send(&eth(0x0800, &udp(1024 + i as u16, 3000)));
    }
    let after = pair.counters();
    let (ok, dir, stderr) = wait_trace(child, Duration::from_secs(30));
    assert!(ok, "trace failed: {stderr}");
    let mut target = target;
    let _ = target.kill();

    let rows = read_jsonl(&dir.join("telemetry-flow.jsonl"));
    let first = &rows[0];
    let last = rows.last().unwrap();
    let sent = 5 + 3 + 2 + 2 + 1 + 1 + FLOOD;
    assert_eq!(after[1] - before[1], sent, "the interface sent every frame");
    assert_eq!(u(&last["tx_packets"]) - u(&first["tx_packets"]), sent);
    assert_eq!(
        u(&last["tx_bytes"]) - u(&first["tx_bytes"]),
        after[3] - before[3]
    );
    assert_eq!(u(&last["rx_packets"]), 0);
    assert_eq!(u(&last["icmp_packets"]), 5);
    assert_eq!(u(&last["udp_packets"]), 3 + 2 + 2 + FLOOD);
    assert_eq!(u(&last["tcp_packets"]), 1);
    assert_eq!(u(&last["other_packets"]), 1, "the frame that is not IP");
    assert_eq!(u(&last["dns_queries"]), 1);
    // ICMP, VLAN, QinQ, the first fragment's, the later fragment's (no ports), DNS over
    // TCP, and every flow of the flood: all new to the kernel, tracked or not.
    assert_eq!(u(&last["flows_new"]), 6 + FLOOD);
    let untracked = u(&last["untracked_packets"]);
    assert!(untracked >= FLOOD - 2 * 16_384, "{untracked} untracked");

    // The flows of the frames before the flood, each with its ports.
    let flows = read_jsonl(&dir.join("telemetry-flows.jsonl"));
    let flow = |sport: u64, dport: u64, proto: &str| {
        flows
            .iter()
            .rev()
            .find(|f| f["proto"] == proto && f["src_port"] == sport && f["dst_port"] == dport)
            .unwrap_or_else(|| panic!("no {proto} flow {sport} -> {dport}"))
    };
    assert_eq!(u(&flow(0, 0, "icmp")["packets_fwd"]), 5);
    assert_eq!(u(&flow(1000, 2000, "udp")["packets_fwd"]), 3);
    assert_eq!(u(&flow(1001, 2001, "udp")["packets_fwd"]), 2);
    assert_eq!(u(&flow(1002, 2002, "udp")["packets_fwd"]), 1);
    assert_eq!(
        u(&flow(0, 0, "udp")["packets_fwd"]),
        1,
        "the later fragment"
    );
    assert_eq!(u(&flow(40000, 53, "tcp")["tcp_flags"]), 0x18);
    // Tracked flood flows plus untracked packets are the flood, exactly.
    let mut flood_packets = BTreeMap::new();
    for f in flows.iter().filter(|f| f["dst_port"] == 3000) {
        flood_packets.insert(u(&f["src_port"]), u(&f["packets_fwd"]));
    }
    assert_eq!(flood_packets.values().sum::<u64>() + untracked, FLOOD);

    let dns = read_jsonl(&dir.join("telemetry-dns.jsonl"));
    assert_eq!(dns.len(), 1, "{dns:?}");
    assert_eq!(dns[0]["transport"], "tcp");
    assert_eq!(dns[0]["qname"], "tcp.test");
    assert_eq!(dns[0]["id"], 0x5151);

    // The overflow is reported, not silent.
    let events = read_jsonl(&dir.join("events.jsonl"));
    assert!(
        has_source_error(&events, "flow", "flow table full"),
        "no source_error for the untracked packets"
    );
    assert_valid(&dir);
}

/// A raw packet socket on one interface: frames go out exactly as written.
struct RawSender {
    fd: i32,
    addr: libc::sockaddr_ll,
}

impl RawSender {
    fn open(ifname: &str) -> RawSender {
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: plain libc calls on values owned here.
        unsafe {
            let index = libc::if_nametoindex(name.as_ptr());
            assert!(index > 0, "no interface {ifname}");
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
            assert!(
                fd >= 0,
                "packet socket: {}",
                std::io::Error::last_os_error()
            );
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = index as i32;
            addr.sll_halen = 6;
            RawSender { fd, addr }
        }
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: sendto with a buffer and address that outlive the call.
        let n = unsafe {
            libc::sendto(
                self.fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&self.addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for RawSender {
    fn drop(&mut self) {
        // SAFETY: our own fd.
        unsafe { libc::close(self.fd) };
    }
}

/// To a MAC nobody on the pair has (the peer drops it as another host's).
const NOBODY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];

fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    eth_tagged(&[], ethertype, payload)
}

fn eth_tagged(tags: &[(u16, u16)], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = NOBODY_MAC.to_vec();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    for (tpid, vid) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4 packet from 192.0.2.10 to 192.0.2.1 (TEST-NET-1: nobody's); `frag` is the
/// flags and fragment offset field.
fn ipv4(proto: u8, payload: &[u8], frag: u16) -> Vec<u8> {
    let total = (20 + payload.len()) as u16;
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0x12, 0x34]);
    p.extend_from_slice(&frag.to_be_bytes());
    p.extend_from_slice(&[64, proto, 0, 0, 192, 0, 2, 10, 192, 0, 2, 1]);
    p.extend_from_slice(payload);
    p
}

fn udp_header(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = sport.to_be_bytes().to_vec();
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

fn tcp_header(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = sport.to_be_bytes().to_vec();
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t.extend_from_slice(payload);
    t
}
