//! The GGUF container (llama.cpp's file format), read and written in one place: the model
//! (`kiln_model::gguf`), the tokenizer (`kiln_data::gguf_tokenizer`) and export all go through
//! it. It knows the layout, not what the keys or tensors mean.
//!
//! ```text
//! "GGUF" u32 version  len n_tensors  len n_kv
//! n_kv      × { string key, u32 type, value }                 (len = u32 in v1, u64 in v2/v3)
//! n_tensors × { string name, u32 n_dims, len dims[n_dims], u32 ggml_type, u64 offset }
//! padding to general.alignment (default 32), then the tensor data at data_start + offset
//! ```
//!
//! The reader takes untrusted bytes: every length is checked against the bytes that are left
//! before anything is allocated, nesting is bounded, and every error names the key or tensor it
//! was reading (`metadata key "tokenizer.ggml.tokens": the file is truncated ...`). It never
//! panics (`examples/fuzz.rs` mutates real headers to check that).

use std::collections::BTreeMap;
use std::io::Write;

/// A metadata value, with GGUF's own types (a writer must keep them: llama.cpp checks them).
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// Any non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_i128().and_then(|v| u64::try_from(v).ok())
    }

    /// Any integer.
    pub fn as_i64(&self) -> Option<i64> {
        self.as_i128().and_then(|v| i64::try_from(v).ok())
    }

    fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(x) => x as i128,
            GgufValue::I8(x) => x as i128,
            GgufValue::U16(x) => x as i128,
            GgufValue::I16(x) => x as i128,
            GgufValue::U32(x) => x as i128,
            GgufValue::I32(x) => x as i128,
            GgufValue::U64(x) => x as i128,
            GgufValue::I64(x) => x as i128,
            _ => return None,
        })
    }

    /// Any number (an f32 as the decimal it was written as, so 1e-6 stays 1e-6).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(x) => Some(x.to_string().parse().unwrap_or(x as f64)),
            GgufValue::F64(x) => Some(x),
            _ => self.as_i128().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    fn type_id(&self) -> u32 {
        match self {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::Array(_) => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    /// PyTorch order, outermost first: `(out, in)` for a matrix (the file stores them reversed).
    pub dims: Vec<usize>,
    /// GGML type id (0 F32, 1 F16, 2 Q4_0, ..., 30 BF16).
    pub ggml_type: u32,
    /// Byte offset of the data from `data_start`.
    pub offset: u64,
}

/// A GGUF header: metadata, the tensor table, and where the data begins.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<TensorEntry>,
    pub alignment: usize,
    /// Absolute byte offset of the tensor data.
    pub data_start: usize,
}

/// Why a header could not be read, with the key or tensor being read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct GgufError(pub String);

/// Metadata arrays nest at most this deep (llama.cpp writes none nested).
const MAX_DEPTH: usize = 4;
/// Tensor dimensions at most (GGML_MAX_DIMS).
const MAX_DIMS: usize = 4;

/// A bounds-checked little-endian reader.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    v1: bool,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        match self.pos.checked_add(n).filter(|&e| e <= self.buf.len()) {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(format!(
                "the file is truncated (or not a GGUF file): the header needs {n} bytes at offset {}, the file has {}",
                self.pos,
                self.buf.len()
            )),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count or length, which cannot exceed what is left of the file at `min_size` bytes
    /// per item (so no allocation is larger than the file justifies).
    fn len(&mut self, min_size: usize) -> Result<usize, String> {
        let n = if self.v1 {
            self.u32()? as u64
        } else {
            self.u64()?
        };
        match usize::try_from(n) {
            Ok(n) if n.saturating_mul(min_size.max(1)) <= self.left() => Ok(n),
            _ => Err(format!(
                "a length of {n} at offset {} is more than the {} bytes left in the file (truncated or corrupt)",
                self.pos,
                self.left()
            )),
        }
    }

    fn string(&mut self) -> Result<String, String> {
        let n = self.len(1)?;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<GgufValue, String> {
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>()?[0]),
            1 => GgufValue::I8(self.array::<1>()?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array()?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array()?)),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array()?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array()?)),
            7 => GgufValue::Bool(self.array::<1>()?[0] != 0),
            8 => GgufValue::String(self.string()?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err("metadata arrays nested too deeply".into());
                }
                let elem = self.u32()?;
                let n = self.len(min_value_size(elem)?)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(elem, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array()?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(format!("unknown metadata value type {other}")),
        })
    }
}

