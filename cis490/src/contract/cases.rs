//! The contract against rows the real writers produce from real inputs (the QEMU 10.0.2
//! fixtures, this host's /proc and sysfs), and each kind of violation caught by name.

use serde_json::{json, Map, Value};

use super::check::{check_row, TypeCheck, ViolationKind as V};
use super::{stream, Stream};
use crate::clock::EpisodeClock;
use crate::collector::{Collector, Tick, TickOutput, VcpuMap};
use crate::row::Row;

const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/qemu-10.0.2");

fn fixture(name: &str) -> String {
    let path = format!("{FIX}/{name}");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn s(name: &str) -> &'static Stream {
    stream(name).unwrap_or_else(|| panic!("no stream {name}"))
}

/// A row as the writer puts it in the file, parsed back.
fn written(row: &Row) -> Map<String, Value> {
    let mut line = Vec::new();
    row.write_json_line(&mut line);
    match serde_json::from_slice(&line).unwrap() {
        Value::Object(m) => m,
        other => panic!("{other}"),
    }
}

fn assert_meets(stream: &str, obj: &Map<String, Value>) {
    let v = check_row(s(stream), obj);
    assert!(v.is_empty(), "{stream} row {obj:?}:\n{v:#?}");
}

fn kinds(stream: &str, obj: Value) -> Vec<V> {
    check_row(s(stream), obj.as_object().unwrap())
        .into_iter()
        .map(|v| v.kind)
        .collect()
}

fn tick(seq: u64) -> Tick {
    Tick {
        seq,
        scheduled_ns: 0,
    }
}

// --- every stream's declaration matches real rows ---

#[test]
fn proc_rows_of_the_real_qemu_snapshot_meet_the_declaration() {
    let root = tempfile::tempdir().unwrap();
    let src = format!("{FIX}/tcg/proc");
    let pid_dir = root.path().join("6842");
    for f in ["stat", "io", "status", "schedstat"] {
        std::fs::create_dir_all(pid_dir.join("task")).unwrap();
        std::fs::copy(format!("{src}/{f}"), pid_dir.join(f)).unwrap();
    }
    for tid in ["6842", "6843", "6845", "6846", "6847"] {
        let d = pid_dir.join("task").join(tid);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["stat", "io", "status", "schedstat"] {
            std::fs::copy(format!("{src}/task/{tid}/{f}"), d.join(f)).unwrap();
        }
    }
    // One thread without its io file: its io columns are null, which the contract allows.
    std::fs::remove_file(pid_dir.join("task/6843/io")).unwrap();
    let vcpus = VcpuMap::default();
    vcpus.set([(6846, 0)].into_iter().collect());
    let mut c = crate::procfs::ProcCollector::with_root(6842, root.path(), vcpus);
    let mut out = TickOutput::default();
    c.collect(tick(0), &EpisodeClock::start(), &mut out)
        .unwrap();
    assert_eq!(out.rows().len(), 6);
    let mut check = TypeCheck::for_stream(s("proc"));
    for row in out.rows() {
        let obj = written(row);
        assert_meets("proc", &obj);
        assert!(check.check(&obj).is_empty());
    }
    assert!(check.finish().is_empty());
    // The first line has every column the total row fills, so a reader typing columns
    // from the first rows sees integers there, not nulls.
    let first = written(&out.rows()[0]);
    for col in ["rss_kb", "vsize_bytes", "num_threads", "on_cpu_ns"] {
        assert!(first[col].is_u64(), "{col} in {first:?}");
    }
}

#[test]
fn net_rows_of_this_hosts_loopback_meet_the_declaration() {
    let mut c =
        crate::net::SysfsNetCollector::new(std::process::id(), vec!["lo".into(), "absent0".into()]);
    let mut out = TickOutput::default();
    c.collect(tick(0), &EpisodeClock::start(), &mut out)
        .unwrap();
    assert_eq!(out.rows().len(), 2);
    for row in out.rows() {
        assert_meets("net", &written(row));
    }
    assert!(written(&out.rows()[0])["rx_bytes"].is_u64());
}

