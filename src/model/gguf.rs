//! GGUF (llama.cpp) reader: header, metadata, tensor table, and dequantisation to f32.
//! Layout (v2/v3): magic "GGUF", u32 version, u64 tensor count, u64 metadata count, metadata
//! key/values, tensor infos (name, n_dims, dims innermost first, ggml type, offset), padding to
//! `general.alignment` (32), tensor data. Block formats follow ggml's `dequantize_row_*`.
use crate::{Error, Result};
use half::f16;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
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
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(x) => Some(x as u64),
            Value::U16(x) => Some(x as u64),
            Value::U32(x) => Some(x as u64),
            Value::U64(x) => Some(x),
            Value::I8(x) if x >= 0 => Some(x as u64),
            Value::I16(x) if x >= 0 => Some(x as u64),
            Value::I32(x) if x >= 0 => Some(x as u64),
            Value::I64(x) if x >= 0 => Some(x as u64),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(x) => Some(x as i64),
            Value::I16(x) => Some(x as i64),
            Value::I32(x) => Some(x as i64),
            Value::I64(x) => Some(x),
            _ => self.as_u64().map(|x| x as i64),
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(x) => Some(x as f64),
            Value::F64(x) => Some(x),
            _ => self.as_i64().map(|x| x as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
    Other(u32),
}

impl GgmlType {
    fn from_u32(t: u32) -> Self {
        match t {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4_K,
            13 => GgmlType::Q5_K,
            14 => GgmlType::Q6_K,
            30 => GgmlType::BF16,
            other => GgmlType::Other(other),
        }
    }
    fn to_u32(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
            GgmlType::Other(t) => t,
        }
    }
    /// (elements per block, bytes per block); None for types this reader cannot dequantise.
    pub fn block(self) -> Option<(usize, usize)> {
        Some(match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4_K => (256, 144),
            GgmlType::Q5_K => (256, 176),
            GgmlType::Q6_K => (256, 210),
            GgmlType::Other(_) => return None,
        })
    }
    pub fn name(self) -> String {
        match self {
            GgmlType::Other(t) => format!("ggml type {t}"),
            t => format!("{t:?}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// dims as GGUF stores them: innermost first.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// byte offset relative to the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Shape in row-major (PyTorch) order: the GGUF dims reversed.
    pub fn shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }
    /// The element count; reading the file checked that it fits in an i64 (saturates otherwise).
    pub fn numel(&self) -> u64 {
        self.dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .unwrap_or(u64::MAX)
    }
}

pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
    bytes: Bytes,
}

