//! Isolation: running a plugin in a worker process of its own, so that a
//! plugin that crashes, aborts, exits, hangs or allocates without end costs
//! an error message, not the host. One worker per plugin library of a
//! model, started once and reused for every call; tensors cross through
//! shared memory ([`shm`]); the worker sandboxes itself ([`sandbox`])
//! before it opens the library. The host side is [`Worker`]; the worker's
//! own loop is [`worker::main`].

mod protocol;
mod sandbox;
mod shm;
pub mod worker;

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

pub use protocol::{ParamDecl, Piece, Port, ProbeInput, Reply, Request, Slot, Spec};

use crate::registry::{CheckedPlugin, PluginError};
use crate::tensor::TensorView;

/// The hidden first argument that makes the `host` binary a worker.
pub const WORKER_ARG: &str = "__layer-worker";

/// What to do when the kernel cannot give part of the sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SandboxPolicy {
    /// Say once which protection is missing, and run with the rest.
    #[default]
    Warn,
    /// Refuse to run the plugin.
    Require,
}

/// How plugins are isolated in this process (the command line's
/// `--isolate`, `--timeout`, `--sandbox`).
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Isolate every layer, whatever the model file says.
    pub all: bool,
    /// The longest one call into an isolated plugin may take.
    pub timeout: Option<Duration>,
    pub sandbox: SandboxPolicy,
    /// The executable started as a worker (`host`, which turns worker when
    /// its first argument is [`WORKER_ARG`]); `None`: this process's own,
    /// which is right for the `host` command line. A program that embeds
    /// the host as a library names a `host` binary here.
    pub worker_exe: Option<std::path::PathBuf>,
}

static SETTINGS: RwLock<Option<Settings>> = RwLock::new(None);

/// Sets how plugins are isolated from now on.
pub fn configure(settings: Settings) {
    *SETTINGS.write().unwrap_or_else(|p| p.into_inner()) = Some(settings);
}

/// How plugins are isolated now.
pub fn settings() -> Settings {
    SETTINGS
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_default()
}

/// How [`Worker::forward`] runs a call.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallMode {
    pub prefill: bool,
    pub together: bool,
    /// When the call has no pieces: the threads of the worker's pool to
    /// lend to it (interface 1.3); below 2, none.
    pub lend_threads: usize,
}

/// A call into an isolated plugin that did not succeed.
#[derive(Debug, Clone)]
pub enum CallError {
    /// The plugin returned an error, or panicked and the panic was caught.
    Layer { panicked: bool, message: String },
    /// The worker died or was killed: what happened, as "crashed: SIGSEGV
    /// (segmentation fault) in forward", and the end of its stderr.
    Worker { message: String, stderr: String },
}

/// How much of a worker's stderr is kept, for the error that reports its
/// death (and `--verbose`).
const STDERR_TAIL: usize = 8192;

/// The smallest address-space limit a worker gets, whatever the memory
/// budget: the executable, the C library and thread stacks need some.
const MIN_ADDRESS_SPACE: u64 = 512 << 20;

/// A worker process running one plugin library, as the host sees it.
pub struct Worker {
    pub plugin: String,
    pub has_flops: bool,
    /// Whether the plugin's table has `backward` (interface 1.2).
    pub has_backward: bool,
    state: Mutex<State>,
}

struct State {
    /// `None` once the worker is gone.
    conn: Option<Connection>,
    /// Why the worker is gone, for calls after its death.
    dead: Option<CallError>,
    input: Option<shm::Region>,
    output: Option<shm::Region>,
    memory_limit: u64,
    timeout: Option<Duration>,
}

struct Connection {
    child: Child,
    socket: OwnedFd,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_closed: mpsc::Receiver<()>,
}

/// The sandbox protections missing on this machine, said once a process.
static WARNED: std::sync::Once = std::sync::Once::new();

