//! What the export macro puts between a [`MultiLayer`] and the binary
//! interface: the functions of the plugin's table. They convert the
//! boundary's types to the authoring ones and catch every panic, so that
//! nothing unwinds into the host.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

use abi_stable::std_types::{RErr, ROk, ROption, RResult, RSlice, RSliceMut, RStr, RString, RVec};
use abi_stable::StableAbi;
use serde::de::DeserializeOwned;

use crate::abi::{
    self, CoreTable, DType, LayerError, LayerHandle, ParamRef, PluginTable, PortDecl,
    PreparedHandle, ProbeCase, TensorDesc, TensorMut, TensorRef, ABI_MAJOR, ABI_MINOR,
};
use crate::authoring::{Grads, Inputs, MultiLayer, Outputs, Params, Prepared, TensorInfo};

/// A created layer, with the names of its ports fixed at creation.
pub(crate) struct Instance<L> {
    pub(crate) layer: L,
    pub(crate) input_names: Vec<String>,
    pub(crate) output_names: Vec<String>,
}

fn instance<L>(handle: &LayerHandle) -> &Instance<L> {
    // SAFETY: the host passes back only handles this plugin's `create`
    // made for this layer type, until it passes them to `drop_layer`.
    unsafe { &*handle.0.cast::<Instance<L>>() }
}

fn infos(inputs: RSlice<'_, TensorDesc<'_>>) -> Vec<Option<TensorInfo>> {
    inputs
        .iter()
        .map(|d| (d.dtype != DType::ABSENT).then(|| TensorInfo::new(d.dtype, d.shape.to_vec())))
        .collect()
}

extern "C" fn create<L: MultiLayer>(config_json: RStr<'_>) -> RResult<LayerHandle, LayerError> {
    guard(|| {
        let config = parse_config::<L::Config>(config_json.as_str())?;
        let layer = L::new(config)?;
        let signature = layer.signature();
        let instance = Instance {
            input_names: signature.inputs.iter().map(|p| p.name.clone()).collect(),
            output_names: signature.outputs.clone(),
            layer,
        };
        Ok(LayerHandle(
            Box::into_raw(Box::new(instance)).cast::<c_void>(),
        ))
    })
}

extern "C" fn drop_layer<L: MultiLayer>(handle: LayerHandle) -> RResult<(), LayerError> {
    guard(|| {
        // SAFETY: made by `create::<L>`; the host passes each handle here once
        // and never uses it after.
        drop(unsafe { Box::from_raw(handle.0.cast::<Instance<L>>()) });
        Ok(())
    })
}

extern "C" fn signature<L: MultiLayer>(
    handle: &LayerHandle,
) -> RResult<abi::Signature, LayerError> {
    guard(|| {
        let s = instance::<L>(handle).layer.signature();
        Ok(abi::Signature {
            inputs: s
                .inputs
                .into_iter()
                .map(|p| PortDecl {
                    name: p.name.into(),
                    optional: p.optional,
                    dtypes: p.dtypes.into(),
                })
                .collect(),
            outputs: s
                .outputs
                .into_iter()
                .map(|name| PortDecl {
                    name: name.into(),
                    optional: false,
                    dtypes: RVec::new(),
                })
                .collect(),
        })
    })
}

extern "C" fn plan<L: MultiLayer>(
    handle: &LayerHandle,
    inputs: RSlice<'_, TensorDesc<'_>>,
) -> RResult<abi::LayerPlan, LayerError> {
    guard(|| {
        let plan = instance::<L>(handle).layer.plan(&infos(inputs))?;
        Ok(abi::LayerPlan {
            outputs: plan
                .outputs
                .into_iter()
                .map(|t| abi::TensorSpec {
                    dtype: t.dtype,
                    shape: t.shape.into(),
                })
                .collect(),
            params: plan.params.into_iter().map(|p| p.into_decl()).collect(),
        })
    })
}

extern "C" fn batch_independent<L: MultiLayer>(handle: &LayerHandle) -> RResult<bool, LayerError> {
    guard(|| Ok(instance::<L>(handle).layer.batch_independent()))
}

