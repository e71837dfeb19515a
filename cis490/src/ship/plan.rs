//! What shipping one episode uploads, in which order, and under which keys (pure: unit
//! tested without a store).
//!
//! ```text
//! PREFIX/raw/<episode_id>/<file>                                the episode's files, as captured
//! PREFIX/dataset/<stream>/episode_id=<id>/part-0.parquet        its Parquet export (docs/datasets.md)
//! PREFIX/dataset/episodes/episode_id=<id>/part-0.parquet        its row of the episodes table
//! PREFIX/shipped/<episode_id>.json                              the marker: every object, size, sha256
//! ```
//!
//! Order: the raw files but done.marker, the stream parts, raw done.marker, the episodes
//! table's part, the marker. A reader that starts from `shipped/` (or from the episodes
//! table) therefore never sees half an episode; one that globs a stream's folder may see
//! an episode in flight, so docs/datasets.md joins on the episodes table.

use serde::{Deserialize, Serialize};

use super::ShipError;

/// `s3://BUCKET/PREFIX` split into its bucket and its prefix (no leading or trailing
/// slash; empty for the bucket's root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub bucket: String,
    pub prefix: String,
}

impl Destination {
    pub fn parse(url: &str) -> Result<Destination, ShipError> {
        let bad = |why: &str| {
            ShipError::Usage(format!("--to {url:?}: {why} (expected s3://BUCKET/PREFIX)"))
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("not an s3:// URL"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        // S3's bucket naming rules (3-63 of a-z 0-9 . -, starting and ending with a
        // letter or digit); object_store would otherwise send it into a URL as given.
        let ok_char =
            |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-';
        if !(3..=63).contains(&bucket.len())
            || !bucket.chars().all(ok_char)
            || !bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
            || !bucket.ends_with(|c: char| c.is_ascii_alphanumeric())
        {
            return Err(bad("not a valid bucket name"));
        }
        let prefix = prefix.trim_matches('/');
        if prefix
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
            && !prefix.is_empty()
        {
            return Err(bad("the prefix has an empty, . or .. part"));
        }
        Ok(Destination {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
        })
    }

    /// `PREFIX/<rest>`, or `<rest>` at the bucket's root.
    pub fn key(&self, rest: &str) -> String {
        if self.prefix.is_empty() {
            rest.to_owned()
        } else {
            format!("{}/{rest}", self.prefix)
        }
    }

    pub fn raw_key(&self, id: &str, file: &str) -> String {
        self.key(&format!("raw/{id}/{file}"))
    }

    pub fn dataset_key(&self, table: &str, id: &str, part: &str) -> String {
        self.key(&format!("dataset/{table}/episode_id={id}/{part}"))
    }

    pub fn marker_key(&self, id: &str) -> String {
        self.key(&format!("shipped/{id}.json"))
    }
}

/// Where an upload's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A file of the episode, with the size and sha256 its manifest lists (None for
    /// manifest.json and done.marker, which it does not list: hashed when read).
    Episode { name: String },
    /// A file of the local Parquet export (hashed when read).
    Export { path: std::path::PathBuf },
}

/// One object to upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub key: String,
    pub origin: Origin,
    /// From manifest.json where it lists the file: the upload is refused if the file on
    /// disk differs, and the object is verified against them.
    pub expect: Option<(u64, String)>,
}

/// The marker object: written last, it is the record that the episode is shipped and
/// what each object is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub episode_id: String,
    pub shipped_at: String,
    pub cis490_version: String,
    pub objects: Vec<MarkerObject>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkerObject {
    pub key: String,
    pub bytes: u64,
    pub sha256: String,
}

/// A file name from manifest.json, which the episode's writer made but a hostile guest
/// or user could have edited: one plain path component only.
pub fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
        && name.len() <= 255
}

/// The ordered uploads of one episode. `listed` is manifest.json's files (name, bytes,
/// sha256); `streams` the export's parts (stream name, local file); `episodes_part` the
/// episodes table's part.
pub fn plan(
    dest: &Destination,
    id: &str,
    listed: &[(String, u64, String)],
    streams: &[(String, std::path::PathBuf)],
    episodes_part: &std::path::Path,
) -> Result<Vec<Upload>, ShipError> {
    let part = crate::export::PART;
    let mut out = Vec::new();
    let episode = |name: &str, expect: Option<(u64, String)>| Upload {
        key: dest.raw_key(id, name),
        origin: Origin::Episode {
            name: name.to_owned(),
        },
        expect,
    };
    for (name, bytes, sha) in listed {
        if !safe_name(name) || name == "manifest.json" || name == "done.marker" {
            return Err(ShipError::Usage(format!(
                "manifest.json lists {name:?}, which is not a file of the episode"
            )));
        }
        out.push(episode(name, Some((*bytes, sha.clone()))));
    }
    out.push(episode("manifest.json", None));
    for (stream, path) in streams {
        out.push(Upload {
            key: dest.dataset_key(stream, id, part),
            origin: Origin::Export { path: path.clone() },
            expect: None,
        });
    }
    out.push(episode("done.marker", None));
    out.push(Upload {
        key: dest.dataset_key(crate::export::EPISODES, id, part),
        origin: Origin::Export {
            path: episodes_part.to_path_buf(),
        },
        expect: None,
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn destinations_parse_and_refuse_what_s3_would_not_take() {
        let d = Destination::parse("s3://lab-data/cis490/host-a/").unwrap();
        assert_eq!(d.bucket, "lab-data");
        assert_eq!(d.prefix, "cis490/host-a");
        assert_eq!(d.marker_key("E1"), "cis490/host-a/shipped/E1.json");
        let root = Destination::parse("s3://lab-data").unwrap();
        assert_eq!(root.raw_key("E1", "meta.json"), "raw/E1/meta.json");
        for bad in [
            "lab-data/x",
            "s3://",
            "s3://Lab_Data/x",
            "s3://ab/x",
            "s3://-lab/x",
            "s3://lab-data/a//b",
            "s3://lab-data/a/../b",
        ] {
            assert!(Destination::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn the_plan_puts_done_marker_and_the_episodes_row_after_everything_else() {
        let d = Destination::parse("s3://lab-data/p").unwrap();
        let listed = vec![
            ("meta.json".into(), 10, "aa".into()),
            ("telemetry-proc.jsonl".into(), 20, "bb".into()),
        ];
        let streams = vec![("proc".into(), PathBuf::from("/x/proc.parquet"))];
        let p = plan(&d, "E1", &listed, &streams, &PathBuf::from("/x/ep.parquet")).unwrap();
        let keys: Vec<&str> = p.iter().map(|u| u.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "p/raw/E1/meta.json",
                "p/raw/E1/telemetry-proc.jsonl",
                "p/raw/E1/manifest.json",
                "p/dataset/proc/episode_id=E1/part-0.parquet",
                "p/raw/E1/done.marker",
                "p/dataset/episodes/episode_id=E1/part-0.parquet",
            ]
        );
        assert_eq!(p[1].expect, Some((20, "bb".into())));
    }

    #[test]
    fn a_manifest_naming_paths_outside_the_episode_is_refused() {
        let d = Destination::parse("s3://lab-data/p").unwrap();
        for name in [
            "../../etc/shadow",
            "/etc/shadow",
            "a/b",
            "",
            "..",
            "done.marker",
        ] {
            let listed = vec![(name.to_string(), 1, "x".to_string())];
            assert!(
                plan(&d, "E1", &listed, &[], &PathBuf::from("/e")).is_err(),
                "{name:?} accepted"
            );
        }
    }
}
