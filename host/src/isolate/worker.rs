//! The worker process: started by the host as `host __layer-worker` with
//! its socket as standard input. It limits its own address space, enters
//! the sandbox, checks and opens one plugin library (the bytes must have
//! the SHA-256 the host checked), then answers the host's requests until
//! the host closes the socket. It never decides anything about a model: it
//! makes the raw calls the host asks for and reports what they returned.

use std::collections::HashMap;
use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};

use abi_stable::std_types::{RSlice, RSliceMut, RStr};
use layer_api::abi::{
    DType, LayerError, LayerHandle, ParamRef, PreparedHandle, TensorDesc, TensorMut, TensorRef,
};

use super::protocol::{self, Param, Piece, Port, ProbeInput, Reply, Request, Slot, Spec};
use super::shm::Mapped;
use crate::registry::{self, LoadedPlugin};
use crate::tensor::Tensor;

/// What the host learns from a worker's exit status when its plugin ran
/// out of memory: the text the Rust runtime prints before aborting.
pub const OUT_OF_MEMORY_TEXT: &str = "memory allocation of";

struct Prepared {
    layer: u64,
    handle: PreparedHandle,
    params: Vec<Param>,
    region: Option<Mapped>,
}

struct Worker {
    plugin: &'static LoadedPlugin,
    layers: HashMap<u64, LayerHandle>,
    prepared: HashMap<u64, Prepared>,
    next_id: u64,
    input: Option<Mapped>,
    output: Option<Mapped>,
}

fn failed(message: impl Into<String>) -> Reply {
    Reply::Failed {
        panicked: false,
        message: message.into(),
    }
}

fn from_layer_error(e: LayerError) -> Reply {
    Reply::Failed {
        panicked: e.panicked,
        message: e.message.into_string(),
    }
}

/// The worker's `main`: returns the process's exit status.
pub fn main() -> i32 {
    // Die with the host, whatever ends it. (The signal is tied to the
    // thread that started the worker: the host starts workers from the
    // thread that loads the model, which lives as long as the model.)
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    let socket: OwnedFd = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => fd,
        Err(_) => return 2,
    };
    let socket = socket.as_fd();
    let Ok(Some((
        Request::Start {
            path,
            name,
            sha256,
            memory_limit,
        },
        _,
    ))) = protocol::receive::<Request>(socket)
    else {
        eprintln!("layer worker: started without a Start request (it is run by the host)");
        return 2;
    };
    let limit = rustix::process::Rlimit {
        current: Some(memory_limit),
        maximum: Some(memory_limit),
    };
    let mut missing = Vec::new();
    if let Err(e) = rustix::process::setrlimit(rustix::process::Resource::As, limit) {
        missing.push(format!("the address-space limit (RLIMIT_AS): {e}"));
    }
    registry::allow_panic_abort();
    missing.extend(super::sandbox::enter(&path));
    let plugin = match registry::load(&path, Some(&name), Some(&sha256)) {
        Ok(plugin) => plugin,
        Err(e) => {
            let _ = protocol::send(socket, &failed(e.to_string()), &[]);
            return 0;
        }
    };
    let started = Reply::Started {
        sandbox: protocol::SandboxReport { missing },
        has_flops: plugin.table.flops().is_some(),
        has_backward: plugin.table.backward().is_some(),
    };
    if protocol::send(socket, &started, &[]).is_err() {
        return 0;
    }
    let mut worker = Worker {
        plugin,
        layers: HashMap::new(),
        prepared: HashMap::new(),
        next_id: 1,
        input: None,
        output: None,
    };
    // Whether this worker is in a run of short calls on one thread that
    // follow each other at once (a small batch through its layers): then
    // the next request is polled for before sleeping. A worker whose calls
    // are far apart sleeps at once, and takes nothing from a busy one.
    let mut latency_bound = false;
    let mut replied_at: Option<std::time::Instant> = None;
    loop {
        if latency_bound {
            protocol::spin_until_readable(socket, protocol::WORKER_SPIN);
        }
        let (request, fds) = match protocol::receive::<Request>(socket) {
            Ok(Some(got)) => got,
            // The host closed the socket: its run is over.
            Ok(None) => return 0,
            Err(e) => {
                eprintln!("layer worker: {e}");
                return 2;
            }
        };
        let one_thread = match &request {
            Request::Forward { pieces, .. } => pieces.len() <= 1,
            _ => true,
        };
        let started = std::time::Instant::now();
        let chained = replied_at.is_some_and(|t| started - t < protocol::SPIN);
        let reply = worker.serve(request, fds);
        latency_bound = one_thread && chained && started.elapsed() < protocol::WORKER_SPIN;
        if protocol::send(socket, &reply, &[]).is_err() {
            return 0;
        }
        replied_at = Some(std::time::Instant::now());
    }
}