extern "C" fn probes<L: MultiLayer>(handle: &LayerHandle) -> RResult<RVec<ProbeCase>, LayerError> {
    guard(|| {
        Ok(instance::<L>(handle)
            .layer
            .probes()
            .into_iter()
            .map(|p| ProbeCase {
                inputs: p
                    .inputs
                    .into_iter()
                    .map(|i| match i {
                        Some(i) => ROption::RSome(abi::ProbeInput {
                            shape: i.shape.into(),
                            dtype: i.dtype.unwrap_or(DType::ABSENT),
                            low: i.range.0,
                            high: i.range.1,
                        }),
                        None => ROption::RNone,
                    })
                    .collect(),
            })
            .collect())
    })
}

/// What `prepare` returns when the layer prepared nothing: not null, so
/// that `forward` can tell a host that called `prepare` from one that
/// predates it. Never dereferenced; `drop_prepared` ignores it.
static NOTHING_PREPARED: u8 = 0;

fn nothing_prepared() -> PreparedHandle {
    PreparedHandle(std::ptr::addr_of!(NOTHING_PREPARED).cast::<c_void>())
}

/// What the host's `prepared` handle holds: `Err(())` when the host never
/// called `prepare`, `Ok(None)` when the layer prepared nothing.
fn prepared_ref<'a>(handle: PreparedHandle) -> Result<Option<&'a (dyn Any + Send + Sync)>, ()> {
    if handle.0.is_null() {
        return Err(());
    }
    if handle.0 == nothing_prepared().0 {
        return Ok(None);
    }
    // SAFETY: non-null handles come from `prepare` below (a leaked
    // `Box<Prepared>`) and stay alive until `drop_prepared`, which the host
    // calls only after the last `forward` that was given the handle.
    Ok(Some(unsafe { &**handle.0.cast::<Prepared>() }))
}

/// What `prepare` made of `params` for `forward` or `backward`: what the
/// host passed, or, when it passed null (a host that predates `prepare`,
/// or one that prepared nothing for this call), made here into `local` for
/// this call only, so that the layer sees the same thing either way.
fn prepared_for<'a, L: MultiLayer>(
    layer: &L,
    prepared: PreparedHandle,
    inputs: &[TensorRef<'_>],
    params: &[ParamRef<'_>],
    local: &'a mut Option<Prepared>,
) -> Result<Option<&'a (dyn Any + Send + Sync)>, String> {
    if let Ok(p) = prepared_ref(prepared) {
        return Ok(p);
    }
    let descs: Vec<Option<TensorInfo>> = inputs
        .iter()
        .map(|t| (t.dtype != DType::ABSENT).then(|| TensorInfo::new(t.dtype, t.shape.to_vec())))
        .collect();
    *local = layer.prepare(&descs, &Params::new(params))?;
    Ok(local.as_deref())
}

extern "C" fn forward<L: MultiLayer>(
    handle: &LayerHandle,
    prepared: PreparedHandle,
    inputs: RSlice<'_, TensorRef<'_>>,
    params: RSlice<'_, ParamRef<'_>>,
    outputs: RSliceMut<'_, TensorMut<'_>>,
) -> RResult<(), LayerError> {
    guard(|| {
        let inst = instance::<L>(handle);
        let inputs = inputs.as_slice();
        let params = params.as_slice();
        let mut local = None;
        let prepared = prepared_for(&inst.layer, prepared, inputs, params, &mut local)?;
        let params = Params::with_prepared(params, prepared);
        // SAFETY: `Outputs` only ever writes empty `RSliceMut`s into it.
        let outputs = unsafe { lent(outputs) };
        let inputs = Inputs::new(&inst.input_names, inputs);
        let mut outputs = Outputs::new(&inst.output_names, outputs);
        inst.layer.forward(&inputs, &params, &mut outputs)
    })
}

