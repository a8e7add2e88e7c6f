//! The host's losses, as torch defines them with `reduction="mean"`.

use ndarray::{ArrayD, Axis, Ix2};

use crate::tensor::Tensor;

/// A loss between the model's output and the data's `target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// `mean((y - target)^2)` over every element (`torch.nn.MSELoss`);
    /// `target` has the output's shape.
    Mse,
    /// `mean_n(logsumexp(y_n) - y_n[target_n])` (`torch.nn.CrossEntropyLoss`
    /// on logits): `y` of shape `(N, C)`, `target` `N` integer class ids in
    /// `[0, C)`.
    CrossEntropy,
}

impl Loss {
    pub fn name(self) -> &'static str {
        match self {
            Loss::Mse => "mse",
            Loss::CrossEntropy => "cross_entropy",
        }
    }

    /// The loss of `output` against `target`.
    pub fn value(self, output: &Tensor, target: &Tensor) -> Result<f64, String> {
        self.value_and_grad(output, target).map(|(v, _)| v)
    }

    /// The loss, and its gradient with respect to `output` (computed in
    /// `f64`, returned as `float32`).
    pub fn value_and_grad(
        self,
        output: &Tensor,
        target: &Tensor,
    ) -> Result<(f64, ArrayD<f32>), String> {
        if !matches!(output, Tensor::F32(_) | Tensor::F64(_)) {
            return Err(format!(
                "the model's output is {}; {} needs float32 or float64",
                output.dtype(),
                self.name()
            ));
        }
        let y = output.to_f64();
        match self {
            Loss::Mse => {
                if !matches!(target, Tensor::F32(_) | Tensor::F64(_)) || target.shape() != y.shape()
                {
                    return Err(format!(
                        "mse needs a float target of the output's shape {:?}; `target` is {} {:?}",
                        y.shape(),
                        target.dtype(),
                        target.shape()
                    ));
                }
                let t = target.to_f64();
                let n = y.len().max(1) as f64;
                let diff = &y - &t;
                let value = diff.iter().map(|d| d * d).sum::<f64>() / n;
                Ok((value, diff.mapv(|d| (2.0 * d / n) as f32)))
            }
            Loss::CrossEntropy => {
                let logits = y.view().into_dimensionality::<Ix2>().map_err(|_| {
                    format!(
                        "cross_entropy needs an output of shape (N, classes); the model's is {:?}",
                        output.shape()
                    )
                })?;
                let (rows, classes) = logits.dim();
                let ids: Vec<i64> = match target {
                    Tensor::I64(a) if a.shape() == [rows] => a.iter().copied().collect(),
                    Tensor::I32(a) if a.shape() == [rows] => a.iter().map(|&v| v as i64).collect(),
                    other => {
                        return Err(format!(
                            "cross_entropy needs `target` of int64 class ids of shape [{rows}]; \
                             it is {} {:?}",
                            other.dtype(),
                            other.shape()
                        ))
                    }
                };
                let mut grad = ndarray::Array2::<f64>::zeros((rows, classes));
                let mut total = 0.0;
                for (n, (row, &id)) in logits.axis_iter(Axis(0)).zip(&ids).enumerate() {
                    if id < 0 || id as usize >= classes {
                        return Err(format!(
                            "`target` row {n} holds class {id}, outside [0, {classes})"
                        ));
                    }
                    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = row.iter().map(|v| (v - max).exp()).sum();
                    let log_sum = max + sum.ln();
                    total += log_sum - row[id as usize];
                    for (c, v) in row.iter().enumerate() {
                        grad[[n, c]] = (v - log_sum).exp();
                    }
                    grad[[n, id as usize]] -= 1.0;
                }
                let n = rows.max(1) as f64;
                Ok((total / n, grad.mapv(|g| (g / n) as f32).into_dyn()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn mse_by_hand() {
        let y = Tensor::F32(array![[1.0f32, 2.0], [3.0, 5.0]].into_dyn());
        let t = Tensor::F32(array![[1.0f32, 0.0], [3.0, 4.0]].into_dyn());
        let (v, g) = Loss::Mse.value_and_grad(&y, &t).unwrap();
        // Differences 0, 2, 0, 1: mean of squares 5/4; gradient 2d/4.
        assert_eq!(v, 1.25);
        assert_eq!(g, array![[0.0f32, 1.0], [0.0, 0.5]].into_dyn());
    }

    #[test]
    fn cross_entropy_by_hand() {
        // Two equal logits: log 2 per row; softmax 1/2 each.
        let y = Tensor::F32(array![[0.0f32, 0.0], [1.0, 1.0]].into_dyn());
        let t = Tensor::I64(array![1i64, 0].into_dyn());
        let (v, g) = Loss::CrossEntropy.value_and_grad(&y, &t).unwrap();
        assert!((v - std::f64::consts::LN_2).abs() < 1e-12);
        assert_eq!(g, array![[0.25f32, -0.25], [-0.25, 0.25]].into_dyn());
        let bad = Tensor::I64(array![2i64, 0].into_dyn());
        let err = Loss::CrossEntropy.value(&y, &bad).unwrap_err();
        assert!(err.contains("row 0 holds class 2, outside [0, 2)"), "{err}");
    }
}
