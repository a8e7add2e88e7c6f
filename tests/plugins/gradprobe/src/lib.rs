//! `gradprobe`: a test plugin with a backward pass, for `host check-plugin`'s
//! `gradcheck`.
//!
//! * input `x`, `float32` or `float64`, of any shape of rank 1 or more;
//! * output `y`, of the input's type and shape:
//!   `y[..., j] = weight[j] * tanh(x[..., j]) + x[..., j]² / 2`, computed in
//!   the input's precision;
//! * parameter `weight`, `float32`, one per feature (the last axis).
//!
//! Its `backward` is right, unless the config says otherwise:
//! `{"wrong": "input"}` adds 0.5 to flat element 1 of the gradient of `x`,
//! `{"wrong": "weight"}` adds 0.5 to element 2 of the gradient of `weight`,
//! `{"wrong": "abort"}` aborts the process in `backward`, and
//! `{"wrong": "hang"}` never returns from it.

use layer_api::ndarray::{ArrayD, ArrayViewD, ArrayViewMutD, Axis, Ix1};
use layer_api::{
    export_layer, DType, Grads, Init, Inputs, MultiLayer, Outputs, ParamSpec, Params, Plan,
    Signature, TensorInfo,
};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Wrong {
    #[default]
    Nothing,
    /// One element of the input's gradient is off by 0.5.
    Input,
    /// One element of the weight's gradient is off by 0.5.
    Weight,
    /// `backward` aborts the process.
    Abort,
    /// `backward` never returns.
    Hang,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GradprobeConfig {
    #[serde(default)]
    pub wrong: Wrong,
}

pub struct Gradprobe {
    wrong: Wrong,
}

/// `y = w tanh(x) + x² / 2` and its derivatives, in the input's precision.
trait Float: layer_api::Element + Copy {
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
    fn y(x: Self, w: f32) -> Self;
    fn dy_dx(x: Self, w: f32) -> Self;
    fn dy_dw(x: Self) -> f32;
    fn add(self, v: Self) -> Self;
    fn mul(self, v: Self) -> Self;
}

macro_rules! float {
    ($t:ty) => {
        impl Float for $t {
            fn from_f32(v: f32) -> Self {
                v as $t
            }
            fn to_f32(self) -> f32 {
                self as f32
            }
            fn y(x: $t, w: f32) -> $t {
                w as $t * x.tanh() + x * x / 2.0
            }
            fn dy_dx(x: $t, w: f32) -> $t {
                let t = x.tanh();
                w as $t * (1.0 - t * t) + x
            }
            fn dy_dw(x: $t) -> f32 {
                x.tanh() as f32
            }
            fn add(self, v: $t) -> $t {
                self + v
            }
            fn mul(self, v: $t) -> $t {
                self * v
            }
        }
    };
}
float!(f32);
float!(f64);

fn features(shape: &[usize]) -> Result<usize, String> {
    shape
        .last()
        .copied()
        .ok_or_else(|| "needs an input of rank 1 or more; got a scalar".to_string())
}

impl Gradprobe {
    fn forward_as<T: Float>(
        &self,
        inputs: &Inputs<'_>,
        params: &Params<'_>,
        outputs: &mut Outputs<'_>,
    ) -> Result<(), String> {
        let x = inputs.get::<T>("x")?;
        let w = params.get::<Ix1>("weight")?;
        let mut y: ArrayViewMutD<'_, T> = outputs.take::<T>("y")?;
        for (mut y_row, x_row) in y
            .lanes_mut(Axis(x.ndim() - 1))
            .into_iter()
            .zip(x.lanes(Axis(x.ndim() - 1)))
        {
            for ((y, &x), &w) in y_row.iter_mut().zip(x_row.iter()).zip(w.iter()) {
                *y = T::y(x, w);
            }
        }
        Ok(())
    }

    fn backward_as<T: Float>(
        &self,
        inputs: &Inputs<'_>,
        params: &Params<'_>,
        grad_outputs: &Inputs<'_>,
        grads: &mut Grads<'_>,
    ) -> Result<(), String> {
        match self.wrong {
            Wrong::Abort => std::process::abort(),
            Wrong::Hang => loop {
                std::thread::sleep(std::time::Duration::from_millis(10));
            },
            _ => {}
        }
        let x: ArrayViewD<'_, T> = inputs.get::<T>("x")?;
        let g: ArrayViewD<'_, T> = grad_outputs.get::<T>("y")?;
        let w = params.get::<Ix1>("weight")?;
        let last = Axis(x.ndim() - 1);
        if let Some(mut dx) = grads.input::<T>("x")? {
            for ((mut d_row, x_row), g_row) in dx
                .lanes_mut(last)
                .into_iter()
                .zip(x.lanes(last))
                .zip(g.lanes(last))
            {
                for (((d, &x), &g), &w) in d_row.iter_mut().zip(x_row).zip(g_row).zip(w) {
                    *d = T::dy_dx(x, w).mul(g);
                }
            }
            if self.wrong == Wrong::Input {
                if let Some(d) = dx.iter_mut().nth(1) {
                    *d = d.add(T::from_f32(0.5));
                }
            }
        }
        if let Some(mut dw) = grads.param("weight")? {
            let mut sums = ArrayD::<f32>::zeros(dw.raw_dim());
            for (x_row, g_row) in x.lanes(last).into_iter().zip(g.lanes(last)) {
                for ((s, &x), &g) in sums.iter_mut().zip(x_row).zip(g_row) {
                    *s += T::dy_dw(x) * g.to_f32();
                }
            }
            if self.wrong == Wrong::Weight {
                if let Some(s) = sums.iter_mut().nth(2) {
                    *s += 0.5;
                }
            }
            dw.assign(&sums);
        }
        Ok(())
    }
}

impl MultiLayer for Gradprobe {
    const DESCRIPTION: &'static str =
        "y = weight * tanh(x) + x^2 / 2, with a backward that can be made wrong (for tests)";
    type Config = GradprobeConfig;

    fn new(config: GradprobeConfig) -> Result<Self, String> {
        Ok(Gradprobe {
            wrong: config.wrong,
        })
    }

    fn signature(&self) -> Signature {
        Signature::new()
            .input("x", [DType::F32, DType::F64])
            .output("y")
    }

    fn plan(&self, inputs: &[Option<TensorInfo>]) -> Result<Plan, String> {
        let [Some(x)] = inputs else {
            return Err("takes one input, `x`".into());
        };
        let f = features(&x.shape)?;
        Ok(
            Plan::new([TensorInfo::new(x.dtype, x.shape.clone())]).params(vec![ParamSpec::new(
                "weight",
                [f],
                Init::uniform(-1.0, 1.0),
            )]),
        )
    }

    fn batch_independent(&self) -> bool {
        true
    }

    fn forward(
        &self,
        inputs: &Inputs<'_>,
        params: &Params<'_>,
        outputs: &mut Outputs<'_>,
    ) -> Result<(), String> {
        match inputs.dtype("x")? {
            Some(DType::F64) => self.forward_as::<f64>(inputs, params, outputs),
            _ => self.forward_as::<f32>(inputs, params, outputs),
        }
    }

    const BACKWARD: bool = true;

    fn backward(
        &self,
        inputs: &Inputs<'_>,
        _outputs: &Inputs<'_>,
        params: &Params<'_>,
        grad_outputs: &Inputs<'_>,
        grads: &mut Grads<'_>,
    ) -> Result<(), String> {
        match inputs.dtype("x")? {
            Some(DType::F64) => self.backward_as::<f64>(inputs, params, grad_outputs, grads),
            _ => self.backward_as::<f32>(inputs, params, grad_outputs, grads),
        }
    }
}

export_layer!(Gradprobe);

#[cfg(test)]
mod tests {
    use super::*;
    use layer_api::ndarray::array;
    use layer_api::testing::{gradcheck, Harness, Tolerance};

    #[test]
    fn the_gradient_is_right_unless_told_otherwise() {
        let x = array![[0.3f32, -0.7, 0.1], [0.9, -0.2, 0.5]].into_dyn();
        let w = array![0.5f32, -0.25, 0.75].into_dyn();
        let right = Harness::new::<Gradprobe>("{}").unwrap();
        gradcheck(
            &right,
            vec![("x", x.clone().into())],
            &[("weight", w.clone())],
            Tolerance::F32,
        )
        .unwrap();
        // layer-api's gradcheck steps float32 parameters by the float64 step
        // too, so float64 inputs are checked with the float32 tolerance here.
        let x64 = x.mapv(f64::from);
        gradcheck(
            &right,
            vec![("x", x64.into())],
            &[("weight", w.clone())],
            Tolerance::F32,
        )
        .unwrap();
        let wrong = Harness::new::<Gradprobe>(r#"{"wrong": "input"}"#).unwrap();
        let err = gradcheck(
            &wrong,
            vec![("x", x.clone().into())],
            &[("weight", w.clone())],
            Tolerance::F32,
        )
        .unwrap_err();
        assert!(err.contains("input `x` element [0, 1]"), "{err}");
        let wrong = Harness::new::<Gradprobe>(r#"{"wrong": "weight"}"#).unwrap();
        let err = gradcheck(
            &wrong,
            vec![("x", x.into())],
            &[("weight", w)],
            Tolerance::F32,
        )
        .unwrap_err();
        assert!(err.contains("parameter `weight` element [2]"), "{err}");
    }
}