/// The file's bytes: mapped from disk, or given (`GgufFile::from_bytes`).
enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.buf.len().saturating_sub(self.pos) < n {
            return Err(Error::format(
                self.path,
                format!(
                    "GGUF header truncated at byte {} while reading {what} ({n} bytes needed, file has {})",
                    self.pos,
                    self.buf.len()
                ),
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)? as usize;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| {
            Error::format(
                self.path,
                format!("{what}: string is not UTF-8 (byte {})", self.pos),
            )
        })
    }
    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.take(1, what)?[0]),
            1 => Value::I8(self.take(1, what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap())),
            3 => Value::I16(i16::from_le_bytes(self.take(2, what)?.try_into().unwrap())),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(self.u32(what)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(what)?)),
            7 => Value::Bool(self.take(1, what)?[0] != 0),
            8 => Value::String(self.string(what)?),
            9 if depth < 4 => {
                let elem = self.u32(what)?;
                let n = self.u64(what)? as usize;
                // each element takes at least `min_bytes` of the file: a count beyond it is corrupt
                // (and so the array's memory is bounded by the file's length)
                let min_bytes = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    _ => 1,
                };
                if n > (self.buf.len() - self.pos) / min_bytes {
                    return Err(Error::format(
                        self.path,
                        format!("{what}: truncated: array of {n} elements exceeds the file"),
                    ));
                }
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, what, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(what)?)),
            other => {
                return Err(Error::format(
                    self.path,
                    format!(
                        "{what}: unknown metadata value type {other} at byte {}",
                        self.pos
                    ),
                ))
            }
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = crate::io::open_file(path)?;
        // SAFETY: the file is only read; a concurrent truncation by another process is outside our control
        // as for any mmap-based reader (llama.cpp, safetensors).
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| crate::io::error(path, e))?;
        Self::parse(Bytes::Mapped(mmap), path)
    }

    /// Read a GGUF file held in memory; `path` names it in errors.
    pub fn from_bytes(bytes: Vec<u8>, path: &Path) -> Result<Self> {
        Self::parse(Bytes::Owned(bytes), path)
    }

    fn parse(bytes: Bytes, path: &Path) -> Result<Self> {
        let mut c = Cursor {
            buf: &bytes,
            pos: 0,
            path,
        };
        let magic = c.take(4, "magic")?;
        if magic != b"GGUF" {
            return Err(Error::format(
                path,
                format!(
                    "not a GGUF file: bad magic {:?} (expected \"GGUF\")",
                    String::from_utf8_lossy(magic)
                ),
            ));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::format(
                path,
                format!("GGUF version {version} is not supported (2 and 3 are)"),
            ));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.u32(&format!("type of metadata '{key}'"))?;
            let v = c.value(ty, &format!("metadata '{key}'"), 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::new();
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor name #{i}"))?;
            let n_dims = c.u32(&format!("dims of tensor '{name}'"))?;
            if n_dims > 8 {
                return Err(Error::format(
                    path,
                    format!("tensor '{name}': {n_dims} dimensions"),
                ));
            }
            let dims = (0..n_dims)
                .map(|_| c.u64(&format!("dims of tensor '{name}'")))
                .collect::<Result<Vec<_>>>()?;
            let fits = dims
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d))
                .is_some_and(|n| n <= i64::MAX as u64);
            if !fits || dims.iter().any(|&d| d > i64::MAX as u64) {
                return Err(Error::format(
                    path,
                    format!("tensor '{name}': dims {dims:?} hold more than 2^63 elements"),
                ));
            }
            let ggml_type = GgmlType::from_u32(c.u32(&format!("type of tensor '{name}'"))?);
            let offset = c.u64(&format!("offset of tensor '{name}'"))?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let align = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32)
            .max(1) as usize;
        let data_start = c.pos.div_ceil(align) * align;
        let f = GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_start,
            bytes,
        };
        for t in &f.tensors {
            f.tensor_bytes(t)?; // every tensor's bytes lie inside the file
        }
        Ok(f)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    fn tensor_bytes(&self, t: &TensorInfo) -> Result<&[u8]> {
        let (block_elems, block_bytes) = t.ggml_type.block().ok_or_else(|| {
            Error::format(
                &self.path,
                format!(
                    "tensor '{}': {} is not supported",
                    t.name,
                    t.ggml_type.name()
                ),
            )
        })?;
        let numel = t.numel();
        let inner = t.dims.first().copied().unwrap_or(1);
        if inner % block_elems as u64 != 0 {
            return Err(Error::format(
                &self.path,
                format!("tensor '{}': row of {inner} is not a multiple of the {} block of {block_elems}", t.name, t.ggml_type.name()),
            ));
        }
        let size = (numel / block_elems as u64).checked_mul(block_bytes as u64);
        let start = (self.data_start as u64).checked_add(t.offset);
        match (start, size) {
            (Some(s), Some(n))
                if s.checked_add(n)
                    .is_some_and(|e| e <= self.bytes.len() as u64) =>
            {
                Ok(&self.bytes[s as usize..(s + n) as usize])
            }
            _ => Err(Error::format(
                &self.path,
                format!(
                    "tensor '{}' data truncated: needs {} bytes at offset {}, file has {}",
                    t.name,
                    size.unwrap_or(u64::MAX),
                    start.unwrap_or(u64::MAX),
                    self.bytes.len()
                ),
            )),
        }
    }

    /// The tensor's values as f32, in GGUF element order (row-major for `shape()`).
    pub fn dequantize(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        let bytes = self.tensor_bytes(t)?;
        let mut out = vec![0f32; t.numel() as usize];
        dequantize_into(t.ggml_type, bytes, &mut out);
        Ok(out)
    }
}

