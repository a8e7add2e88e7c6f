//! The authoring face: what a plugin writer implements ([`Layer`]) and the
//! adapter that the export macro puts between it and the binary interface.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

use abi_stable::{
    library::{CheckTypeLayout, LibHeader, RootModuleResult},
    prefix_type::PrefixTypeTrait,
    sabi_trait::TD_Opaque,
    std_types::{RErr, ROk, RResult, RSlice, RStr, RString, RVec},
};
use ndarray::{ArrayView, ArrayViewD, ArrayViewMutD, Dimension, IxDyn};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::abi::{
    LayerBox, LayerError, LayerObject, LayerObject_TO, ParamDecl, ParamRef, PluginModule,
    PluginModuleRef, TensorMut, TensorRef,
};
use crate::init::Init;

/// A neural-network layer, as a plugin author writes it.
///
/// The host calls `output_shape` and `params` before any computation, with
/// the shape of the input the layer will see, allocates the output and the
/// parameters, and then calls `forward`. Errors are plain messages: say what
/// is wrong and what would be right; the host adds which layer and plugin.
/// A panic is caught at the boundary and reported as an error too.
pub trait Layer: Sized + Send + Sync + 'static {
    /// The name models use for this layer (`"mydense"`); it must match the
    /// library's file name (`libmydense.so`).
    const NAME: &'static str;
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

    /// The parameters this layer needs for `input_shape`, in the order
    /// `forward` will find them. The host creates, initializes, loads and
    /// saves them.
    fn params(&self, _input_shape: &[usize]) -> Result<Vec<ParamSpec>, String> {
        Ok(Vec::new())
    }

    /// True when output row `i` depends only on input row `i` (axis 0).
    fn batch_independent(&self) -> bool;

    /// Computes `output` (already shaped as `output_shape` said) from `input`
    /// and the parameters. Write every element: the host hands over zeros,
    /// but `host check-plugin` hands over a marker value and fails a layer
    /// that leaves any of it, since that means the declared shape and the
    /// computation disagree.
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
/// that scale the Xavier and Kaiming initializers.
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

    fn into_decl(self) -> ParamDecl {
        let (fan_in, fan_out) = self.fans.unwrap_or_else(|| default_fans(&self.shape));
        ParamDecl {
            name: self.name.into(),
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

/// The parameters lent to one `forward` call, found by the names the layer
/// declared.
pub struct Params<'a> {
    items: &'a [ParamRef<'a>],
}

impl<'a> Params<'a> {
    /// Lends `items` to a layer called directly, in-process, rather than
    /// through the plugin boundary (a benchmark linking a layer statically).
    pub fn new(items: &'a [ParamRef<'a>]) -> Params<'a> {
        Params { items }
    }

    /// The parameter `name` as a view of dimension `D` (`Ix1`, `Ix2`, `IxDyn`…).
    pub fn get<D: Dimension>(&self, name: &str) -> Result<ArrayView<'a, f32, D>, String> {
        let item = self
            .items
            .iter()
            .find(|p| p.name.as_str() == name)
            .ok_or_else(|| format!("the host passed no parameter `{name}`"))?;
        let view = tensor_view(item.tensor)
            .map_err(|e| format!("parameter `{name}`: {e}"))?
            .into_dimensionality::<D>()
            .map_err(|_| {
                format!(
                    "parameter `{name}` has shape {:?}, not the rank the layer expects",
                    item.tensor.shape.as_slice()
                )
            })?;
        Ok(view)
    }
}