impl Worker {
    /// Starts a worker for the checked library `plugin`, which the worker
    /// opens (after checking its bytes again) inside its sandbox.
    pub fn start(plugin: &CheckedPlugin) -> Result<Worker, PluginError> {
        let settings = settings();
        let init_error = |message: String| PluginError::Init {
            path: plugin.path.clone(),
            message,
        };
        let exe = match &settings.worker_exe {
            Some(exe) => exe.clone(),
            None => std::env::current_exe().map_err(|e| {
                init_error(format!(
                    "cannot find the host executable to start its worker: {e}"
                ))
            })?,
        };
        let (ours, theirs) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::STREAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| init_error(format!("cannot make a socket for its worker: {e}")))?;
        let mut child = Command::new(exe)
            .arg(WORKER_ARG)
            .arg(&plugin.manifest.name)
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // A group of its own: Ctrl-C reaches the host, which cleans up
            // and exits; the worker then dies with it (its parent-death
            // signal), instead of racing it to report an interrupted call.
            .process_group(0)
            .spawn()
            .map_err(|e| init_error(format!("cannot start its worker process: {e}")))?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (closed_tx, stderr_closed) = mpsc::channel();
        if let Some(mut pipe) = child.stderr.take() {
            let tail = Arc::clone(&stderr);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
                    tail.extend_from_slice(&buf[..n]);
                    if tail.len() > STDERR_TAIL {
                        let cut = tail.len() - STDERR_TAIL;
                        tail.drain(..cut);
                    }
                }
                let _ = closed_tx.send(());
            });
        }
        let memory_limit = crate::budget::limit().max(MIN_ADDRESS_SPACE);
        let worker = Worker {
            plugin: plugin.manifest.name.clone(),
            has_flops: false,
            has_backward: false,
            state: Mutex::new(State {
                conn: Some(Connection {
                    child,
                    socket: ours,
                    stderr,
                    stderr_closed,
                }),
                dead: None,
                input: None,
                output: None,
                memory_limit,
                timeout: settings.timeout,
            }),
        };
        let start = Request::Start {
            path: plugin.path.clone(),
            name: plugin.manifest.name.clone(),
            sha256: plugin.sha256.clone(),
            memory_limit,
        };
        let reply = worker
            .call(&start, &[], "opening the library")
            .map_err(|e| match e {
                CallError::Layer { message, .. } => PluginError::InWorker(message),
                CallError::Worker { message, .. } => init_error(format!("its worker {message}")),
            })?;
        let Reply::Started {
            sandbox,
            has_flops,
            has_backward,
        } = reply
        else {
            return Err(init_error(
                "its worker gave an unexpected answer when started".into(),
            ));
        };
        if !sandbox.missing.is_empty() {
            let missing = sandbox.missing.join("; ");
            if settings.sandbox == SandboxPolicy::Require {
                return Err(init_error(format!(
                    "--sandbox require: the sandbox is incomplete on this machine ({missing}); \
                     run without --sandbox require to accept that"
                )));
            }
            WARNED.call_once(|| {
                eprintln!("warning: isolated plugins run with an incomplete sandbox: {missing}");
            });
        }
        Ok(Worker {
            has_flops,
            has_backward,
            ..worker
        })
    }

    /// Whether the worker process still runs.
    pub fn is_alive(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .dead
            .is_none()
    }

    /// Sends `request` (with `fds`) and waits for the answer; `during`
    /// names the call for the message if the worker dies in it.
    pub fn call(
        &self,
        request: &Request,
        fds: &[BorrowedFd<'_>],
        during: &str,
    ) -> Result<Reply, CallError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.call(request, fds, during, true)
    }

    /// Runs `forward` in the worker: copies the inputs into the shared
    /// input region, sends where each tensor lies, and copies the outputs
    /// back from the shared output region. Pieces are row ranges run on
    /// the worker's threads. With `mode.prefill`, the outputs' present
    /// contents are copied in first, so that elements the layer leaves
    /// unwritten come back as they were (what `check-plugin` looks for);
    /// with `mode.together`, the pieces enter `forward` at once.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        layer: u64,
        prepared: u64,
        inputs: &[Option<TensorView<'_>>],
        outputs: &mut [(u32, &[usize], &mut [u8])],
        pieces: Vec<Piece>,
        mode: CallMode,
    ) -> Result<(), CallError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // The run's threads copy large tensors in and out, while the
        // worker waits (as many as the call's pieces: `--threads` at most).
        let ways = pieces.len().max(1);
        let mut offset = 0;
        let in_slots: Vec<Option<Slot>> = inputs
            .iter()
            .map(|i| {
                i.as_ref().map(|v| {
                    let start = shm::aligned(offset);
                    offset = start + v.bytes.len();
                    Slot {
                        dtype: v.dtype.0,
                        shape: v.shape.to_vec(),
                        bytes: start..offset,
                    }
                })
            })
            .collect();
        let in_len = offset;
        let mut offset = 0;
        let out_slots: Vec<Slot> = outputs
            .iter()
            .map(|(dtype, shape, bytes)| {
                let start = shm::aligned(offset);
                offset = start + bytes.len();
                Slot {
                    dtype: *dtype,
                    shape: shape.to_vec(),
                    bytes: start..offset,
                }
            })
            .collect();
        let out_len = offset;
        let grow = |region: &mut Option<shm::Region>, len: usize, name: &str| match region {
            Some(r) if r.len() >= len => Ok(false),
            _ => {
                let old = region.as_ref().map_or(0, shm::Region::len);
                let size = len.max(old.saturating_mul(2)).max(4096);
                *region = Some(shm::Region::new(name, size)?);
                Ok(true)
            }
        };
        let region_error = |e: std::io::Error| CallError::Worker {
            message: format!("could not be given its tensors: cannot make shared memory: {e}"),
            stderr: String::new(),
        };
        let new_input = grow(&mut state.input, in_len, "layer-inputs").map_err(region_error)?;
        let new_output = grow(&mut state.output, out_len, "layer-outputs").map_err(region_error)?;
        {
            let region = state.input.as_mut().expect("made above").bytes_mut();
            for (slot, input) in in_slots.iter().zip(inputs) {
                if let (Some(slot), Some(v)) = (slot, input) {
                    copy(&mut region[slot.bytes.clone()], v.bytes, ways);
                }
            }
        }
        if mode.prefill {
            let region = state.output.as_mut().expect("made above").bytes_mut();
            for (slot, (_, _, out)) in out_slots.iter().zip(outputs.iter()) {
                region[slot.bytes.clone()].copy_from_slice(out);
            }
        }
        let mut fds: Vec<OwnedFd> = Vec::new();
        if new_input {
            let fd = state
                .input
                .as_ref()
                .expect("made above")
                .read_only_fd()
                .map_err(region_error)?;
            fds.push(fd);
        }
        if new_output {
            let fd = state
                .output
                .as_ref()
                .expect("made above")
                .fd()
                .try_clone_to_owned()
                .map_err(region_error)?;
            fds.push(fd);
        }
        // While the worker runs pieces on every core, polling for its
        // answer would take a core from it.
        let spin = pieces.len() <= 1 && mode.lend_threads <= 1;
        let request = Request::Forward {
            layer,
            prepared,
            inputs: in_slots,
            outputs: out_slots.clone(),
            pieces,
            together: mode.together,
            lend_threads: mode.lend_threads,
            new_input_region: new_input,
            new_output_region: new_output,
        };
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
        match state.call(&request, &borrowed, "forward", spin)? {
            Reply::Done => {}
            other => return Err(unexpected(other)),
        }
        let region = state.output.as_ref().expect("made above").bytes();
        for (slot, (_, _, out)) in out_slots.iter().zip(outputs.iter_mut()) {
            copy(out, &region[slot.bytes.clone()], ways);
        }
        Ok(())
    }

    /// Puts `params` in a sealed region and asks the worker to prepare.
    pub fn prepare(
        &self,
        layer: u64,
        inputs: Vec<Option<Spec>>,
        params: &[(String, u32, &[usize], &[u8])],
    ) -> Result<u64, CallError> {
        let mut bytes = Vec::new();
        let mut decls = Vec::with_capacity(params.len());
        for (name, dtype, shape, data) in params {
            let start = shm::aligned(bytes.len());
            bytes.resize(start, 0);
            bytes.extend_from_slice(data);
            decls.push(protocol::Param {
                name: name.clone(),
                slot: Slot {
                    dtype: *dtype,
                    shape: shape.to_vec(),
                    bytes: start..bytes.len(),
                },
            });
        }
        let region =
            crate::sealed::sealed_file("layer-params", &bytes).map_err(|e| CallError::Worker {
                message: format!("could not be given its parameters: {e}"),
                stderr: String::new(),
            })?;
        let request = Request::Prepare {
            layer,
            inputs,
            params: decls,
        };
        match self.call(&request, &[region.as_fd()], "prepare")? {
            Reply::Prepared(id) => Ok(id),
            other => Err(unexpected(other)),
        }
    }

    /// Runs check-plugin's gradcheck ([`crate::gradcheck::compare`]) in the
    /// worker, on `inputs` (one per declared input) and `params` (name,
    /// dtype, shape, bytes, in the plan's order), for a plan whose outputs
    /// are `outputs`; both are put in one sealed region.
    pub fn gradcheck(
        &self,
        layer: u64,
        inputs: &[Option<TensorView<'_>>],
        params: &[(String, u32, &[usize], &[u8])],
        outputs: Vec<Spec>,
        seed: u64,
    ) -> Result<crate::gradcheck::GradReport, CallError> {
        let mut bytes = Vec::new();
        let mut place = |data: &[u8]| {
            let start = shm::aligned(bytes.len());
            bytes.resize(start, 0);
            bytes.extend_from_slice(data);
            start..bytes.len()
        };
        let input_slots: Vec<Option<Slot>> = inputs
            .iter()
            .map(|t| {
                t.as_ref().map(|t| Slot {
                    dtype: t.dtype.0,
                    shape: t.shape.to_vec(),
                    bytes: place(t.bytes),
                })
            })
            .collect();
        let param_slots: Vec<protocol::Param> = params
            .iter()
            .map(|(name, dtype, shape, data)| protocol::Param {
                name: name.clone(),
                slot: Slot {
                    dtype: *dtype,
                    shape: shape.to_vec(),
                    bytes: place(data),
                },
            })
            .collect();
        let region = crate::sealed::sealed_file("layer-gradcheck", &bytes).map_err(|e| {
            CallError::Worker {
                message: format!("could not be given the gradcheck's tensors: {e}"),
                stderr: String::new(),
            }
        })?;
        let request = Request::Gradcheck {
            layer,
            inputs: input_slots,
            params: param_slots,
            outputs,
            seed,
        };
        match self.call(&request, &[region.as_fd()], "backward (gradcheck)")? {
            Reply::Gradcheck(report) => Ok(report),
            other => Err(unexpected(other)),
        }
    }
}