/// A QMP row as the collector assembles it (`Worker::row`, the request/reply span of
/// `stamp_span`, then the parsed fields).
fn qmp_row(kind: &'static str, fields: Vec<(crate::row::FieldName, crate::row::Value)>) -> Row {
    let mut r = Row::new(EpisodeClock::start().stamp(), "qmp", false);
    r.seq = Some(0);
    r.thread_columns = true;
    r.push("t_request_mono_ns", 100u64);
    r.push("t_sample_mono_ns", 150u64);
    r.push("rtt_ns", 100u64);
    r.push("kind", kind);
    r.fields.extend(fields);
    r
}

fn qmp_return(name: &str) -> Value {
    match crate::qmp::parse::parse_message(fixture(name).trim()).unwrap() {
        crate::qmp::parse::Message::Return { value, .. } => value,
        other => panic!("{name}: {other:?}"),
    }
}

#[test]
fn qmp_rows_from_real_replies_meet_the_declaration() {
    use crate::qmp::parse;
    // TCG: the vm row is the run state only; block rows from query-blockstats.
    let mut status = Vec::new();
    parse::status_fields(qmp_return("tcg/query-status.json"), &mut status).unwrap();
    assert_meets("qmp", &written(&qmp_row("vm", status.clone())));
    let blocks = parse::block_rows(qmp_return("tcg/query-blockstats.json")).unwrap();
    assert!(!blocks.is_empty());
    for b in blocks {
        assert_meets("qmp", &written(&qmp_row("block", b.fields)));
    }
    // KVM: vm and vcpu statistics, booleans and summarized histograms included.
    let mut vm = status;
    for r in parse::stats_rows(qmp_return("kvm/query-stats.vm.kvm.json")).unwrap() {
        vm.extend(r.fields);
    }
    let mut check = TypeCheck::for_stream(s("qmp"));
    let vm = written(&qmp_row("vm", vm));
    assert!(vm.keys().any(|k| k.starts_with("kvm_")));
    assert_meets("qmp", &vm);
    assert!(check.check(&vm).is_empty());
    let vcpus = parse::stats_rows(qmp_return("kvm/query-stats.vcpu.kvm.json")).unwrap();
    assert!(!vcpus.is_empty());
    for r in vcpus {
        let mut row = qmp_row("vcpu", Vec::new());
        row.tid = Some(6846);
        row.vcpu = Some(0);
        row.push("qom_path", r.qom_path.clone());
        row.fields.extend(r.fields);
        let obj = written(&row);
        assert!(obj.keys().any(|k| k.ends_with("_buckets")), "{obj:?}");
        assert_meets("qmp", &obj);
        assert!(check.check(&obj).is_empty());
    }
    assert!(check.finish().is_empty());
}

#[test]
fn agent_rows_from_the_lab_agents_lines_meet_the_declaration() {
    let mut check = TypeCheck::for_stream(s("agent"));
    let text = fixture("tcg/guest-agent.sample.jsonl");
    let mut columns = crate::agent::line::Columns::new();
    for (i, line) in text.lines().enumerate() {
        let acc = crate::agent::line::check(line.as_bytes(), &mut columns).unwrap();
        let mut row = Row::new(EpisodeClock::start().stamp(), "agent", true);
        row.seq = Some(i as u64);
        // As the reader writes it: null until the clock map has enough lines.
        let sampled = if i < 2 {
            crate::row::Value::Null
        } else {
            crate::row::Value::I64(-5)
        };
        row.push("t_sample_mono_ns", sampled);
        row.fields.extend(acc.fields);
        let obj = written(&row);
        assert_meets("agent", &obj);
        assert!(check.check(&obj).is_empty(), "line {i}");
    }
    assert!(check.finish().is_empty());
}

#[test]
fn labels_as_written_meet_the_declaration() {
    let dir = tempfile::tempdir().unwrap();
    let ep = crate::episode::dir::EpisodeDir::open_existing(dir.path()).unwrap();
    let mut labels = crate::labels::Labels::create(&ep, EpisodeClock::start()).unwrap();
    labels
        .transition(crate::labels::Phase::Armed, Some("mark"))
        .unwrap();
    labels
        .transition(crate::labels::Phase::InfectedRunning, None)
        .unwrap();
    drop(labels);
    let text = std::fs::read_to_string(dir.path().join("labels.jsonl")).unwrap();
    assert_eq!(text.lines().count(), 3);
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_meets("labels", v.as_object().unwrap());
    }
}

