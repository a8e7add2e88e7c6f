//! Reading and writing numpy `.npy` files.
//!
//! Inputs may be any numeric dtype numpy writes (bool, signed and unsigned
//! integers, float16/32/64, either byte order) in C or Fortran order; they are
//! converted to f32, the type every layer computes in. They are read whole
//! ([`read_f32`]) or a block of rows at a time ([`NpyRowReader`]: f32 inputs
//! are read straight into a reused buffer, others converted). Outputs are always little-endian f32 in C order,
//! written whole ([`write_f32`]) or as they come ([`NpyWriter`]). The header is checked against the file size
//! and the memory budget ([`crate::budget`]) before anything is allocated, so
//! a header that claims a huge shape, or a truncated file, is refused with a
//! message instead of an allocation failure. Only regular files are read: a
//! FIFO or a device is refused when opened.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::budget::{self, OverBudget};
use crate::tensor::Tensor;
use layer_api::DType;
use ndarray::{ArrayD, IxDyn, ShapeBuilder};
use thiserror::Error;

/// What is wrong with an `.npy` file; the caller adds the path.
#[derive(Debug, Error, PartialEq)]
pub enum NpyError {
    #[error("cannot read the file: {0}")]
    Io(String),
    #[error("not a .npy file (it does not start with the numpy magic string \\x93NUMPY)")]
    NotNpy,
    #[error("unsupported .npy format version {0}.{1} (1.0, 2.0 and 3.0 are read)")]
    Version(u8, u8),
    #[error("corrupt header: {0}")]
    Header(String),
    #[error(
        "unsupported dtype '{0}': inputs must be numeric (bool, int8-64, uint8-64, float16/32/64)"
    )]
    Dtype(String),
    #[error("shape {shape:?} is too large: {elements} elements overflow the address space")]
    TooLarge { shape: Vec<usize>, elements: String },
    #[error(
        "truncated: the header's shape {shape:?} of '{descr}' needs {needed} bytes of data, \
         but the file holds {found}"
    )]
    Truncated {
        shape: Vec<usize>,
        descr: String,
        needed: u64,
        found: u64,
    },
    #[error(
        "{extra} bytes after the data that the header's shape {shape:?} describes: \
         the header and the data disagree"
    )]
    TrailingData { shape: Vec<usize>, extra: u64 },
    #[error("the array of shape {} ('{descr}') {over}", budget::shape_text(shape))]
    OverBudget {
        shape: Vec<usize>,
        descr: String,
        over: Box<OverBudget>,
    },
    #[error(
        "the file shrank while it was being read: it now holds {now} bytes, but rows \
         {rows} end at byte {needed} (was it truncated or rewritten during the run?)"
    )]
    Shrunk { now: u64, needed: u64, rows: String },
}

/// Elements converted per read when a whole array is read.
const CHUNK_ELEMENTS: usize = 16384;

/// The element types an input may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    Int,
    Uint,
    Float,
}

/// An element type as the header's `descr` spells it (`<f8`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dtype {
    kind: Kind,
    size: usize,
    little_endian: bool,
    descr: String,
}

impl Dtype {
    /// The header's spelling, e.g. `<f8`.
    pub fn descr(&self) -> &str {
        &self.descr
    }

    /// Whether it is a floating-point type (float16, float32 or float64).
    pub fn is_float(&self) -> bool {
        self.kind == Kind::Float
    }

    fn parse(descr: &str) -> Result<Dtype, NpyError> {
        let unsupported = || NpyError::Dtype(descr.to_string());
        let mut chars = descr.chars();
        let order = chars.next().ok_or_else(unsupported)?;
        let little_endian = match order {
            '<' | '|' => true,
            '>' => false,
            '=' => cfg!(target_endian = "little"),
            _ => return Err(unsupported()),
        };
        let kind = match chars.next().ok_or_else(unsupported)? {
            'b' => Kind::Bool,
            'i' => Kind::Int,
            'u' => Kind::Uint,
            'f' => Kind::Float,
            _ => return Err(unsupported()),
        };
        let size: usize = chars.as_str().parse().map_err(|_| unsupported())?;
        let valid = match kind {
            Kind::Bool => size == 1,
            Kind::Int | Kind::Uint => matches!(size, 1 | 2 | 4 | 8),
            Kind::Float => matches!(size, 2 | 4 | 8),
        };
        if !valid {
            return Err(unsupported());
        }
        Ok(Dtype {
            kind,
            size,
            little_endian,
            descr: descr.to_string(),
        })
    }

    /// The element type the host keeps this type's values in: its own where
    /// the interface has it, else the narrowest signed integer type that
    /// holds every value (uint64 as int64, its values checked on reading).
    pub fn tensor_dtype(&self) -> DType {
        match (self.kind, self.size) {
            (Kind::Bool, _) => DType::BOOL,
            (Kind::Float, 2) => DType::F16,
            (Kind::Float, 4) => DType::F32,
            (Kind::Float, _) => DType::F64,
            (Kind::Uint, 1) => DType::U8,
            (Kind::Int, 1 | 2 | 4) | (Kind::Uint, 2) => DType::I32,
            (Kind::Int, _) | (Kind::Uint, _) => DType::I64,
        }
    }