fn descs(specs: &[Option<Spec>]) -> Vec<TensorDesc<'_>> {
    specs
        .iter()
        .map(|s| match s {
            Some(s) => TensorDesc {
                dtype: DType(s.dtype),
                shape: RSlice::from_slice(&s.shape),
            },
            None => TensorDesc {
                dtype: DType::ABSENT,
                shape: RSlice::from_slice(&[]),
            },
        })
        .collect()
}

fn ports(ports: &[layer_api::abi::PortDecl]) -> Vec<Port> {
    ports
        .iter()
        .map(|p| Port {
            name: p.name.to_string(),
            optional: p.optional,
            dtypes: p.dtypes.iter().map(|d| d.0).collect(),
        })
        .collect()
}

/// Cuts `bytes` into the disjoint, ascending `ranges` (relative to it).
fn cut<'a>(mut bytes: &'a mut [u8], ranges: &[Range<usize>]) -> Option<Vec<&'a mut [u8]>> {
    let mut taken = 0;
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        if r.start < taken || r.end < r.start {
            return None;
        }
        let rest = std::mem::take(&mut bytes);
        let (_, tail) = rest.split_at_mut_checked(r.start - taken)?;
        let (piece, tail) = tail.split_at_mut_checked(r.len())?;
        out.push(piece);
        bytes = tail;
        taken = r.end;
    }
    Some(out)
}

impl Worker {
    fn layer(&self, id: u64) -> Result<&LayerHandle, Reply> {
        self.layers
            .get(&id)
            .ok_or_else(|| failed(format!("no layer {id} in this worker (a bug in the host)")))
    }

    fn serve(&mut self, request: Request, fds: Vec<OwnedFd>) -> Reply {
        match self.handle(request, fds) {
            Ok(reply) | Err(reply) => reply,
        }
    }

