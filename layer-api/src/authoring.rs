//! The authoring face: what a plugin writer implements and the types a layer
//! sees. Two traits, one for each kind of layer:
//!
//! * [`Layer`]: one `float32` tensor in, one out: most layers. A plugin
//!   implements it and exports it with [`export_layer!`](crate::export_layer).
//! * [`MultiLayer`]: several named inputs and outputs, any element types,
//!   optional inputs. Every [`Layer`] is a [`MultiLayer`] with one input
//!   called `input` and one output called `output`.

use std::any::Any;

use ndarray::{ArrayView, ArrayViewD, ArrayViewMutD, Dimension, IxDyn};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use abi_stable::std_types::RSlice;

use crate::abi::{DType, ParamDecl, ParamRef, TensorMut, TensorRef};
use crate::init::Init;

/// Read-only data a layer derives once from its parameters (see
/// [`Layer::prepare`]); `forward` finds it with [`Params::prepared`].
pub type Prepared = Box<dyn Any + Send + Sync>;

/// A neural-network layer with one `float32` input and one `float32` output,
/// as a plugin author writes it.
///
/// The host calls `output_shape` and `params` before any computation, with
/// the shape of the input the layer will see, allocates the output and the
/// parameters, and then calls `forward`. Errors are plain messages: say what
/// is wrong and what would be right; the host adds which layer and plugin.
/// A panic is caught at the boundary and reported as an error too.
///
/// The layer's name is its crate's library name (`mydense` for
/// `libmydense.so`): the export macro writes it, so it cannot disagree with
/// the file.
pub trait Layer: Sized + Send + Sync + 'static {
    /// One line saying what the layer computes.
    const DESCRIPTION: &'static str;
    /// The layer's config, deserialized from the model file's `"config"`
    /// object. Use `#[serde(deny_unknown_fields)]` so that a misspelt field
    /// names the fields that exist; the adapter refuses unknown fields either
    /// way. Layers without options use [`NoConfig`].
    type Config: DeserializeOwned;

    /// Validates the config and builds the layer.
    fn new(config: Self::Config) -> Result<Self, String>;

    /// The output shape for `input_shape`, or why that input is not valid.
    fn output_shape(&self, input_shape: &[usize]) -> Result<Vec<usize>, String>;

    /// The parameters this layer needs for `input_shape`. The host creates,
    /// initializes, loads and saves them.
    fn params(&self, _input_shape: &[usize]) -> Result<Vec<ParamSpec>, String> {
        Ok(Vec::new())
    }

    /// True when output row `i` depends only on input row `i` (axis 0).
    fn batch_independent(&self) -> bool;

    /// Computes `output` (already shaped as `output_shape` said) from `input`
    /// and the parameters. Write every element: the host hands over zeros,
    /// but `host check-plugin` hands over a marker value and fails a layer
    /// that leaves any of it.
    fn forward(
        &self,
        input: ArrayViewD<'_, f32>,
        params: &Params<'_>,
        output: ArrayViewMutD<'_, f32>,
    ) -> Result<(), String>;

    /// Floating-point operations one `forward` performs for `input_shape`
    /// (multiply and add count as two), for benchmarks; 0 means unknown.
    fn flops(&self, _input_shape: &[usize]) -> u64 {
        0
    }

    /// Derives read-only data from the parameters once per parameter set
    /// (prepacked or folded weights, an FFT plan); every later `forward`
    /// finds it with [`Params::prepared`], on any thread. It must not depend
    /// on the batch size (axis 0 of `input_shape`): the host may use it for
    /// other batch sizes. `None`: nothing to prepare.
    fn prepare(
        &self,
        _input_shape: &[usize],
        _params: &Params<'_>,
    ) -> Result<Option<Prepared>, String> {
        Ok(None)
    }

    /// Whether the layer implements [`Layer::backward`]: the export macro
    /// offers the `backward` capability (and the layer can be trained
    /// through) only when this is `true`.
    const BACKWARD: bool = false;

    /// The gradients of one `forward`: given its `input`, its `output`,
    /// the parameters (with what `prepare` made of them) and `grad_output`,
    /// the gradient of a scalar loss with respect to each element of
    /// `output`, writes into `grads` the gradient with respect to the input
    /// (`grads.input::<f32>(INPUT)`) and to each parameter
    /// (`grads.param(name)`). Each is `None` when the host does not want
    /// it (the model's data, a frozen parameter); each buffer starts at
    /// zero. Set [`Layer::BACKWARD`] to `true` when implementing this.
    fn backward(
        &self,
        _input: ArrayViewD<'_, f32>,
        _output: ArrayViewD<'_, f32>,
        _params: &Params<'_>,
        _grad_output: ArrayViewD<'_, f32>,
        _grads: &mut Grads<'_>,
    ) -> Result<(), String> {
        Err(NO_BACKWARD.into())
    }
}