    /// One element's bytes in little-endian order, 8 bytes wide.
    fn le_bytes(&self, bytes: &[u8]) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..self.size].copy_from_slice(bytes);
        if !self.little_endian {
            b[..self.size].reverse();
        }
        b
    }

    /// One integer or boolean element, exactly (`None` for a uint64 past
    /// int64's range).
    fn to_i64(&self, bytes: &[u8]) -> Option<i64> {
        let b = self.le_bytes(bytes);
        Some(match (self.kind, self.size) {
            (Kind::Bool, _) => i64::from(b[0] != 0),
            (Kind::Int, 1) => i64::from(b[0] as i8),
            (Kind::Int, 2) => i64::from(i16::from_le_bytes([b[0], b[1]])),
            (Kind::Int, 4) => i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            (Kind::Uint, 1) => i64::from(b[0]),
            (Kind::Uint, 2) => i64::from(u16::from_le_bytes([b[0], b[1]])),
            (Kind::Uint, 4) => i64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            (Kind::Uint, _) => i64::try_from(u64::from_le_bytes(b)).ok()?,
            _ => i64::from_le_bytes(b),
        })
    }

    /// Converts one element's bytes to f32 (integers round to nearest).
    fn to_f32(&self, bytes: &[u8]) -> f32 {
        let mut b = [0u8; 8];
        b[..self.size].copy_from_slice(bytes);
        if !self.little_endian {
            b[..self.size].reverse();
        }
        match (self.kind, self.size) {
            (Kind::Bool, _) => f32::from(u8::from(b[0] != 0)),
            (Kind::Int, 1) => f32::from(b[0] as i8),
            (Kind::Int, 2) => f32::from(i16::from_le_bytes([b[0], b[1]])),
            (Kind::Int, 4) => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32,
            (Kind::Int, _) => i64::from_le_bytes(b) as f32,
            (Kind::Uint, 1) => f32::from(b[0]),
            (Kind::Uint, 2) => f32::from(u16::from_le_bytes([b[0], b[1]])),
            (Kind::Uint, 4) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32,
            (Kind::Uint, _) => u64::from_le_bytes(b) as f32,
            (Kind::Float, 2) => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            (Kind::Float, 4) => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            (Kind::Float, _) => f64::from_le_bytes(b) as f32,
        }
    }
}

/// The parsed header of an `.npy` file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    dtype: Dtype,
    fortran_order: bool,
    shape: Vec<usize>,
    /// Bytes before the data: magic, version, length field and header text.
    data_offset: u64,
}

const MAGIC: &[u8] = b"\x93NUMPY";

fn read_header(reader: &mut impl Read) -> Result<Header, NpyError> {
    let mut prefix = [0u8; 8];
    read_exact_or(reader, &mut prefix, || NpyError::NotNpy)?;
    if &prefix[..6] != MAGIC {
        return Err(NpyError::NotNpy);
    }
    let (major, minor) = (prefix[6], prefix[7]);
    let (len, len_size) = match major {
        1 => {
            let mut b = [0u8; 2];
            read_exact_or(reader, &mut b, truncated_header)?;
            (u16::from_le_bytes(b) as usize, 2)
        }
        2 | 3 => {
            let mut b = [0u8; 4];
            read_exact_or(reader, &mut b, truncated_header)?;
            (u32::from_le_bytes(b) as usize, 4)
        }
        _ => return Err(NpyError::Version(major, minor)),
    };
    if len > 1 << 20 {
        return Err(NpyError::Header(format!(
            "the header claims {len} bytes; real headers are a few hundred"
        )));
    }
    let mut text = vec![0u8; len];
    read_exact_or(reader, &mut text, truncated_header)?;
    let text = String::from_utf8(text)
        .map_err(|_| NpyError::Header("the header is not text".to_string()))?;
    let dict = parse_header_dict(&text)?;
    let descr = dict.descr.ok_or_else(|| missing_key("descr"))?;
    let dtype = Dtype::parse(&descr)?;
    Ok(Header {
        dtype,
        fortran_order: dict
            .fortran_order
            .ok_or_else(|| missing_key("fortran_order"))?,
        shape: dict.shape.ok_or_else(|| missing_key("shape"))?,
        data_offset: (MAGIC.len() + 2 + len_size + len) as u64,
    })
}

fn truncated_header() -> NpyError {
    NpyError::Header("the file ends inside the header".to_string())
}

fn missing_key(key: &str) -> NpyError {
    NpyError::Header(format!("the header has no '{key}' entry"))
}

fn read_exact_or(
    reader: &mut impl Read,
    buf: &mut [u8],
    on_eof: impl FnOnce() -> NpyError,
) -> Result<(), NpyError> {
    reader.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            on_eof()
        } else {
            NpyError::Io(e.to_string())
        }
    })
}

#[derive(Default)]
struct HeaderDict {
    descr: Option<String>,
    fortran_order: Option<bool>,
    shape: Option<Vec<usize>>,
}