    fn handle(&mut self, request: Request, fds: Vec<OwnedFd>) -> Result<Reply, Reply> {
        let core = &self.plugin.core;
        Ok(match request {
            Request::Start { .. } => failed("the worker was already started"),
            Request::Create { config } => {
                let handle = (core.create)(RStr::from_str(&config))
                    .into_result()
                    .map_err(from_layer_error)?;
                let id = self.next_id;
                self.next_id += 1;
                self.layers.insert(id, handle);
                Reply::Created(id)
            }
            Request::Signature { layer } => {
                let s = (core.signature)(self.layer(layer)?)
                    .into_result()
                    .map_err(from_layer_error)?;
                Reply::Signature {
                    inputs: ports(&s.inputs),
                    outputs: ports(&s.outputs),
                }
            }
            Request::Plan { layer, inputs } => {
                let plan = (core.plan)(self.layer(layer)?, RSlice::from_slice(&descs(&inputs)))
                    .into_result()
                    .map_err(from_layer_error)?;
                Reply::Plan {
                    outputs: plan
                        .outputs
                        .iter()
                        .map(|o| Spec {
                            dtype: o.dtype.0,
                            shape: o.shape.to_vec(),
                        })
                        .collect(),
                    params: plan.params.iter().map(protocol::ParamDecl::from).collect(),
                }
            }
            Request::Flops { layer, inputs } => match self.plugin.table.flops() {
                Some(flops) => Reply::Flops(flops(
                    self.layer(layer)?,
                    RSlice::from_slice(&descs(&inputs)),
                )),
                None => Reply::Flops(0),
            },
            Request::BatchIndependent { layer } => Reply::Bool(
                (core.batch_independent)(self.layer(layer)?)
                    .into_result()
                    .map_err(from_layer_error)?,
            ),
            Request::Probes { layer } => {
                let probes = (core.probes)(self.layer(layer)?)
                    .into_result()
                    .map_err(from_layer_error)?;
                Reply::Probes(
                    probes
                        .iter()
                        .map(|case| {
                            case.inputs
                                .iter()
                                .map(|i| {
                                    i.as_ref().into_option().map(|i| ProbeInput {
                                        shape: i.shape.to_vec(),
                                        dtype: i.dtype.0,
                                        low: i.low,
                                        high: i.high,
                                    })
                                })
                                .collect()
                        })
                        .collect(),
                )
            }
            Request::Prepare {
                layer,
                inputs,
                params,
            } => {
                let region = match fds.into_iter().next() {
                    Some(fd) => Some(
                        Mapped::read_only(fd)
                            .map_err(|e| failed(format!("cannot map the parameters: {e}")))?,
                    ),
                    None => None,
                };
                let handle = match (
                    self.plugin.table.prepare(),
                    self.plugin.table.drop_prepared(),
                ) {
                    (Some(prepare), Some(_)) => {
                        let bytes = region.as_ref().map_or(&[][..], Mapped::bytes);
                        let refs = param_refs(&params, bytes)?;
                        prepare(
                            self.layer(layer)?,
                            RSlice::from_slice(&descs(&inputs)),
                            RSlice::from_slice(&refs),
                        )
                        .into_result()
                        .map_err(from_layer_error)?
                    }
                    _ => PreparedHandle::NONE,
                };
                let id = self.next_id;
                self.next_id += 1;
                self.prepared.insert(
                    id,
                    Prepared {
                        layer,
                        handle,
                        params,
                        region,
                    },
                );
                Reply::Prepared(id)
            }
            Request::DropPrepared { layer, prepared } => {
                let entry = self.prepared.remove(&prepared).ok_or_else(|| {
                    failed(format!("no prepared data {prepared} (a bug in the host)"))
                })?;
                match self.plugin.table.drop_prepared() {
                    Some(drop_prepared) if !entry.handle.0.is_null() => {
                        drop_prepared(self.layer(layer)?, entry.handle)
                            .into_result()
                            .map_err(from_layer_error)?;
                    }
                    _ => {}
                }
                Reply::Done
            }
            Request::Forward {
                layer,
                prepared,
                inputs,
                outputs,
                pieces,
                together,
                lend_threads,
                new_input_region,
                new_output_region,
            } => {
                let mut fds = fds.into_iter();
                let map_failed = |e: std::io::Error| failed(format!("cannot map a region: {e}"));
                if new_input_region {
                    let fd = fds.next().ok_or_else(|| failed("no input region came"))?;
                    self.input = Some(Mapped::read_only(fd).map_err(map_failed)?);
                }
                if new_output_region {
                    let fd = fds.next().ok_or_else(|| failed("no output region came"))?;
                    self.output = Some(Mapped::writable(fd).map_err(map_failed)?);
                }
                let lend = if pieces.is_empty() {
                    crate::pool::shared(lend_threads)
                        .map_err(|e| failed(format!("cannot start threads: {e}")))?
                } else {
                    None
                };
                self.forward(layer, prepared, &inputs, &outputs, &pieces, together, lend)?;
                Reply::Done
            }
            Request::Gradcheck {
                layer,
                inputs,
                params,
                outputs,
                seed,
            } => {
                let region = match fds.into_iter().next() {
                    Some(fd) => Mapped::read_only(fd)
                        .map_err(|e| failed(format!("cannot map the gradcheck's tensors: {e}")))?,
                    None => return Err(failed("no region came with the gradcheck's tensors")),
                };
                let backward =
                    self.plugin.table.backward().ok_or_else(|| {
                        failed("the plugin offers no backward (it is forward-only)")
                    })?;
                let bytes = region.bytes();
                let outside =
                    || failed("a tensor lies outside its shared region (a bug in the host)");
                let owned = |slot: &Slot| -> Result<Tensor, Reply> {
                    let data = bytes.get(slot.bytes.clone()).ok_or_else(outside)?;
                    let mut t = Tensor::zeros(DType(slot.dtype), &slot.shape).map_err(failed)?;
                    if t.bytes().len() != data.len() {
                        return Err(outside());
                    }
                    t.bytes_mut().copy_from_slice(data);
                    Ok(t)
                };
                let inputs: Vec<Option<Tensor>> = inputs
                    .iter()
                    .map(|s| s.as_ref().map(owned).transpose())
                    .collect::<Result<_, _>>()?;
                let values: Vec<Tensor> = params
                    .iter()
                    .map(|p| owned(&p.slot))
                    .collect::<Result<_, _>>()?;
                let mut layer = InWorker {
                    plugin: self.plugin,
                    handle: self.layer(layer)?,
                    backward,
                    names: params.iter().map(|p| p.name.clone()).collect(),
                    outputs: &outputs,
                };
                match crate::gradcheck::compare(&mut layer, &inputs, &values, seed) {
                    Ok(report) => Reply::Gradcheck(report),
                    Err(e) => Reply::Failed {
                        panicked: e.panicked,
                        message: e.message,
                    },
                }
            }
            Request::DropLayer { layer } => {
                let handle = self
                    .layers
                    .remove(&layer)
                    .ok_or_else(|| failed(format!("no layer {layer} (a bug in the host)")))?;
                (core.drop_layer)(handle)
                    .into_result()
                    .map_err(from_layer_error)?;
                Reply::Done
            }
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        layer: u64,
        prepared: u64,
        inputs: &[Option<Slot>],
        outputs: &[Slot],
        pieces: &[Piece],
        together: bool,
        lend: Option<std::sync::Arc<rayon::ThreadPool>>,
    ) -> Result<(), Reply> {
        let entry = self
            .prepared
            .get(&prepared)
            .filter(|p| p.layer == layer)
            .ok_or_else(|| failed(format!("no prepared data {prepared} for layer {layer}")))?;
        let handle = self
            .layers
            .get(&layer)
            .ok_or_else(|| failed(format!("no layer {layer} in this worker")))?;
        let params = param_refs(
            &entry.params,
            entry.region.as_ref().map_or(&[][..], Mapped::bytes),
        )?;
        let in_bytes = self.input.as_ref().map_or(&[][..], Mapped::bytes);
        let bad = || failed("a tensor lies outside its shared region (a bug in the host)");
        let input_bytes: Vec<Option<(&Slot, &[u8])>> = inputs
            .iter()
            .map(|s| match s {
                Some(s) => in_bytes
                    .get(s.bytes.clone())
                    .map(|b| Some((s, b)))
                    .ok_or_else(bad),
                None => Ok(None),
            })
            .collect::<Result<_, _>>()?;
        let out_region = self.output.as_mut().map_or(&mut [][..], Mapped::bytes_mut);
        let ranges: Vec<Range<usize>> = outputs.iter().map(|s| s.bytes.clone()).collect();
        let out_bytes = cut(out_region, &ranges).ok_or_else(bad)?;
        let forward = self.plugin.core.forward;
        let call = |inputs: &[TensorRef<'_>], outputs: &mut [TensorMut<'_>]| {
            forward(
                handle,
                entry.handle,
                RSlice::from_slice(inputs),
                RSlice::from_slice(&params),
                RSliceMut::from_mut_slice(outputs),
            )
            .into_result()
        };
        if pieces.is_empty() {
            let refs: Vec<TensorRef<'_>> = input_bytes.iter().map(whole_ref).collect();
            let mut muts: Vec<TensorMut<'_>> = out_bytes
                .into_iter()
                .zip(outputs)
                .map(|(b, s)| TensorMut {
                    dtype: DType(s.dtype),
                    shape: RSlice::from_slice(&s.shape),
                    data: RSliceMut::from_mut_slice(b),
                })
                .collect();
            let table = &self.plugin.table;
            return crate::pool::lending(table, lend.as_deref(), || call(&refs, &mut muts))
                .map_err(from_layer_error);
        }
        // Each output cut into the pieces' row ranges, in order.
        let mut per_piece: Vec<Vec<&mut [u8]>> = pieces.iter().map(|_| Vec::new()).collect();
        for (o, out) in out_bytes.into_iter().enumerate() {
            let ranges: Vec<Range<usize>> = pieces
                .iter()
                .map(|p| p.outputs.get(o).map_or(0..0, |(_, r)| r.clone()))
                .collect();
            for (k, part) in cut(out, &ranges).ok_or_else(bad)?.into_iter().enumerate() {
                per_piece[k].push(part);
            }
        }
        let failure: std::sync::Mutex<Option<LayerError>> = std::sync::Mutex::new(None);
        let run_piece = |piece: &Piece, refs: Vec<TensorRef<'_>>, ys: Vec<&mut [u8]>| {
            let mut muts: Vec<TensorMut<'_>> = ys
                .into_iter()
                .zip(&piece.outputs)
                .zip(outputs)
                .map(|((y, (shape, _)), s)| TensorMut {
                    dtype: DType(s.dtype),
                    shape: RSlice::from_slice(shape),
                    data: RSliceMut::from_mut_slice(y),
                })
                .collect();
            if let Err(e) = call(&refs, &mut muts) {
                let mut slot = failure.lock().unwrap_or_else(|p| p.into_inner());
                slot.get_or_insert(e);
            }
        };
        if together {
            // Threads of their own, released into `forward` at once.
            let barrier = std::sync::Barrier::new(pieces.len());
            let all_refs = pieces
                .iter()
                .map(|p| piece_refs(&input_bytes, p))
                .collect::<Result<Vec<_>, Reply>>()?;
            std::thread::scope(|scope| {
                for ((piece, ys), refs) in pieces.iter().zip(per_piece).zip(all_refs) {
                    let (barrier, run_piece) = (&barrier, &run_piece);
                    scope.spawn(move || {
                        barrier.wait();
                        run_piece(piece, refs, ys);
                    });
                }
            });
            return match failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
                Some(e) => Err(from_layer_error(e)),
                None => Ok(()),
            };
        }
        // The host cuts a call into at most `--threads` pieces, and lends
        // `--threads` otherwise: one pool of that size serves both.
        let pool = crate::pool::shared(pieces.len().max(2))
            .map_err(|e| failed(format!("cannot start threads: {e}")))?
            .ok_or_else(|| failed("no threads for the pieces (a bug in the host)"))?;
        let outcome: Result<(), Reply> = pool.scope(|scope| {
            for (piece, ys) in pieces.iter().zip(per_piece) {
                let refs = piece_refs(&input_bytes, piece)?;
                let run_piece = &run_piece;
                scope.spawn(move |_| run_piece(piece, refs, ys));
            }
            Ok(())
        });
        outcome?;
        match failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(from_layer_error(e)),
            None => Ok(()),
        }
    }
}