/// Shortens the lifetime of tensors lent for one call to the slice's.
///
/// # Safety
/// The only values written into the slice must be empty `RSliceMut`s, which
/// live for 'static, so nothing shorter-lived than the host's buffers is
/// ever stored where the host will read it.
unsafe fn lent<'a>(items: RSliceMut<'a, TensorMut<'_>>) -> &'a mut [TensorMut<'a>] {
    let items = items.into_mut_slice();
    // SAFETY: see the function's contract.
    unsafe {
        std::slice::from_raw_parts_mut(items.as_mut_ptr().cast::<TensorMut<'a>>(), items.len())
    }
}

#[allow(clippy::too_many_arguments)]
extern "C" fn backward<L: MultiLayer>(
    handle: &LayerHandle,
    prepared: PreparedHandle,
    inputs: RSlice<'_, TensorRef<'_>>,
    params: RSlice<'_, ParamRef<'_>>,
    outputs: RSlice<'_, TensorRef<'_>>,
    output_grads: RSlice<'_, TensorRef<'_>>,
    input_grads: RSliceMut<'_, TensorMut<'_>>,
    param_grads: RSliceMut<'_, TensorMut<'_>>,
) -> RResult<(), LayerError> {
    guard(|| {
        let inst = instance::<L>(handle);
        let param_items = params.as_slice();
        let mut local = None;
        let prepared = prepared_for(
            &inst.layer,
            prepared,
            inputs.as_slice(),
            param_items,
            &mut local,
        )?;
        let params = Params::with_prepared(param_items, prepared);
        // SAFETY: `Grads` only ever writes empty `RSliceMut`s into them.
        let (input_grads, param_grads) = unsafe { (lent(input_grads), lent(param_grads)) };
        let mut grads = Grads::new(&inst.input_names, input_grads, param_items, param_grads);
        let inputs = Inputs::new(&inst.input_names, inputs.as_slice());
        let outputs = Inputs::of("output", &inst.output_names, outputs.as_slice());
        let output_grads = Inputs::of(
            "output gradient",
            &inst.output_names,
            output_grads.as_slice(),
        );
        inst.layer
            .backward(&inputs, &outputs, &params, &output_grads, &mut grads)
    })
}

extern "C" fn flops<L: MultiLayer>(
    handle: &LayerHandle,
    inputs: RSlice<'_, TensorDesc<'_>>,
) -> u64 {
    // Only a benchmark figure: a failure here means "unknown".
    guard(|| Ok(instance::<L>(handle).layer.flops(&infos(inputs)))).unwrap_or(0)
}

extern "C" fn prepare<L: MultiLayer>(
    handle: &LayerHandle,
    inputs: RSlice<'_, TensorDesc<'_>>,
    params: RSlice<'_, ParamRef<'_>>,
) -> RResult<PreparedHandle, LayerError> {
    guard(|| {
        let prepared = instance::<L>(handle)
            .layer
            .prepare(&infos(inputs), &Params::new(params.as_slice()))?;
        Ok(match prepared {
            Some(p) => PreparedHandle(Box::into_raw(Box::new(p)).cast_const().cast::<c_void>()),
            None => nothing_prepared(),
        })
    })
}

extern "C" fn drop_prepared(
    _handle: &LayerHandle,
    prepared: PreparedHandle,
) -> RResult<(), LayerError> {
    guard(|| {
        if !prepared.0.is_null() && prepared.0 != nothing_prepared().0 {
            // SAFETY: made by `prepare` above; the host frees each once, after
            // its last use.
            drop(unsafe { Box::from_raw(prepared.0.cast_mut().cast::<Prepared>()) });
        }
        Ok(())
    })
}

/// The table of the plugin whose layer is `L`.
#[doc(hidden)]
pub const fn plugin_table<L: MultiLayer>() -> PluginTable {
    PluginTable {
        size: std::mem::size_of::<PluginTable>(),
        abi_major: ABI_MAJOR,
        abi_minor: ABI_MINOR,
        core_layout: <CoreTable as StableAbi>::LAYOUT,
        core: CoreTable {
            create: create::<L>,
            drop_layer: drop_layer::<L>,
            signature: signature::<L>,
            plan: plan::<L>,
            batch_independent: batch_independent::<L>,
            probes: probes::<L>,
            forward: forward::<L>,
        },
        flops: Some(flops::<L>),
        prepare: Some(prepare::<L>),
        drop_prepared: Some(drop_prepared),
        backward: if L::BACKWARD {
            Some(backward::<L>)
        } else {
            None
        },
        lend_pool: Some(crate::parallel::lend_pool),
    }
}

/// The capabilities [`plugin_table`] offers for `L` beyond the core, by
/// name, as the manifest lists them.
#[doc(hidden)]
pub const fn offers<L: MultiLayer>() -> &'static [&'static str] {
    if L::BACKWARD {
        &["flops", "prepare", "backward", "lend-pool"]
    } else {
        &["flops", "prepare", "lend-pool"]
    }
}

