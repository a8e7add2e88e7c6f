//! `faulty`: a test plugin that passes its input through unchanged, except
//! where its config tells it to fail. Tests use it to check that the host
//! reports each failure, naming the layer, and keeps running, and that
//! `host check-plugin` names the check each broken behaviour fails.

use std::sync::atomic::{AtomicU32, Ordering};

use layer_api::{export_layer, ArrayViewD, ArrayViewMutD, Layer, Params};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    #[default]
    None,
    PanicInNew,
    PanicInShape,
    PanicInForward,
    ErrorInForward,
    /// Fails only on an input holding a negative value: a streamed run then
    /// fails in the chunk that has one, after earlier chunks were written.
    ErrorOnNegativeInput,
    /// Declares one more feature than it writes.
    WrongOutputShape,
    /// Claims batch independence but adds the batch size to every element.
    BatchDependent,
    /// Panics in `forward` when the input has no elements.
    PanicOnEmptyBatch,
    /// Adds the number of calls made so far.
    Nondeterministic,
    /// Adds the number of threads the host lent to the call, less one.
    ThreadDependent,
    /// Panics in a task on the threads the host lent, when it lent some.
    PanicInLentTask,
    /// Divides by zero.
    InfiniteOutput,
    /// Works, but panics when the layer is dropped.
    PanicInDrop,
    /// Works, but its second and later calls to `forward` first create the
    /// file named by $LAYER_TEST_READY, then wait until the file named by
    /// $LAYER_TEST_RELEASE exists (at most a minute, then fail): a test
    /// signals the host at a known point of a streamed run, after a first
    /// chunk was written.
    BlockUntilSignalled,
    /// Works, but its second call to `forward` (on one thread: the second
    /// chunk of a streamed run) truncates the file named by
    /// $LAYER_TEST_TRUNCATE to half its length, after computing: the host
    /// must then refuse the next chunk of a mapped input, not die of SIGBUS.
    TruncateFile,
    /// Plans its output with one more feature on every call after the
    /// first: an `output_shape` that changes between calls.
    ChangingOutputShape,
    // What a hostile or broken plugin does to its process, in `forward`;
    // the isolation tests run each under `--isolate` and `check-plugin`.
    /// Writes through a null pointer: SIGSEGV.
    Segfault,
    /// Calls `std::process::abort`: SIGABRT.
    Abort,
    /// Recurses without end.
    StackOverflow,
    /// Calls `std::process::exit(0)`.
    Exit,
    /// Never returns.
    InfiniteLoop,
    /// Allocates 64 MiB blocks without end (zeroed, so fast: the address
    /// space, not touched memory, is what runs out under `RLIMIT_AS`).
    UnboundedAllocation,
    /// Reads /etc/passwd; fails saying whether it could.
    ReadPasswd,
    /// Creates the file named by $LAYER_TEST_CREATE; fails saying whether
    /// it could.
    CreateFile,
    /// Opens a TCP connection to 127.0.0.1:9; fails saying whether it
    /// could make the socket.
    OpenSocket,
    /// Writes bytes that are no message to its standard input, which in a
    /// worker is the socket to the host, then works.
    GarbageToHost,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultyConfig {
    #[serde(default)]
    pub fail: Failure,
}

pub struct Faulty {
    fail: Failure,
}

impl Layer for Faulty {
    const DESCRIPTION: &'static str = "identity that fails on purpose (for tests)";
    type Config = FaultyConfig;

    fn new(config: FaultyConfig) -> Result<Self, String> {
        if config.fail == Failure::PanicInNew {
            panic!("faulty: told to panic in new");
        }
        Ok(Faulty { fail: config.fail })
    }

