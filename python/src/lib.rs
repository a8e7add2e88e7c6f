//! `layerhost._native`: the host's library ([`host::embed`]) as a Python
//! extension module. The `layerhost` package (python/layerhost) wraps it in
//! the API users see; this crate only moves values across: numpy arrays in
//! (lent without a copy where they already are what the model takes),
//! numpy arrays out (the host's owned arrays, handed over without another
//! copy), host errors as the package's exception classes. The GIL is
//! released while a model loads and runs.

use std::path::PathBuf;
use std::time::Duration;

use half::{bf16, f16};
use host::embed::{ErrorKind, Failure, Options, Session};
use host::tensor::{Tensor, TensorView};
use layer_api::DType;
use ndarray::ArrayD;
use numpy::{
    dtype, Element, IntoPyArray, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods,
    PyReadonlyArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    layerhost,
    Error,
    PyException,
    "Any failure of the host: the message is the command line's, without `error: `."
);
create_exception!(
    layerhost,
    ModelError,
    Error,
    "The model file: unreadable, invalid, or wired wrongly."
);
create_exception!(
    layerhost,
    PluginError,
    Error,
    "A plugin: not found, refused, or failing (or panicking) in a call."
);
create_exception!(
    layerhost,
    ParamsError,
    Error,
    "The parameters: the file, or a tensor in it."
);
create_exception!(
    layerhost,
    InputError,
    Error,
    "The inputs given: their names, number, element types or shapes."
);

fn to_py(failure: Failure) -> PyErr {
    let message = failure.to_string();
    match failure.kind {
        ErrorKind::Model => ModelError::new_err(message),
        ErrorKind::Plugin => PluginError::new_err(message),
        ErrorKind::Params => ParamsError::new_err(message),
        ErrorKind::Input => InputError::new_err(message),
    }
}

/// An input as the run reads it: a numpy array lent for the call, or a
/// converted copy.
enum Held<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    F64(PyReadonlyArrayDyn<'py, f64>),
    F16(PyReadonlyArrayDyn<'py, f16>),
    I64(PyReadonlyArrayDyn<'py, i64>),
    I32(PyReadonlyArrayDyn<'py, i32>),
    U8(PyReadonlyArrayDyn<'py, u8>),
    Copied(Tensor),
}

fn bytes_of<'a, T: bytemuck::Pod + Element>(a: &'a PyReadonlyArrayDyn<'_, T>) -> &'a [u8] {
    bytemuck::cast_slice(a.as_slice().expect("lent only when C-contiguous"))
}

impl Held<'_> {
    fn view(&self) -> TensorView<'_> {
        let (dtype, shape, bytes) = match self {
            Held::F32(a) => (DType::F32, a.shape(), bytes_of(a)),
            Held::F64(a) => (DType::F64, a.shape(), bytes_of(a)),
            Held::F16(a) => (DType::F16, a.shape(), bytes_of(a)),
            Held::I64(a) => (DType::I64, a.shape(), bytes_of(a)),
            Held::I32(a) => (DType::I32, a.shape(), bytes_of(a)),
            Held::U8(a) => (DType::U8, a.shape(), bytes_of(a)),
            Held::Copied(t) => return t.view(),
        };
        TensorView {
            dtype,
            shape,
            bytes,
        }
    }

    fn is_lent(&self) -> bool {
        !matches!(self, Held::Copied(_))
    }
}

/// `array` (of element type `T`, the host's `own`) lent as it is when the
/// model takes `target` = `own` and the array is C-contiguous and aligned;
/// otherwise copied and converted by the host's rules.
fn hold<'py, T: Element + bytemuck::Pod>(
    array: &Bound<'py, PyUntypedArray>,
    own: DType,
    target: DType,
    lend: fn(PyReadonlyArrayDyn<'py, T>) -> Held<'py>,
    owned: fn(ArrayD<T>) -> Tensor,
) -> Result<Held<'py>, String> {
    let typed = array
        .cast::<PyArrayDyn<T>>()
        .map_err(|e| format!("not an array of {own}: {e}"))?;
    let aligned = (typed.data() as usize) % std::mem::align_of::<T>() == 0;
    if own == target && array.is_c_contiguous() && aligned {
        if let Ok(readonly) = typed.try_readonly() {
            return Ok(lend(readonly));
        }
    }
    let tensor = owned(typed.to_owned_array()).into_standard();
    tensor.convert(target).map(Held::Copied)
}

/// The host's element type of a numpy dtype it reads directly.
fn host_dtype(array: &Bound<'_, PyUntypedArray>) -> Option<DType> {
    let py = array.py();
    let d = array.dtype();
    [
        (dtype::<f32>(py), DType::F32),
        (dtype::<f64>(py), DType::F64),
        (dtype::<f16>(py), DType::F16),
        (dtype::<i64>(py), DType::I64),
        (dtype::<i32>(py), DType::I32),
        (dtype::<u8>(py), DType::U8),
        (dtype::<bool>(py), DType::BOOL),
    ]
    .into_iter()
    .find(|(numpy, _)| d.is_equiv_to(numpy))
    .map(|(_, host)| host)
}

fn held<'py>(array: &Bound<'py, PyUntypedArray>, target: DType) -> Result<Held<'py>, String> {
    let Some(own) = host_dtype(array) else {
        return Err(format!(
            "numpy element type {} is not one the host reads (float16/32/64, int32/64, \
             uint8, bool; other integers are widened to int64 by the package)",
            array.dtype()
        ));
    };
    match own {
        DType::F32 => hold::<f32>(array, own, target, Held::F32, Tensor::F32),
        DType::F64 => hold::<f64>(array, own, target, Held::F64, Tensor::F64),
        DType::F16 => hold::<f16>(array, own, target, Held::F16, Tensor::F16),
        DType::I64 => hold::<i64>(array, own, target, Held::I64, Tensor::I64),
        DType::I32 => hold::<i32>(array, own, target, Held::I32, Tensor::I32),
        DType::U8 => hold::<u8>(array, own, target, Held::U8, Tensor::U8),
        _ => {
            // numpy's bools are bytes 0 and 1, Rust's `bool`: the host keeps
            // bytes, so a bool input is always copied.
            let typed = array
                .cast::<PyArrayDyn<bool>>()
                .map_err(|e| format!("not an array of bool: {e}"))?;
            let bytes = typed.to_owned_array().mapv(u8::from);
            Tensor::Bool(bytes)
                .into_standard()
                .convert(target)
                .map(Held::Copied)
        }
    }
}