/// A layer of this worker's plugin as the gradcheck loop runs it: each
/// call prepares its parameters (where the plugin can) for itself alone.
struct InWorker<'a> {
    plugin: &'static LoadedPlugin,
    handle: &'a LayerHandle,
    backward: layer_api::abi::BackwardFn,
    /// The parameters' names, in the plan's order.
    names: Vec<String>,
    /// The plan's outputs.
    outputs: &'a [Spec],
}

fn call_failure(during: &str, e: LayerError) -> crate::gradcheck::Failure {
    crate::gradcheck::Failure {
        panicked: e.panicked,
        message: if e.panicked {
            format!("{during} panicked: {}", e.message)
        } else {
            format!("{during} failed: {}", e.message)
        },
    }
}

impl InWorker<'_> {
    /// Runs `body` with the parameters lent and prepared, then frees what
    /// was prepared.
    fn with_prepared<T>(
        &self,
        inputs: &[Option<Tensor>],
        params: &[Tensor],
        body: impl FnOnce(PreparedHandle, &[ParamRef<'_>]) -> Result<T, crate::gradcheck::Failure>,
    ) -> Result<T, crate::gradcheck::Failure> {
        let refs: Vec<ParamRef<'_>> = self
            .names
            .iter()
            .zip(params)
            .map(|(name, t)| ParamRef {
                name: RStr::from_str(name),
                tensor: crate::runtime::tensor_ref(Some(t)),
            })
            .collect();
        let descs: Vec<TensorDesc<'_>> = inputs
            .iter()
            .map(|t| match t {
                Some(t) => TensorDesc {
                    dtype: t.dtype(),
                    shape: RSlice::from_slice(t.shape()),
                },
                None => TensorDesc {
                    dtype: DType::ABSENT,
                    shape: RSlice::from_slice(&[]),
                },
            })
            .collect();
        let table = &self.plugin.table;
        let prepared = match (table.prepare(), table.drop_prepared()) {
            (Some(prepare), Some(_)) => prepare(
                self.handle,
                RSlice::from_slice(&descs),
                RSlice::from_slice(&refs),
            )
            .into_result()
            .map_err(|e| call_failure("prepare", e))?,
            _ => PreparedHandle::NONE,
        };
        let result = body(prepared, &refs);
        if let Some(drop_prepared) = table.drop_prepared() {
            if !prepared.0.is_null() {
                drop_prepared(self.handle, prepared)
                    .into_result()
                    .map_err(|e| call_failure("drop_prepared", e))?;
            }
        }
        result
    }

    fn zeros(&self, dtype: DType, shape: &[usize]) -> Result<Tensor, crate::gradcheck::Failure> {
        Tensor::zeros(dtype, shape).map_err(|message| crate::gradcheck::Failure {
            panicked: false,
            message,
        })
    }
}

impl crate::gradcheck::Differentiable for InWorker<'_> {
    fn forward(
        &mut self,
        inputs: &[Option<Tensor>],
        params: &[Tensor],
    ) -> Result<Vec<Tensor>, crate::gradcheck::Failure> {
        let mut outputs: Vec<Tensor> = self
            .outputs
            .iter()
            .map(|o| self.zeros(DType(o.dtype), &o.shape))
            .collect::<Result<_, _>>()?;
        self.with_prepared(inputs, params, |prepared, refs| {
            let input_refs: Vec<TensorRef<'_>> = inputs
                .iter()
                .map(|t| crate::runtime::tensor_ref(t.as_ref()))
                .collect();
            let mut muts: Vec<TensorMut<'_>> = outputs
                .iter_mut()
                .zip(self.outputs)
                .map(|(t, o)| TensorMut {
                    dtype: DType(o.dtype),
                    shape: RSlice::from_slice(&o.shape),
                    data: RSliceMut::from_mut_slice(t.bytes_mut()),
                })
                .collect();
            (self.plugin.core.forward)(
                self.handle,
                prepared,
                RSlice::from_slice(&input_refs),
                RSlice::from_slice(refs),
                RSliceMut::from_mut_slice(&mut muts),
            )
            .into_result()
            .map_err(|e| call_failure("forward", e))
        })?;
        Ok(outputs)
    }

    fn backward(
        &mut self,
        inputs: &[Option<Tensor>],
        params: &[Tensor],
        outputs: &[Tensor],
        output_grads: &[Option<Tensor>],
    ) -> Result<(Vec<Option<Tensor>>, Vec<Tensor>), crate::gradcheck::Failure> {
        let mut input_grads: Vec<Option<Tensor>> = inputs
            .iter()
            .map(|t| match t {
                Some(t) if crate::gradcheck::is_checked_float(t.dtype()) => {
                    self.zeros(t.dtype(), t.shape()).map(Some)
                }
                _ => Ok(None),
            })
            .collect::<Result<_, _>>()?;
        let mut param_grads: Vec<Option<Tensor>> = params
            .iter()
            .map(|p| self.zeros(DType::F32, p.shape()).map(Some))
            .collect::<Result<_, _>>()?;
        let backward = self.backward;
        self.with_prepared(inputs, params, |prepared, refs| {
            let input_refs = crate::runtime::tensor_refs(inputs.iter().map(Option::as_ref));
            let output_refs = crate::runtime::tensor_refs(outputs.iter().map(Some));
            let grad_refs = crate::runtime::tensor_refs(output_grads.iter().map(Option::as_ref));
            let input_shapes = crate::runtime::grad_shapes(&input_grads);
            let param_shapes = crate::runtime::grad_shapes(&param_grads);
            let mut input_muts = crate::runtime::grad_muts(&mut input_grads, &input_shapes);
            let mut param_muts = crate::runtime::grad_muts(&mut param_grads, &param_shapes);
            backward(
                self.handle,
                prepared,
                RSlice::from_slice(&input_refs),
                RSlice::from_slice(refs),
                RSlice::from_slice(&output_refs),
                RSlice::from_slice(&grad_refs),
                RSliceMut::from_mut_slice(&mut input_muts),
                RSliceMut::from_mut_slice(&mut param_muts),
            )
            .into_result()
            .map_err(|e| call_failure("backward", e))
        })?;
        let param_grads = param_grads.into_iter().flatten().collect();
        Ok((input_grads, param_grads))
    }
}

