//! The binary interface between the host and a plugin library: interface 1.x.
//!
//! A plugin library carries two exported symbols:
//!
//! * [`MANIFEST_SYMBOL`], a fixed-size byte array holding the plugin's
//!   [manifest](crate::manifest) (name, version, interface version,
//!   capabilities, panic strategy) as JSON. The host reads it from the file
//!   with an object-file parser, before the library is opened, so nothing
//!   about a plugin is learned by running its code before it is checked.
//! * [`TABLE_SYMBOL`], a [`PluginTable`]: a `#[repr(C)]` table of function
//!   pointers that starts with its own size and interface version.
//!
//! How the table stays compatible across 1.x (the scheme of ONNX Runtime's
//! `OrtCustomOp::version`): the [`CoreTable`] is frozen at 1.0 and its layout
//! (with every type its functions take) is checked by `abi_stable` at load.
//! Later minor versions only *append* entries after it, each an `Option` of a
//! function pointer. The host reads an appended entry only when the plugin's
//! `size` says the plugin's table has it, so a plugin built against 1.0 loads
//! into a 1.1 host (it simply lacks 1.1's capabilities), and a plugin built
//! against a later 1.x loads into this host (the host never looks past the
//! entries it knows). A plugin that cannot work without something the host
//! may lack lists it in its manifest's `needs`, and is refused before it is
//! opened.
//!
//! Nothing here may change in 1.x except by appending to [`PluginTable`]:
//! the types below are the frozen 1.0 core.

// abi_stable's derive expands to impls that rustc's `non_local_definitions`
// lint flags; they are sound and local to this module.
#![allow(non_local_definitions)]

use std::ffi::c_void;

use abi_stable::{
    std_types::{ROption, RResult, RSlice, RSliceMut, RStr, RString, RVec},
    type_layout::TypeLayout,
    StableAbi,
};

/// The interface's major version: plugins and host must agree on it.
pub const ABI_MAJOR: u32 = 1;
/// The interface's minor version as this copy of layer-api defines it.
/// 1.0: the core; 1.1: `flops`, `prepare` and `drop_prepared`; 1.2:
/// `backward`; 1.3: `lend_pool`.
pub const ABI_MINOR: u32 = 3;

/// The abi_stable release series whose layout descriptions
/// (`core_layout`) the table carries. A host reads a plugin's description
/// only when the plugin's manifest names the same series.
pub const ABI_STABLE_VERSION: &str = "0.11";

/// The exported symbol holding the manifest bytes.
pub const MANIFEST_SYMBOL: &str = "layer_plugin_manifest_v1";
/// The exported symbol holding the [`PluginTable`].
pub const TABLE_SYMBOL: &str = "layer_plugin_table_v1";
/// Size of the manifest symbol: the JSON text, then zero bytes.
pub const MANIFEST_CAPACITY: usize = 4096;
/// The first bytes of the manifest symbol.
pub const MANIFEST_MAGIC: &[u8; 8] = b"LPMANIF1";

/// An element type. A plain number rather than a Rust enum, so that a code
/// from a newer plugin is an error the host can name, never undefined
/// behaviour. Codes are never reused.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DType(pub u32);

impl DType {
    /// No tensor: an optional input left out.
    pub const ABSENT: DType = DType(0);
    pub const F32: DType = DType(1);
    pub const F64: DType = DType(2);
    pub const F16: DType = DType(3);
    pub const BF16: DType = DType(4);
    pub const I64: DType = DType(5);
    pub const I32: DType = DType(6);
    pub const U8: DType = DType(7);
    /// One byte per element, 0 or 1.
    pub const BOOL: DType = DType(8);

    /// Every element type of interface 1.0.
    pub const ALL: [DType; 8] = [
        DType::F32,
        DType::F64,
        DType::F16,
        DType::BF16,
        DType::I64,
        DType::I32,
        DType::U8,
        DType::BOOL,
    ];

