//! Printing an array the way numpy's `print(array)` does: shortest digits
//! that identify each value (at most 8 after the point), columns aligned,
//! scientific notation when magnitudes call for it, rows wrapped at 75
//! characters, and large arrays summarized with `...`.
//!
//! The nesting is walked with a loop, not recursion, and only the values
//! shown are visited: an array of any rank or size prints in memory
//! proportional to its text (at most [`THRESHOLD`] values, or
//! [`EDGE_ITEMS`] at each end of each axis), never the array again.

use ndarray::ArrayD;

use crate::tensor::Tensor;

const LINE_WIDTH: usize = 75;
const PRECISION: usize = 8;
/// Arrays with more elements than this are summarized.
const THRESHOLD: usize = 1000;
const EDGE_ITEMS: usize = 3;

/// Formats `array` as numpy's `str()` would.
pub fn format_array(array: &ArrayD<f32>) -> String {
    if array.ndim() == 0 {
        // numpy prints a 0-d array as its scalar: shortest digits, no padding.
        return format!("{:?}", array.iter().next().copied().unwrap_or_default());
    }
    let standard = array.as_standard_layout();
    let values = standard.as_slice().expect("standard layout is contiguous");
    format_floats(array.shape(), &|i| values[i])
}

/// Prints a command's result. A reader that stopped early (`| head`) is not
/// an error: it has what it wanted.
pub fn print_stdout(text: &str) -> Result<(), crate::Error> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(crate::Error::Write {
            path: std::path::PathBuf::from("<stdout>"),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Formats a tensor of any element type: floats as numpy prints them
/// (through float32 for float16, bfloat16 and float64 alike, at float32's
/// shortest digits), integers as integers, booleans as `True`/`False`, with
/// the same brackets and summarization. Only the values shown are converted.
pub fn format_tensor(tensor: &Tensor) -> String {
    fn flat<T: Clone>(a: &ArrayD<T>) -> std::borrow::Cow<'_, [T]> {
        match a.as_slice() {
            Some(s) => std::borrow::Cow::Borrowed(s),
            None => std::borrow::Cow::Owned(a.as_standard_layout().iter().cloned().collect()),
        }
    }
    let shape = tensor.shape();
    let floats = |value: &dyn Fn(usize) -> f32| {
        if shape.is_empty() {
            format!("{:?}", value(0))
        } else {
            format_floats(shape, value)
        }
    };
    match tensor {
        Tensor::F32(a) => format_array(a),
        Tensor::F64(a) => {
            let v = flat(a);
            floats(&|i| v[i] as f32)
        }
        Tensor::F16(a) => {
            let v = flat(a);
            floats(&|i| f32::from(v[i]))
        }
        Tensor::BF16(a) => {
            let v = flat(a);
            floats(&|i| f32::from(v[i]))
        }
        Tensor::Bool(a) => {
            let v = flat(a);
            format_plain(shape, &|i| {
                if v[i] != 0 { "True" } else { "False" }.to_string()
            })
        }
        Tensor::I64(a) => {
            let v = flat(a);
            format_plain(shape, &|i| v[i].to_string())
        }
        Tensor::I32(a) => {
            let v = flat(a);
            format_plain(shape, &|i| v[i].to_string())
        }
        Tensor::U8(a) => {
            let v = flat(a);
            format_plain(shape, &|i| v[i].to_string())
        }
    }
}

/// Integers and booleans (`show` gives the element at a flat C-order
/// index), right-aligned in columns of the widest value shown.
fn format_plain(shape: &[usize], show: &dyn Fn(usize) -> String) -> String {
    if shape.is_empty() {
        return show(0);
    }
    if shape.contains(&0) {
        return "[]".to_string();
    }
    let summarize = summarizes(shape);
    let last = shape[shape.len() - 1];
    let mut width = 1;
    walk(shape, summarize, &mut |event| {
        if let Event::Row(offset) = event {
            for i in (0..shown_count(last, summarize)).filter_map(|k| shown_at(last, summarize, k))
            {
                width = width.max(show(offset + i).len());
            }
        }
    });
    let mut out = String::new();
    walk(shape, summarize, &mut |event| match event {
        Event::Row(offset) => {
            for k in 0..shown_count(last, summarize) {
                if k > 0 {
                    out.push(' ');
                }
                match shown_at(last, summarize, k) {
                    Some(i) => out.push_str(&format!("{:>width$}", show(offset + i))),
                    None => out.push_str("..."),
                }
            }
        }
        other => push_structure(&mut out, shape.len(), other),
    });
    out
}

/// Floats (`value` gives the element at a flat C-order index) of an array
/// of `shape` (rank 1 or more), numpy's way.
fn format_floats(shape: &[usize], value: &dyn Fn(usize) -> f32) -> String {
    if shape.contains(&0) {
        // As numpy prints any array without elements.
        return "[]".to_string();
    }
    let summarize = summarizes(shape);
    let ndim = shape.len();
    let last = shape[ndim - 1];
    let mut shown = Vec::new();
    walk(shape, summarize, &mut |event| {
        if let Event::Row(offset) = event {
            shown.extend(
                (0..shown_count(last, summarize))
                    .filter_map(|k| shown_at(last, summarize, k))
                    .map(|i| value(offset + i)),
            );
        }
    });
    let format = FloatFormat::for_values(&shown);
    drop(shown);
    let mut out = String::new();
    walk(shape, summarize, &mut |event| match event {
        Event::Row(offset) => {
            // The last axis: values separated by spaces, wrapped at the
            // width. As numpy does: a word wraps when it would reach the
            // column where this level's closing brackets go.
            let indent = ndim;
            let width = LINE_WIDTH.saturating_sub(ndim);
            let mut line_len = indent;
            for k in 0..shown_count(last, summarize) {
                let word = match shown_at(last, summarize, k) {
                    Some(i) => format.format(value(offset + i)),
                    None => "...".to_string(),
                };
                if k > 0 {
                    if line_len + 1 + word.len() > width {
                        out.push('\n');
                        out.push_str(&" ".repeat(indent));
                        line_len = indent;
                    } else {
                        out.push(' ');
                        line_len += 1;
                    }
                }
                out.push_str(&word);
                line_len += word.len();
            }
        }
        other => push_structure(&mut out, ndim, other),
    });
    out
}

/// Whether an array of `shape` is summarized: more than [`THRESHOLD`]
/// elements (counted without overflow).
fn summarizes(shape: &[usize]) -> bool {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .is_none_or(|n| n > THRESHOLD)
}

/// How many entries an axis of length `n` shows: all, or when summarized
/// [`EDGE_ITEMS`] at each end and the `...` between.
fn shown_count(n: usize, summarize: bool) -> usize {
    if summarize && n > 2 * EDGE_ITEMS {
        2 * EDGE_ITEMS + 1
    } else {
        n
    }
}

/// The index shown as entry `k` of an axis of length `n`; `None` for the
/// `...`.
fn shown_at(n: usize, summarize: bool, k: usize) -> Option<usize> {
    if summarize && n > 2 * EDGE_ITEMS {
        match k {
            k if k < EDGE_ITEMS => Some(k),
            k if k == EDGE_ITEMS => None,
            k => Some(n - (2 * EDGE_ITEMS + 1 - k)),
        }
    } else {
        Some(k)
    }
}

/// One step of the printed nesting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// `[`
    Open,
    /// `]`
    Close,
    /// Between two entries of this axis (not the last).
    Separator(usize),
    /// An axis's `...`, in place of an entry (not on the last axis).
    Ellipsis,
    /// A row of the last axis, starting at this flat C-order index: its
    /// entries are written by the caller.
    Row(usize),
}

