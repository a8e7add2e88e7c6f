//! Reading and writing numpy `.npy` files.
//!
//! Inputs may be any numeric dtype numpy writes (bool, signed and unsigned
//! integers, float16/32/64, either byte order) in C or Fortran order; they are
//! converted to f32, the type every layer computes in. Outputs are always
//! little-endian f32 in C order. The header is checked against the file size
//! before anything is allocated, so a header that claims a huge shape, or a
//! truncated file, is refused with a message instead of an allocation failure.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::Path;

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
}

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
    let file = File::open(path).map_err(|e| NpyError::Io(e.to_string()))?;
    let file_len = file
        .metadata()
        .map_err(|e| NpyError::Io(e.to_string()))?
        .len();
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
            shape: header.shape,
            descr: header.dtype.descr,
            needed,
            found,
        });
    }
    if found > needed {
        return Err(NpyError::TrailingData {
            shape: header.shape,
            extra: found - needed,
        });
    }
    let mut data = Vec::with_capacity(elements);
    let mut chunk = vec![0u8; header.dtype.size * 16384];
    let mut remaining = elements;
    while remaining > 0 {
        let n = remaining.min(16384);
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

/// Writes an f32 array as a little-endian, C-order `.npy` (format 1.0).
pub fn write_f32(writer: &mut (impl Write + ?Sized), array: &ArrayD<f32>) -> std::io::Result<()> {
    let shape = match array.shape() {
        [n] => format!("({n},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
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
    let standard = array.as_standard_layout();
    let data = standard.as_slice().expect("standard layout is contiguous");
    let mut buf = Vec::with_capacity(data.len().min(16384) * 4);
    for chunk in data.chunks(16384) {
        buf.clear();
        for v in chunk {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        writer.write_all(&buf)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