const NO_BACKWARD: &str = "this layer has no backward (it is forward-only)";

/// A layer with several named inputs and outputs of any element type.
///
/// The host asks for the [`Signature`] once, then calls `plan` with the
/// element type and shape of every input (in the signature's order; `None`
/// for an optional input left out) before any computation, allocates each
/// output as the plan says, and calls `forward`.
pub trait MultiLayer: Sized + Send + Sync + 'static {
    /// One line saying what the layer computes.
    const DESCRIPTION: &'static str;
    /// As [`Layer::Config`].
    type Config: DeserializeOwned;

    /// Validates the config and builds the layer.
    fn new(config: Self::Config) -> Result<Self, String>;

    /// The layer's inputs (with the element types each accepts) and outputs.
    fn signature(&self) -> Signature;

    /// Each output's element type and shape (in the signature's order) and
    /// the parameters, for inputs described by `inputs`, or why those inputs
    /// are not valid. The host has checked each present input's element type
    /// against the signature.
    fn plan(&self, inputs: &[Option<TensorInfo>]) -> Result<Plan, String>;

    /// True when row `i` of every output depends only on row `i` of every
    /// input (axis 0).
    fn batch_independent(&self) -> bool;

    /// Inputs for `host check-plugin` to run the layer on. Layers whose one
    /// input is a float tensor may leave this empty and let the checker
    /// try shapes; others should say, including the valid range of integer
    /// inputs (an index tensor's `[0, rows)`).
    fn probes(&self) -> Vec<Probe> {
        Vec::new()
    }

    /// Computes every output (each already shaped as `plan` said) from the
    /// inputs and the parameters. Write every element of every output.
    fn forward(
        &self,
        inputs: &Inputs<'_>,
        params: &Params<'_>,
        outputs: &mut Outputs<'_>,
    ) -> Result<(), String>;

    /// As [`Layer::flops`].
    fn flops(&self, _inputs: &[Option<TensorInfo>]) -> u64 {
        0
    }

    /// As [`Layer::prepare`].
    fn prepare(
        &self,
        _inputs: &[Option<TensorInfo>],
        _params: &Params<'_>,
    ) -> Result<Option<Prepared>, String> {
        Ok(None)
    }

    /// As [`Layer::BACKWARD`].
    const BACKWARD: bool = false;

    /// As [`Layer::backward`], with every input and output by name:
    /// `outputs` holds what `forward` wrote, `grad_outputs` the gradient of
    /// each output (a non-float output's is absent: `optional` gives
    /// `None`), and `grads` takes the gradient of each float input and each
    /// parameter.
    fn backward(
        &self,
        _inputs: &Inputs<'_>,
        _outputs: &Inputs<'_>,
        _params: &Params<'_>,
        _grad_outputs: &Inputs<'_>,
        _grads: &mut Grads<'_>,
    ) -> Result<(), String> {
        Err(NO_BACKWARD.into())
    }
}

/// The name of a one-input layer's input.
pub const INPUT: &str = "input";
/// The name of a one-output layer's output.
pub const OUTPUT: &str = "output";

impl<L: Layer> MultiLayer for L {
    const DESCRIPTION: &'static str = L::DESCRIPTION;
    type Config = L::Config;

    fn new(config: Self::Config) -> Result<Self, String> {
        L::new(config)
    }