impl Value {
    /// The metadata type code GGUF stores before a value of this kind.
    fn type_code(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Value::U8(x) => out.push(*x),
            Value::I8(x) => out.extend(x.to_le_bytes()),
            Value::U16(x) => out.extend(x.to_le_bytes()),
            Value::I16(x) => out.extend(x.to_le_bytes()),
            Value::U32(x) => out.extend(x.to_le_bytes()),
            Value::I32(x) => out.extend(x.to_le_bytes()),
            Value::F32(x) => out.extend(x.to_le_bytes()),
            Value::Bool(x) => out.push(*x as u8),
            Value::String(x) => write_string(out, x),
            Value::Array(items) => {
                // GGUF arrays are homogeneous: the first item's type stands for all (u8 when empty)
                out.extend(items.first().map_or(0, Value::type_code).to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                items.iter().for_each(|v| v.write(out));
            }
            Value::U64(x) => out.extend(x.to_le_bytes()),
            Value::I64(x) => out.extend(x.to_le_bytes()),
            Value::F64(x) => out.extend(x.to_le_bytes()),
        }
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// The alignment of tensor data in the files we write (llama.cpp's default `general.alignment`).
pub const ALIGN: usize = 32;

/// The bytes of a GGUF v3 file before its tensor data (alignment [`ALIGN`]): header, `metadata` in
/// order, the tensor table of (name, dims innermost first, type, stored byte length), each tensor
/// placed at the first multiple of 32 after the end of the one before, and the padding to 32. The
/// data follows, each tensor padded to 32 (`encode`).
pub fn encode_header(
    metadata: &[(&str, Value)],
    tensors: &[(&str, &[u64], GgmlType, usize)],
) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, v) in metadata {
        write_string(&mut out, key);
        out.extend(v.type_code().to_le_bytes());
        v.write(&mut out);
    }
    let mut offset = 0usize;
    for (name, dims, ty, len) in tensors {
        write_string(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
        out.extend(ty.to_u32().to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offset = (offset + len).div_ceil(ALIGN) * ALIGN;
    }
    out.resize(out.len().div_ceil(ALIGN) * ALIGN, 0);
    out
}

/// A GGUF v3 file's bytes (alignment 32): `metadata` in order, then `tensors` as (name, dims
/// innermost first, type, stored bytes), each tensor's data aligned. The inverse of
/// [`GgufFile::open`]; the caller gives bytes of the size the type and dims need.
pub fn encode(metadata: &[(&str, Value)], tensors: &[(&str, &[u64], GgmlType, &[u8])]) -> Vec<u8> {
    let table: Vec<(&str, &[u64], GgmlType, usize)> = tensors
        .iter()
        .map(|(name, dims, ty, bytes)| (*name, *dims, *ty, bytes.len()))
        .collect();
    let mut out = encode_header(metadata, &table);
    for (_, _, _, bytes) in tensors {
        out.resize(out.len().div_ceil(ALIGN) * ALIGN, 0);
        out.extend_from_slice(bytes);
    }
    out
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantise `bytes` of type `ty` into `out` (whose length is the element count).
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let (qk, bs) = ty.block().expect("dequantize_into: supported type");
    let blocks = bytes.chunks_exact(bs).zip(out.chunks_exact_mut(qk));
    match ty {
        GgmlType::F32 => blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes(b.try_into().unwrap())),
        GgmlType::F16 => blocks.for_each(|(b, y)| y[0] = f16_at(b, 0)),
        GgmlType::BF16 => {
            blocks.for_each(|(b, y)| y[0] = half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
        }
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| {
            let d = f16_at(b, 0);
            for (j, v) in y.iter_mut().enumerate() {
                *v = b[2 + j] as i8 as f32 * d;
            }
        }),
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| {
            let d = f16_at(b, 0);
            let qs = &b[2..18];
            for j in 0..16 {
                y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
                y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
            }
        }),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            let qs = &b[4..20];
            for j in 0..16 {
                y[j] = (qs[j] & 0x0F) as f32 * d + m;
                y[j + 16] = (qs[j] >> 4) as f32 * d + m;
            }
        }),
        GgmlType::Q5_0 => blocks.for_each(|(b, y)| {
            let d = f16_at(b, 0);
            let qh = u32::from_le_bytes(b[2..6].try_into().unwrap());
            let qs = &b[6..22];
            for j in 0..16 {
                let h0 = ((qh >> j) << 4) & 0x10;
                let h1 = (qh >> (j + 12)) & 0x10;
                y[j] = (((qs[j] & 0x0F) as u32 | h0) as i32 - 16) as f32 * d;
                y[j + 16] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
            }
        }),
        GgmlType::Q5_1 => blocks.for_each(|(b, y)| {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            let qh = u32::from_le_bytes(b[4..8].try_into().unwrap());
            let qs = &b[8..24];
            for j in 0..16 {
                let h0 = ((qh >> j) << 4) & 0x10;
                let h1 = (qh >> (j + 12)) & 0x10;
                y[j] = ((qs[j] & 0x0F) as u32 | h0) as f32 * d + m;
                y[j + 16] = ((qs[j] >> 4) as u32 | h1) as f32 * d + m;
            }
        }),
        GgmlType::Q4_K => blocks.for_each(|(b, y)| {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let qs = &b[16..144];
            for (c, j) in (0..256).step_by(64).enumerate() {
                let (sc1, m1) = scale_min_k4(2 * c, scales);
                let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
                let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                let q = &qs[32 * c..32 * c + 32];
                for l in 0..32 {
                    y[j + l] = d1 * (q[l] & 0x0F) as f32 - m1;
                    y[j + 32 + l] = d2 * (q[l] >> 4) as f32 - m2;
                }
            }
        }),
        GgmlType::Q5_K => blocks.for_each(|(b, y)| {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let qh = &b[16..48];
            let qs = &b[48..176];
            for (c, j) in (0..256).step_by(64).enumerate() {
                let (sc1, m1) = scale_min_k4(2 * c, scales);
                let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
                let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
                let ql = &qs[32 * c..32 * c + 32];
                for l in 0..32 {
                    let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                    let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                    y[j + l] = d1 * ((ql[l] & 0x0F) + h1) as f32 - m1;
                    y[j + 32 + l] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
                }
            }
        }),
        GgmlType::Q6_K => blocks.for_each(|(b, y)| {
            let ql = &b[0..128];
            let qh = &b[128..192];
            let sc = &b[192..208];
            let d = f16_at(b, 208);
            for half in 0..2 {
                let (ql, qh, sc) = (&ql[64 * half..], &qh[32 * half..], &sc[8 * half..]);
                let y = &mut y[128 * half..];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    y[l] = d * (sc[is] as i8 as f32) * q1 as f32;
                    y[l + 32] = d * (sc[is + 2] as i8 as f32) * q2 as f32;
                    y[l + 64] = d * (sc[is + 4] as i8 as f32) * q3 as f32;
                    y[l + 96] = d * (sc[is + 6] as i8 as f32) * q4 as f32;
                }
            }
        }),
        GgmlType::Other(_) => unreachable!("block() is None for other types"),
    }
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` from the 12 packed bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}
