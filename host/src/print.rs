//! Printing an array the way numpy's `print(array)` does: shortest digits
//! that identify each value (at most 8 after the point), columns aligned,
//! scientific notation when magnitudes call for it, rows wrapped at 75
//! characters, and large arrays summarized with `...`.

use ndarray::{ArrayD, ArrayViewD, Axis};

use crate::tensor::Tensor;

const LINE_WIDTH: usize = 75;
const PRECISION: usize = 8;
/// Arrays with more elements than this are summarized.
const THRESHOLD: usize = 1000;
const EDGE_ITEMS: usize = 3;

/// Formats `array` as numpy's `str()` would.
pub fn format_array(array: &ArrayD<f32>) -> String {
    let summarize = array.len() > THRESHOLD;
    let view = array.view();
    let shown = shown_values(&view, summarize);
    if array.ndim() == 0 {
        // numpy prints a 0-d array as its scalar: shortest digits, no padding.
        return format!("{:?}", array[[]]);
    }
    let format = FloatFormat::for_values(&shown);
    let mut out = String::new();
    format_axis(&view, &format, summarize, 0, &mut out);
    out
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
/// the same brackets and summarization.
pub fn format_tensor(tensor: &Tensor) -> String {
    match tensor {
        Tensor::F32(a) => format_array(a),
        Tensor::F64(_) | Tensor::F16(_) | Tensor::BF16(_) => {
            format_array(&tensor.to_f64().mapv(|v| v as f32))
        }
        Tensor::Bool(a) => format_plain(&a.view(), &|v: &u8| {
            if *v != 0 { "True" } else { "False" }.to_string()
        }),
        Tensor::I64(a) => format_plain(&a.view(), &|v: &i64| v.to_string()),
        Tensor::I32(a) => format_plain(&a.view(), &|v: &i32| v.to_string()),
        Tensor::U8(a) => format_plain(&a.view(), &|v: &u8| v.to_string()),
    }
}

/// Integers and booleans, right-aligned in columns of the widest value.
fn format_plain<T>(array: &ArrayViewD<'_, T>, show: &dyn Fn(&T) -> String) -> String {
    if array.ndim() == 0 {
        return array.iter().next().map(show).unwrap_or_default();
    }
    let summarize = array.len() > THRESHOLD;
    let width = array.iter().map(|v| show(v).len()).max().unwrap_or(1);
    let mut out = String::new();
    plain_axis(array, show, width, summarize, 0, &mut out);
    out
}

fn plain_axis<T>(
    view: &ArrayViewD<'_, T>,
    show: &dyn Fn(&T) -> String,
    width: usize,
    summarize: bool,
    depth: usize,
    out: &mut String,
) {
    out.push('[');
    let n = view.shape()[0];
    let indices: Vec<Option<usize>> = if summarize && n > 2 * EDGE_ITEMS {
        (0..EDGE_ITEMS)
            .map(Some)
            .chain([None])
            .chain((n - EDGE_ITEMS..n).map(Some))
            .collect()
    } else {
        (0..n).map(Some).collect()
    };
    for (k, index) in indices.iter().enumerate() {
        if k > 0 {
            if view.ndim() == 1 {
                out.push(' ');
            } else {
                out.push_str(&"\n".repeat(view.ndim() - 1));
                out.push_str(&" ".repeat(depth + 1));
            }
        }
        match index {
            None => out.push_str("..."),
            Some(i) if view.ndim() == 1 => {
                out.push_str(&format!("{:>width$}", show(&view[[*i]])));
            }
            Some(i) => {
                let sub = view.index_axis(Axis(0), *i);
                plain_axis(&sub, show, width, summarize, depth + 1, out);
            }
        }
    }
    out.push(']');
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

fn shown_values(view: &ArrayViewD<'_, f32>, summarize: bool) -> Vec<f32> {
    if !summarize || view.ndim() == 0 {
        return view.iter().copied().collect();
    }
    let mut values = Vec::new();
    for i in shown_indices(view.shape()[0], summarize)
        .into_iter()
        .flatten()
    {
        let sub = view.index_axis(Axis(0), i);
        if sub.ndim() == 0 {
            values.push(sub[[]]);
        } else {
            values.extend(shown_values(&sub, summarize));
        }
    }
    values
}

/// The indices shown along an axis of length `n`; `None` marks the `...`.
fn shown_indices(n: usize, summarize: bool) -> Vec<Option<usize>> {
    if summarize && n > 2 * EDGE_ITEMS {
        (0..EDGE_ITEMS)
            .map(Some)
            .chain(std::iter::once(None))
            .chain((n - EDGE_ITEMS..n).map(Some))
            .collect()
    } else {
        (0..n).map(Some).collect()
    }
}

fn format_axis(
    view: &ArrayViewD<'_, f32>,
    format: &FloatFormat,
    summarize: bool,
    depth: usize,
    out: &mut String,
) {
    out.push('[');
    let n = view.shape()[0];
    let indices = shown_indices(n, summarize);
    if view.ndim() == 1 {
        // The last axis: values separated by spaces, wrapped at the width.
        // As numpy does: a word wraps when it would reach the column where
        // this level's closing brackets go.
        let indent = depth + 1;
        let width = LINE_WIDTH - depth - 1;
        let mut line_len = indent;
        for (k, index) in indices.iter().enumerate() {
            let word = match index {
                Some(i) => format.format(view[[*i]]),
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
    } else {
        let separator = format!("{}{}", "\n".repeat(view.ndim() - 1), " ".repeat(depth + 1));
        for (k, index) in indices.iter().enumerate() {
            if k > 0 {
                out.push_str(&separator);
            }
            match index {
                Some(i) => format_axis(
                    &view.index_axis(Axis(0), *i),
                    format,
                    summarize,
                    depth + 1,
                    out,
                ),
                None => out.push_str("..."),
            }
        }
    }
    out.push(']');
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