/// Tensors smaller than this are copied on one thread.
const PARALLEL_COPY_BYTES: usize = 4 << 20;

/// `dst.copy_from_slice(src)`, on up to `ways` threads for large tensors.
fn copy(dst: &mut [u8], src: &[u8], ways: usize) {
    if ways < 2 || src.len() < PARALLEL_COPY_BYTES {
        dst.copy_from_slice(src);
        return;
    }
    let chunk = src.len().div_ceil(ways).next_multiple_of(shm::ALIGN);
    std::thread::scope(|scope| {
        for (d, s) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
            scope.spawn(move || d.copy_from_slice(s));
        }
    });
}

/// An answer of the wrong kind: the worker is not the host's own code
/// running as expected.
pub fn unexpected(reply: Reply) -> CallError {
    match reply {
        Reply::Failed { panicked, message } => CallError::Layer { panicked, message },
        other => CallError::Worker {
            message: format!("gave an answer out of turn ({})", reply_kind(&other)),
            stderr: String::new(),
        },
    }
}

fn reply_kind(reply: &Reply) -> &'static str {
    match reply {
        Reply::Started { .. } => "started",
        Reply::Created(_) => "created",
        Reply::Signature { .. } => "signature",
        Reply::Plan { .. } => "plan",
        Reply::Flops(_) => "flops",
        Reply::Bool(_) => "bool",
        Reply::Probes(_) => "probes",
        Reply::Prepared(_) => "prepared",
        Reply::Done => "done",
        Reply::Gradcheck(_) => "gradcheck",
        Reply::Failed { .. } => "failed",
    }
}