    fn signature(&self) -> Signature {
        Signature::new().input(INPUT, [DType::F32]).output(OUTPUT)
    }

    fn plan(&self, inputs: &[Option<TensorInfo>]) -> Result<Plan, String> {
        let shape = &single_input(inputs)?.shape;
        let output = self.output_shape(shape)?;
        Ok(Plan::new([TensorInfo::new(DType::F32, output)]).params(self.params(shape)?))
    }

    fn batch_independent(&self) -> bool {
        Layer::batch_independent(self)
    }

    fn forward(
        &self,
        inputs: &Inputs<'_>,
        params: &Params<'_>,
        outputs: &mut Outputs<'_>,
    ) -> Result<(), String> {
        // By position: the signature above has one input and one output.
        let input = inputs.get_at::<f32>(0, INPUT)?;
        let output = outputs.take_at::<f32>(0, OUTPUT)?;
        Layer::forward(self, input, params, output)
    }

    fn flops(&self, inputs: &[Option<TensorInfo>]) -> u64 {
        single_input(inputs).map_or(0, |x| Layer::flops(self, &x.shape))
    }

    fn prepare(
        &self,
        inputs: &[Option<TensorInfo>],
        params: &Params<'_>,
    ) -> Result<Option<Prepared>, String> {
        Layer::prepare(self, &single_input(inputs)?.shape, params)
    }

    const BACKWARD: bool = L::BACKWARD;

    fn backward(
        &self,
        inputs: &Inputs<'_>,
        outputs: &Inputs<'_>,
        params: &Params<'_>,
        grad_outputs: &Inputs<'_>,
        grads: &mut Grads<'_>,
    ) -> Result<(), String> {
        let input = inputs.get_at::<f32>(0, INPUT)?;
        let output = outputs.get_at::<f32>(0, OUTPUT)?;
        let grad_output = grad_outputs.get_at::<f32>(0, OUTPUT)?;
        Layer::backward(self, input, output, params, grad_output, grads)
    }
}

fn single_input(inputs: &[Option<TensorInfo>]) -> Result<&TensorInfo, String> {
    match inputs {
        [Some(x)] => Ok(x),
        _ => Err(format!(
            "takes exactly one input, `{INPUT}`; the host passed {}",
            inputs.len()
        )),
    }
}

/// A tensor's element type and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorInfo {
    pub fn new(dtype: DType, shape: impl Into<Vec<usize>>) -> TensorInfo {
        TensorInfo {
            dtype,
            shape: shape.into(),
        }
    }
}

/// One input of a [`Signature`].
#[derive(Debug, Clone, PartialEq)]
pub struct InputPort {
    pub name: String,
    pub optional: bool,
    /// Accepted element types, preferred first.
    pub dtypes: Vec<DType>,
}

/// A layer's named inputs and outputs, built with [`Signature::input`],
/// [`Signature::optional_input`] and [`Signature::output`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Signature {
    pub inputs: Vec<InputPort>,
    pub outputs: Vec<String>,
}

impl Signature {
    pub fn new() -> Signature {
        Signature::default()
    }

    /// A required input accepting `dtypes` (preferred first).
    pub fn input(mut self, name: &str, dtypes: impl Into<Vec<DType>>) -> Signature {
        self.inputs.push(InputPort {
            name: name.to_string(),
            optional: false,
            dtypes: dtypes.into(),
        });
        self
    }

    /// An input the layer can run without (a mask).
    pub fn optional_input(mut self, name: &str, dtypes: impl Into<Vec<DType>>) -> Signature {
        self.inputs.push(InputPort {
            name: name.to_string(),
            optional: true,
            dtypes: dtypes.into(),
        });
        self
    }

    pub fn output(mut self, name: &str) -> Signature {
        self.outputs.push(name.to_string());
        self
    }
}

/// What a layer will do for given inputs: its outputs and parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub outputs: Vec<TensorInfo>,
    pub params: Vec<ParamSpec>,
}

impl Plan {
    /// Outputs in the signature's order.
    pub fn new(outputs: impl Into<Vec<TensorInfo>>) -> Plan {
        Plan {
            outputs: outputs.into(),
            params: Vec::new(),
        }
    }

