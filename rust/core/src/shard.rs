//! One safetensors file: validated header, memory maps, and the identity the file had
//! when it was opened (to notice later truncation or replacement).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use memmap2::{Mmap, MmapMut, MmapOptions};
use safetensors::tensor::{Dtype, SafeTensorError, TensorInfo};
use safetensors::SafeTensors;

use crate::error::{Error, Result};

/// Where one tensor's bytes lie in its shard. Offsets are absolute file offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

impl TensorEntry {
    /// Bytes of one element, or `None` for sub-byte dtypes (F4, F6), which cannot be sliced
    /// along their last dimension at element granularity.
    pub fn elem_bytes(&self) -> Option<usize> {
        elem_bytes(self.dtype)
    }
}

pub fn elem_bytes(dtype: Dtype) -> Option<usize> {
    let bits = dtype.bitsize();
    bits.is_multiple_of(8).then_some(bits / 8)
}

/// What identifies the file's contents as they were at open time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdentity {
    len: u64,
    dev: u64,
    ino: u64,
    mtime: (i64, i64),
}

impl FileIdentity {
    fn of(meta: &std::fs::Metadata) -> Self {
        FileIdentity {
            len: meta.len(),
            dev: meta.dev(),
            ino: meta.ino(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        }
    }
}

/// The eight bytes of the header length plus the smallest header, `{}`.
const MIN_FILE_LEN: u64 = 10;

pub struct Shard {
    path: PathBuf,
    file: File,
    /// Read-only mapping the copy plans read: nothing in this process can write to it.
    map: Mmap,
    /// Private (copy-on-write) mapping for zero-copy views handed to callers, made on first
    /// use: a caller writing through a view changes its own pages, never the file, never what
    /// later loads read, and never crashes on a read-only page. MAP_NORESERVE keeps huge
    /// shards from being charged against swap.
    view_map: OnceLock<MmapMut>,
    identity: FileIdentity,
    /// Set when a copy found pages of the mapping gone: the file was cut short under it.
    cut_short: AtomicBool,
    tensors: Vec<(String, TensorEntry)>,
    /// The header's `__metadata__` strings (what the writer recorded about the file).
    metadata: HashMap<String, String>,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("path", &self.path)
            .field("len", &self.identity.len)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Shard {
    /// Opens, validates and maps one safetensors file. A truncated or corrupt file fails here.
    pub fn open(path: &Path) -> Result<Shard> {
        // Refuse FIFOs and devices before opening them: opening a FIFO blocks forever.
        let kind = std::fs::metadata(path).map_err(|e| Error::io(path, "stat", e))?;
        if !kind.is_file() {
            return Err(Error::Checkpoint {
                path: path.to_path_buf(),
                reason: "not a regular file".into(),
            });
        }
        let file = File::open(path).map_err(|e| Error::io(path, "open", e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, "stat", e))?;
        if meta.len() < MIN_FILE_LEN {
            return Err(header_error(
                path,
                format!("the file is {} bytes, too short for a header", meta.len()),
            ));
        }
        // SAFETY: the mapping is read-only; this process never writes to the file. Truncation
        // by another process is detected by `check_intact` before every copy, and survived
        // by `read_mapped` during one.
        let map = unsafe { MmapOptions::new().map(&file) }
            .map_err(|e| Error::io(path, "memory-map", e))?;
        let (tensors, metadata) = parse_header(path, &map)?;
        Ok(Shard {
            path: path.to_path_buf(),
            file,
            map,
            view_map: OnceLock::new(),
            identity: FileIdentity::of(&meta),
            cut_short: AtomicBool::new(false),
            tensors,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Tensors in file order.
    /// The header's `__metadata__` entries.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    pub fn tensors(&self) -> &[(String, TensorEntry)] {
        &self.tensors
    }

    /// Start of the read-only mapping that copies read.
    pub fn as_ptr(&self) -> *const u8 {
        self.map.as_ptr()
    }

    /// Start of the private, writable (copy-on-write) mapping that zero-copy views export,
    /// mapped on first use.
    pub fn view_ptr(&self) -> Result<*mut u8> {
        if let Some(map) = self.view_map.get() {
            return Ok(map.as_ptr().cast_mut());
        }
        // SAFETY: private and copy-on-write: writes through it reach neither the file nor the
        // read-only mapping; truncation is checked before views are made.
        let map = unsafe { MmapOptions::new().no_reserve_swap().map_copy(&self.file) }
            .map_err(|e| Error::io(&self.path, "memory-map", e))?;
        Ok(self.view_map.get_or_init(|| map).as_ptr().cast_mut())
    }

    /// Starts asynchronous readahead of file bytes `[start, end)` into the page cache.
    pub fn will_need(&self, start: usize, end: usize) {
        const PAGE: usize = 4096;
        let first = start / PAGE * PAGE;
        let end = end.min(self.map.len());
        if end > first {
            // Advice only: a failure leaves the later reads to fault the pages in themselves.
            let _ = self
                .map
                .advise_range(memmap2::Advice::WillNeed, first, end - first);
        }
    }

    /// Reads `dst.len()` bytes at file offset `offset` with `pread`. A file truncated under us
    /// gives an error here.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(dst, offset as u64).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::FileChanged {
                    path: self.path.clone(),
                    what: "it is shorter than when it was opened".into(),
                }
            } else {
                Error::io(&self.path, "read", e)
            }
        })
    }

    /// Reads mapped bytes `[start, end)` with `read`, surviving the file being cut short
    /// meanwhile (see [`crate::fault`]); fails if it was, rather than pass zeros as data.
    pub(crate) fn read_mapped(&self, start: usize, end: usize, read: impl FnOnce()) -> Result<()> {
        let base = self.map.as_ptr() as usize;
        crate::fault::guarded(base + start..base + end, &self.cut_short, read);
        self.check_not_cut_short()
    }

    fn check_not_cut_short(&self) -> Result<()> {
        if self.cut_short.load(Ordering::SeqCst) {
            return Err(Error::FileChanged {
                path: self.path.clone(),
                what: "it was cut short during a copy".into(),
            });
        }
        Ok(())
    }

    /// Fails if the file was truncated, extended, rewritten, replaced or deleted since open.
    pub fn check_intact(&self) -> Result<()> {
        self.check_not_cut_short()?;
        let changed = |what: String| Error::FileChanged {
            path: self.path.clone(),
            what,
        };
        let now = FileIdentity::of(
            &self
                .file
                .metadata()
                .map_err(|e| Error::io(&self.path, "stat", e))?,
        );
        let was = self.identity;
        if now.len != was.len {
            return Err(changed(format!(
                "its size was {} bytes and is now {}",
                was.len, now.len
            )));
        }
        if now.mtime != was.mtime {
            return Err(changed("it was modified".into()));
        }
        match std::fs::metadata(&self.path) {
            Err(_) => Err(changed("it was deleted or moved".into())),
            Ok(meta) => {
                let on_disk = FileIdentity::of(&meta);
                if (on_disk.dev, on_disk.ino) != (was.dev, was.ino) {
                    Err(changed("it was replaced by another file".into()))
                } else {
                    Ok(())
                }
            }
        }
    }
}