/// The inputs of one piece: its rows of each input, or the whole input.
fn piece_refs<'a>(
    inputs: &[Option<(&'a Slot, &'a [u8])>],
    piece: &'a Piece,
) -> Result<Vec<TensorRef<'a>>, Reply> {
    inputs
        .iter()
        .zip(&piece.inputs)
        .map(|(i, p)| match (i, p) {
            (Some((s, b)), Some((shape, range))) => {
                Ok(TensorRef {
                    dtype: DType(s.dtype),
                    shape: RSlice::from_slice(shape),
                    data: RSlice::from_slice(b.get(range.clone()).ok_or_else(|| {
                        failed("a piece lies outside its input (a bug in the host)")
                    })?),
                })
            }
            (i, _) => Ok(whole_ref(i)),
        })
        .collect()
}

/// A whole input as the plugin sees it.
fn whole_ref<'a>(i: &Option<(&'a Slot, &'a [u8])>) -> TensorRef<'a> {
    match i {
        Some((s, b)) => TensorRef {
            dtype: DType(s.dtype),
            shape: RSlice::from_slice(&s.shape),
            data: RSlice::from_slice(b),
        },
        None => absent(),
    }
}

fn absent() -> TensorRef<'static> {
    TensorRef {
        dtype: DType::ABSENT,
        shape: RSlice::from_slice(&[]),
        data: RSlice::from_slice(&[]),
    }
}

fn param_refs<'a>(params: &'a [Param], region: &'a [u8]) -> Result<Vec<ParamRef<'a>>, Reply> {
    params
        .iter()
        .map(|p| {
            let data = region.get(p.slot.bytes.clone()).ok_or_else(|| {
                failed(format!(
                    "parameter '{}' lies outside its shared region (a bug in the host)",
                    p.name
                ))
            })?;
            Ok(ParamRef {
                name: RStr::from_str(&p.name),
                tensor: TensorRef {
                    dtype: DType(p.slot.dtype),
                    shape: RSlice::from_slice(&p.slot.shape),
                    data: RSlice::from_slice(data),
                },
            })
        })
        .collect()
}