    /// The parameters, in the order `forward` finds them.
    pub fn params(mut self, params: Vec<ParamSpec>) -> Plan {
        self.params = params;
        self
    }
}

/// How `host check-plugin` makes one input of a [`Probe`].
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeInput {
    pub shape: Vec<usize>,
    /// `None`: each element type the input accepts, in turn.
    pub dtype: Option<DType>,
    /// For integer inputs: values are drawn from `[low, high)`.
    pub range: (i64, i64),
}

impl ProbeInput {
    /// An input of `shape`, of each accepted element type in turn.
    pub fn new(shape: impl Into<Vec<usize>>) -> ProbeInput {
        ProbeInput {
            shape: shape.into(),
            dtype: None,
            range: (0, 2),
        }
    }

    /// Only this element type.
    pub fn dtype(mut self, dtype: DType) -> ProbeInput {
        self.dtype = Some(dtype);
        self
    }

    /// Integer values from `[low, high)`.
    pub fn range(mut self, low: i64, high: i64) -> ProbeInput {
        self.range = (low, high);
        self
    }
}

/// Inputs for `host check-plugin`: one per declared input, in the
/// signature's order, `None` to leave an optional input out.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub inputs: Vec<Option<ProbeInput>>,
}

impl Probe {
    pub fn new(inputs: impl Into<Vec<Option<ProbeInput>>>) -> Probe {
        Probe {
            inputs: inputs.into(),
        }
    }
}

/// The size of the last axis, where layers like dense ones keep their
/// features: inferred from the input when the config leaves `expected` out,
/// checked against it when given (`field` names the config field in the
/// message).
pub fn last_axis_features(
    input_shape: &[usize],
    expected: Option<usize>,
    field: &str,
) -> Result<usize, String> {
    let Some(&features) = input_shape.last() else {
        return Err(
            "needs an input of rank 1 or more, whose last axis holds the \
                    features; got a scalar"
                .into(),
        );
    };
    match expected {
        Some(expected) if expected != features => Err(format!(
            "expects {expected} input features (config `{field}`), but the input's \
             last axis has {features} (input shape {input_shape:?})"
        )),
        _ => Ok(features),
    }
}

/// The config of a layer that has no options: only `{}` is accepted.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoConfig {}

/// A parameter declaration: name, shape, default initializer and the fans
/// that scale the Xavier and Kaiming initializers. Parameters are
/// `float32`.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    name: String,
    shape: Vec<usize>,
    init: Init,
    fans: Option<(usize, usize)>,
}

impl ParamSpec {
    /// A parameter called `name` of `shape`, initialized by `init` unless the
    /// model file says otherwise.
    pub fn new(name: impl Into<String>, shape: impl Into<Vec<usize>>, init: Init) -> ParamSpec {
        ParamSpec {
            name: name.into(),
            shape: shape.into(),
            init,
            fans: None,
        }
    }

    /// Sets fan-in and fan-out. Without this they follow PyTorch's rule for a
    /// weight laid out `(out, in, …)`: fan-in `shape[1] * receptive field`,
    /// fan-out `shape[0] * receptive field`; a vector's fans are its length.
    pub fn fans(mut self, fan_in: usize, fan_out: usize) -> ParamSpec {
        self.fans = Some((fan_in, fan_out));
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub(crate) fn into_decl(self) -> ParamDecl {
        let (fan_in, fan_out) = self.fans.unwrap_or_else(|| default_fans(&self.shape));
        ParamDecl {
            name: self.name.into(),
            dtype: DType::F32,
            shape: self.shape.into(),
            fan_in,
            fan_out,
            init: self.init.to_json().into(),
        }
    }
}

fn default_fans(shape: &[usize]) -> (usize, usize) {
    match shape {
        [] => (1, 1),
        [n] => (*n, *n),
        [out, inp, rest @ ..] => {
            let receptive: usize = rest.iter().product();
            (inp * receptive, out * receptive)
        }
    }
}

/// An element type a tensor may hold.
pub trait Element: Copy + Send + Sync + 'static + sealed::Sealed {
    const DTYPE: DType;
}