    /// The name numpy gives the type (`float32`, `int64`, `bool`).
    pub const fn name(self) -> &'static str {
        match self.0 {
            0 => "absent",
            1 => "float32",
            2 => "float64",
            3 => "float16",
            4 => "bfloat16",
            5 => "int64",
            6 => "int32",
            7 => "uint8",
            8 => "bool",
            _ => "unknown",
        }
    }

    /// The type numpy calls `name`.
    pub fn from_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Bytes per element (0 for [`DType::ABSENT`] and unknown codes).
    pub const fn size(self) -> usize {
        match self.0 {
            1 | 6 => 4,
            2 | 5 => 8,
            3 | 4 => 2,
            7 | 8 => 1,
            _ => 0,
        }
    }

    /// Whether this is one of the types interface 1.0 defines.
    pub const fn is_known(self) -> bool {
        self.0 >= 1 && self.0 <= 8
    }

    /// Whether the type holds integers (or booleans): probes of such inputs
    /// take their values from a declared range.
    pub const fn is_integer(self) -> bool {
        matches!(self.0, 5..=8)
    }
}

impl std::fmt::Debug for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_known() || *self == DType::ABSENT {
            f.write_str(self.name())
        } else {
            write!(f, "dtype#{}", self.0)
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// A tensor's element type and shape, without data: what the host tells a
/// layer it will receive. An optional input left out has dtype
/// [`DType::ABSENT`] and an empty shape.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct TensorDesc<'a> {
    pub dtype: DType,
    pub shape: RSlice<'a, usize>,
}

/// An owned tensor description: what a layer says it will produce.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub dtype: DType,
    pub shape: RVec<usize>,
}

/// A borrowed, contiguous, row-major tensor. `data` holds exactly
/// `product(shape) * dtype.size()` bytes, aligned for the element type.
/// An optional input left out has dtype [`DType::ABSENT`] and no data.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct TensorRef<'a> {
    pub dtype: DType,
    pub shape: RSlice<'a, usize>,
    pub data: RSlice<'a, u8>,
}

/// A mutably borrowed, contiguous, row-major tensor: a layer's output.
#[repr(C)]
#[derive(StableAbi)]
pub struct TensorMut<'a> {
    pub dtype: DType,
    pub shape: RSlice<'a, usize>,
    pub data: RSliceMut<'a, u8>,
}

/// A parameter lent to a layer, by the name the layer declared.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct ParamRef<'a> {
    pub name: RStr<'a>,
    pub tensor: TensorRef<'a>,
}

/// A parameter a layer needs, declared before any computation.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct ParamDecl {
    /// The name within the layer (`weight`); the host prefixes the layer name.
    pub name: RString,
    /// The element type (hosts of 1.x keep `float32` parameters and refuse
    /// others with a message).
    pub dtype: DType,
    pub shape: RVec<usize>,
    /// Fan-in and fan-out, for the Xavier and Kaiming initializers.
    pub fan_in: usize,
    pub fan_out: usize,
    /// The default initializer, as the JSON form of layer-api's `Init`
    /// (the same text a model file uses to override it).
    pub init: RString,
}

/// One named input or output of a layer.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct PortDecl {
    pub name: RString,
    /// Inputs only: the layer runs without it.
    pub optional: bool,
    /// Inputs: the element types accepted, in order of preference (the host
    /// converts a model input to the first). Outputs: empty; the dtype comes
    /// with the plan.
    pub dtypes: RVec<DType>,
}

/// A layer's inputs and outputs, fixed once the layer is created.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct Signature {
    pub inputs: RVec<PortDecl>,
    pub outputs: RVec<PortDecl>,
}

/// What a layer will do for given inputs: its outputs, one per declared
/// output, and its parameters, in the order `forward` finds them.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct LayerPlan {
    pub outputs: RVec<TensorSpec>,
    pub params: RVec<ParamDecl>,
}

/// How `host check-plugin` may make one input of a probe: a shape, the
/// element type to use (or [`DType::ABSENT`]: each accepted type in turn),
/// and for integer types the half-open range `[low, high)` values are drawn
/// from (an embedding's `[0, num_embeddings)`).
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct ProbeInput {
    pub shape: RVec<usize>,
    pub dtype: DType,
    pub low: i64,
    pub high: i64,
}

/// One probe: a value for each declared input, `RNone` for an optional
/// input left out.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct ProbeCase {
    pub inputs: RVec<ROption<ProbeInput>>,
}

/// An error returned by a plugin.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct LayerError {
    /// True when the plugin panicked; the panic was caught at the boundary.
    pub panicked: bool,
    pub message: RString,
}

/// A layer instance created by a plugin: opaque to the host, which hands it
/// back to the plugin's functions and finally to `drop_layer`.
#[repr(transparent)]
#[derive(StableAbi, Debug)]
pub struct LayerHandle(pub *mut c_void);