/// The fewest bytes a value of type `ty` takes in the file.
fn min_value_size(ty: u32) -> Result<usize, String> {
    Ok(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        8 | 9 => 4, // a length (u32 in v1) at least
        other => return Err(format!("unknown metadata value type {other}")),
    })
}

/// Reads the header of a GGUF file from its bytes (the whole file, or at least its header).
pub fn read_header(buf: &[u8]) -> Result<GgufHeader, GgufError> {
    read(buf).map_err(GgufError)
}

fn read(buf: &[u8]) -> Result<GgufHeader, String> {
    if buf.is_empty() {
        return Err("the file is empty (an interrupted download?)".into());
    }
    let mut r = Reader {
        buf,
        pos: 0,
        v1: false,
    };
    if r.take(4)? != b"GGUF" {
        return Err("not a GGUF file (its first bytes are not \"GGUF\")".into());
    }
    let version = r.u32()?;
    match version {
        1 => r.v1 = true,
        2 | 3 => {}
        v => return Err(format!("unsupported GGUF version {v} (kiln reads 1 to 3)")),
    }
    // A tensor entry takes at least 24 bytes, a key/value at least 13 (v1: 9).
    let n_tensors = r.len(20)?;
    let n_kv = r.len(9)?;
    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = r
            .string()
            .map_err(|e| format!("metadata key {i} of {n_kv}: {e}"))?;
        let value = r
            .u32()
            .and_then(|ty| r.value(ty, 0))
            .map_err(|e| format!("metadata key {key:?}: {e}"))?;
        metadata.insert(key, value);
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(GgufValue::U32(a)) if *a > 0 && a.is_power_of_two() => *a as usize,
        Some(other) => {
            return Err(format!(
                "metadata key \"general.alignment\": {other:?} is not a power of two (u32)"
            ))
        }
    };
    let mut tensors = Vec::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = r
            .string()
            .map_err(|e| format!("tensor {i} of {n_tensors}: {e}"))?;
        let entry = (|| -> Result<TensorEntry, String> {
            let n_dims = r.u32()? as usize;
            if n_dims > MAX_DIMS {
                return Err(format!("{n_dims} dimensions (at most {MAX_DIMS})"));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                let d = if r.v1 { r.u32()? as u64 } else { r.u64()? };
                dims.push(usize::try_from(d).map_err(|_| format!("dimension {d} is too large"))?);
            }
            dims.reverse();
            if dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .is_none()
            {
                return Err(format!("dimensions {dims:?} overflow"));
            }
            Ok(TensorEntry {
                name: name.clone(),
                dims,
                ggml_type: r.u32()?,
                offset: r.u64()?,
            })
        })()
        .map_err(|e| format!("tensor {name:?}: {e}"))?;
        tensors.push(entry);
    }
    let data_start = r.pos.div_ceil(alignment) * alignment;
    Ok(GgufHeader {
        version,
        metadata,
        tensors,
        alignment,
        data_start,
    })
}

/// A tensor to write: its name, GGML type id, PyTorch-order dims and its bytes as GGML lays
/// them out.
pub struct TensorData<'a> {
    pub name: &'a str,
    pub ggml_type: u32,
    pub dims: &'a [usize],
    pub data: &'a [u8],
}