mod sealed {
    pub trait Sealed {}
}

macro_rules! element {
    ($($t:ty => $d:ident),* $(,)?) => {$(
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DType = DType::$d;
        }
    )*};
}

element!(
    f32 => F32, f64 => F64, half::f16 => F16, half::bf16 => BF16,
    i64 => I64, i32 => I32, u8 => U8, bool => BOOL,
);

/// Checks `bytes` hold exactly `shape`'s elements of `T`, aligned, and (for
/// `bool`) only 0 and 1; returns the element count.
fn check_elements<T: Element>(shape: &[usize], bytes: &[u8]) -> Result<usize, String> {
    let count = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| {
            n.checked_mul(std::mem::size_of::<T>()) == Some(bytes.len())
                && isize::try_from(bytes.len()).is_ok()
        })
        .ok_or_else(|| {
            format!(
                "tensor of shape {shape:?} does not match its {} bytes of {}",
                bytes.len(),
                T::DTYPE
            )
        })?;
    if count > 0 && !bytes.as_ptr().cast::<T>().is_aligned() {
        return Err(format!("{} tensor data is not aligned", T::DTYPE));
    }
    if T::DTYPE == DType::BOOL && bytes.iter().any(|&b| b > 1) {
        return Err("a bool tensor holds a byte other than 0 or 1".into());
    }
    Ok(count)
}

fn view<'a, T: Element>(t: &TensorRef<'a>) -> Result<ArrayViewD<'a, T>, String> {
    if t.dtype != T::DTYPE {
        return Err(format!("is {}, not {}", t.dtype, T::DTYPE));
    }
    let shape = t.shape.as_slice();
    let bytes: &'a [u8] = t.data.as_slice();
    let count = check_elements::<T>(shape, bytes)?;
    // An empty tensor's bytes may sit anywhere; ndarray wants an aligned
    // pointer even then.
    let ptr = if count == 0 {
        std::ptr::NonNull::<T>::dangling().as_ptr().cast_const()
    } else {
        bytes.as_ptr().cast::<T>()
    };
    // SAFETY: `bytes` is live for 'a and holds exactly as many aligned,
    // valid `T` as the shape has (checked above), in C order as the
    // boundary's contract says; an empty view reads nothing. (ndarray's
    // checked constructor costs more than a batch-1 layer's whole boundary
    // crossing should.)
    Ok(unsafe { ArrayViewD::from_shape_ptr(IxDyn(shape), ptr) })
}

fn view_mut<'a, T: Element>(
    shape: &'a [usize],
    bytes: &'a mut [u8],
) -> Result<ArrayViewMutD<'a, T>, String> {
    let count = check_elements::<T>(shape, bytes)?;
    let ptr = if count == 0 {
        std::ptr::NonNull::<T>::dangling().as_ptr()
    } else {
        bytes.as_mut_ptr().cast::<T>()
    };
    // SAFETY: as in `view`; the bytes are borrowed mutably, so the view is
    // the only access to them, and every byte pattern a `T` view can write
    // is one the host reads back as that dtype.
    Ok(unsafe { ArrayViewMutD::from_shape_ptr(IxDyn(shape), ptr) })
}

/// Read-only tensors lent to one call, found by the names the signature
/// gave them: the inputs of `forward`; in `backward` also the outputs
/// `forward` wrote and their gradients.
pub struct Inputs<'a> {
    names: &'a [String],
    items: &'a [TensorRef<'a>],
    /// What the tensors are, for messages: `input`, `output`, `output gradient`.
    what: &'static str,
}

impl<'a> Inputs<'a> {
    pub(crate) fn new(names: &'a [String], items: &'a [TensorRef<'a>]) -> Inputs<'a> {
        Inputs {
            names,
            items,
            what: "input",
        }
    }

    pub(crate) fn of(
        what: &'static str,
        names: &'a [String],
        items: &'a [TensorRef<'a>],
    ) -> Inputs<'a> {
        Inputs { names, items, what }
    }