fn to_numpy(py: Python<'_>, tensor: Tensor) -> Py<PyAny> {
    match tensor {
        Tensor::F32(a) => a.into_pyarray(py).into_any().unbind(),
        Tensor::F64(a) => a.into_pyarray(py).into_any().unbind(),
        Tensor::F16(a) => a.into_pyarray(py).into_any().unbind(),
        // numpy has no bfloat16: widened to float32, which holds every value.
        Tensor::BF16(a) => a.mapv(bf16::to_f32).into_pyarray(py).into_any().unbind(),
        Tensor::I64(a) => a.into_pyarray(py).into_any().unbind(),
        Tensor::I32(a) => a.into_pyarray(py).into_any().unbind(),
        Tensor::U8(a) => a.into_pyarray(py).into_any().unbind(),
        Tensor::Bool(a) => a.mapv(|b| b != 0).into_pyarray(py).into_any().unbind(),
    }
}

/// A loaded model (`host::embed::Session`); `layerhost.Model` wraps it.
#[pyclass(frozen, module = "layerhost._native")]
struct NativeModel {
    session: Session,
}

#[pymethods]
impl NativeModel {
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        params: Option<PathBuf>,
        plugin_dirs: Vec<PathBuf>,
        threads: usize,
        seed: Option<u64>,
        allow_unused_params: bool,
        isolate: bool,
        timeout: Option<f64>,
        worker_exe: Option<PathBuf>,
    ) -> PyResult<NativeModel> {
        let timeout = timeout
            .map(|s| {
                Duration::try_from_secs_f64(s).map_err(|_| {
                    pyo3::exceptions::PyValueError::new_err(format!(
                        "timeout={s} is not a number of seconds greater than 0"
                    ))
                })
            })
            .transpose()?;
        let options = Options {
            params,
            allow_unused_params,
            plugin_dirs,
            threads,
            seed,
            isolate,
            timeout,
            worker_exe,
        };
        // Loading reads and hashes every plugin library: other Python
        // threads may run meanwhile.
        let session = py.detach(|| Session::open(&path, options)).map_err(to_py)?;
        Ok(NativeModel { session })
    }

    #[getter]
    fn input_names(&self) -> Vec<String> {
        self.session.input_names()
    }

    #[getter]
    fn output_names(&self) -> Vec<String> {
        self.session.output_names()
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.session.model().spec.path.clone()
    }

    /// Runs the model on one array per input, in declared order. Returns
    /// the outputs, in the model's order, and for each input the address of
    /// the memory the host read it from: the array's own when it was lent,
    /// `None` when it was copied.
    #[allow(clippy::type_complexity)]
    fn run<'py>(
        &self,
        py: Python<'py>,
        inputs: Vec<Bound<'py, PyUntypedArray>>,
    ) -> PyResult<(Vec<Py<PyAny>>, Vec<Option<usize>>)> {
        let names = self.session.input_names();
        let mut lent = Vec::with_capacity(inputs.len());
        for (i, array) in inputs.iter().enumerate() {
            let target = host_dtype(array)
                .map(|own| self.session.input_dtype(i, own))
                .unwrap_or(DType::F32);
            let name = names.get(i).map_or("?", String::as_str);
            lent.push(held(array, target).map_err(|message| {
                InputError::new_err(format!(
                    "{}: input '{name}': {message}",
                    self.session.model().spec.path.display()
                ))
            })?);
        }
        let views: Vec<TensorView<'_>> = lent.iter().map(Held::view).collect();
        let addresses = lent
            .iter()
            .zip(&views)
            .map(|(h, v)| h.is_lent().then_some(v.bytes.as_ptr() as usize))
            .collect();
        let session = &self.session;
        let outputs = py.detach(|| session.run(&views)).map_err(to_py)?;
        drop(views);
        drop(lent);
        Ok((
            outputs.into_iter().map(|t| to_numpy(py, t)).collect(),
            addresses,
        ))
    }

    /// `host inspect --json` for the input shapes given by name, as JSON
    /// text.
    fn inspect(&self, py: Python<'_>, shapes: Vec<(String, Vec<usize>)>) -> PyResult<String> {
        let session = &self.session;
        let summary = py.detach(|| session.inspect(&shapes)).map_err(to_py)?;
        Ok(serde_json::to_string(&summary).expect("JSON values serialize"))
    }

    /// Copies of the stored parameters, by full name, in layer order.
    fn params(
        &self,
        py: Python<'_>,
        shapes: Vec<(String, Vec<usize>)>,
    ) -> PyResult<Vec<(String, Py<PyAny>)>> {
        let session = &self.session;
        let params = py.detach(|| session.params(&shapes)).map_err(to_py)?;
        Ok(params
            .into_iter()
            .map(|(name, values)| (name, to_numpy(py, Tensor::F32(values))))
            .collect())
    }

    /// Why inputs of these shapes cannot be split into blocks of rows run
    /// separately, or `None` when they can.
    fn row_sharding_refusal(
        &self,
        py: Python<'_>,
        shapes: Vec<(String, Vec<usize>)>,
    ) -> PyResult<Option<String>> {
        let session = &self.session;
        py.detach(|| session.row_sharding_refusal(&shapes))
            .map_err(to_py)
    }
}

/// Every plugin library in `plugin_dirs` then `LAYER_PLUGIN_PATH`: for
/// each, (name, version, interface, description, path); and a message for
/// each library file that could not be read.
#[pyfunction]
#[allow(clippy::type_complexity)]
fn plugins(
    plugin_dirs: Vec<PathBuf>,
) -> (Vec<(String, String, String, String, PathBuf)>, Vec<String>) {
    let (found, problems) = host::embed::plugins(&plugin_dirs);
    (
        found
            .into_iter()
            .map(|p| (p.name, p.version, p.interface, p.description, p.path))
            .collect(),
        problems,
    )
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<NativeModel>()?;
    m.add_function(wrap_pyfunction!(plugins, m)?)?;
    m.add("Error", py.get_type::<Error>())?;
    m.add("ModelError", py.get_type::<ModelError>())?;
    m.add("PluginError", py.get_type::<PluginError>())?;
    m.add("ParamsError", py.get_type::<ParamsError>())?;
    m.add("InputError", py.get_type::<InputError>())?;
    Ok(())
}