/// Parses the Python dict literal numpy writes, e.g.
/// `{'descr': '<f8', 'fortran_order': False, 'shape': (2, 64), }`.
fn parse_header_dict(text: &str) -> Result<HeaderDict, NpyError> {
    let mut p = DictParser {
        s: text.trim_end().as_bytes(),
        i: 0,
    };
    let mut dict = HeaderDict::default();
    p.expect(b'{')?;
    loop {
        p.skip_ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string()?;
        p.expect(b':')?;
        p.skip_ws();
        match key.as_str() {
            "descr" => {
                if p.peek() == Some(b'[') {
                    return Err(NpyError::Dtype(
                        "a structured dtype (record array)".to_string(),
                    ));
                }
                dict.descr = Some(p.string()?);
            }
            "fortran_order" => dict.fortran_order = Some(p.boolean()?),
            "shape" => dict.shape = Some(p.tuple()?),
            other => return Err(NpyError::Header(format!("unexpected key '{other}'"))),
        }
        p.skip_ws();
        if !p.eat(b',') {
            p.skip_ws();
            p.expect(b'}')?;
            break;
        }
    }
    p.skip_ws();
    if p.i != p.s.len() {
        return Err(NpyError::Header("text after the closing '}'".to_string()));
    }
    Ok(dict)
}

struct DictParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl DictParser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) -> Result<(), NpyError> {
        self.skip_ws();
        if self.eat(c) {
            Ok(())
        } else {
            Err(NpyError::Header(format!(
                "expected '{}' at byte {} of the header",
                c as char, self.i
            )))
        }
    }

    fn string(&mut self) -> Result<String, NpyError> {
        self.skip_ws();
        let quote = match self.peek() {
            Some(q @ (b'\'' | b'"')) => q,
            _ => {
                return Err(NpyError::Header(format!(
                    "expected a quoted string at byte {} of the header",
                    self.i
                )))
            }
        };
        self.i += 1;
        let start = self.i;
        while let Some(c) = self.peek() {
            if c == quote {
                let s = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
                self.i += 1;
                return Ok(s);
            }
            self.i += 1;
        }
        Err(NpyError::Header("unterminated string".to_string()))
    }

    fn boolean(&mut self) -> Result<bool, NpyError> {
        let rest = &self.s[self.i..];
        if rest.starts_with(b"True") {
            self.i += 4;
            Ok(true)
        } else if rest.starts_with(b"False") {
            self.i += 5;
            Ok(false)
        } else {
            Err(NpyError::Header(
                "'fortran_order' must be True or False".to_string(),
            ))
        }
    }

    fn tuple(&mut self) -> Result<Vec<usize>, NpyError> {
        self.expect(b'(')?;
        let mut dims = Vec::new();
        loop {
            self.skip_ws();
            if self.eat(b')') {
                return Ok(dims);
            }
            let start = self.i;
            while matches!(self.peek(), Some(b'0'..=b'9')) {
                self.i += 1;
            }
            let digits = std::str::from_utf8(&self.s[start..self.i]).expect("ascii digits");
            let dim = digits.parse::<usize>().map_err(|_| {
                NpyError::Header(format!(
                    "'shape' must hold non-negative integers, found '{}' at byte {start}",
                    String::from_utf8_lossy(&self.s[start..(self.i + 1).min(self.s.len())])
                ))
            })?;
            dims.push(dim);
            self.skip_ws();
            if !self.eat(b',') {
                self.expect(b')')?;
                return Ok(dims);
            }
        }
    }
}

/// Reads an `.npy` file of any numeric dtype into an f32 array in C order.
pub fn read_f32(path: &Path) -> Result<ArrayD<f32>, NpyError> {
    let (file, file_len) = budget::open_regular(path).map_err(|e| NpyError::Io(e.to_string()))?;
    read_f32_from(BufReader::new(file), file_len).map(|(array, _)| array)
}

/// Reads `.npy` bytes held in memory, as [`read_f32`] reads a file.
pub fn read_f32_bytes(bytes: &[u8]) -> Result<ArrayD<f32>, NpyError> {
    read_f32_from(bytes, bytes.len() as u64).map(|(array, _)| array)
}

/// Reads `.npy` data of `len` bytes in all from `reader` (a file, or a member
/// of an `.npz` archive) into an f32 array in C order, with the dtype it was
/// stored as.
pub fn read_f32_from(mut reader: impl Read, len: u64) -> Result<(ArrayD<f32>, Dtype), NpyError> {
    let header = read_header(&mut reader)?;
    let elements = data_elements(&header, len)?;
    // A Fortran-order array is reordered into a second one.
    check_budget(&header, 4 * (1 + usize::from(header.fortran_order)))?;
    let mut data = Vec::with_capacity(elements);
    let mut chunk = vec![0u8; header.dtype.size * CHUNK_ELEMENTS];
    let mut remaining = elements;
    while remaining > 0 {
        let n = remaining.min(CHUNK_ELEMENTS);
        let bytes = &mut chunk[..n * header.dtype.size];
        read_exact_or(&mut reader, bytes, || {
            NpyError::Io("the data ended before its declared length".into())
        })?;
        data.extend(
            bytes
                .chunks_exact(header.dtype.size)
                .map(|b| header.dtype.to_f32(b)),
        );
        remaining -= n;
    }
    let shape = IxDyn(&header.shape);
    let array = if header.fortran_order {
        ArrayD::from_shape_vec(shape.f(), data).map(|a| a.as_standard_layout().into_owned())
    } else {
        ArrayD::from_shape_vec(shape, data)
    };
    Ok((
        array.expect("element count checked against the shape"),
        header.dtype,
    ))
}