    fn output_shape(&self, input_shape: &[usize]) -> Result<Vec<usize>, String> {
        if self.fail == Failure::PanicInShape {
            panic!("faulty: told to panic in output_shape");
        }
        let mut shape = input_shape.to_vec();
        if self.fail == Failure::WrongOutputShape {
            *shape.last_mut().ok_or("needs an input of rank 1 or more")? += 1;
        }
        if self.fail == Failure::ChangingOutputShape {
            static PLANS: AtomicU32 = AtomicU32::new(0);
            let extra = PLANS.fetch_add(1, Ordering::SeqCst) as usize;
            *shape.last_mut().ok_or("needs an input of rank 1 or more")? += extra;
        }
        Ok(shape)
    }

    fn batch_independent(&self) -> bool {
        true
    }

    fn forward(
        &self,
        input: ArrayViewD<'_, f32>,
        _params: &Params<'_>,
        mut output: ArrayViewMutD<'_, f32>,
    ) -> Result<(), String> {
        match self.fail {
            Failure::PanicInForward => panic!("faulty: told to panic in forward"),
            Failure::ErrorInForward => Err("faulty: told to fail in forward".into()),
            Failure::ErrorOnNegativeInput if input.iter().any(|&v| v < 0.0) => {
                Err("faulty: told to fail on a negative input".into())
            }
            Failure::WrongOutputShape => {
                let features = input.shape().last().copied().unwrap_or(1).max(1);
                let x = input.iter().collect::<Vec<_>>();
                let mut y = output.iter_mut().collect::<Vec<_>>();
                for (y_row, x_row) in y.chunks_mut(features + 1).zip(x.chunks(features)) {
                    for (y, x) in y_row.iter_mut().zip(x_row) {
                        **y = **x;
                    }
                }
                Ok(())
            }
            Failure::BatchDependent => {
                let rows = input.shape().first().copied().unwrap_or(1) as f32;
                output.zip_mut_with(&input, |y, &x| *y = x + rows);
                Ok(())
            }
            Failure::PanicOnEmptyBatch if input.is_empty() => {
                panic!("faulty: told to panic on an empty batch")
            }
            Failure::Nondeterministic => {
                static CALLS: AtomicU32 = AtomicU32::new(0);
                let calls = CALLS.fetch_add(1, Ordering::Relaxed) as f32;
                output.zip_mut_with(&input, |y, &x| *y = x + calls);
                Ok(())
            }
            Failure::ThreadDependent => {
                let extra = (layer_api::parallel::threads() - 1) as f32;
                output.zip_mut_with(&input, |y, &x| *y = x + extra);
                Ok(())
            }
            Failure::PanicInLentTask => {
                output.assign(&input);
                let lent = layer_api::parallel::threads() > 1;
                layer_api::parallel::for_each(2, |task| {
                    assert!(!(lent && task == 1), "faulty: told to panic in a lent task");
                });
                Ok(())
            }
            Failure::InfiniteOutput => {
                output.zip_mut_with(&input, |y, &x| *y = x / 0.0);
                Ok(())
            }
            Failure::BlockUntilSignalled => {
                static CALLS: AtomicU32 = AtomicU32::new(0);
                if CALLS.fetch_add(1, Ordering::SeqCst) > 0 {
                    block_until_released()?;
                }
                output.assign(&input);
                Ok(())
            }
            Failure::Segfault => {
                // SAFETY: none; the point is to crash the process.
                unsafe { std::ptr::null_mut::<u8>().write_volatile(1) };
                Ok(())
            }
            Failure::Abort => std::process::abort(),
            Failure::StackOverflow => {
                output.fill(recurse(input.len() as u64) as f32);
                Ok(())
            }
            Failure::Exit => std::process::exit(0),
            Failure::InfiniteLoop => loop {
                std::thread::sleep(std::time::Duration::from_millis(10));
            },
            Failure::UnboundedAllocation => {
                let mut blocks: Vec<Vec<u8>> = Vec::new();
                loop {
                    blocks.push(vec![0u8; 64 << 20]);
                    std::hint::black_box(&blocks);
                }
            }
            Failure::ReadPasswd => Err(match std::fs::read("/etc/passwd") {
                Ok(bytes) => format!("faulty: read /etc/passwd ({} bytes)", bytes.len()),
                Err(e) => format!("faulty: cannot read /etc/passwd: {e}"),
            }),
            Failure::CreateFile => {
                let path = std::env::var_os("LAYER_TEST_CREATE")
                    .ok_or("faulty: LAYER_TEST_CREATE names no file to create")?;
                Err(match std::fs::File::create(&path) {
                    Ok(_) => "faulty: created the file".to_string(),
                    Err(e) => format!("faulty: cannot create a file: {e}"),
                })
            }
            Failure::OpenSocket => Err(match std::net::TcpStream::connect("127.0.0.1:9") {
                Ok(_) => "faulty: connected to 127.0.0.1:9".to_string(),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    "faulty: made a socket (the connection was refused)".to_string()
                }
                Err(e) => format!("faulty: cannot open a socket: {e}"),
            }),
            Failure::GarbageToHost => {
                use std::io::Write;
                use std::os::fd::FromRawFd;
                // SAFETY: none needed beyond the test's: fd 0 is open, and
                // the File is forgotten so it is never closed here.
                let mut stdin = unsafe { std::fs::File::from_raw_fd(0) };
                let _ = stdin.write_all(&[0xff; 64]);
                std::mem::forget(stdin);
                output.assign(&input);
                Ok(())
            }
            Failure::TruncateFile => {
                static CALLS: AtomicU32 = AtomicU32::new(0);
                output.assign(&input);
                if CALLS.fetch_add(1, Ordering::SeqCst) == 1 {
                    truncate_to_half()?;
                }
                Ok(())
            }
            _ => {
                output.assign(&input);
                Ok(())
            }
        }
    }
}