// SAFETY: a layer is `Send + Sync` on the plugin side (the authoring trait
// requires it); the handle is only a pointer to one.
unsafe impl Send for LayerHandle {}
unsafe impl Sync for LayerHandle {}

/// Read-only data a layer prepared from one parameter set (1.1's
/// `prepare`), shared by every later `forward` on any thread. Opaque to the
/// host, which passes `forward` exactly what `prepare` returned, or null when
/// it did not call `prepare` (the host or the plugin predates it).
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct PreparedHandle(pub *const c_void);

// SAFETY: prepared data is `Send + Sync` on the plugin side.
unsafe impl Send for PreparedHandle {}
unsafe impl Sync for PreparedHandle {}

impl PreparedHandle {
    pub const NONE: PreparedHandle = PreparedHandle(std::ptr::null());
}

/// The frozen 1.0 core: what every 1.x plugin provides. Its layout, with all
/// the types its functions take, is checked at load.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct CoreTable {
    /// Creates a layer from its config, given as a JSON object.
    pub create: extern "C" fn(config_json: RStr<'_>) -> RResult<LayerHandle, LayerError>,
    /// Destroys a layer; a panic in its `Drop` comes back as an error.
    pub drop_layer: extern "C" fn(layer: LayerHandle) -> RResult<(), LayerError>,
    /// The layer's inputs and outputs.
    pub signature: extern "C" fn(layer: &LayerHandle) -> RResult<Signature, LayerError>,
    /// Outputs and parameters for inputs described by `inputs` (one per
    /// declared input, in order), or why those inputs are not valid.
    pub plan: extern "C" fn(
        layer: &LayerHandle,
        inputs: RSlice<'_, TensorDesc<'_>>,
    ) -> RResult<LayerPlan, LayerError>,
    /// Whether output row `i` of every output depends only on row `i` of
    /// every input (axis 0), so that a batch may be split into pieces.
    pub batch_independent: extern "C" fn(layer: &LayerHandle) -> RResult<bool, LayerError>,
    /// Inputs for `host check-plugin` to try; empty: let the checker guess
    /// (one-input float layers only).
    pub probes: extern "C" fn(layer: &LayerHandle) -> RResult<RVec<ProbeCase>, LayerError>,
    /// Computes every output from the inputs (as the plan described them)
    /// and the parameters (in the plan's order). `prepared` is what
    /// `prepare` returned for these parameters, or null.
    pub forward: extern "C" fn(
        layer: &LayerHandle,
        prepared: PreparedHandle,
        inputs: RSlice<'_, TensorRef<'_>>,
        params: RSlice<'_, ParamRef<'_>>,
        outputs: RSliceMut<'_, TensorMut<'_>>,
    ) -> RResult<(), LayerError>,
}

/// The table a plugin exports as [`TABLE_SYMBOL`].
///
/// Append only. Each entry after `core` is an `Option` and carries the minor
/// version that added it; the host reads it only when
/// `size >= offset_of!(entry) + size_of(entry)`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PluginTable {
    /// `size_of::<PluginTable>()` as the plugin was built: how many entries
    /// its table has.
    pub size: usize,
    pub abi_major: u32,
    pub abi_minor: u32,
    /// `abi_stable`'s description of [`CoreTable`] as the plugin was built,
    /// compared with the host's before any entry is called.
    pub core_layout: &'static TypeLayout,
    pub core: CoreTable,

    // ---- 1.1 ----
    /// Floating-point operations one `forward` performs for `inputs`
    /// (multiply and add count as two), 0 when unknown.
    pub flops:
        Option<extern "C" fn(layer: &LayerHandle, inputs: RSlice<'_, TensorDesc<'_>>) -> u64>,
    /// Called once per parameter set, before any `forward` with it: returns
    /// read-only data derived from the parameters (prepacked weights, a
    /// folded tensor, an FFT plan) that `forward` receives, or null.
    pub prepare: Option<
        extern "C" fn(
            layer: &LayerHandle,
            inputs: RSlice<'_, TensorDesc<'_>>,
            params: RSlice<'_, ParamRef<'_>>,
        ) -> RResult<PreparedHandle, LayerError>,
    >,
    /// Frees what `prepare` returned (never called with null).
    pub drop_prepared: Option<
        extern "C" fn(layer: &LayerHandle, prepared: PreparedHandle) -> RResult<(), LayerError>,
    >,

    // ---- 1.2 ----
    /// The gradients of one `forward`: given what that call was given and
    /// wrote (`inputs`, `params`, `prepared`, `outputs`) and the gradient of
    /// a scalar loss with respect to each output (`output_grads`, one per
    /// output, shaped and typed as it; [`DType::ABSENT`] for an output that
    /// is not a float), writes the gradient with respect to each input
    /// (`input_grads`, one per input, of the input's shape and type) and
    /// each parameter (`param_grads`, in the plan's order, `float32`). A
    /// gradient the host does not want (an integer input, data, a frozen
    /// parameter) has [`DType::ABSENT`] and no data. Every gradient buffer
    /// starts at zero: a layer may add into it or write it whole (an
    /// embedding writes only the rows it read).
    pub backward: Option<BackwardFn>,

    // ---- 1.3 ----
    /// Lends the host's thread pool to the plugin's calls on the calling
    /// thread (`Some`), or ends the loan (`None`). Between the two, a
    /// `forward` or `backward` on this thread may spread its work over
    /// `pool` (see [`HostPool`]); the host lends its pool only to a call it
    /// does not itself split across threads, so the threads it asked for
    /// are never exceeded. The plugin copies `*pool`; the loan ends, and
    /// `pool.context` may die, at the call with `None`, which the host makes
    /// on the same thread before `pool` goes away.
    pub lend_pool: Option<extern "C" fn(pool: Option<&HostPool>)>,
}

