//! Tensors of any element type the interface defines, as the host keeps
//! them: owned, contiguous, row-major.

use half::{bf16, f16};
use layer_api::DType;
use ndarray::{ArrayD, IxDyn};

/// An owned tensor. `Bool` holds one byte per element, 0 or 1: the host
/// keeps booleans as bytes so that a plugin writing another byte value is an
/// error it can report ([`Tensor::check_bool`]), never an invalid `bool`.
#[derive(Debug, Clone, PartialEq)]
pub enum Tensor {
    F32(ArrayD<f32>),
    F64(ArrayD<f64>),
    F16(ArrayD<f16>),
    BF16(ArrayD<bf16>),
    I64(ArrayD<i64>),
    I32(ArrayD<i32>),
    U8(ArrayD<u8>),
    Bool(ArrayD<u8>),
}

/// Applies `$body` to the array inside any variant, bound as `$a`.
macro_rules! each {
    ($value:expr, $a:ident => $body:expr) => {
        match $value {
            Tensor::F32($a) => $body,
            Tensor::F64($a) => $body,
            Tensor::F16($a) => $body,
            Tensor::BF16($a) => $body,
            Tensor::I64($a) => $body,
            Tensor::I32($a) => $body,
            Tensor::U8($a) => $body,
            Tensor::Bool($a) => $body,
        }
    };
}

/// The plain-data element types, viewed as bytes without copying.
trait Plain: bytemuck::Pod {}
impl Plain for f32 {}
impl Plain for f64 {}
impl Plain for f16 {}
impl Plain for bf16 {}
impl Plain for i64 {}
impl Plain for i32 {}
impl Plain for u8 {}

fn bytes_of<T: Plain>(a: &ArrayD<T>) -> &[u8] {
    bytemuck::cast_slice(
        a.as_slice()
            .expect("the host keeps tensors in standard layout"),
    )
}

fn bytes_of_mut<T: Plain>(a: &mut ArrayD<T>) -> &mut [u8] {
    bytemuck::cast_slice_mut(a.as_slice_mut().expect("owned arrays are contiguous"))
}

/// A borrowed, contiguous, row-major tensor: what a forward pass reads its
/// input from (an owned [`Tensor`], or a block of rows read from a file).
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub dtype: DType,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl<'a> TensorView<'a> {
    /// A view of `float32` data in standard layout, or `None` if it is not.
    pub fn f32(array: &'a ndarray::ArrayViewD<'a, f32>) -> Option<TensorView<'a>> {
        Some(TensorView {
            dtype: DType::F32,
            shape: array.shape(),
            bytes: bytemuck::cast_slice(array.as_slice()?),
        })
    }
}

impl From<ArrayD<f32>> for Tensor {
    fn from(a: ArrayD<f32>) -> Tensor {
        Tensor::F32(a)
    }
}

impl Tensor {
    /// Zeros (false) of `dtype` and `shape`, refused (before anything is
    /// allocated) when it would take more than the memory budget.
    pub fn zeros(dtype: DType, shape: &[usize]) -> Result<Tensor, String> {
        if dtype.is_known() {
            crate::budget::check_shape(shape, dtype.size()).map_err(|over| {
                format!(
                    "a {dtype} tensor of shape {} {over}",
                    crate::budget::shape_text(shape)
                )
            })?;
        }
        let s = IxDyn(shape);
        Ok(match dtype {
            DType::F32 => Tensor::F32(ArrayD::zeros(s)),
            DType::F64 => Tensor::F64(ArrayD::zeros(s)),
            DType::F16 => Tensor::F16(ArrayD::from_elem(s, f16::ZERO)),
            DType::BF16 => Tensor::BF16(ArrayD::from_elem(s, bf16::ZERO)),
            DType::I64 => Tensor::I64(ArrayD::zeros(s)),
            DType::I32 => Tensor::I32(ArrayD::zeros(s)),
            DType::U8 => Tensor::U8(ArrayD::zeros(s)),
            DType::BOOL => Tensor::Bool(ArrayD::zeros(s)),
            other => return Err(format!("unknown element type {other}")),
        })
    }