fn header_error(path: &Path, reason: String) -> Error {
    Error::Header {
        path: path.to_path_buf(),
        reason,
    }
}

type Header = (Vec<(String, TensorEntry)>, HashMap<String, String>);

fn parse_header(path: &Path, bytes: &[u8]) -> Result<Header> {
    if let Some(what) = not_safetensors(bytes) {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("not a safetensors file but {what}"),
        });
    }
    let (header_len, metadata) =
        SafeTensors::read_metadata(bytes).map_err(|e| header_error(path, explain(&e, bytes)))?;
    let data_start = 8 + header_len;
    let mut tensors: Vec<(String, TensorEntry)> = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            let entry = TensorEntry {
                dtype: info.dtype,
                shape: info.shape.clone(),
                start: data_start + info.data_offsets.0,
                end: data_start + info.data_offsets.1,
            };
            (name, entry)
        })
        .collect();
    tensors.sort_by_key(|(_, e)| (e.start, e.end));
    Ok((tensors, metadata.metadata().clone().unwrap_or_default()))
}

/// What a file that cannot be safetensors looks like, or `None` if it may be one. A
/// safetensors file begins with its header's length and the header's opening `{`; a file
/// whose first eight bytes claim more than it holds, and are text or are not followed by
/// `{`, is something else (a config, an index or a PyTorch pickle under the wrong name),
/// not a truncated download. A length that fits leaves the verdict to the header's own
/// validation.
fn not_safetensors(bytes: &[u8]) -> Option<&'static str> {
    let start = bytes.get(..8)?;
    let claimed = u64::from_le_bytes(start.try_into().ok()?);
    let fits = claimed
        .checked_add(8)
        .is_some_and(|end| end <= bytes.len() as u64);
    // A real header length has zero high bytes, never eight printable characters.
    let printable = start
        .iter()
        .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace());
    if fits || (bytes.get(8) == Some(&b'{') && !printable) {
        return None;
    }
    let text = bytes.trim_ascii_start();
    let json = text.starts_with(b"{") || text.starts_with(b"[");
    Some(if json && contains(bytes, b"\"weight_map\"") {
        "the index of a sharded checkpoint: pass the directory that holds it"
    } else if json {
        "JSON (a config.json?): pass the checkpoint's directory or one of its .safetensors files"
    } else if bytes.starts_with(b"PK\x03\x04") {
        "a zip archive (a PyTorch checkpoint written by torch.save?): fastmoe_load reads \
         safetensors files only"
    } else if bytes.starts_with(&[0x80]) {
        "a Python pickle (a PyTorch .bin checkpoint?): fastmoe_load reads safetensors files only"
    } else if bytes.starts_with(b"GGUF") {
        "a GGUF file: fastmoe_load reads safetensors files only"
    } else {
        "something else (it does not begin with a header length and a JSON header): pass a \
         .safetensors file or the checkpoint's directory"
    })
}