#[test]
fn events_as_the_event_log_writes_them_meet_the_declaration() {
    let dir = tempfile::tempdir().unwrap();
    let ep = crate::episode::dir::EpisodeDir::open_existing(dir.path()).unwrap();
    let log = crate::episode::EventLog::create(&ep, EpisodeClock::start()).unwrap();
    use super::events::Event;
    use crate::labels::Phase;
    let typed = [
        Event::gap("proc", 3, 4, Some(12)),
        Event::gap("proc", 5, 5, None),
        Event::EpisodeEnd {
            end_reason: super::EndReason::Recovered,
            error: None,
            recovered_by: Some("cis490 recover".into()),
        },
        Event::Phase {
            phase: Phase::InfectedRunning,
            prev: None,
            reason: None,
        },
        Event::SourceStarted {
            source: "qmp".into(),
            socket: None,
            rate_hz: Some(10),
            autodetected: None,
        },
        Event::QmpEvent {
            source: "qmp".into(),
            qmp_event: "STOP".into(),
            data: None,
            qemu_timestamp_us: None,
            data_dropped_bytes: None,
        },
    ];
    for e in &typed {
        log.record(e);
    }
    log.close().unwrap();
    let text = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), typed.len());
    for (v, e) in lines.iter().zip(&typed) {
        assert_meets("events", v.as_object().unwrap());
        // What was written reads back as the event recorded.
        let back: Event = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(&back, e);
    }
    // None: absent where the declaration says optional, null where it says required.
    assert!(lines[1].get("late_ns").is_none(), "{}", lines[1]);
    assert!(lines[2].get("error").is_none(), "{}", lines[2]);
    assert_eq!(lines[3]["phase"], "infected_running");
    assert!(lines[3]["prev"].is_null() && lines[3].get("prev").is_some());
    assert!(lines[4].get("socket").is_none() && lines[4]["rate_hz"] == 10);
    assert!(lines[5].get("data").is_some_and(Value::is_null));
    assert!(lines[5].get("data_dropped_bytes").is_none());
}

#[test]
fn the_row_writer_writes_floats_as_floats() {
    let mut row = Row::new(EpisodeClock::start().stamp(), "agent", true);
    row.seq = Some(0);
    row.push("t_sample_mono_ns", crate::row::Value::Null);
    row.push("guest_load1", 0.0).push("guest_uptime_s", 2.0);
    let obj = written(&row);
    assert!(obj["guest_load1"].is_f64(), "{obj:?}");
    assert_meets("agent", &obj);
}

// --- each violation, by name ---

fn proc_row() -> Value {
    json!({"t_mono_ns": 1, "t_wall_ns": 2, "source": "proc", "available_in_deployment": false,
        "seq": 0, "tid": 5, "comm": "CPU 0/TCG", "vcpu": null, "state": "S", "utime_ticks": 1,
        "stime_ticks": 1, "minflt": 0, "majflt": 0, "last_cpu": 1, "rchar": 1, "wchar": 1,
        "syscr": 1, "syscw": 1, "read_bytes": 0, "write_bytes": 0, "cancelled_write_bytes": 0,
        "on_cpu_ns": 7, "runqueue_wait_ns": 1, "timeslices_count": 1, "voluntary_switches": 1,
        "involuntary_switches": 0, "rss_kb": null, "vsize_bytes": null, "num_threads": null})
}

fn with(mut row: Value, key: &str, v: Value) -> Value {
    row[key] = v;
    row
}

#[test]
fn a_complete_proc_row_has_no_violation() {
    assert_eq!(kinds("proc", proc_row()), vec![]);
}

#[test]
fn null_in_a_non_nullable_column_is_caught() {
    assert_eq!(
        kinds("proc", with(proc_row(), "comm", Value::Null)),
        vec![V::NullInNonNullable]
    );
    assert_eq!(
        kinds("proc", with(proc_row(), "t_mono_ns", Value::Null)),
        vec![V::NullInNonNullable]
    );
}

