//! The object store, behind blocking calls: object_store's S3 client on a current-thread
//! tokio runtime owned here, so the rest of the shipper (and `--watch`'s loop) is plain
//! sequential code.

use std::fs::File;
use std::io::Read;
use std::time::Duration;

use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as Key;
use object_store::{
    BackoffConfig, ClientOptions, MultipartId, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
};
use sha2::{Digest, Sha256};

use super::journal::{Entry, Journal};
use super::plan::{Destination, Marker};
use super::ShipError;
use crate::jsonl::hex;

/// Files up to this size go in one PUT by default; larger ones in parts of
/// [`PART_BYTES`] (`--multipart-above`).
pub const SINGLE_PUT_MAX: u64 = 16 << 20;
/// Multipart part size (S3's minimum is 5 MiB for every part but the last).
pub const PART_BYTES: usize = 8 << 20;
/// A marker is small; a larger object at its key is not one of ours.
const MARKER_CAP: usize = 16 << 20;

#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// `--endpoint`: overrides AWS_ENDPOINT; a plain http:// URL is accepted because it was
    /// given explicitly (a lab's local store).
    pub endpoint: Option<String>,
    /// `--region`: overrides AWS_REGION / AWS_DEFAULT_REGION; us-east-1 when none is set.
    pub region: Option<String>,
    /// Files larger than this go up in parts (None: [`SINGLE_PUT_MAX`]).
    pub multipart_above: Option<u64>,
    /// `--state-dir`: where multipart uploads are journaled so a killed shipper resumes
    /// mid-file (None: [`Journal::default_dir`]).
    pub state_dir: Option<std::path::PathBuf>,
}

/// What one upload did.
pub struct Sent {
    /// The object's size and sha256 (the whole file's).
    pub bytes: u64,
    pub sha256: String,
    /// Bytes sent by this run (less than `bytes` when an upload was resumed).
    pub sent: u64,
}

pub struct Store {
    s3: AmazonS3,
    rt: tokio::runtime::Runtime,
    pub dest: Destination,
    endpoint: String,
    multipart_above: u64,
    /// None when no state directory could be had: uploads then start over when cut.
    journal: Option<Journal>,
}

/// What the store holds at a key.
pub struct Remote {
    pub bytes: u64,
}