/// Whether `needle` occurs in the first 64 KiB of `haystack` (enough for any index's keys).
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack[..haystack.len().min(64 << 10)]
        .windows(needle.len())
        .any(|w| w == needle)
}

/// Turns a header error into a sentence that names the tensor at fault where the
/// safetensors crate does not.
fn explain(error: &SafeTensorError, bytes: &[u8]) -> String {
    use SafeTensorError as E;
    let header = || -> Option<HashMap<String, serde_json::Value>> {
        let n = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
        serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()
    };
    let tensors = || {
        header()
            .into_iter()
            .flatten()
            .filter(|(name, _)| name != "__metadata__")
            .filter_map(|(name, value)| {
                Some((name, serde_json::from_value::<TensorInfo>(value).ok()?))
            })
    };
    match error {
        E::HeaderTooLarge | E::InvalidHeaderLength => format!(
            "the header claims {} bytes, more than the file ({} bytes) or the 100 MB limit \
             holds (truncated download?)",
            u64::from_le_bytes(bytes[..8].try_into().unwrap_or_default()),
            bytes.len()
        ),
        E::InvalidHeader(e) => format!("the header is not UTF-8 ({e})"),
        E::InvalidHeaderDeserialization(e) => header()
            .into_iter()
            .flatten()
            .filter(|(name, _)| name != "__metadata__")
            .find_map(|(name, value)| {
                let err = serde_json::from_value::<TensorInfo>(value).err()?;
                Some(format!("tensor `{name}`: {err}"))
            })
            .unwrap_or_else(|| format!("the header is not a JSON tensor table ({e})")),
        E::TensorInvalidInfo | E::ValidationOverflow | E::MisalignedSlice => tensors()
            .find_map(|(name, info)| {
                let bits = info
                    .shape
                    .iter()
                    .try_fold(info.dtype.bitsize(), |acc, &d| acc.checked_mul(d));
                let span = info.data_offsets.1.checked_sub(info.data_offsets.0);
                match (bits, span) {
                    (Some(bits), Some(span)) if bits % 8 == 0 && bits / 8 == span => None,
                    (None, _) => Some(format!("tensor `{name}`: shape {:?} overflows", info.shape)),
                    _ => {
                        Some(format!(
                        "tensor `{name}`: {} {:?} needs {} bytes but its data_offsets {:?} span {}",
                        info.dtype,
                        info.shape,
                        bits.map_or("a whole number of".into(), |b| format!("{}", b as f64 / 8.0)),
                        info.data_offsets,
                        span.map_or("a negative number of".into(), |s| s.to_string()),
                    ))
                    }
                }
            })
            .unwrap_or_else(|| error.to_string()),
        E::MetadataIncompleteBuffer => {
            let described = tensors().map(|(_, i)| i.data_offsets.1).max().unwrap_or(0);
            let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap_or_default());
            let held = (bytes.len() as u64).saturating_sub(8 + header_len);
            let verdict = if held < described as u64 {
                "truncated or incomplete download?"
            } else {
                "extra bytes after the data: a corrupt or mis-written file"
            };
            format!(
                "the header describes {described} bytes of data but the file holds {held} \
                 after the header ({verdict})"
            )
        }
        E::InvalidOffset(name) => format!(
            "tensor `{name}`: data_offsets are out of order, overlap another tensor or leave a gap"
        ),
        other => other.to_string(),
    }
}