/// Reads an `.npy` file into a tensor of the element type its dtype maps to
/// ([`Dtype::tensor_dtype`]), values exact, in C order.
pub fn read_tensor(path: &Path) -> Result<Tensor, NpyError> {
    let (file, len) = budget::open_regular(path).map_err(|e| NpyError::Io(e.to_string()))?;
    read_tensor_from(BufReader::new(file), len)
}

/// Reads `.npy` data of `len` bytes in all from `reader` (a file, or a
/// member of an `.npz` archive) as [`read_tensor`] reads a file.
pub fn read_tensor_from(mut reader: impl Read, len: u64) -> Result<Tensor, NpyError> {
    let header = read_header(&mut reader)?;
    let elements = data_elements(&header, len)?;
    let dtype = &header.dtype;
    // Read and converted a chunk at a time, so that only the tensor itself
    // (and, for Fortran order, its reordered copy) is allocated.
    check_budget(
        &header,
        dtype.tensor_dtype().size() * (1 + usize::from(header.fortran_order)),
    )?;
    let shape = if header.fortran_order {
        IxDyn(&header.shape).f()
    } else {
        IxDyn(&header.shape).into()
    };
    fn array<T: Clone>(shape: ndarray::Shape<IxDyn>, data: Vec<T>) -> ArrayD<T> {
        let array =
            ArrayD::from_shape_vec(shape, data).expect("element count checked against the shape");
        // Only Fortran order is copied, into C order.
        if array.is_standard_layout() {
            array
        } else {
            array.as_standard_layout().into_owned()
        }
    }
    let too_large = || NpyError::Io(format!("a {} value exceeds int64's range", dtype.descr));
    let n = elements;
    let tensor = match dtype.tensor_dtype() {
        DType::F32 => Tensor::F32(array(
            shape,
            read_elements(&mut reader, dtype, n, |b| Ok(dtype.to_f32(b)))?,
        )),
        DType::F64 => Tensor::F64(array(
            shape,
            read_elements(&mut reader, dtype, n, |b| {
                Ok(f64::from_le_bytes(dtype.le_bytes(b)))
            })?,
        )),
        DType::F16 => Tensor::F16(array(
            shape,
            read_elements(&mut reader, dtype, n, |b| {
                let b = dtype.le_bytes(b);
                Ok(half::f16::from_le_bytes([b[0], b[1]]))
            })?,
        )),
        DType::BOOL => Tensor::Bool(array(
            shape,
            read_elements(&mut reader, dtype, n, |b| Ok(u8::from(b[0] != 0)))?,
        )),
        DType::U8 => Tensor::U8(array(
            shape,
            read_elements(&mut reader, dtype, n, |b| Ok(b[0]))?,
        )),
        DType::I32 => Tensor::I32(array(
            shape,
            read_elements(&mut reader, dtype, n, |b| {
                Ok(dtype.to_i64(b).map_or(0, |v| v as i32))
            })?,
        )),
        _ => Tensor::I64(array(
            shape,
            read_elements(&mut reader, dtype, n, |b| {
                dtype.to_i64(b).ok_or_else(too_large)
            })?,
        )),
    };
    Ok(tensor)
}

/// Reads `elements` elements of `dtype` from `reader`, a chunk of bytes at
/// a time, each converted by `convert`: only the values are allocated.
fn read_elements<T>(
    reader: &mut impl Read,
    dtype: &Dtype,
    elements: usize,
    convert: impl Fn(&[u8]) -> Result<T, NpyError>,
) -> Result<Vec<T>, NpyError> {
    let mut data = Vec::with_capacity(elements);
    let mut chunk = vec![0u8; dtype.size * CHUNK_ELEMENTS.min(elements.max(1))];
    let mut remaining = elements;
    while remaining > 0 {
        let n = remaining.min(CHUNK_ELEMENTS);
        let bytes = &mut chunk[..n * dtype.size];
        read_exact_or(reader, bytes, || {
            NpyError::Io("the data ended before its declared length".into())
        })?;
        for b in bytes.chunks_exact(dtype.size) {
            data.push(convert(b)?);
        }
        remaining -= n;
    }
    Ok(data)
}

/// Checks an array of the header's shape, of `element_bytes` bytes per
/// element in memory, against the memory budget.
fn check_budget(header: &Header, element_bytes: usize) -> Result<(), NpyError> {
    budget::check_shape(&header.shape, element_bytes)
        .map(drop)
        .map_err(|over| NpyError::OverBudget {
            shape: header.shape.clone(),
            descr: header.dtype.descr.clone(),
            over: Box::new(over),
        })
}