fn tensor_view(t: TensorRef<'_>) -> Result<ArrayViewD<'_, f32>, String> {
    let (shape, data) = (t.shape.as_slice(), t.data.as_slice());
    check_len(shape, data.len())?;
    // SAFETY: `data` is a live slice of exactly as many elements as the
    // shape has (checked above), laid out in C order as the boundary's
    // contract says; the view borrows it for no longer than `t` lends it.
    // (ndarray's checked constructor costs more than a batch-1 layer's
    // whole boundary crossing should.)
    Ok(unsafe { ArrayViewD::from_shape_ptr(IxDyn(shape), data.as_ptr()) })
}

fn tensor_view_mut(t: TensorMut<'_>) -> Result<ArrayViewMutD<'_, f32>, String> {
    let shape = t.shape.as_slice();
    let data = t.data.into_mut_slice();
    check_len(shape, data.len())?;
    // SAFETY: as in `tensor_view`; the slice is borrowed mutably, so the
    // view is the only access to it.
    Ok(unsafe { ArrayViewMutD::from_shape_ptr(IxDyn(shape), data.as_mut_ptr()) })
}

/// Checks that a tensor of `shape` has exactly `len` elements.
fn check_len(shape: &[usize], len: usize) -> Result<(), String> {
    match shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) {
        Some(n) if n == len && isize::try_from(n).is_ok() => Ok(()),
        _ => Err(format!(
            "tensor of shape {shape:?} does not match its {len} elements"
        )),
    }
}

/// Sits between a [`Layer`] and the trait object the host calls: converts
/// views and catches panics.
struct Adapter<L> {
    layer: L,
}

impl<L: Layer> LayerObject for Adapter<L> {
    fn output_shape(&self, input_shape: RSlice<'_, usize>) -> RResult<RVec<usize>, LayerError> {
        guard(|| {
            self.layer
                .output_shape(input_shape.as_slice())
                .map(RVec::from)
        })
    }

    fn param_decls(&self, input_shape: RSlice<'_, usize>) -> RResult<RVec<ParamDecl>, LayerError> {
        guard(|| {
            let specs = self.layer.params(input_shape.as_slice())?;
            Ok(specs.into_iter().map(ParamSpec::into_decl).collect())
        })
    }

    fn batch_independent(&self) -> bool {
        // A panic here cannot be reported through a `bool`; claiming nothing
        // is the safe answer.
        matches!(guard(|| Ok(self.layer.batch_independent())), ROk(true))
    }

    fn forward(
        &self,
        input: TensorRef<'_>,
        params: RSlice<'_, ParamRef<'_>>,
        output: TensorMut<'_>,
    ) -> RResult<(), LayerError> {
        guard(|| {
            let input = tensor_view(input).map_err(|e| format!("input: {e}"))?;
            let output = tensor_view_mut(output).map_err(|e| format!("output: {e}"))?;
            let params = Params {
                items: params.as_slice(),
            };
            self.layer.forward(input, &params, output)
        })
    }

    fn flops(&self, input_shape: RSlice<'_, usize>) -> u64 {
        // Only a benchmark figure: a failure here means "unknown".
        guard(|| Ok(self.layer.flops(input_shape.as_slice()))).unwrap_or(0)
    }
}

fn create_layer<L: Layer>(config_json: RStr<'_>) -> RResult<LayerBox, LayerError> {
    guard(|| {
        let config = parse_config::<L::Config>(config_json.as_str())?;
        let layer = L::new(config)?;
        Ok(LayerObject_TO::from_value(Adapter { layer }, TD_Opaque))
    })
}

extern "C" fn create_layer_extern<L: Layer>(
    config_json: RStr<'_>,
) -> RResult<LayerBox, LayerError> {
    create_layer::<L>(config_json)
}

/// Parses a layer config, refusing fields the config type does not know even
/// when its author forgot `deny_unknown_fields`.
fn parse_config<C: DeserializeOwned>(json: &str) -> Result<C, String> {
    let mut unknown = Vec::new();
    let mut de = serde_json::Deserializer::from_str(json);
    let config: C = serde_ignored::deserialize(&mut de, |path| unknown.push(path.to_string()))
        .map_err(|e| without_position(&e))?;
    if !unknown.is_empty() {
        return Err(format!("unknown config field `{}`", unknown.join("`, `")));
    }
    Ok(config)
}

/// serde_json appends "at line 1 column 17" to its messages; the config text
/// the plugin sees was re-serialized by the host, so that position means
/// nothing to the user.
fn without_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

thread_local! {
    /// True while this thread runs plugin code under [`guard`].
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
    /// The message and location of the last panic caught under [`guard`].
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs, once, a panic hook that records panics raised under [`guard`]
/// instead of printing them; the host prints them, naming the layer. Panics
/// elsewhere go to the hook that was there before.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if CAPTURING.with(Cell::get) {
                let text = info.to_string().replace('\n', " ");
                LAST_PANIC.with(|p| *p.borrow_mut() = Some(text));
            } else {
                previous(info);
            }
        }));
    });
}