    pub fn dtype(&self) -> DType {
        match self {
            Tensor::F32(_) => DType::F32,
            Tensor::F64(_) => DType::F64,
            Tensor::F16(_) => DType::F16,
            Tensor::BF16(_) => DType::BF16,
            Tensor::I64(_) => DType::I64,
            Tensor::I32(_) => DType::I32,
            Tensor::U8(_) => DType::U8,
            Tensor::Bool(_) => DType::BOOL,
        }
    }

    pub fn shape(&self) -> &[usize] {
        each!(self, a => a.shape())
    }

    pub fn len(&self) -> usize {
        each!(self, a => a.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The same tensor in standard (C) layout.
    pub fn into_standard(self) -> Tensor {
        fn standard<T: Clone>(a: ArrayD<T>) -> ArrayD<T> {
            if a.is_standard_layout() {
                a
            } else {
                a.as_standard_layout().into_owned()
            }
        }
        match self {
            Tensor::F32(a) => Tensor::F32(standard(a)),
            Tensor::F64(a) => Tensor::F64(standard(a)),
            Tensor::F16(a) => Tensor::F16(standard(a)),
            Tensor::BF16(a) => Tensor::BF16(standard(a)),
            Tensor::I64(a) => Tensor::I64(standard(a)),
            Tensor::I32(a) => Tensor::I32(standard(a)),
            Tensor::U8(a) => Tensor::U8(standard(a)),
            Tensor::Bool(a) => Tensor::Bool(standard(a)),
        }
    }

    /// A view of the whole tensor (which must be in standard layout, as
    /// every tensor the host makes is).
    pub fn view(&self) -> TensorView<'_> {
        TensorView {
            dtype: self.dtype(),
            shape: self.shape(),
            bytes: self.bytes(),
        }
    }

    /// Whether the elements lie in standard (C) layout.
    pub fn is_standard_layout(&self) -> bool {
        each!(self, a => a.is_standard_layout())
    }

    /// The elements as bytes, in C order.
    pub fn bytes(&self) -> &[u8] {
        each!(self, a => bytes_of(a))
    }

    /// The elements as bytes, to be written by a layer.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        each!(self, a => bytes_of_mut(a))
    }

    /// The `float32` array, if this is one.
    pub fn as_f32(&self) -> Option<&ArrayD<f32>> {
        match self {
            Tensor::F32(a) => Some(a),
            _ => None,
        }
    }

