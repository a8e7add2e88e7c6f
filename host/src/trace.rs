//! `host run --trace`: after each layer, one line with what came out of it
//! (shape, mean, standard deviation, min, max) and how long it took. This is
//! the chapter's sanity check ("is the mean really 0?") for every layer.

use std::fmt;
use std::time::Duration;

use ndarray::ArrayD;

use crate::print::format_known_shape;

/// What one layer produced.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerTrace {
    pub layer: String,
    pub plugin: String,
    pub shape: Vec<usize>,
    /// Mean and population standard deviation (numpy's default, ddof 0),
    /// accumulated in f64; NaN for an empty output.
    pub mean: f64,
    pub std: f64,
    /// NaN for an empty output; NaN elements are skipped.
    pub min: f32,
    pub max: f32,
    pub elapsed: Duration,
}

impl LayerTrace {
    /// The trace of an output of any element type (its statistics taken as
    /// float32 values, which integers up to 2^24 and booleans are exactly).
    pub fn of_tensor(
        layer: &str,
        plugin: &str,
        output: &crate::tensor::Tensor,
        elapsed: Duration,
    ) -> LayerTrace {
        match output.as_f32() {
            Some(a) => LayerTrace::new(layer, plugin, a, elapsed),
            None => LayerTrace::new(layer, plugin, &output.to_f64().mapv(|v| v as f32), elapsed),
        }
    }

    pub fn new(layer: &str, plugin: &str, output: &ArrayD<f32>, elapsed: Duration) -> LayerTrace {
        let n = output.len() as f64;
        let mean = output.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = output
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        let (min, max) = if output.is_empty() {
            (f32::NAN, f32::NAN)
        } else {
            output
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                    (lo.min(v), hi.max(v))
                })
        };
        LayerTrace {
            layer: layer.to_string(),
            plugin: plugin.to_string(),
            shape: output.shape().to_vec(),
            mean,
            std: var.sqrt(),
            min,
            max,
            elapsed,
        }
    }
}

impl fmt::Display for LayerTrace {
    /// `trace: layer '0' (mydense) output (2, 8) mean 1.25 std 0.5 min 0.0
    /// max 2.0 time 10.2µs`: values with the shortest digits that identify
    /// them as f32, so a mean of -4.656613e-9 is not rounded to 0.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "trace: layer '{}' ({}) output {} mean {:?} std {:?} min {:?} max {:?} time {:?}",
            self.layer,
            self.plugin,
            format_known_shape(&self.shape),
            self.mean as f32,
            self.std as f32,
            self.min,
            self.max,
            self.elapsed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    #[test]
    fn statistics_by_hand() {
        // mean 2.5; deviations ±1.5, ±0.5: variance (2.25 + 0.25) / 2 = 1.25.
        let a = ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let t = LayerTrace::new("0", "mydense", &a, Duration::from_micros(12));
        assert_eq!(t.mean, 2.5);
        assert_eq!(t.std, 1.25f64.sqrt());
        assert_eq!((t.min, t.max), (1.0, 4.0));
        assert_eq!(
            t.to_string(),
            "trace: layer '0' (mydense) output (2, 2) mean 2.5 std 1.118034 min 1.0 max 4.0 \
             time 12µs"
        );
        let empty = ArrayD::<f32>::zeros(IxDyn(&[0, 3]));
        let t = LayerTrace::new("e", "centered", &empty, Duration::ZERO);
        assert!(t.mean.is_nan() && t.min.is_nan() && t.max.is_nan());
    }
}