    fn find(&self, name: &str) -> Result<&TensorRef<'a>, String> {
        let what = self.what;
        let index = self
            .names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| format!("the layer's signature has no {what} `{name}`"))?;
        self.items
            .get(index)
            .ok_or_else(|| format!("the host passed no {what} `{name}`"))
    }

    /// The element type of input `name` (`None`: an optional input left out).
    pub fn dtype(&self, name: &str) -> Result<Option<DType>, String> {
        let t = self.find(name)?;
        Ok((t.dtype != DType::ABSENT).then_some(t.dtype))
    }

    /// Input `name` as a view of `T`s.
    pub fn get<T: Element>(&self, name: &str) -> Result<ArrayViewD<'a, T>, String> {
        self.optional(name)?
            .ok_or_else(|| format!("required {} `{name}` was left out", self.what))
    }

    /// Input number `index` (called `name`, for messages), required.
    pub(crate) fn get_at<T: Element>(
        &self,
        index: usize,
        name: &str,
    ) -> Result<ArrayViewD<'a, T>, String> {
        let what = self.what;
        let t = self
            .items
            .get(index)
            .ok_or_else(|| format!("the host passed no {what} `{name}`"))?;
        if t.dtype == DType::ABSENT {
            return Err(format!("required {what} `{name}` was left out"));
        }
        view(t).map_err(|e| format!("{what} `{name}` {e}"))
    }

    /// Optional input `name`, or `None` if it was left out.
    pub fn optional<T: Element>(&self, name: &str) -> Result<Option<ArrayViewD<'a, T>>, String> {
        let t = self.find(name)?;
        if t.dtype == DType::ABSENT {
            return Ok(None);
        }
        view(t)
            .map(Some)
            .map_err(|e| format!("{} `{name}` {e}", self.what))
    }
}

/// Where one `backward` call writes its gradients: one buffer per input
/// and per parameter the host wants a gradient of, each taken once by name.
/// Every buffer starts at zero.
pub struct Grads<'a> {
    input_names: &'a [String],
    inputs: &'a mut [TensorMut<'a>],
    params: &'a [ParamRef<'a>],
    param_grads: &'a mut [TensorMut<'a>],
    /// Bit `i` set: input `i`'s (low 64) or parameter `i`'s (high 64)
    /// gradient was taken.
    taken: u128,
}

impl<'a> Grads<'a> {
    pub(crate) fn new(
        input_names: &'a [String],
        inputs: &'a mut [TensorMut<'a>],
        params: &'a [ParamRef<'a>],
        param_grads: &'a mut [TensorMut<'a>],
    ) -> Grads<'a> {
        Grads {
            input_names,
            inputs,
            params,
            param_grads,
            taken: 0,
        }
    }

    fn take(
        items: &mut [TensorMut<'a>],
        taken: &mut u128,
        index: usize,
        bit_base: u32,
        what: &str,
    ) -> Result<Option<TensorMut<'a>>, String> {
        let bit = 1u128
            .checked_shl(bit_base + index as u32)
            .filter(|_| index < 64)
            .ok_or_else(|| format!("a layer has at most 64 inputs and 64 parameters ({what})"))?;
        if *taken & bit != 0 {
            return Err(format!("the gradient of {what} was already taken"));
        }
        let item = items
            .get_mut(index)
            .ok_or_else(|| format!("the host lent no gradient for {what}"))?;
        if item.dtype == DType::ABSENT {
            return Ok(None);
        }
        *taken |= bit;
        let data = std::mem::take(&mut item.data);
        Ok(Some(TensorMut {
            dtype: item.dtype,
            shape: item.shape,
            data,
        }))
    }

    /// The gradient of input `name`, of the input's shape and element type
    /// `T`; `None` when the host does not want it.
    pub fn input<T: Element>(
        &mut self,
        name: &str,
    ) -> Result<Option<ArrayViewMutD<'a, T>>, String> {
        let index = self
            .input_names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| format!("the layer's signature has no input `{name}`"))?;
        let what = format!("input `{name}`");
        let Some(t) = Self::take(self.inputs, &mut self.taken, index, 0, &what)? else {
            return Ok(None);
        };
        if t.dtype != T::DTYPE {
            return Err(format!(
                "the gradient of {what} is {}, not {}",
                t.dtype,
                T::DTYPE
            ));
        }
        view_mut(t.shape.as_slice(), t.data.into_mut_slice())
            .map(Some)
            .map_err(|e| format!("the gradient of {what}: {e}"))
    }

    /// The gradient of parameter `name`, of its shape; `None` when the host
    /// does not want it (a frozen parameter).
    pub fn param(&mut self, name: &str) -> Result<Option<ArrayViewMutD<'a, f32>>, String> {
        let index = self
            .params
            .iter()
            .position(|p| p.name.as_str() == name)
            .ok_or_else(|| format!("the host passed no parameter `{name}`"))?;
        let what = format!("parameter `{name}`");
        let Some(t) = Self::take(self.param_grads, &mut self.taken, index, 64, &what)? else {
            return Ok(None);
        };
        if t.dtype != DType::F32 {
            return Err(format!(
                "the gradient of {what} is {}, not float32",
                t.dtype
            ));
        }
        view_mut(t.shape.as_slice(), t.data.into_mut_slice())
            .map(Some)
            .map_err(|e| format!("the gradient of {what}: {e}"))
    }
}