#[test]
fn integer_in_a_float_column_is_caught() {
    let row = json!({"t_mono_ns": 1, "t_wall_ns": 2, "source": "agent", "t_sample_mono_ns": null,
        "available_in_deployment": true, "seq": 0, "guest_load1": 0});
    assert_eq!(kinds("agent", row.clone()), vec![V::IntInFloat]);
    assert_eq!(kinds("agent", with(row, "guest_load1", json!(0.0))), vec![]);
}

#[test]
fn float_in_an_integer_column_is_caught() {
    assert_eq!(
        kinds("proc", with(proc_row(), "on_cpu_ns", json!(1.5))),
        vec![V::FloatInInt]
    );
    // 7.0 is a float too: integers are written without a decimal point.
    assert_eq!(
        kinds("proc", with(proc_row(), "on_cpu_ns", json!(7.0))),
        vec![V::FloatInInt]
    );
}

#[test]
fn negative_integer_in_an_unsigned_column_is_caught() {
    assert_eq!(
        kinds("proc", with(proc_row(), "minflt", json!(-1))),
        vec![V::NegativeInUnsigned]
    );
}

#[test]
fn string_in_a_number_column_and_nested_values_are_wrong_types() {
    assert_eq!(
        kinds("proc", with(proc_row(), "rss_kb", json!("12"))),
        vec![V::WrongType]
    );
    assert_eq!(
        kinds("proc", with(proc_row(), "state", json!({"a": 1}))),
        vec![V::WrongType]
    );
}

#[test]
fn unknown_column_matching_no_pattern_is_caught() {
    assert_eq!(
        kinds("proc", with(proc_row(), "on_cpu_us", json!(1))),
        vec![V::UnknownColumn]
    );
    // Agent columns are open-ended only under guest_.
    let row = json!({"t_mono_ns": 1, "t_wall_ns": 2, "source": "agent", "t_sample_mono_ns": null,
        "available_in_deployment": true, "seq": 0, "guest_anything": "x", "host_x": 1});
    assert_eq!(kinds("agent", row), vec![V::UnknownColumn]);
}

#[test]
fn missing_column_is_caught() {
    let mut row = proc_row();
    row.as_object_mut().unwrap().remove("on_cpu_ns");
    assert_eq!(kinds("proc", row), vec![V::MissingColumn]);
}

#[test]
fn column_of_another_row_kind_is_caught() {
    let row = json!({"t_mono_ns": 1, "t_wall_ns": 2, "source": "qmp",
        "available_in_deployment": false, "seq": 0, "tid": null, "comm": null, "vcpu": null,
        "t_request_mono_ns": 0, "t_sample_mono_ns": 0, "rtt_ns": 1, "kind": "vm", "run_status": "running", "running": true, "read_bytes": 1,
        "kvm_exits": 3});
    assert_eq!(kinds("qmp", row.clone()), vec![V::WrongKind]);
    // kvm_* statistics belong to vm and vcpu rows only.
    let mut block = row;
    let b = block.as_object_mut().unwrap();
    b.retain(|k, _| !matches!(k.as_str(), "run_status" | "running" | "read_bytes"));
    b.insert("kind".into(), json!("block"));
    let k = kinds("qmp", block);
    assert!(k.contains(&V::WrongKind), "{k:?}");
    assert!(
        k.contains(&V::MissingColumn),
        "block columns missing: {k:?}"
    );
}

#[test]
fn value_outside_a_closed_set_is_caught() {
    assert_eq!(
        kinds("proc", with(proc_row(), "source", json!("bpf-sched"))),
        vec![V::NotAllowedValue]
    );
    assert_eq!(
        kinds(
            "proc",
            with(proc_row(), "available_in_deployment", json!(true))
        ),
        vec![V::NotAllowedValue]
    );
    let label = json!({"t_mono_ns": 1, "t_wall_ns": 2, "phase": "exploded", "prev": null,
        "reason": null});
    assert_eq!(kinds("labels", label), vec![V::NotAllowedValue]);
}