/// Runs plugin code, turning an `Err` into a [`LayerError`] and a panic into
/// one marked `panicked`, so that nothing unwinds into the host.
fn guard<T>(f: impl FnOnce() -> Result<T, String>) -> RResult<T, LayerError> {
    install_panic_hook();
    let was_capturing = CAPTURING.with(|c| c.replace(true));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    CAPTURING.with(|c| c.set(was_capturing));
    match result {
        Ok(Ok(value)) => ROk(value),
        Ok(Err(message)) => RErr(LayerError {
            panicked: false,
            message: message.into(),
        }),
        Err(payload) => {
            let message = LAST_PANIC
                .with(|p| p.borrow_mut().take())
                .unwrap_or_else(|| format!("panicked: {}", payload_text(payload.as_ref())));
            RErr(LayerError {
                panicked: true,
                message: RString::from(message),
            })
        }
    }
}

fn payload_text(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-text payload".to_string()
    }
}

/// Ties a [`Layer`] type to its crate's version; implemented by
/// [`export_layer!`].
#[doc(hidden)]
pub trait Export {
    type Layer: Layer;
    const VERSION: &'static str;
}

/// The root module of the plugin that exports `E::Layer`.
#[doc(hidden)]
pub fn plugin_module<E: Export>() -> PluginModuleRef {
    PluginModule {
        name: RStr::from_str(<E::Layer as Layer>::NAME),
        version: RStr::from_str(E::VERSION),
        description: RStr::from_str(<E::Layer as Layer>::DESCRIPTION),
        create: create_layer_extern::<E::Layer>,
    }
    .leak_into_prefix()
}

extern "C" fn load_root_module<E: Export>() -> RootModuleResult {
    abi_stable::library::__call_root_module_loader(plugin_module::<E>)
}

/// The header `abi_stable` looks for in a plugin library.
#[doc(hidden)]
pub const fn lib_header<E: Export>() -> LibHeader {
    // SAFETY: the constructor returns the module built by `plugin_module`,
    // which is a `PluginModuleRef`, the type named here.
    unsafe {
        LibHeader::from_constructor::<PluginModuleRef>(load_root_module::<E>, CheckTypeLayout::Yes)
    }
}