/// The outputs of one `forward` call, each taken once by name.
pub struct Outputs<'a> {
    names: &'a [String],
    items: &'a mut [TensorMut<'a>],
    /// Bit `i` set: output `i` was taken.
    taken: u128,
}

impl<'a> Outputs<'a> {
    pub(crate) fn new(names: &'a [String], items: &'a mut [TensorMut<'a>]) -> Outputs<'a> {
        Outputs {
            names,
            items,
            taken: 0,
        }
    }

    /// Output `name` as a mutable view of `T`s (the type its plan gave).
    /// Each output can be taken once per call.
    pub fn take<T: Element>(&mut self, name: &str) -> Result<ArrayViewMutD<'a, T>, String> {
        let index = self
            .names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| format!("the layer's signature has no output `{name}`"))?;
        self.take_at(index, name)
    }

    /// Output number `index` (called `name`, for messages).
    pub(crate) fn take_at<T: Element>(
        &mut self,
        index: usize,
        name: &str,
    ) -> Result<ArrayViewMutD<'a, T>, String> {
        let bit = 1u128
            .checked_shl(index as u32)
            .ok_or("a layer has at most 128 outputs")?;
        if self.taken & bit != 0 {
            return Err(format!("output `{name}` was already taken"));
        }
        let item = self
            .items
            .get_mut(index)
            .ok_or_else(|| format!("the host lent no output `{name}`"))?;
        if item.dtype != T::DTYPE {
            return Err(format!(
                "output `{name}` is {}, not {} (as the plan said)",
                item.dtype,
                T::DTYPE
            ));
        }
        self.taken |= bit;
        let shape: RSlice<'a, usize> = item.shape;
        let data = std::mem::take(&mut item.data);
        view_mut(shape.as_slice(), data.into_mut_slice())
            .map_err(|e| format!("output `{name}`: {e}"))
    }
}

/// The parameters lent to one `forward` call, found by the names the layer
/// declared, and what `prepare` derived from them.
pub struct Params<'a> {
    items: &'a [ParamRef<'a>],
    prepared: Option<&'a (dyn Any + Send + Sync)>,
}

