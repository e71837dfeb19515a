//! The object store, behind blocking calls: object_store's S3 client on a current-thread
//! tokio runtime owned here, so the rest of the shipper (and `--watch`'s loop) is plain
//! sequential code.

use std::fs::File;
use std::io::Read;
use std::time::Duration;

use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
    WriteMultipart,
};
use sha2::{Digest, Sha256};

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
}

pub struct Store {
    s3: AmazonS3,
    rt: tokio::runtime::Runtime,
    pub dest: Destination,
    endpoint: String,
    multipart_above: u64,
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
        Ok(Store {
            s3,
            rt,
            endpoint: endpoint.unwrap_or_else(|| "AWS".into()),
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
    /// holds a file the manifest does not vouch for. Returns the bytes sent and their sha256.
    pub fn put_file(
        &self,
        key: &str,
        mut file: File,
        size: u64,
        expect: Option<&(u64, String)>,
    ) -> Result<(u64, String), ShipError> {
        let k = Key::from(key);
        let check = |n: u64, sha: &str| -> Result<(), ShipError> {
            match expect {
                Some((b, s)) if *b != n || s != sha => Err(ShipError::Verify {
                    key: key.to_owned(),
                    message: format!(
                        "the local file is {n} bytes sha256 {sha}, manifest.json says {b} bytes sha256 {s}: not uploaded"
                    ),
                }),
                _ => Ok(()),
            }
        };
        let read_err = ShipError::io(key.to_owned());
        if size <= self.multipart_above {
            let mut data = Vec::with_capacity(size as usize);
            file.by_ref()
                .take(self.multipart_above + 1)
                .read_to_end(&mut data)
                .map_err(read_err)?;
            let sha = hex(&Sha256::digest(&data));
            let n = data.len() as u64;
            check(n, &sha)?;
            self.rt
                .block_on(self.s3.put(&k, PutPayload::from(data)))
                .map_err(|e| ShipError::store(format!("PUT {key}"), &e))?;
            return Ok((n, sha));
        }
        self.rt.block_on(async {
            let upload = self
                .s3
                .put_multipart(&k)
                .await
                .map_err(|e| ShipError::store(format!("multipart PUT {key}"), &e))?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
            let mut h = Sha256::new();
            let mut n = 0u64;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let got = match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(g) => g,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let _ = w.abort().await;
                        return Err(ShipError::Io {
                            path: key.into(),
                            source: e,
                        });
                    }
                };
                h.update(&buf[..got]);
                n += got as u64;
                // At most two parts in flight: memory stays at a few parts whatever the
                // file's size.
                if let Err(e) = w.wait_for_capacity(2).await {
                    return Err(ShipError::store(format!("multipart PUT {key}"), &e));
                }
                w.write(&buf[..got]);
            }
            let sha = hex(&h.finalize());
            if let Err(e) = check(n, &sha) {
                let _ = w.abort().await;
                return Err(e);
            }
            w.finish()
                .await
                .map_err(|e| ShipError::store(format!("multipart PUT {key}"), &e))?;
            Ok((n, sha))
        })
    }
}