impl State {
    /// One request and its answer; with `spin`, the answer is polled for a
    /// moment before the host sleeps waiting for it.
    fn call(
        &mut self,
        request: &Request,
        fds: &[BorrowedFd<'_>],
        during: &str,
        spin: bool,
    ) -> Result<Reply, CallError> {
        if let Some(dead) = &self.dead {
            return Err(match dead {
                CallError::Worker { message, stderr } => CallError::Worker {
                    message: format!("is unavailable: its worker {message} earlier"),
                    stderr: stderr.clone(),
                },
                other => other.clone(),
            });
        }
        let conn = self.conn.as_mut().expect("alive while not dead");
        // What ended the call, when no answer came: the worker's end (a
        // closed socket), or something the host killed it for.
        let killed_for = match protocol::send(conn.socket.as_fd(), request, fds) {
            Err(_) => None,
            // A short call's answer is caught while polling; without a
            // timeout, the read itself waits after that.
            Ok(()) => match match (
                spin && protocol::spin_until_readable(conn.socket.as_fd(), protocol::SPIN),
                self.timeout,
            ) {
                (true, _) | (false, None) => Ok(true),
                (false, Some(t)) => protocol::readable(conn.socket.as_fd(), Some(t)),
            } {
                Ok(true) => match protocol::receive::<Reply>(conn.socket.as_fd()) {
                    Ok(Some((Reply::Failed { panicked, message }, _))) => {
                        return Err(CallError::Layer { panicked, message })
                    }
                    Ok(Some((reply, _))) => return Ok(reply),
                    Ok(None) => None,
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => None,
                    Err(e) if e.raw_os_error().is_some() => None,
                    // Bytes that are no message: whatever wrote them, the
                    // worker can no longer be trusted to answer.
                    Err(e) => Some(format!(
                        "sent something that is not an answer in {during} ({e}; its worker was \
                         killed)"
                    )),
                },
                Ok(false) => Some(format!(
                    "exceeded --timeout {} in {during} (its worker was killed)",
                    seconds(self.timeout.unwrap_or_default())
                )),
                Err(_) => None,
            },
        };
        if killed_for.is_some() {
            let _ = conn.child.kill();
        }
        let error = match (self.bury(during), killed_for) {
            (CallError::Worker { stderr, .. }, Some(message)) => {
                CallError::Worker { message, stderr }
            }
            (error, _) => error,
        };
        self.dead = Some(error.clone());
        Err(error)
    }

    /// Reaps a worker that closed its socket or is being killed, and says
    /// what became of it.
    fn bury(&mut self, during: &str) -> CallError {
        let Some(mut conn) = self.conn.take() else {
            return CallError::Worker {
                message: format!("is gone ({during})"),
                stderr: String::new(),
            };
        };
        drop(conn.socket);
        let status = wait_at_most(&mut conn.child, Duration::from_secs(2));
        // The stderr pipe closes when the process is gone; its last words
        // come before that.
        let _ = conn.stderr_closed.recv_timeout(Duration::from_millis(500));
        let stderr =
            String::from_utf8_lossy(&conn.stderr.lock().unwrap_or_else(|p| p.into_inner()))
                .into_owned();
        let message = describe_death(status, &stderr, self.memory_limit, during);
        CallError::Worker { message, stderr }
    }
}

impl Drop for State {
    fn drop(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            // Closing the socket tells the worker to exit; one that does not
            // is killed.
            drop(conn.socket);
            wait_at_most(&mut conn.child, Duration::from_secs(1));
        }
    }
}