impl Store {
    pub fn connect(dest: Destination, opts: &StoreOptions) -> Result<Store, ShipError> {
        // reqwest is built without a default TLS provider (ring instead of aws-lc: no C
        // toolchain for the build); install ring's once per process.
        let _ = rustls::crypto::ring::default_provider().install_default();
        // Client options first: with_allow_http below is kept in them, and setting them
        // afterwards would reset it.
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&dest.bucket)
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(300)),
            )
            // Fail within seconds on a store that is down (the default retries for
            // minutes); --watch does its own waiting between passes.
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(2),
                    base: 2.0,
                },
                max_retries: 3,
                retry_timeout: Duration::from_secs(20),
            });
        let env_endpoint = std::env::var("AWS_ENDPOINT")
            .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
            .ok();
        let endpoint = opts.endpoint.clone().or(env_endpoint);
        if let Some(e) = &endpoint {
            b = b
                .with_endpoint(e)
                .with_allow_http(e.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        let region = opts.region.clone().or_else(|| {
            std::env::var("AWS_REGION")
                .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
                .ok()
        });
        b = b.with_region(region.unwrap_or_else(|| "us-east-1".into()));
        let s3 = b.build().map_err(|e| ShipError::Store {
            fault: super::StoreFault::Other,
            what: format!("configuring s3://{}", dest.bucket),
            hint: "the store configuration is incomplete (credentials, region, endpoint)",
            detail: super::error::chain_text(&e),
        })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ShipError::io("tokio runtime"))?;
        let endpoint = endpoint.unwrap_or_else(|| "AWS".into());
        let journal = opts
            .state_dir
            .clone()
            .or_else(Journal::default_dir)
            .and_then(|dir| {
                Journal::open(&dir, &format!("{endpoint}\n{}", dest.bucket))
                    .map_err(|e| {
                        eprintln!(
                            "cis490 ship: no upload journal in {} ({e}): an upload cut short starts over",
                            dir.display()
                        )
                    })
                    .ok()
            });
        Ok(Store {
            s3,
            rt,
            endpoint,
            journal,
            multipart_above: opts.multipart_above.unwrap_or(SINGLE_PUT_MAX),
            dest,
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "s3://{}/{} at {}",
            self.dest.bucket, self.dest.prefix, self.endpoint
        )
    }

    /// List the prefix once: the first request, so a store that is down, a bucket that
    /// does not exist and refused credentials are told before any episode is read.
    pub fn check(&self) -> Result<(), ShipError> {
        let prefix = Key::from(self.dest.prefix.as_str());
        self.rt
            .block_on(self.s3.list_with_delimiter(Some(&prefix)))
            .map(|_| ())
            .map_err(|e| ShipError::store(format!("listing {}", self.describe()), &e))
    }

    /// Size of the object at `key`, None if there is none.
    pub fn head(&self, key: &str) -> Result<Option<Remote>, ShipError> {
        match self.rt.block_on(self.s3.head(&Key::from(key))) {
            Ok(m) => Ok(Some(Remote { bytes: m.size })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(ShipError::store(format!("HEAD {key}"), &e)),
        }
    }

    /// Read the object at `key` back and return its size and sha256 (the verification:
    /// what the store will serve, not what it said it stored).
    pub fn digest(&self, key: &str) -> Result<(u64, String), ShipError> {
        let k = Key::from(key);
        self.rt.block_on(async {
            let got = self
                .s3
                .get(&k)
                .await
                .map_err(|e| ShipError::store(format!("GET {key}"), &e))?;
            let mut body = got.into_stream();
            let mut h = Sha256::new();
            let mut n = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| ShipError::store(format!("GET {key}"), &e))?;
                n += chunk.len() as u64;
                h.update(&chunk);
            }
            Ok((n, hex(&h.finalize())))
        })
    }

    /// The episode's marker, if the store has a readable one.
    pub fn marker(&self, id: &str) -> Result<Option<Marker>, ShipError> {
        let key = self.dest.marker_key(id);
        let k = Key::from(key.as_str());
        let got = match self.rt.block_on(self.s3.get(&k)) {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(ShipError::store(format!("GET {key}"), &e)),
        };
        if got.meta.size > MARKER_CAP as u64 {
            return Ok(None);
        }
        let bytes = self
            .rt
            .block_on(got.bytes())
            .map_err(|e| ShipError::store(format!("GET {key}"), &e))?;
        Ok(serde_json::from_slice::<Marker>(&bytes)
            .ok()
            .filter(|m| m.episode_id == id))
    }

    pub fn put_marker(&self, m: &Marker) -> Result<(), ShipError> {
        let key = self.dest.marker_key(&m.episode_id);
        let body = serde_json::to_vec_pretty(m).expect("a marker serializes");
        self.rt
            .block_on(
                self.s3
                    .put(&Key::from(key.as_str()), PutPayload::from(body)),
            )
            .map(|_| ())
            .map_err(|e| ShipError::store(format!("PUT {key}"), &e))
    }

    /// Upload `file` (already open, `size` bytes) to `key`, hashing it as it is read; if
    /// `expect` is given (the manifest's size and sha256) and the bytes differ, the upload
    /// is abandoned before it completes (a multipart upload is aborted), so the store never
    /// holds a file the manifest does not vouch for.
    pub fn put_file(
        &self,
        key: &str,
        mut file: File,
        size: u64,
        expect: Option<&(u64, String)>,
    ) -> Result<Sent, ShipError> {
        let k = Key::from(key);
        let read_err = ShipError::io(key.to_owned());
        if size <= self.multipart_above {
            let mut data = Vec::with_capacity(size as usize);
            file.by_ref()
                .take(self.multipart_above + 1)
                .read_to_end(&mut data)
                .map_err(read_err)?;
            let sha = hex(&Sha256::digest(&data));
            let n = data.len() as u64;
            check(key, expect, n, &sha)?;
            self.rt
                .block_on(self.s3.put(&k, PutPayload::from(data)))
                .map_err(|e| ShipError::store(format!("PUT {key}"), &e))?;
            return Ok(Sent {
                bytes: n,
                sha256: sha,
                sent: n,
            });
        }
        // A journaled upload of this very file resumes; one the store no longer knows
        // (completed, aborted or expired meanwhile) starts over, once.
        let journal = self.journal.as_ref().filter(|_| expect.is_some());
        let resume = journal.and_then(|j| {
            let (b, sha) = expect?;
            j.load(key, *b, sha, PART_BYTES)
        });
        let resumed = resume.is_some();
        match self.put_parts(key, &mut file, expect, journal, resume) {
            Err(Multipart::Gone) if resumed => {
                if let Some(j) = journal {
                    j.remove(key);
                }
                eprintln!("cis490 ship: {key}: the store no longer has the upload to resume; starting over");
                std::io::Seek::rewind(&mut file).map_err(ShipError::io(key.to_owned()))?;
                self.put_parts(key, &mut file, expect, journal, None)
                    .map_err(Multipart::into_error)
            }
            other => other.map_err(Multipart::into_error),
        }
    }

    /// The parts of one multipart upload: new, or `resume`'s, whose parts already in the
    /// store are read and hashed but not sent again.
    fn put_parts(
        &self,
        key: &str,
        file: &mut File,
        expect: Option<&(u64, String)>,
        journal: Option<&Journal>,
        resume: Option<Entry>,
    ) -> Result<Sent, Multipart> {
        let k = Key::from(key);
        let store_err = |e: object_store::Error| {
            if matches!(e, object_store::Error::NotFound { .. }) {
                Multipart::Gone
            } else {
                Multipart::Failed(ShipError::store(format!("multipart PUT {key}"), &e))
            }
        };
        self.rt.block_on(async {
            let (id, mut parts) = match resume {
                Some(e) => {
                    let parts: Vec<PartId> = e
                        .parts
                        .into_iter()
                        .map(|content_id| PartId { content_id })
                        .collect();
                    (MultipartId::from(e.upload_id), parts)
                }
                None => (
                    self.s3
                        .create_multipart(&k)
                        .await
                        .map_err(|e| Multipart::Failed(ShipError::store(format!("multipart PUT {key}"), &e)))?,
                    Vec::new(),
                ),
            };
            let already = parts.len();
            if already > 0 {
                eprintln!("cis490 ship: {key}: resuming its upload after {already} parts already in the store");
            }
            let mut entry = Entry {
                key: key.to_owned(),
                upload_id: id.clone(),
                size: expect.map_or(0, |e| e.0),
                sha256: expect.map_or_else(String::new, |e| e.1.clone()),
                part_bytes: PART_BYTES,
                parts: parts.iter().map(|p| p.content_id.clone()).collect(),
            };
            let mut h = Sha256::new();
            let (mut n, mut sent) = (0u64, 0u64);
            for idx in 0usize.. {
                // A buffer of its own per part: it becomes the request's payload as it is.
                let mut buf = vec![0u8; PART_BYTES];
                let got = read_full(file, &mut buf).map_err(|e| {
                    Multipart::Failed(ShipError::Io {
                        path: key.into(),
                        source: e,
                    })
                })?;
                if got == 0 && idx > 0 {
                    break;
                }
                h.update(&buf[..got]);
                n += got as u64;
                let last = got < PART_BYTES;
                if idx >= already {
                    buf.truncate(got);
                    let part = self
                        .s3
                        .put_part(&k, &id, idx, PutPayload::from(buf))
                        .await
                        .map_err(store_err)?;
                    sent += got as u64;
                    entry.parts.push(part.content_id.clone());
                    parts.push(part);
                    if let Some(j) = journal {
                        // Best effort: without it a cut upload starts over.
                        let _ = j.save(&entry);
                    }
                }
                if last {
                    break;
                }
            }
            let sha = hex(&h.finalize());
            if let Err(e) = check(key, expect, n, &sha) {
                let _ = self.s3.abort_multipart(&k, &id).await;
                if let Some(j) = journal {
                    j.remove(key);
                }
                return Err(Multipart::Failed(e));
            }
            self.s3
                .complete_multipart(&k, &id, parts)
                .await
                .map_err(store_err)?;
            if let Some(j) = journal {
                j.remove(key);
            }
            Ok(Sent {
                bytes: n,
                sha256: sha,
                sent,
            })
        })
    }
}

/// How a multipart upload failed: the store no longer knows the upload (a resumed one
/// then starts over), or anything else.
enum Multipart {
    Gone,
    Failed(ShipError),
}

impl Multipart {
    fn into_error(self) -> ShipError {
        match self {
            Multipart::Failed(e) => e,
            Multipart::Gone => ShipError::Store {
                fault: super::StoreFault::Other,
                what: "multipart PUT".into(),
                hint: "the store lost the upload while it was being sent",
                detail: "NoSuchUpload".into(),
            },
        }
    }
}

/// Fill `buf` from `file` unless the file ends first; the bytes read.
fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut at = 0;
    while at < buf.len() {
        match file.read(&mut buf[at..]) {
            Ok(0) => break,
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(at)
}

/// The file's bytes against the manifest's size and sha256.
fn check(key: &str, expect: Option<&(u64, String)>, n: u64, sha: &str) -> Result<(), ShipError> {
    match expect {
        Some((b, s)) if *b != n || s != sha => Err(ShipError::Verify {
            key: key.to_owned(),
            message: format!(
                "the local file is {n} bytes sha256 {sha}, manifest.json says {b} bytes sha256 {s}: not uploaded"
            ),
        }),
        _ => Ok(()),
    }
}