/// The number of elements the header's shape describes, checked against the
/// `len` bytes of the whole file, so that nothing is allocated for a shape
/// the file cannot hold.
fn data_elements(header: &Header, len: u64) -> Result<usize, NpyError> {
    // Like numpy, ndarray refuses a shape whose non-zero axes multiply past
    // isize::MAX even when a zero-length axis leaves it empty: check both.
    let nonzero_axes_fit = header
        .shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .is_some_and(|n| isize::try_from(n).is_ok());
    let elements = header
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|n| n.checked_mul(header.dtype.size).is_some() && nonzero_axes_fit)
        .ok_or_else(|| NpyError::TooLarge {
            shape: header.shape.clone(),
            elements: header
                .shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(" x "),
        })?;
    let needed = (elements * header.dtype.size) as u64;
    let found = len.saturating_sub(header.data_offset);
    if found < needed {
        return Err(NpyError::Truncated {
            shape: header.shape.clone(),
            descr: header.dtype.descr.clone(),
            needed,
            found,
        });
    }
    if found > needed {
        return Err(NpyError::TrailingData {
            shape: header.shape.clone(),
            extra: found - needed,
        });
    }
    Ok(elements)
}

/// Writes an f32 array as a little-endian, C-order `.npy` (format 1.0).
pub fn write_f32(writer: &mut (impl Write + ?Sized), array: &ArrayD<f32>) -> std::io::Result<()> {
    let mut npy = NpyWriter::new(writer, array.shape())?;
    let standard = array.as_standard_layout();
    npy.write(standard.as_slice().expect("standard layout is contiguous"))?;
    npy.finish().map(|_| ())
}

/// Writes a tensor as a little-endian, C-order `.npy` (format 1.0) of its
/// own element type. numpy has no bfloat16: those are written as float32,
/// which holds every bfloat16 value exactly.
pub fn write_tensor(writer: &mut (impl Write + ?Sized), tensor: &Tensor) -> std::io::Result<()> {
    let descr = match tensor {
        Tensor::F32(a) => return write_f32(writer, a),
        Tensor::BF16(a) => return write_f32(writer, &a.mapv(f32::from)),
        Tensor::F64(_) => "<f8",
        Tensor::F16(_) => "<f2",
        Tensor::I64(_) => "<i8",
        Tensor::I32(_) => "<i4",
        Tensor::U8(_) => "|u1",
        Tensor::Bool(_) => "|b1",
    };
    let shape = tensor.shape();
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = match dims.as_slice() {
        [one] => format!("({one},)"),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}");
    // Magic (6) + version (2) + length (2) + header + newline, to a multiple of 64.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    writer.write_all(b"\x93NUMPY\x01\x00")?;
    writer.write_all(&(header.len() as u16).to_le_bytes())?;
    writer.write_all(header.as_bytes())?;
    // x86-64 is little-endian: the elements' bytes are already '<'.
    let standard = tensor.clone().into_standard();
    writer.write_all(standard.bytes())
}

/// Writes a little-endian, C-order f32 `.npy` (format 1.0) whose shape is
/// known before its values: the header first, then the values as they come,
/// so that an output need not be held whole.
pub struct NpyWriter<W: Write> {
    writer: W,
    /// Values still to come before the data matches the header's shape.
    remaining: usize,
    bytes: Vec<u8>,
}