/// Writes the brackets, separators and `...` of an array of rank `ndim`.
fn push_structure(out: &mut String, ndim: usize, event: Event) {
    match event {
        Event::Open => out.push('['),
        Event::Close => out.push(']'),
        Event::Separator(axis) => {
            // A blank line per axis below, then the indent of the next `[`.
            for _ in 0..ndim - axis - 1 {
                out.push('\n');
            }
            for _ in 0..=axis {
                out.push(' ');
            }
        }
        Event::Ellipsis => out.push_str("..."),
        Event::Row(_) => {}
    }
}

/// Walks the nesting of an array of `shape` (rank 1 or more, no zero-length
/// axis), in the order it prints, with a loop: memory is a few words per
/// axis whatever the rank, and only the rows shown are visited.
fn walk(shape: &[usize], summarize: bool, f: &mut dyn FnMut(Event)) {
    let ndim = shape.len();
    let last = ndim - 1;
    let mut strides = vec![1usize; ndim];
    for axis in (0..last).rev() {
        strides[axis] = strides[axis + 1] * shape[axis + 1];
    }
    // Per axis: the entry being printed, and the flat index its sub-array
    // starts at.
    let mut entry = vec![0usize; ndim];
    let mut start = vec![0usize; ndim];
    let mut axis = 0;
    f(Event::Open);
    loop {
        if axis == last {
            f(Event::Row(start[axis]));
            f(Event::Close);
            // Up to the nearest axis with an entry left.
            loop {
                if axis == 0 {
                    return;
                }
                axis -= 1;
                entry[axis] += 1;
                if entry[axis] < shown_count(shape[axis], summarize) {
                    break;
                }
                f(Event::Close);
            }
            f(Event::Separator(axis));
            if shown_at(shape[axis], summarize, entry[axis]).is_none() {
                f(Event::Ellipsis);
                f(Event::Separator(axis));
                entry[axis] += 1;
            }
        }
        // Into the current entry of `axis`.
        let index = shown_at(shape[axis], summarize, entry[axis]).expect("not the `...`");
        start[axis + 1] = start[axis] + index * strides[axis];
        axis += 1;
        entry[axis] = 0;
        f(Event::Open);
    }
}