#[test]
fn family_column_that_changes_type_is_caught_but_int_to_float_widens() {
    let row = |v: Value| {
        json!({"t_mono_ns": 1, "t_wall_ns": 2, "source": "agent", "t_sample_mono_ns": null,
            "available_in_deployment": true, "seq": 0, "guest_custom": v})
    };
    let mut check = TypeCheck::for_stream(s("agent"));
    assert!(check.check(row(json!(1)).as_object().unwrap()).is_empty());
    assert!(check.check(row(json!(1.5)).as_object().unwrap()).is_empty());
    assert!(check
        .check(row(Value::Null).as_object().unwrap())
        .is_empty());
    let p = check.check(row(json!("one")).as_object().unwrap());
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].contains("guest_custom changed type"), "{p:?}");
    // A family with an exact type is checked like a declared column.
    let disk = json!({"t_mono_ns": 1, "t_wall_ns": 2, "source": "agent", "t_sample_mono_ns": null,
        "available_in_deployment": true, "seq": 0, "guest_disk_vda_read_bytes": 1.5});
    assert_eq!(kinds("agent", disk), vec![V::FloatInInt]);
}

#[test]
fn unknown_event_kind_and_missing_or_unknown_event_fields_are_caught() {
    let ev = |v: Value| kinds("events", v);
    assert_eq!(
        ev(json!({"t_mono_ns": 1, "t_wall_ns": 2, "event": "frobnicated"})),
        vec![V::UnknownEventKind]
    );
    assert_eq!(
        ev(
            json!({"t_mono_ns": 1, "t_wall_ns": 2, "event": "gap", "source": "proc",
            "from_seq": 1})
        ),
        vec![V::MissingColumn]
    );
    assert_eq!(
        ev(
            json!({"t_mono_ns": 1, "t_wall_ns": 2, "event": "target_exit", "pid": 3,
            "extra": 1})
        ),
        vec![V::UnknownColumn]
    );
    assert_eq!(
        ev(
            json!({"t_mono_ns": 1, "t_wall_ns": 2, "event": "episode_end",
            "end_reason": "bored"})
        ),
        vec![V::NotAllowedValue]
    );
}

#[test]
fn a_file_of_no_declared_stream_is_reported_once() {
    let mut check = TypeCheck::for_file("telemetry-pcap.jsonl");
    let row = json!({"t_mono_ns": 1});
    let first = check.check(row.as_object().unwrap());
    assert_eq!(first.len(), 1);
    assert!(first[0].contains("telemetry-pcap.jsonl"), "{first:?}");
    assert!(check.check(row.as_object().unwrap()).is_empty());
}

#[test]
fn a_repeated_problem_is_reported_once_then_counted() {
    let mut check = TypeCheck::for_file("telemetry-proc.jsonl.zst");
    let bad = with(proc_row(), "on_cpu_ns", json!(1.5));
    assert_eq!(check.check(bad.as_object().unwrap()).len(), 1);
    for _ in 0..4 {
        assert!(check.check(bad.as_object().unwrap()).is_empty());
    }
    let summary = check.finish();
    assert_eq!(summary.len(), 1);
    assert!(summary[0].contains("on_cpu_ns") && summary[0].contains("4 more rows"));
}

#[test]
fn bpf_writer_column_names_are_the_declared_ones() {
    use crate::bpf::sched::Stream as W;
    for (writer, name) in [(W::Sched, "bpf-sched"), (W::Io, "bpf-io")] {
        let declared = s(name);
        assert_eq!(writer.source(), name);
        for col in writer.names() {
            let c = declared
                .column(col)
                .unwrap_or_else(|| panic!("{name} writes {col}, which it does not declare"));
            // `state` is the one letter proc prints; every other column is a number.
            let ty = if *col == "state" {
                super::ColumnType::Dict
            } else {
                super::ColumnType::UInt64
            };
            assert_eq!(c.ty, ty, "{name}.{col}");
            assert!(
                c.nullable,
                "{name}.{col}: the kernel may not have it (written null)"
            );
        }
        // Every declared counter that every row must have is written.
        let header = [
            "t_mono_ns",
            "t_wall_ns",
            "source",
            "available_in_deployment",
            "seq",
            "tid",
            "comm",
            "vcpu",
            // Written by `push_process_only` (values on the process row, null on thread rows).
            "num_threads",
            "rss_kb",
            "vsize_bytes",
        ];
        for c in declared.columns {
            if c.presence == super::Presence::Always && !header.contains(&c.name) {
                assert!(
                    writer.names().contains(&c.name),
                    "{name} declares {} but does not write it",
                    c.name
                );
            }
        }
    }
}