impl<W: Write> NpyWriter<W> {
    /// Writes the header for an array of `shape`.
    pub fn new(mut writer: W, shape: &[usize]) -> std::io::Result<NpyWriter<W>> {
        let dims = match shape {
            [n] => format!("({n},)"),
            dims => format!(
                "({})",
                dims.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
        // numpy pads the header with spaces so that the data starts on a 64-byte
        // boundary, and ends it with a newline.
        let unpadded = MAGIC.len() + 2 + 2 + header.len() + 1;
        header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
        header.push('\n');
        writer.write_all(MAGIC)?;
        writer.write_all(&[1, 0])?;
        let len = u16::try_from(header.len())
            .map_err(|_| std::io::Error::other("shape too long for an .npy header"))?;
        writer.write_all(&len.to_le_bytes())?;
        writer.write_all(header.as_bytes())?;
        Ok(NpyWriter {
            writer,
            remaining: shape.iter().product(),
            bytes: Vec::new(),
        })
    }

    /// Appends `values`, the next ones in C order.
    pub fn write(&mut self, values: &[f32]) -> std::io::Result<()> {
        if values.len() > self.remaining {
            return Err(std::io::Error::other(format!(
                "{} values given where the header's shape leaves room for {}",
                values.len(),
                self.remaining
            )));
        }
        for chunk in values.chunks(16384) {
            self.bytes.clear();
            for v in chunk {
                self.bytes.extend_from_slice(&v.to_le_bytes());
            }
            self.writer.write_all(&self.bytes)?;
        }
        self.remaining -= values.len();
        Ok(())
    }

    /// Checks that every value the header promised was written, and returns
    /// the writer.
    pub fn finish(self) -> std::io::Result<W> {
        if self.remaining != 0 {
            return Err(std::io::Error::other(format!(
                "{} values short of the shape the header declares",
                self.remaining
            )));
        }
        Ok(self.writer)
    }
}

/// An `.npy` input read a block of rows (slices along axis 0) at a time, so
/// that memory does not grow with the file. The header is read and checked
/// against the file's size when it is opened.
pub struct NpyRowReader {
    path: PathBuf,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Elements per row: the product of every axis but the first.
    row_len: usize,
    source: RowSource,
}

enum RowSource {
    /// Little-endian f32 in C order: each block of rows is read straight
    /// into a buffer of f32, with no conversion.
    Direct {
        file: File,
        data_offset: u64,
        values: Vec<f32>,
    },
    /// Any other dtype in C order: a block's bytes are read and converted.
    Converted {
        reader: BufReader<File>,
        dtype: Dtype,
        data_offset: u64,
        next_row: usize,
        bytes: Vec<u8>,
        values: Vec<f32>,
    },
    /// Fortran order keeps each row's elements a whole column apart, so rows
    /// cannot be read as a block without a read per element: the array is
    /// read and reordered whole.
    Whole(ArrayD<f32>),
}

impl NpyRowReader {
    /// Opens `path` and checks its header against its size.
    pub fn open(path: &Path) -> Result<NpyRowReader, NpyError> {
        let (file, file_len) =
            budget::open_regular(path).map_err(|e| NpyError::Io(e.to_string()))?;
        let mut reader = BufReader::new(file);
        let header = read_header(&mut reader)?;
        data_elements(&header, file_len)?;
        let row_len = header.shape.iter().skip(1).product();
        let source = if header.fortran_order {
            RowSource::Whole(read_f32(path)?)
        } else if header.dtype.kind == Kind::Float
            && header.dtype.size == 4
            && header.dtype.little_endian
            && cfg!(target_endian = "little")
            && header.data_offset % 4 == 0
        {
            RowSource::Direct {
                file: reader.into_inner(),
                data_offset: header.data_offset,
                values: Vec::new(),
            }
        } else {
            RowSource::Converted {
                reader,
                data_offset: header.data_offset,
                next_row: 0,
                dtype: header.dtype.clone(),
                bytes: Vec::new(),
                values: Vec::new(),
            }
        };
        Ok(NpyRowReader {
            path: path.to_path_buf(),
            dtype: header.dtype.clone(),
            shape: header.shape,
            row_len,
            source,
        })
    }

    /// The array's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Whether blocks of rows are read as they are, rather than converted.
    pub fn is_direct(&self) -> bool {
        matches!(self.source, RowSource::Direct { .. })
    }

    /// The values of `rows` (a range along axis 0, of an array of rank 1 or
    /// more) in C order, as f32. The slice is valid until the next call.
    pub fn rows(&mut self, rows: Range<usize>) -> Result<&[f32], NpyError> {
        let available = self.shape.first().copied().unwrap_or(0);
        if rows.start > rows.end || rows.end > available {
            return Err(NpyError::Io(format!(
                "rows {rows:?} asked of an array of shape {:?}",
                self.shape
            )));
        }
        let start = rows.start * self.row_len;
        let count = rows.len() * self.row_len;
        let io = |e: std::io::Error| NpyError::Io(e.to_string());
        match &mut self.source {
            RowSource::Whole(array) => Ok(&array
                .as_slice()
                .expect("read_f32 returns standard layout")[start..start + count]),
            RowSource::Direct {
                file,
                data_offset,
                values,
            } => {
                // The rows are read (not mapped) into a buffer of f32 that is
                // reused from block to block: a map would end the process
                // with SIGBUS, and no message, if another process truncated
                // the file while a layer read the block. One copy of a block
                // costs far less than the layers' work on it.
                budget::check(Some(count as u128 * 4)).map_err(|over| NpyError::OverBudget {
                    shape: {
                        let mut shape = self.shape.clone();
                        shape[0] = rows.len();
                        shape
                    },
                    descr: self.dtype.descr.clone(),
                    over: Box::new(over),
                })?;
                values.clear();
                values.resize(count, 0.0);
                let at = *data_offset + 4 * start as u64;
                let end = at + 4 * count as u64;
                let bytes: &mut [u8] = bytemuck::cast_slice_mut(values.as_mut_slice());
                match file.read_exact_at(bytes, at) {
                    Ok(()) => Ok(values),
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        let now = file.metadata().map_err(io)?.len();
                        Err(NpyError::Shrunk {
                            now,
                            needed: end,
                            rows: format!("{}..{}", rows.start, rows.end),
                        })
                    }
                    Err(e) => Err(io(e)),
                }
            }
            RowSource::Converted {
                reader,
                dtype,
                data_offset,
                next_row,
                bytes,
                values,
            } => {
                budget::check(Some(count as u128 * (dtype.size as u128 + 4))).map_err(|over| {
                    NpyError::OverBudget {
                        shape: {
                            let mut shape = self.shape.clone();
                            shape[0] = rows.len();
                            shape
                        },
                        descr: dtype.descr.clone(),
                        over: Box::new(over),
                    }
                })?;
                if *next_row != rows.start {
                    let at = *data_offset + (start * dtype.size) as u64;
                    reader.seek(SeekFrom::Start(at)).map_err(io)?;
                }
                bytes.resize(count * dtype.size, 0);
                read_exact_or(reader, bytes, || {
                    NpyError::Io("the data ended before its declared length".into())
                })?;
                values.clear();
                values.extend(bytes.chunks_exact(dtype.size).map(|b| dtype.to_f32(b)));
                *next_row = rows.end;
                Ok(values)
            }
        }
    }

    /// The whole array, in C order.
    /// The file's element type.
    pub fn dtype(&self) -> &Dtype {
        &self.dtype
    }

    /// Reads the whole array in the element type its dtype maps to.
    pub fn into_tensor(self) -> Result<Tensor, NpyError> {
        read_tensor(&self.path)
    }

    pub fn into_array(self) -> Result<ArrayD<f32>, NpyError> {
        match self.source {
            RowSource::Whole(array) => Ok(array),
            _ => read_f32(&self.path),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8]) -> Result<Tensor, String> {
        read_tensor_from(bytes, bytes.len() as u64).map_err(|e| e.to_string())
    }

    /// An `.npy` file of `descr` and `shape` holding `data`, as numpy lays
    /// it out (format 1.0, header padded to 64 bytes).
    fn npy_bytes_ordered(descr: &str, fortran: bool, shape: &str, data: &[u8]) -> Vec<u8> {
        let fortran = if fortran { "True" } else { "False" };
        let mut header =
            format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    #[test]
    fn npy_arrays_keep_their_element_type_and_exact_values() {
        let big: i64 = (1 << 53) + 1; // not a float32, nor a float64
        let data: Vec<u8> = [big, -3].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            read(&npy_bytes_ordered("<i8", false, "(2,)", &data)).unwrap(),
            Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[2]), vec![big, -3]).unwrap())
        );
        let data: Vec<u8> = [7i32, -8].iter().flat_map(|v| v.to_be_bytes()).collect();
        assert_eq!(
            read(&npy_bytes_ordered(">i4", false, "(2,)", &data)).unwrap(),
            Tensor::I32(ArrayD::from_shape_vec(IxDyn(&[2]), vec![7, -8]).unwrap())
        );
        // Fortran order: the columns of [[1, 2, 3], [4, 5, 6]] one after the other.
        let data: Vec<u8> = [1.0f64, 4.0, 2.0, 5.0, 3.0, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            read(&npy_bytes_ordered("<f8", true, "(2, 3)", &data)).unwrap(),
            Tensor::F64(
                ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap()
            )
        );
        assert_eq!(
            read(&npy_bytes_ordered("|u1", false, "(3,)", &[0, 171, 255])).unwrap(),
            Tensor::U8(ArrayD::from_shape_vec(IxDyn(&[3]), vec![0, 171, 255]).unwrap())
        );
        assert_eq!(
            read(&npy_bytes_ordered("|b1", false, "(2,)", &[1, 0])).unwrap(),
            Tensor::Bool(ArrayD::from_shape_vec(IxDyn(&[2]), vec![1, 0]).unwrap())
        );
        assert_eq!(
            read(&npy_bytes_ordered(
                "<f4",
                false,
                "()",
                &1.5f32.to_le_bytes()
            ))
            .unwrap(),
            Tensor::F32(ArrayD::from_elem(IxDyn(&[]), 1.5))
        );
        // Integer types the interface lacks widen to one that holds them.
        assert_eq!(
            read(&npy_bytes_ordered(
                "<i2",
                false,
                "(1,)",
                &(-300i16).to_le_bytes()
            ))
            .unwrap(),
            Tensor::I32(ArrayD::from_shape_vec(IxDyn(&[1]), vec![-300]).unwrap())
        );
        assert!(read(&npy_bytes_ordered("<f4", false, "(2,)", &[0; 4]))
            .unwrap_err()
            .starts_with("truncated"));
    }

    #[test]
    fn header_dicts_as_numpy_writes_them() {
        let d =
            parse_header_dict("{'descr': '<f8', 'fortran_order': False, 'shape': (2, 64), }   \n")
                .unwrap();
        assert_eq!(d.descr.as_deref(), Some("<f8"));
        assert_eq!(d.fortran_order, Some(false));
        assert_eq!(d.shape, Some(vec![2, 64]));
        let d =
            parse_header_dict("{'descr': '|u1', 'fortran_order': True, 'shape': (5,)}").unwrap();
        assert_eq!(d.shape, Some(vec![5]));
        assert_eq!(d.fortran_order, Some(true));
        let d = parse_header_dict("{'descr': '<i8', 'fortran_order': False, 'shape': ()}").unwrap();
        assert_eq!(d.shape, Some(vec![]));
    }

    #[test]
    fn corrupt_headers_are_named() {
        for (text, fragment) in [
            (
                "{'descr': '<f8', 'fortran_order': Maybe, 'shape': (2,)}",
                "True or False",
            ),
            (
                "{'descr': '<f8', 'fortran_order': False, 'shape': (-2,)}",
                "non-negative",
            ),
            ("{'descr': '<f8' 'shape': (2,)}", "expected '}'"),
            ("{'colour': 'red'}", "unexpected key 'colour'"),
            (
                "{'descr': '<f8', 'fortran_order': False, 'shape': (2,)} x",
                "after the closing",
            ),
        ] {
            let err = parse_header_dict(text).err().unwrap().to_string();
            assert!(err.contains(fragment), "{text}: {err}");
        }
    }

    #[test]
    fn dtypes_numeric_only() {
        assert!(Dtype::parse("<f8").is_ok());
        assert!(Dtype::parse(">i2").is_ok());
        assert!(Dtype::parse("|b1").is_ok());
        for bad in ["<c16", "|O", "<U5", "|S3", "<f16", "<i3", "<M8[ns]"] {
            assert!(
                matches!(Dtype::parse(bad), Err(NpyError::Dtype(_))),
                "{bad} should be refused"
            );
        }
    }

    #[test]
    fn conversions_by_hand() {
        let be_i16 = Dtype::parse(">i2").unwrap();
        assert_eq!(be_i16.to_f32(&[0xff, 0xfe]), -2.0);
        let le_u32 = Dtype::parse("<u4").unwrap();
        assert_eq!(le_u32.to_f32(&[1, 1, 0, 0]), 257.0);
        let f16 = Dtype::parse("<f2").unwrap();
        assert_eq!(f16.to_f32(&[0x00, 0x3c]), 1.0);
        let b = Dtype::parse("|b1").unwrap();
        assert_eq!(b.to_f32(&[7]), 1.0);
    }

    #[test]
    fn written_headers_are_aligned_and_readable() {
        let a = ArrayD::from_shape_vec(IxDyn(&[2, 3]), (0..6).map(|v| v as f32).collect()).unwrap();
        let mut bytes = Vec::new();
        write_f32(&mut bytes, &a).unwrap();
        let header = read_header(&mut bytes.as_slice()).unwrap();
        assert_eq!(header.data_offset % 64, 0);
        assert_eq!(header.shape, vec![2, 3]);
        assert_eq!(bytes.len() as u64, header.data_offset + 24);
    }

    /// An `.npy` file of `descr` and `shape` holding `data`, as numpy lays
    /// it out (format 1.0, header padded to 64 bytes).
    fn npy_bytes(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        npy_bytes_ordered(descr, false, shape, data)
    }

    #[test]
    fn rows_are_read_directly_or_converted_in_any_order() {
        let dir = tempfile::tempdir().unwrap();
        let values: Vec<f64> = (0..12).map(|v| f64::from(v) * 0.5).collect();
        let f64_path = dir.path().join("x64.npy");
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&f64_path, npy_bytes("<f8", "(4, 3)", &data)).unwrap();
        let f32_path = dir.path().join("x32.npy");
        let data: Vec<u8> = values
            .iter()
            .flat_map(|&v| (v as f32).to_le_bytes())
            .collect();
        std::fs::write(&f32_path, npy_bytes("<f4", "(4, 3)", &data)).unwrap();
        for (path, direct) in [(&f64_path, false), (&f32_path, true)] {
            let mut reader = NpyRowReader::open(path).unwrap();
            assert_eq!(reader.is_direct(), direct);
            assert_eq!(reader.shape(), &[4, 3]);
            assert_eq!(reader.rows(1..3).unwrap(), &[1.5, 2.0, 2.5, 3.0, 3.5, 4.0]);
            assert_eq!(reader.rows(3..4).unwrap(), &[4.5, 5.0, 5.5]);
            assert_eq!(reader.rows(0..1).unwrap(), &[0.0, 0.5, 1.0]);
            assert!(reader.rows(3..5).is_err());
        }
    }

    #[test]
    fn a_truncated_file_is_refused_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.npy");
        std::fs::write(&path, npy_bytes("<f4", "(4, 3)", &[0; 40])).unwrap();
        assert!(matches!(
            NpyRowReader::open(&path),
            Err(NpyError::Truncated {
                needed: 48,
                found: 40,
                ..
            })
        ));
    }

    #[test]
    fn the_streaming_writer_holds_to_its_header() {
        let a = ArrayD::from_shape_vec(IxDyn(&[3, 2]), (0..6).map(|v| v as f32).collect()).unwrap();
        let mut whole = Vec::new();
        write_f32(&mut whole, &a).unwrap();
        let mut npy = NpyWriter::new(Vec::new(), &[3, 2]).unwrap();
        npy.write(&[0.0, 1.0]).unwrap();
        npy.write(&[2.0, 3.0, 4.0, 5.0]).unwrap();
        assert!(
            npy.write(&[6.0]).is_err(),
            "more values than the shape holds"
        );
        assert_eq!(npy.finish().unwrap(), whole);
        let mut short = NpyWriter::new(Vec::new(), &[3, 2]).unwrap();
        short.write(&[0.0; 4]).unwrap();
        assert!(short.finish().is_err(), "fewer values than the shape holds");
    }
}
