//! Find the QMP socket and the agent's chardev socket in a QEMU command line, so
//! `cis490 trace --qemu-pid N` needs no other flag for a VM started the usual way.
//!
//! Understood: `-qmp unix:PATH[,server=on,...]` (also `-qmp unix:PATH,server,nowait`),
//! `-chardev socket,id=ID,path=PATH,...` + `-mon chardev=ID,mode=control`, and
//! `-device virtserialport,...,chardev=ID,name=cis490.guest.agent` (also in `-device`'s
//! JSON form). QEMU option values escape a comma as ",,". `-qmp-pretty` sockets are
//! skipped: their replies span several lines. The first QMP socket wins: harnesses are
//! expected to use a second one (each socket serves one client at a time).

use std::collections::HashMap;
use std::path::PathBuf;

pub const AGENT_PORT_NAME: &str = "cis490.guest.agent";

/// Split `a,b=c,,d` into ["a", "b=c,d"].
fn split_opts(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

fn kv(opts: &[String]) -> HashMap<String, String> {
    opts.iter()
        .filter_map(|o| o.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect()
}

/// Options after `-name` or `--name`, in order.
fn option_values<'a>(cmdline: &'a [String], name: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut it = cmdline.iter().skip(1);
    while let Some(a) = it.next() {
        let bare = a.strip_prefix("--").or_else(|| a.strip_prefix('-'));
        if bare == Some(name) {
            if let Some(v) = it.next() {
                out.push(v.as_str());
            }
        } else if let Some((k, v)) = bare.and_then(|b| b.split_once('=')) {
            if k == name {
                out.push(v);
            }
        }
    }
    out
}

/// `-chardev socket,id=X,path=P` → X → P.
fn socket_chardevs(cmdline: &[String]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for v in option_values(cmdline, "chardev") {
        let opts = split_opts(v);
        if opts.first().map(String::as_str) != Some("socket") {
            continue;
        }
        let m = kv(&opts);
        if let (Some(id), Some(path)) = (m.get("id"), m.get("path")) {
            out.insert(id.clone(), path.clone());
        }
    }
    out
}

/// The QMP Unix socket of the command line, if any.
pub fn qmp_socket(cmdline: &[String]) -> Option<PathBuf> {
    for v in option_values(cmdline, "qmp") {
        let first = split_opts(v).into_iter().next().unwrap_or_default();
        if let Some(p) = first.strip_prefix("unix:") {
            return Some(PathBuf::from(p));
        }
    }
    let chardevs = socket_chardevs(cmdline);
    for v in option_values(cmdline, "mon") {
        let opts = split_opts(v);
        let m = kv(&opts);
        let control = m.get("mode").map(String::as_str) == Some("control");
        let pretty = m.get("pretty").map(String::as_str) == Some("on");
        if control && !pretty {
            if let Some(p) = m.get("chardev").and_then(|id| chardevs.get(id)) {
                return Some(PathBuf::from(p));
            }
        }
    }
    None
}

/// The socket behind the `cis490.guest.agent` virtserialport, if any.
pub fn agent_socket(cmdline: &[String]) -> Option<PathBuf> {
    let chardevs = socket_chardevs(cmdline);
    for v in option_values(cmdline, "device") {
        let (driver, chardev, name) = if v.trim_start().starts_with('{') {
            let Ok(j) = serde_json::from_str::<serde_json::Value>(v) else {
                continue;
            };
            let s = |k: &str| j.get(k).and_then(|x| x.as_str()).map(str::to_owned);
            (s("driver"), s("chardev"), s("name"))
        } else {
            let opts = split_opts(v);
            let m = kv(&opts);
            (
                opts.first().cloned(),
                m.get("chardev").cloned(),
                m.get("name").cloned(),
            )
        };
        if driver.as_deref() == Some("virtserialport") && name.as_deref() == Some(AGENT_PORT_NAME) {
            if let Some(p) = chardev.and_then(|id| chardevs.get(&id).cloned()) {
                return Some(PathBuf::from(p));
            }
        }
    }
    None
}

/// A relative socket path is relative to QEMU's working directory.
pub fn resolve(pid: u32, path: PathBuf) -> PathBuf {
    if path.is_absolute() {
        path
    } else {
        PathBuf::from(format!("/proc/{pid}/cwd")).join(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_owned).collect()
    }

    #[test]
    fn lab_cmdline_fixture() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/data/qemu-10.0.2/tcg/proc/cmdline.txt"
        ))
        .unwrap();
        // The fixture is the NUL-separated cmdline with NULs shown as spaces.
        let a: Vec<String> = if text.contains('\0') {
            crate::target::parse_cmdline(text.as_bytes())
        } else {
            args(text.trim())
        };
        assert_eq!(
            qmp_socket(&a).unwrap(),
            PathBuf::from("/run/cis490-lab/run/vm1/qmp.sock")
        );
        assert_eq!(
            agent_socket(&a).unwrap(),
            PathBuf::from("/run/cis490-lab/run/vm1/ga.sock")
        );
    }

    #[test]
    fn chardev_mon_form_and_escaped_commas() {
        let a = args("qemu -chardev socket,id=mon0,path=/tmp/a,,b.sock,server=on,wait=off -mon chardev=mon0,mode=control");
        assert_eq!(qmp_socket(&a).unwrap(), PathBuf::from("/tmp/a,b.sock"));
        let a = args("qemu -chardev socket,id=m,path=/x -mon chardev=m,mode=readline");
        assert_eq!(qmp_socket(&a), None);
        let a = args("qemu -qmp tcp:127.0.0.1:4444,server -qmp unix:/q2,server,nowait");
        assert_eq!(qmp_socket(&a).unwrap(), PathBuf::from("/q2"));
    }

    #[test]
    fn json_device_form() {
        let a = vec![
            "qemu".to_owned(),
            "-chardev".to_owned(),
            "socket,id=ga,path=/g.sock,server=on".to_owned(),
            "-device".to_owned(),
            r#"{"driver":"virtserialport","chardev":"ga","name":"cis490.guest.agent"}"#.to_owned(),
        ];
        assert_eq!(agent_socket(&a).unwrap(), PathBuf::from("/g.sock"));
        let other = args("qemu -chardev socket,id=ga,path=/g -device virtserialport,chardev=ga,name=org.qemu.guest_agent.0");
        assert_eq!(agent_socket(&other), None);
    }
}