impl Drop for Faulty {
    fn drop(&mut self) {
        // Never while already unwinding: a second panic would abort.
        if self.fail == Failure::PanicInDrop && !std::thread::panicking() {
            panic!("faulty: told to panic in drop");
        }
    }
}

/// See [`Failure::StackOverflow`]: a frame of 64 KiB per call, never the
/// last.
#[inline(never)]
#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth; 8192]);
    recurse(depth + 1).wrapping_add(frame[depth as usize % 8192])
}

/// See [`Failure::BlockUntilSignalled`].
fn block_until_released() -> Result<(), String> {
    if let Some(ready) = std::env::var_os("LAYER_TEST_READY") {
        std::fs::write(&ready, b"").map_err(|e| format!("faulty: LAYER_TEST_READY: {e}"))?;
    }
    let release = std::env::var_os("LAYER_TEST_RELEASE").map(std::path::PathBuf::from);
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(60) {
        if release.as_ref().is_some_and(|r| r.exists()) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err("faulty: never released (LAYER_TEST_RELEASE)".into())
}

/// See [`Failure::TruncateFile`].
fn truncate_to_half() -> Result<(), String> {
    let path = std::env::var_os("LAYER_TEST_TRUNCATE")
        .ok_or("faulty: LAYER_TEST_TRUNCATE names no file to truncate")?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|e| format!("faulty: LAYER_TEST_TRUNCATE: {e}"))?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    file.set_len(len / 2)
        .map_err(|e| format!("faulty: LAYER_TEST_TRUNCATE: {e}"))
}

export_layer!(Faulty);

#[cfg(test)]
mod tests {
    use super::*;
    use layer_api::ndarray::array;
    use layer_api::testing::Harness;
    use layer_api::INPUT;

    #[test]
    fn panic_in_drop_runs_then_panics_when_dropped() {
        let harness = Harness::new::<Faulty>(r#"{"fail": "panic_in_drop"}"#).unwrap();
        let x = array![[1.0f32, -2.0]].into_dyn();
        let outputs = harness.run(vec![(INPUT, x.clone().into())], &[]).unwrap();
        assert_eq!(outputs[0].1, x.into());
        let err = harness.close().unwrap_err();
        assert!(err.contains("faulty: told to panic in drop"), "{err}");

        let harness = Harness::new::<Faulty>("{}").unwrap();
        harness.close().unwrap();
    }
}