/// Formats a shape as Python writes a tuple (`(2, 64)`, `(8,)`, `()`), with
/// `?` for a dimension that is not known.
pub fn format_shape(dims: &[Option<usize>]) -> String {
    let text: Vec<String> = dims
        .iter()
        .map(|d| d.map_or_else(|| "?".to_string(), |d| d.to_string()))
        .collect();
    match text.as_slice() {
        [one] => format!("({one},)"),
        _ => format!("({})", text.join(", ")),
    }
}

/// [`format_shape`] for a shape whose dimensions are all known.
pub fn format_known_shape(dims: &[usize]) -> String {
    format_shape(&dims.iter().copied().map(Some).collect::<Vec<_>>())
}

/// How every value of one array is written: fixed or scientific notation,
/// and the widths that align them.
#[derive(Debug, Clone, PartialEq)]
struct FloatFormat {
    scientific: bool,
    /// Characters before the point (sign included).
    int_width: usize,
    /// Digits after the point.
    frac_width: usize,
    /// Exponent digits (scientific only).
    exp_width: usize,
}

impl FloatFormat {
    fn for_values(values: &[f32]) -> FloatFormat {
        let magnitudes: Vec<f64> = values
            .iter()
            .filter(|v| v.is_finite() && **v != 0.0)
            .map(|v| f64::from(v.abs()))
            .collect();
        let max = magnitudes.iter().copied().fold(0.0, f64::max);
        let min = magnitudes.iter().copied().fold(f64::INFINITY, f64::min);
        let scientific = !magnitudes.is_empty() && (max >= 1e8 || min < 1e-4 || max / min > 1e3);
        let mut format = FloatFormat {
            scientific,
            int_width: 0,
            frac_width: 0,
            exp_width: 2,
        };
        for v in values.iter().filter(|v| v.is_finite()) {
            let (int, frac, exp) = split_digits(*v, scientific);
            format.int_width = format.int_width.max(int.len());
            format.frac_width = format.frac_width.max(frac.len());
            format.exp_width = format.exp_width.max(exp.trim_start_matches('-').len());
        }
        // Room for nan and inf, as numpy makes it: they take the integer
        // part's place, right-aligned to the whole width.
        if values.iter().any(|v| !v.is_finite()) {
            let negative_inf = values.contains(&f32::NEG_INFINITY);
            let longest = 3 + usize::from(negative_inf);
            format.int_width = format
                .int_width
                .max(longest.saturating_sub(format.frac_width + 1));
        }
        format
    }

    fn width(&self) -> usize {
        let base = self.int_width + 1 + self.frac_width;
        if self.scientific {
            base + 2 + self.exp_width
        } else {
            base
        }
    }

    fn format(&self, v: f32) -> String {
        if !v.is_finite() {
            let text = if v.is_nan() {
                "nan"
            } else if v > 0.0 {
                "inf"
            } else {
                "-inf"
            };
            return format!("{text:>width$}", width = self.width());
        }
        let (int, frac, exp) = split_digits(v, self.scientific);
        if self.scientific {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d.to_string()),
                None => ('+', exp),
            };
            format!(
                "{int:>iw$}.{frac:0<fw$}e{sign}{digits:0>ew$}",
                iw = self.int_width,
                fw = self.frac_width,
                ew = self.exp_width
            )
        } else {
            format!(
                "{int:>iw$}.{frac:<fw$}",
                iw = self.int_width,
                fw = self.frac_width
            )
        }
    }
}