/// The host's thread pool as it lends it to a plugin
/// ([`PluginTable::lend_pool`]).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HostPool {
    /// How many tasks the pool runs at once: its threads, at least 2.
    pub threads: usize,
    /// The host's own state, passed back to `run`.
    pub context: *const c_void,
    /// Runs `task(data, i)` once for every `i` in `0..tasks`, spread over
    /// the pool's threads, and returns once every one has returned. The
    /// calling thread waits (it may run tasks itself). `task` must not
    /// unwind, and must not call `run` again.
    pub run:
        extern "C" fn(context: *const c_void, tasks: usize, task: PoolTask, data: *const c_void),
}

/// One task of [`HostPool::run`]: `data` as given to `run`, and the task's
/// index.
pub type PoolTask = extern "C" fn(data: *const c_void, index: usize);

/// The type of [`PluginTable::backward`].
pub type BackwardFn = extern "C" fn(
    layer: &LayerHandle,
    prepared: PreparedHandle,
    inputs: RSlice<'_, TensorRef<'_>>,
    params: RSlice<'_, ParamRef<'_>>,
    outputs: RSlice<'_, TensorRef<'_>>,
    output_grads: RSlice<'_, TensorRef<'_>>,
    input_grads: RSliceMut<'_, TensorMut<'_>>,
    param_grads: RSliceMut<'_, TensorMut<'_>>,
) -> RResult<(), LayerError>;

// SAFETY: the table is immutable static data: a size, numbers, a pointer to
// static layout data and function pointers.
unsafe impl Sync for PluginTable {}

/// The table's capabilities by name, with the minor version that added each
/// and whether this host understands it. Manifests list capabilities by
/// these names.
pub const CAPABILITIES: &[(&str, u32)] = &[
    ("flops", 1),
    ("prepare", 1),
    ("backward", 2),
    ("lend-pool", 3),
];

/// The layout the host compares a plugin's `core_layout` with.
pub const CORE_LAYOUT: &TypeLayout = <CoreTable as StableAbi>::LAYOUT;

/// A plugin's table as the host sees it: the header and the 1.0 core, which
/// every 1.x table has, and the appended entries read only when the
/// plugin's table is long enough to hold them (it may be shorter than this
/// copy's [`PluginTable`], so the table is never read as a whole).
#[derive(Clone, Copy)]
pub struct TableRef {
    ptr: *const PluginTable,
    size: usize,
}

// SAFETY: the table is immutable static data in a library that is never
// unloaded.
unsafe impl Send for TableRef {}
unsafe impl Sync for TableRef {}

/// Where the 1.0 part of every 1.x table ends.
pub const CORE_END: usize =
    std::mem::offset_of!(PluginTable, core) + std::mem::size_of::<CoreTable>();