/// Parses a layer config, refusing fields the config type does not know even
/// when its author forgot `deny_unknown_fields`.
pub(crate) fn parse_config<C: DeserializeOwned>(json: &str) -> Result<C, String> {
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

/// Runs `f` with panics recorded as under [`guard`] rather than printed: for
/// tasks that run plugin code on the host's pool threads.
pub(crate) fn capturing<T>(f: impl FnOnce() -> T) -> T {
    install_panic_hook();
    let was_capturing = CAPTURING.with(|c| c.replace(true));
    let result = f();
    CAPTURING.with(|c| c.set(was_capturing));
    result
}

/// The message of the last panic recorded on this thread, taken.
pub(crate) fn take_last_panic() -> Option<String> {
    LAST_PANIC.with(|p| p.borrow_mut().take())
}

/// Records `message` as this thread's last panic, for a panic raised again
/// here that was first raised on another thread.
pub(crate) fn set_last_panic(message: Option<String>) {
    LAST_PANIC.with(|p| *p.borrow_mut() = message);
}

/// Runs plugin code, turning an `Err` into a [`LayerError`] and a panic into
/// one marked `panicked`, so that nothing unwinds into the host.
pub(crate) fn guard<T>(f: impl FnOnce() -> Result<T, String>) -> RResult<T, LayerError> {
    let result = capturing(|| panic::catch_unwind(AssertUnwindSafe(f)));
    match result {
        Ok(Ok(value)) => ROk(value),
        Ok(Err(message)) => RErr(LayerError {
            panicked: false,
            message: message.into(),
        }),
        Err(payload) => {
            let message = take_last_panic()
                .unwrap_or_else(|| format!("panicked: {}", payload_text(payload.as_ref())));
            // A payload whose own `Drop` panics would unwind out of here and
            // across the boundary: drop it under a guard too, and leak it if
            // that panics.
            if let Err(second) = panic::catch_unwind(AssertUnwindSafe(move || drop(payload))) {
                std::mem::forget(second);
            }
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

/// Exports a [`Layer`](crate::Layer) or [`MultiLayer`] type as this
/// library's plugin. Use it once per plugin crate, whose `Cargo.toml` sets
/// `crate-type = ["cdylib", "rlib"]`.
///
/// It writes two exported symbols: the manifest (name, version, interface
/// version, capabilities, panic strategy), which the host reads from the
/// file before opening it, and the table of functions. The layer's name is
/// the crate's library name (`CARGO_CRATE_NAME`), the name of the file
/// cargo builds (`lib<name>.so`).
///
/// The symbols have fixed names, so two plugin crates linked into one
/// program as rlibs define them twice and the link fails. A plugin crate
/// that declares a cargo feature `static` and is built with it leaves them
/// out: the layer can then be linked into a program with others and called
/// directly, but that build is no plugin. The `cfg` below is evaluated in
/// the plugin crate, so it sees the plugin's own features and panic
/// strategy.
#[macro_export]
macro_rules! export_layer {
    ($layer:ty) => {
        // Plugin crates need not declare a `static` feature: the allow
        // spares those that do not a warning about an unknown feature.
        #[allow(unexpected_cfgs)]
        const _: () = {
            #[cfg(not(feature = "static"))]
            #[unsafe(export_name = "layer_plugin_manifest_v1")]
            #[used]
            static LAYER_PLUGIN_MANIFEST: [u8; $crate::abi::MANIFEST_CAPACITY] =
                $crate::__private::build_manifest(&$crate::__private::ManifestParts {
                    name: env!("CARGO_CRATE_NAME"),
                    version: env!("CARGO_PKG_VERSION"),
                    description: <$layer as $crate::MultiLayer>::DESCRIPTION,
                    layer_api: $crate::LAYER_API_VERSION,
                    abi: ($crate::abi::ABI_MAJOR, $crate::abi::ABI_MINOR),
                    offers: $crate::__private::offers::<$layer>(),
                    needs: &[],
                    abi_stable: $crate::abi::ABI_STABLE_VERSION,
                    panic_abort: cfg!(panic = "abort"),
                });
            #[cfg(not(feature = "static"))]
            #[unsafe(export_name = "layer_plugin_table_v1")]
            #[used]
            static LAYER_PLUGIN_TABLE: $crate::abi::PluginTable =
                $crate::__private::plugin_table::<$layer>();
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_macro_exports_the_symbols_the_host_looks_up() {
        let source = include_str!("adapter.rs");
        for symbol in [abi::MANIFEST_SYMBOL, abi::TABLE_SYMBOL] {
            let expected = format!("export_name = \"{symbol}\"");
            assert!(source.contains(&expected), "macro must use {expected}");
        }
    }
}