/// How a worker ended.
enum End {
    /// By itself, with this status.
    Exited(ExitStatus),
    /// Alive past the limit: the host killed it.
    Killed,
    /// Its status could not be read.
    Unknown,
}

/// Waits for `child` to end, killing it if it has not within `limit`.
fn wait_at_most(child: &mut Child, limit: Duration) -> End {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return End::Exited(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return End::Killed;
            }
            Err(_) => return End::Unknown,
        }
    }
}

fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s}s")
    } else {
        format!("{s:.3}s")
    }
}

/// What a worker's end says, as the tail of "layer 'x' (plugin 'y') …".
fn describe_death(end: End, stderr: &str, limit: u64, during: &str) -> String {
    if stderr.contains(worker::OUT_OF_MEMORY_TEXT) {
        return format!("ran out of memory (limit {limit} bytes) in {during}");
    }
    if stderr.contains("has overflowed its stack") {
        return format!("overflowed its stack in {during}");
    }
    let status = match end {
        End::Exited(status) => status,
        End::Killed => {
            return format!(
                "stopped answering in {during}: it closed its connection to the host or sent \
                 something that is not an answer (its worker was killed)"
            )
        }
        End::Unknown => return format!("ended in {during}, and its exit status could not be read"),
    };
    if let Some(code) = status.code() {
        return format!("exited with status {code} during {during}");
    }
    match status.signal() {
        Some(libc::SIGABRT) => format!("aborted in {during}"),
        Some(libc::SIGKILL) => format!("was killed (SIGKILL) in {during}"),
        Some(signal) => format!("crashed: {} in {during}", signal_name(signal)),
        None => format!("ended in {during} ({status})"),
    }
}

fn signal_name(signal: i32) -> String {
    let (name, what) = match signal {
        libc::SIGSEGV => ("SIGSEGV", "segmentation fault"),
        libc::SIGBUS => ("SIGBUS", "bus error"),
        libc::SIGILL => ("SIGILL", "illegal instruction"),
        libc::SIGFPE => ("SIGFPE", "arithmetic exception"),
        libc::SIGTRAP => ("SIGTRAP", "trace trap"),
        libc::SIGSYS => ("SIGSYS", "bad system call"),
        libc::SIGTERM => ("SIGTERM", "terminated"),
        libc::SIGINT => ("SIGINT", "interrupted"),
        libc::SIGPIPE => ("SIGPIPE", "broken pipe"),
        other => return format!("signal {other}"),
    };
    format!("{name} ({what})")
}