// Every appended entry is an optional function pointer: one word, so a
// table's length says exactly which entries it has (no entry can hide in
// an older table's padding).
const _: () = {
    assert!(std::mem::size_of::<Option<extern "C" fn()>>() == std::mem::size_of::<usize>());
    assert!((std::mem::size_of::<PluginTable>() - CORE_END) % std::mem::size_of::<usize>() == 0);
};

macro_rules! appended_entry {
    ($(#[$doc:meta])* $name:ident: $ty:ty) => {
        $(#[$doc])*
        pub fn $name(&self) -> $ty {
            let field = std::mem::offset_of!(PluginTable, $name);
            if self.size < field + std::mem::size_of::<$ty>() {
                return None;
            }
            // SAFETY: the plugin's table is at least `size` bytes long (it
            // says so, and `new` checked it holds the core), so the field
            // lies inside it; it was written by a plugin built against an
            // interface whose table has this field at this offset, since
            // fields are only ever appended.
            unsafe { std::ptr::addr_of!((*self.ptr).$name).read() }
        }
    };
}

impl TableRef {
    /// Reads the table at `ptr`, whose symbol is `symbol_size` bytes long
    /// in the library file: the table is taken to be no longer than that,
    /// whatever its `size` field claims.
    ///
    /// # Safety
    /// `ptr` must point to the [`TABLE_SYMBOL`] of a loaded library that is
    /// never unloaded, whose symbol is `symbol_size` bytes long, and that
    /// library's manifest must have said interface 1.x (so that the header
    /// and core have this layout, which the caller then confirms with
    /// [`TableRef::core_layout`]).
    pub unsafe fn new(ptr: *const PluginTable, symbol_size: usize) -> Result<TableRef, String> {
        if symbol_size < CORE_END || !ptr.is_aligned() {
            return Err(format!(
                "its interface table symbol is {symbol_size} bytes long (or misaligned), \
                 shorter than the {CORE_END} bytes of interface 1.0's core"
            ));
        }
        // SAFETY: every 1.x table starts with its size (caller's promise),
        // and the symbol holds at least the core.
        let size = unsafe { std::ptr::addr_of!((*ptr).size).read() }.min(symbol_size);
        if size < CORE_END {
            return Err(format!(
                "its interface table is {size} bytes long, shorter than the {CORE_END} bytes \
                 of interface 1.0's core"
            ));
        }
        Ok(TableRef { ptr, size })
    }

    /// The size the plugin's table says it has.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The interface version the table says it was built for.
    pub fn version(&self) -> (u32, u32) {
        // SAFETY: within the core, which `new` checked the table holds.
        unsafe {
            (
                std::ptr::addr_of!((*self.ptr).abi_major).read(),
                std::ptr::addr_of!((*self.ptr).abi_minor).read(),
            )
        }
    }

    /// The layout of [`CoreTable`] as the plugin was built.
    pub fn core_layout(&self) -> &'static TypeLayout {
        // SAFETY: within the core; a `&'static` into a never-unloaded library.
        unsafe { std::ptr::addr_of!((*self.ptr).core_layout).read() }
    }

    /// The 1.0 core. Call only after [`TableRef::core_layout`] matched
    /// [`CORE_LAYOUT`].
    pub fn core(&self) -> CoreTable {
        // SAFETY: within the core, which `new` checked the table holds.
        unsafe { std::ptr::addr_of!((*self.ptr).core).read() }
    }

    appended_entry!(
        /// 1.1: `flops`, if the plugin's table has it.
        flops: Option<extern "C" fn(&LayerHandle, RSlice<'_, TensorDesc<'_>>) -> u64>
    );
    appended_entry!(
        /// 1.1: `prepare`, if the plugin's table has it.
        prepare: Option<
            extern "C" fn(
                &LayerHandle,
                RSlice<'_, TensorDesc<'_>>,
                RSlice<'_, ParamRef<'_>>,
            ) -> RResult<PreparedHandle, LayerError>,
        >
    );
    appended_entry!(
        /// 1.1: `drop_prepared`, if the plugin's table has it.
        drop_prepared: Option<
            extern "C" fn(&LayerHandle, PreparedHandle) -> RResult<(), LayerError>,
        >
    );
    appended_entry!(
        /// 1.2: `backward`, if the plugin's table has it.
        backward: Option<BackwardFn>
    );
    appended_entry!(
        /// 1.3: `lend_pool`, if the plugin's table has it.
        lend_pool: Option<extern "C" fn(Option<&HostPool>)>
    );
}