impl<'a> Params<'a> {
    /// Lends `items` to a layer called directly, in-process, rather than
    /// through the plugin boundary (a benchmark linking a layer statically).
    pub fn new(items: &'a [ParamRef<'a>]) -> Params<'a> {
        Params {
            items,
            prepared: None,
        }
    }

    pub(crate) fn with_prepared(
        items: &'a [ParamRef<'a>],
        prepared: Option<&'a (dyn Any + Send + Sync)>,
    ) -> Params<'a> {
        Params { items, prepared }
    }

    /// The parameter `name` as a view of dimension `D` (`Ix1`, `Ix2`, `IxDyn`…).
    pub fn get<D: Dimension>(&self, name: &str) -> Result<ArrayView<'a, f32, D>, String> {
        let item = self
            .items
            .iter()
            .find(|p| p.name.as_str() == name)
            .ok_or_else(|| format!("the host passed no parameter `{name}`"))?;
        let shape = item.tensor.shape.as_slice();
        view::<f32>(&item.tensor)
            .map_err(|e| format!("parameter `{name}` {e}"))?
            .into_dimensionality::<D>()
            .map_err(|_| {
                format!("parameter `{name}` has shape {shape:?}, not the rank the layer expects")
            })
    }

    /// What [`Layer::prepare`] returned for these parameters, as a `T`.
    pub fn prepared<T: Any>(&self) -> Result<&'a T, String> {
        self.prepared
            .ok_or("nothing was prepared for these parameters")?
            .downcast_ref::<T>()
            .ok_or_else(|| format!("the prepared data is not a {}", std::any::type_name::<T>()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi_stable::std_types::RSlice;

    fn f32_ref<'a>(shape: &'a [usize], data: &'a [f32]) -> TensorRef<'a> {
        TensorRef {
            dtype: DType::F32,
            shape: RSlice::from_slice(shape),
            data: RSlice::from_slice(bytemuck_f32(data)),
        }
    }

    fn bytemuck_f32(data: &[f32]) -> &[u8] {
        // SAFETY: any f32 is 4 initialized bytes.
        unsafe { std::slice::from_raw_parts(data.as_ptr().cast(), std::mem::size_of_val(data)) }
    }

    #[test]
    fn views_refuse_a_shape_that_does_not_match_the_data() {
        let data = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let ok = view::<f32>(&f32_ref(&[2, 3], &data)).unwrap().to_owned();
        assert_eq!(ok[[1, 0]], 4.0, "C order: row 1 starts at the fourth value");
        let err = view::<f32>(&f32_ref(&[2, 3], &data[..5])).unwrap_err();
        assert!(
            err.contains("shape [2, 3] does not match its 20 bytes"),
            "{err}"
        );
        assert!(view::<f32>(&f32_ref(&[usize::MAX, 2], &data)).is_err());
        assert!(view::<f32>(&f32_ref(&[0, 3], &[])).unwrap().is_empty());
        let err = view::<i64>(&f32_ref(&[2, 3], &data)).unwrap_err();
        assert_eq!(err, "is float32, not int64");
    }

    #[test]
    fn bool_views_refuse_bytes_other_than_zero_and_one() {
        let bytes = [0u8, 1, 2];
        let t = TensorRef {
            dtype: DType::BOOL,
            shape: RSlice::from_slice(&[3]),
            data: RSlice::from_slice(&bytes),
        };
        assert!(view::<bool>(&t).unwrap_err().contains("other than 0 or 1"));
        let ok = TensorRef {
            data: RSlice::from_slice(&bytes[..2]),
            shape: RSlice::from_slice(&[2]),
            ..t
        };
        assert_eq!(
            view::<bool>(&ok)
                .unwrap()
                .iter()
                .copied()
                .collect::<Vec<_>>(),
            [false, true]
        );
    }

    #[test]
    fn last_axis_features_are_inferred_or_checked() {
        assert_eq!(last_axis_features(&[2, 3, 64], None, "in_units"), Ok(64));
        assert_eq!(last_axis_features(&[5], Some(5), "in_units"), Ok(5));
        assert_eq!(
            last_axis_features(&[2, 8], Some(4), "in_features").unwrap_err(),
            "expects 4 input features (config `in_features`), but the input's last axis \
             has 8 (input shape [2, 8])"
        );
        assert!(last_axis_features(&[], None, "in_units")
            .unwrap_err()
            .contains("got a scalar"));
    }

    #[test]
    fn default_fans_follow_the_out_in_layout() {
        assert_eq!(default_fans(&[]), (1, 1));
        assert_eq!(default_fans(&[5]), (5, 5));
        assert_eq!(default_fans(&[8, 64]), (64, 8));
        assert_eq!(default_fans(&[4, 3, 2, 2]), (12, 16));
        let d = ParamSpec::new("w", [64, 8], Init::Zeros)
            .fans(64, 8)
            .into_decl();
        assert_eq!((d.fan_in, d.fan_out, d.dtype), (64, 8, DType::F32));
    }
}