/// Writes a GGUF v3 file: `metadata` in the order given, then the tensor table and the data,
/// each tensor aligned to `general.alignment` (32 unless the metadata says otherwise).
pub fn write<W: Write>(
    w: &mut W,
    metadata: &[(&str, &GgufValue)],
    tensors: &[TensorData],
) -> std::io::Result<()> {
    let alignment = metadata
        .iter()
        .find(|(k, _)| *k == "general.alignment")
        .and_then(|(_, v)| v.as_u64())
        .unwrap_or(32) as usize;
    let mut header = Vec::new();
    header.extend_from_slice(b"GGUF");
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_string(&mut header, k);
        header.extend_from_slice(&v.type_id().to_le_bytes());
        put_value(&mut header, v);
    }
    let mut offset = 0usize;
    let mut offsets = Vec::with_capacity(tensors.len());
    for t in tensors {
        put_string(&mut header, t.name);
        header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in t.dims.iter().rev() {
            header.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        header.extend_from_slice(&t.ggml_type.to_le_bytes());
        header.extend_from_slice(&(offset as u64).to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.data.len()).div_ceil(alignment) * alignment;
    }
    header.resize(header.len().div_ceil(alignment) * alignment, 0);
    w.write_all(&header)?;
    let mut written = 0usize;
    for (t, &at) in tensors.iter().zip(&offsets) {
        w.write_all(&vec![0u8; at - written])?;
        w.write_all(t.data)?;
        written = at + t.data.len();
    }
    Ok(())
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.push(*x as u8),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::String(s) => put_string(out, s),
        GgufValue::Array(items) => {
            // GGUF arrays are homogeneous; an empty one is written as an array of u8.
            let elem = items.first().map_or(0, GgufValue::type_id);
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let md = [
            ("general.architecture", GgufValue::String("llama".into())),
            ("general.alignment", GgufValue::U32(32)),
            ("x.f", GgufValue::F32(1e-6)),
            (
                "x.ids",
                GgufValue::Array(vec![GgufValue::I32(-1), GgufValue::I32(7)]),
            ),
            (
                "x.words",
                GgufValue::Array(vec![GgufValue::String("a b".into())]),
            ),
            ("x.b", GgufValue::Bool(true)),
            ("x.u64", GgufValue::U64(1 << 40)),
        ];
        let md: Vec<(&str, &GgufValue)> = md.iter().map(|(k, v)| (*k, v)).collect();
        let a = [1u8; 12];
        let b = [2u8; 8];
        let tensors = [
            TensorData {
                name: "a",
                ggml_type: 0,
                dims: &[3],
                data: &a,
            },
            TensorData {
                name: "b",
                ggml_type: 1,
                dims: &[2, 2],
                data: &b,
            },
        ];
        let mut out = Vec::new();
        write(&mut out, &md, &tensors).unwrap();
        out
    }

    #[test]
    fn written_headers_read_back() {
        let bytes = sample();
        let h = read_header(&bytes).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.metadata["x.f"].as_f64(), Some(1e-6));
        assert_eq!(
            h.metadata["x.ids"].as_array().unwrap()[0].as_i64(),
            Some(-1)
        );
        assert_eq!(h.metadata["x.u64"].as_u64(), Some(1 << 40));
        assert_eq!(h.tensors[1].dims, vec![2, 2]);
        assert_eq!(h.data_start % 32, 0);
        let b = &h.tensors[1];
        let start = h.data_start + b.offset as usize;
        assert_eq!(&bytes[start..start + 8], &[2u8; 8]);
    }

    #[test]
    fn every_cut_is_an_error_naming_what_was_read() {
        let bytes = sample();
        let h = read_header(&bytes).unwrap();
        for n in 0..h.data_start.min(bytes.len()) {
            // Cuts inside the padding after the table still hold a whole header.
            if let Err(e) = read_header(&bytes[..n]) {
                assert!(
                    e.0.contains("truncated") || e.0.contains("empty") || e.0.contains("more than"),
                    "cut at {n}: {e}"
                );
            }
        }
        let errors: Vec<String> = (0..bytes.len())
            .filter_map(|n| read_header(&bytes[..n]).err().map(|e| e.0))
            .collect();
        assert!(
            errors.iter().any(|e| e.starts_with("metadata key \"x.")),
            "{errors:?}"
        );
        assert!(
            errors.iter().any(|e| e.starts_with("tensor \"b\"")),
            "{errors:?}"
        );
    }

    #[test]
    fn huge_lengths_are_refused_before_allocating() {
        let mut bytes = sample();
        // n_kv = 2^62: refused as more than the file holds.
        bytes[16..24].copy_from_slice(&(1u64 << 62).to_le_bytes());
        let e = read_header(&bytes).unwrap_err().0;
        assert!(e.contains("more than"), "{e}");
    }
}