/// The shortest digits that identify `v` as an f32, at most `PRECISION`
/// after the point: (integer part with sign, fraction digits, exponent).
fn split_digits(v: f32, scientific: bool) -> (String, String, String) {
    if scientific {
        let mut text = format!("{v:e}");
        let (mantissa, _) = text.split_once('e').expect("{:e} has an exponent");
        if mantissa.split_once('.').map_or(0, |(_, f)| f.len()) > PRECISION {
            text = format!("{v:.PRECISION$e}");
        }
        let (mantissa, exp) = text.split_once('e').expect("{:e} has an exponent");
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        (
            int.to_string(),
            frac.trim_end_matches('0').to_string(),
            exp.to_string(),
        )
    } else {
        let mut text = format!("{v}");
        if text.split_once('.').map_or(0, |(_, f)| f.len()) > PRECISION {
            text = format!("{v:.PRECISION$}");
        }
        let (int, frac) = text.split_once('.').unwrap_or((&text, ""));
        (
            int.to_string(),
            frac.trim_end_matches('0').to_string(),
            String::new(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    #[test]
    fn shapes_print_as_python_tuples_with_unknowns() {
        assert_eq!(format_known_shape(&[2, 64]), "(2, 64)");
        assert_eq!(format_known_shape(&[8]), "(8,)");
        assert_eq!(format_known_shape(&[]), "()");
        assert_eq!(format_shape(&[None, Some(8)]), "(?, 8)");
    }

    fn array(shape: &[usize], values: &[f32]) -> ArrayD<f32> {
        ArrayD::from_shape_vec(IxDyn(shape), values.to_vec()).unwrap()
    }

    // Expected texts are what numpy 2.x prints for the same float32 arrays.
    #[test]
    fn vectors_print_as_numpy_does() {
        assert_eq!(
            format_array(&array(&[5], &[-2.0, -1.0, 0.0, 1.0, 2.0])),
            "[-2. -1.  0.  1.  2.]"
        );
        assert_eq!(format_array(&array(&[2], &[1.0, 0.5])), "[1.  0.5]");
        assert_eq!(
            format_array(&array(&[3], &[0.1, 0.25, 10.0])),
            "[ 0.1   0.25 10.  ]"
        );
        assert_eq!(
            format_array(&array(&[2], &[1e-5, 2.5e10])),
            "[1.0e-05 2.5e+10]"
        );
        assert_eq!(
            format_array(&array(&[3], &[f32::NAN, 1.5, f32::NEG_INFINITY])),
            "[ nan  1.5 -inf]"
        );
        assert_eq!(format_array(&array(&[1], &[1.0 / 3.0])), "[0.33333334]");
    }

    #[test]
    fn matrices_and_higher_ranks_nest() {
        assert_eq!(
            format_array(&array(&[2, 2], &[1.0, 2.0, 3.0, 4.5])),
            "[[1.  2. ]\n [3.  4.5]]"
        );
        assert_eq!(
            format_array(&array(&[2, 1, 2], &[0.0, 1.0, 2.0, 3.0])),
            "[[[0. 1.]]\n\n [[2. 3.]]]"
        );
        assert_eq!(format_array(&array(&[], &[7.0])), "7.0");
    }

    #[test]
    fn long_rows_wrap_and_large_arrays_summarize() {
        let values: Vec<f32> = (0..20).map(|v| v as f32 * 1.5).collect();
        assert_eq!(
            format_array(&array(&[20], &values)),
            "[ 0.   1.5  3.   4.5  6.   7.5  9.  10.5 12.  13.5 15.  16.5 18.  19.5\n \
             21.  22.5 24.  25.5 27.  28.5]"
        );
        let values: Vec<f32> = (0..2000).map(|v| v as f32).collect();
        assert_eq!(
            format_array(&array(&[2000], &values)),
            "[0.000e+00 1.000e+00 2.000e+00 ... 1.997e+03 1.998e+03 1.999e+03]"
        );
    }
}