    /// Refuses a boolean tensor holding a byte other than 0 or 1.
    pub fn check_bool(&self) -> Result<(), String> {
        match self {
            Tensor::Bool(a) => match a.iter().position(|&b| b > 1) {
                Some(i) => Err(format!(
                    "bool element {i} holds byte {}, not 0 or 1",
                    a.iter().nth(i).copied().unwrap_or(0)
                )),
                None => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// Rows `rows` of axis 0, in that order (a minibatch).
    pub fn select_rows(&self, rows: &[usize]) -> Tensor {
        let axis = ndarray::Axis(0);
        match self {
            Tensor::F32(a) => Tensor::F32(a.select(axis, rows)),
            Tensor::F64(a) => Tensor::F64(a.select(axis, rows)),
            Tensor::F16(a) => Tensor::F16(a.select(axis, rows)),
            Tensor::BF16(a) => Tensor::BF16(a.select(axis, rows)),
            Tensor::I64(a) => Tensor::I64(a.select(axis, rows)),
            Tensor::I32(a) => Tensor::I32(a.select(axis, rows)),
            Tensor::U8(a) => Tensor::U8(a.select(axis, rows)),
            Tensor::Bool(a) => Tensor::Bool(a.select(axis, rows)),
        }
    }

    /// Every element as `f64` (booleans as 0 and 1), for printing and
    /// comparing.
    pub fn to_f64(&self) -> ArrayD<f64> {
        match self {
            Tensor::F32(a) => a.mapv(f64::from),
            Tensor::F64(a) => a.clone(),
            Tensor::F16(a) => a.mapv(f64::from),
            Tensor::BF16(a) => a.mapv(f64::from),
            Tensor::I64(a) => a.mapv(|v| v as f64),
            Tensor::I32(a) => a.mapv(f64::from),
            Tensor::U8(a) | Tensor::Bool(a) => a.mapv(f64::from),
        }
    }

    /// This tensor as `dtype`: itself when it already is; otherwise
    /// converted element by element where no value can be lost in kind:
    /// any number or boolean to a float type (rounding to its precision, as
    /// numpy's `astype` does), integers and booleans to an integer type
    /// whose range holds every value. Floats are never truncated to
    /// integers.
    pub fn convert(self, dtype: DType) -> Result<Tensor, String> {
        if self.dtype() == dtype {
            return Ok(self);
        }
        let from = self.dtype();
        let refuse = |why: &str| format!("cannot convert {from} to {dtype}: {why}");
        if dtype == DType::F32 || dtype == DType::F64 || dtype == DType::F16 || dtype == DType::BF16
        {
            let x = self.to_f64();
            return Ok(match dtype {
                DType::F32 => Tensor::F32(x.mapv(|v| v as f32)),
                DType::F64 => Tensor::F64(x),
                DType::F16 => Tensor::F16(x.mapv(f16::from_f64)),
                _ => Tensor::BF16(x.mapv(bf16::from_f64)),
            });
        }
        let ints: ArrayD<i64> = match self {
            Tensor::I64(a) => a,
            Tensor::I32(a) => a.mapv(i64::from),
            Tensor::U8(a) | Tensor::Bool(a) => a.mapv(i64::from),
            _ => return Err(refuse("floats are not truncated to integers")),
        };
        let (low, high) = match dtype {
            DType::I64 => (i64::MIN, i64::MAX),
            DType::I32 => (i64::from(i32::MIN), i64::from(i32::MAX)),
            DType::U8 => (0, 255),
            DType::BOOL => (0, 1),
            _ => return Err(refuse("unknown element type")),
        };
        if let Some(v) = ints.iter().find(|&&v| v < low || v > high) {
            return Err(refuse(&format!("value {v} is outside [{low}, {high}]")));
        }
        Ok(match dtype {
            DType::I64 => Tensor::I64(ints),
            DType::I32 => Tensor::I32(ints.mapv(|v| v as i32)),
            DType::U8 => Tensor::U8(ints.mapv(|v| v as u8)),
            _ => Tensor::Bool(ints.mapv(|v| v as u8)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn conversions_keep_values_and_refuse_losing_kind() {
        let x = Tensor::F64(array![1.5, -2.25].into_dyn());
        assert_eq!(
            x.clone().convert(DType::F32).unwrap(),
            Tensor::F32(array![1.5f32, -2.25].into_dyn())
        );
        assert!(x
            .convert(DType::I64)
            .unwrap_err()
            .contains("cannot convert float64 to int64"));
        let i = Tensor::I64(array![0i64, 300].into_dyn());
        assert!(i.clone().convert(DType::U8).unwrap_err().contains("300"));
        assert_eq!(
            i.convert(DType::I32).unwrap(),
            Tensor::I32(array![0i32, 300].into_dyn())
        );
    }

    #[test]
    fn bytes_are_the_elements_in_c_order_and_bools_are_checked() {
        let t = Tensor::I32(array![[1i32, 2], [3, 4]].into_dyn());
        assert_eq!(&t.bytes()[4..8], &2i32.to_ne_bytes());
        let mut b = Tensor::zeros(DType::BOOL, &[3]).unwrap();
        b.bytes_mut()[1] = 1;
        assert!(b.check_bool().is_ok());
        b.bytes_mut()[2] = 7;
        assert_eq!(
            b.check_bool().unwrap_err(),
            "bool element 2 holds byte 7, not 0 or 1"
        );
    }
}