/// Exports a [`Layer`] type as this library's plugin. Use it once per plugin
/// crate, whose `Cargo.toml` sets `crate-type = ["cdylib", "rlib"]`.
///
/// The export is a symbol of one fixed name (the one `abi_stable` looks
/// up), so two plugin crates linked into one program as rlibs define it
/// twice and the link fails. A plugin crate that declares a cargo feature
/// `static` and is built with it leaves the symbol out: the layer can then
/// be linked into a program with others and called directly, but that build
/// is no plugin. The `cfg` below is evaluated in the plugin crate, so it
/// sees the plugin's own features.
#[macro_export]
macro_rules! export_layer {
    ($layer:ty) => {
        #[doc(hidden)]
        pub struct __LayerPluginExport;

        impl $crate::__private::Export for __LayerPluginExport {
            type Layer = $layer;
            const VERSION: &'static str = env!("CARGO_PKG_VERSION");
        }

        // The symbol name is the one `abi_stable` looks up
        // (`abi_stable::library::ROOT_MODULE_LOADER_NAME`). Plugin crates
        // need not declare a `static` feature: the allow spares those that
        // do not a warning about an unknown feature.
        #[allow(unexpected_cfgs)]
        const _: () = {
            #[cfg(not(feature = "static"))]
            #[unsafe(export_name = "_1as_0lib_1header_0root_bmodule_bloader")]
            static LAYER_PLUGIN_HEADER: $crate::__private::LibHeader =
                $crate::__private::lib_header::<__LayerPluginExport>();
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi_stable::std_types::RSlice;
    use ndarray::{Ix1, Ix2};

    #[test]
    fn the_export_symbol_is_the_one_abi_stable_looks_up() {
        let source = include_str!("authoring.rs");
        let expected = format!(
            "export_name = \"{}\"",
            abi_stable::library::ROOT_MODULE_LOADER_NAME
        );
        assert!(source.contains(&expected), "macro must use {expected}");
    }

    #[test]
    fn views_refuse_a_shape_that_does_not_match_the_data() {
        let data = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let view = |shape: &[usize], len: usize| {
            tensor_view(TensorRef {
                shape: RSlice::from_slice(shape),
                data: RSlice::from_slice(&data[..len]),
            })
            .map(|v| v.to_owned())
        };
        let ok = view(&[2, 3], 6).unwrap();
        assert_eq!(ok[[1, 0]], 4.0, "C order: row 1 starts at the fourth value");
        let err = view(&[2, 3], 5).unwrap_err();
        assert!(
            err.contains("shape [2, 3] does not match its 5 elements"),
            "{err}"
        );
        assert!(view(&[usize::MAX, 2], 6).is_err(), "an overflowing shape");
        assert!(view(&[0, 3], 0).unwrap().is_empty());
    }

    #[derive(Deserialize)]
    struct LooseConfig {
        units: usize,
    }

    /// y = x * scale, where `scale` is a parameter; panics on empty input.
    struct Scale {
        units: usize,
    }

    impl Layer for Scale {
        const NAME: &'static str = "scale";
        const DESCRIPTION: &'static str = "test layer";
        type Config = LooseConfig;

        fn new(config: LooseConfig) -> Result<Self, String> {
            if config.units == 0 {
                return Err("`units` must be at least 1".into());
            }
            Ok(Scale {
                units: config.units,
            })
        }
        fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>, String> {
            Ok(input.to_vec())
        }
        fn params(&self, _input: &[usize]) -> Result<Vec<ParamSpec>, String> {
            Ok(vec![ParamSpec::new("scale", [self.units], Init::Ones)])
        }
        fn batch_independent(&self) -> bool {
            true
        }
        fn forward(
            &self,
            input: ArrayViewD<'_, f32>,
            params: &Params<'_>,
            mut output: ArrayViewMutD<'_, f32>,
        ) -> Result<(), String> {
            assert!(!input.is_empty(), "empty input");
            let scale = params.get::<Ix1>("scale")?;
            output.zip_mut_with(&input, |y, &x| *y = x * scale[0]);
            Ok(())
        }
    }

    fn create(json: &str) -> RResult<LayerBox, LayerError> {
        create_layer::<Scale>(RStr::from_str(json))
    }

    fn create_err(json: &str) -> LayerError {
        match create(json) {
            ROk(_) => panic!("{json} should be refused"),
            RErr(e) => e,
        }
    }

    #[test]
    fn unknown_config_fields_are_refused_even_without_deny_unknown_fields() {
        let err = create_err(r#"{"units": 2, "unit": 3}"#);
        assert_eq!(err.message.as_str(), "unknown config field `unit`");
        assert!(!err.panicked);
        let err = create_err(r#"{}"#);
        assert_eq!(err.message.as_str(), "missing field `units`");
        let err = create_err(r#"{"units": 0}"#);
        assert_eq!(err.message.as_str(), "`units` must be at least 1");
    }

    #[test]
    fn forward_runs_through_the_trait_object_and_panics_become_errors() {
        let layer = create(r#"{"units": 1}"#).unwrap();
        let decls = layer.param_decls(RSlice::from_slice(&[3])).unwrap();
        assert_eq!(decls.len(), 1);
        assert_eq!(decls[0].name.as_str(), "scale");
        assert_eq!(decls[0].init.as_str(), "\"ones\"");
        assert_eq!((decls[0].fan_in, decls[0].fan_out), (1, 1));

        let x = [1.0f32, 2.0, 3.0];
        let w = [2.0f32];
        let mut y = [0.0f32; 3];
        let params = [ParamRef {
            name: RStr::from_str("scale"),
            tensor: TensorRef {
                shape: RSlice::from_slice(&[1]),
                data: RSlice::from_slice(&w),
            },
        }];
        let input = TensorRef {
            shape: RSlice::from_slice(&[3]),
            data: RSlice::from_slice(&x),
        };
        let output = TensorMut {
            shape: RSlice::from_slice(&[3]),
            data: (&mut y[..]).into(),
        };
        layer
            .forward(input, RSlice::from_slice(&params), output)
            .unwrap();
        assert_eq!(y, [2.0, 4.0, 6.0]);

        let empty = TensorRef {
            shape: RSlice::from_slice(&[0]),
            data: RSlice::from_slice(&[]),
        };
        let mut nothing: [f32; 0] = [];
        let output = TensorMut {
            shape: RSlice::from_slice(&[0]),
            data: (&mut nothing[..]).into(),
        };
        let err = layer
            .forward(empty, RSlice::from_slice(&params), output)
            .unwrap_err();
        assert!(err.panicked);
        assert!(err.message.as_str().contains("empty input"), "{err:?}");
        assert!(err.message.as_str().contains("authoring.rs"), "{err:?}");
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
        let p = ParamSpec::new("w", [64, 8], Init::Zeros).fans(64, 8);
        let d = p.into_decl();
        assert_eq!((d.fan_in, d.fan_out), (64, 8));
        let _: Option<ArrayView<'_, f32, Ix2>> = None;
    }
}
