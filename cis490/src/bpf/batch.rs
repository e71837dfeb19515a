//! Draining a BPF hash map in one syscall per tick: BPF_MAP_LOOKUP_BATCH into buffers
//! allocated once, instead of get_next_key + lookup per entry (2 syscalls per thread per
//! tick, which at 1 kHz and a few dozen QEMU threads costs more than the kernel side).

use std::os::fd::{AsFd, AsRawFd};

use aya::maps::{Map, MapData};

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `union bpf_attr`'s element-command member (delete).
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// A `u32 → V` hash map read whole each tick.
pub struct HashDrain<V: Copy + Default> {
    map: MapData,
    name: &'static str,
    keys: Vec<u32>,
    values: Vec<V>,
    len: usize,
}

impl<V: Copy + Default> HashDrain<V> {
    pub fn new(map: Map, name: &'static str, max_entries: usize) -> Result<Self, String> {
        let map = match map {
            Map::HashMap(m) => m,
            _ => return Err(format!("map {name} is not a BPF hash map")),
        };
        Ok(Self {
            map,
            name,
            keys: vec![0; max_entries],
            values: vec![V::default(); max_entries],
            len: 0,
        })
    }

    /// The map's fd (handed from the loader process to the capture).
    pub fn map_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.map.fd().as_fd()
    }

    fn fd(&self) -> u32 {
        self.map.fd().as_fd().as_raw_fd() as u32
    }

    /// Read every entry; afterwards [`Self::entries`] holds them.
    pub fn read(&mut self) -> Result<(), String> {
        self.len = 0;
        let mut token_in: u64 = 0;
        let mut token_out: u64 = 0;
        let mut first = true;
        loop {
            let room = self.keys.len() - self.len;
            if room == 0 {
                return Ok(());
            }
            let mut attr = BatchAttr {
                in_batch: if first { 0 } else { &raw const token_in as u64 },
                out_batch: &raw mut token_out as u64,
                keys: self.keys[self.len..].as_mut_ptr() as u64,
                values: self.values[self.len..].as_mut_ptr() as u64,
                count: room as u32,
                map_fd: self.fd(),
                ..Default::default()
            };
            // SAFETY: the buffers have room for `count` keys and values of the map's sizes
            // (u32 keys; V is the #[repr(C)] value type the map was created with).
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_LOOKUP_BATCH,
                    &mut attr as *mut BatchAttr,
                    std::mem::size_of::<BatchAttr>(),
                )
            };
            let err = (rc < 0).then(std::io::Error::last_os_error);
            self.len += attr.count as usize;
            match err {
                None => {}
                // ENOENT: the end of the map (entries of this call are still valid).
                Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                Some(e) => return Err(format!("BPF_MAP_LOOKUP_BATCH on {}: {e}", self.name)),
            }
            token_in = token_out;
            first = false;
        }
    }

    pub fn entries(&self) -> impl Iterator<Item = (u32, &V)> {
        self.keys[..self.len]
            .iter()
            .copied()
            .zip(&self.values[..self.len])
    }

    /// Insert or replace one entry.
    pub fn insert(&mut self, key: u32, value: &V) -> Result<(), String> {
        let attr = ElemAttr {
            map_fd: self.fd(),
            _pad: 0,
            key: &raw const key as u64,
            value: value as *const V as u64,
            flags: 0, // BPF_ANY
        };
        // SAFETY: BPF_MAP_UPDATE_ELEM with pointers to a live key and value of the map's
        // sizes.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_ELEM,
                &attr as *const ElemAttr,
                std::mem::size_of::<ElemAttr>(),
            )
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            return Err(format!("updating map {}: {e}", self.name));
        }
        Ok(())
    }

    pub fn remove(&mut self, key: u32) {
        let attr = ElemAttr {
            map_fd: self.fd(),
            _pad: 0,
            key: &raw const key as u64,
            value: 0,
            flags: 0,
        };
        // SAFETY: BPF_MAP_DELETE_ELEM with a pointer to a live u32 key. Failure (already
        // gone) needs no handling.
        unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_DELETE_ELEM,
                &attr as *const ElemAttr,
                std::mem::size_of::<ElemAttr>(),
            )
        };
    }
}
