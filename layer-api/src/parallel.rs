//! Spreading one call's work over the host's threads.
//!
//! The host splits a large batch across its threads by itself, calling
//! `forward` once per piece of rows. A small batch (one row, a few dozen)
//! is not worth cutting into rows, so the host runs it as one call and
//! lends that call its thread pool instead: inside `forward` or `backward`,
//! [`threads`] says how many threads were lent and [`for_each`] runs tasks
//! on them. Outside such a call (a piece of a split batch, a host older than
//! interface 1.3, a plain `cargo test`) [`threads`] is 1 and [`for_each`]
//! runs the tasks one after the other on the calling thread, so a layer
//! never starts threads of its own and never needs to know which case it is
//! in.
//!
//! The host expects the same bits whatever the threads: split the work so
//! that each output element is computed the same way whichever task
//! computes it (split a product's output columns, never its sum).
//!
//! ```
//! use layer_api::parallel;
//!
//! // Doubles a slice in blocks, on the lent threads if there are any.
//! fn double(x: &[f32], y: &mut [f32]) {
//!     let len = x.len().div_ceil(parallel::threads()).max(1);
//!     parallel::for_each_part(y.chunks_mut(len).collect(), |b, y| {
//!         for (y, x) in y.iter_mut().zip(&x[b * len..]) {
//!             *y = 2.0 * x;
//!         }
//!     });
//! }
//! # let x = [1.0, 2.0, 3.0];
//! # let mut y = [0.0; 3];
//! # double(&x, &mut y);
//! # assert_eq!(y, [2.0, 4.0, 6.0]);
//! ```

use std::any::Any;
use std::cell::Cell;
use std::ffi::c_void;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Mutex;

use crate::abi::HostPool;
use crate::adapter::{capturing, set_last_panic, take_last_panic};

thread_local! {
    /// The pool the host lent to calls on this thread, if any.
    static LENT: Cell<Option<HostPool>> = const { Cell::new(None) };
}

/// The table entry `lend_pool`: starts or ends a loan on this thread. Never
/// unwinds (a thread whose locals are being destroyed keeps no loan).
pub(crate) extern "C" fn lend_pool(pool: Option<&HostPool>) {
    let _ = LENT.try_with(|lent| lent.set(pool.copied()));
}

fn lent() -> Option<HostPool> {
    LENT.try_with(Cell::get).ok().flatten()
}

/// How many threads this call may spread its work over: the host's, when it
/// lent them to this call, else 1.
pub fn threads() -> usize {
    lent().map_or(1, |pool| pool.threads.max(1))
}

/// Runs `task(i)` once for every `i` in `0..tasks`, on the threads the host
/// lent to this call (in any order, several at once), or one after the
/// other on this thread when it lent none. Returns when every task has
/// returned. A panic in a task is raised again here once all have ended.
/// Tasks that call `for_each` themselves run their inner tasks in turn.
pub fn for_each<F: Fn(usize) + Sync>(tasks: usize, task: F) {
    let pool = match lent() {
        Some(pool) if tasks > 1 => pool,
        _ => {
            (0..tasks).for_each(task);
            return;
        }
    };
    let shared = Shared {
        task: &task,
        panic: Mutex::new(None),
    };
    // No loan while the tasks run: a task the pool runs on this thread must
    // not hand the pool out again.
    lend_pool(None);
    (pool.run)(
        pool.context,
        tasks,
        run_task::<F>,
        std::ptr::from_ref(&shared).cast::<c_void>(),
    );
    lend_pool(Some(&pool));
    let caught = shared.panic.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some((message, payload)) = caught {
        set_last_panic(message);
        panic::resume_unwind(payload);
    }
}

/// What the tasks of one [`for_each`] share: the task, and the first panic
/// one of them raised (its message, as the panic hook recorded it).
struct Shared<'a, F> {
    task: &'a F,
    #[allow(clippy::type_complexity)]
    panic: Mutex<Option<(Option<String>, Box<dyn Any + Send>)>>,
}

/// The [`HostPool::run`] task: runs one task and keeps its panic, which must
/// not unwind into the host's pool.
extern "C" fn run_task<F: Fn(usize) + Sync>(data: *const c_void, index: usize) {
    // SAFETY: `data` is the `Shared<F>` that `for_each` passed to `run`,
    // which outlives the call, and `run` returns only after every task has.
    let shared = unsafe { &*data.cast::<Shared<'_, F>>() };
    let result = capturing(|| panic::catch_unwind(AssertUnwindSafe(|| (shared.task)(index))));
    if let Err(payload) = result {
        let message = take_last_panic();
        let mut slot = shared.panic.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some((message, payload));
        } else {
            // Only the first is reported; dropping another payload could
            // itself panic, so it is leaked.
            std::mem::forget(payload);
        }
    }
}

/// Runs `task(i, part)` once for each of `parts` (the `i`th), as
/// [`for_each`] does: how each task gets its own piece of an output (rows
/// from `chunks_mut`, column blocks from `ndarray`'s `split_at`).
pub fn for_each_part<T: Send, F: Fn(usize, T) + Sync>(parts: Vec<T>, task: F) {
    let slots: Vec<Mutex<Option<T>>> = parts.into_iter().map(|p| Mutex::new(Some(p))).collect();
    for_each(slots.len(), |i| {
        let part = slots[i].lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(part) = part {
            task(i, part);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_loan_tasks_run_in_order_on_this_thread() {
        assert_eq!(threads(), 1);
        let seen = Mutex::new(Vec::new());
        let me = std::thread::current().id();
        for_each(4, |i| {
            assert_eq!(std::thread::current().id(), me);
            seen.lock().unwrap().push(i);
        });
        assert_eq!(*seen.lock().unwrap(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn each_part_goes_to_its_own_task() {
        let mut items = [0u32; 10];
        for_each_part(items.chunks_mut(4).collect(), |t, part| {
            for (k, x) in part.iter_mut().enumerate() {
                *x = (t * 4 + k) as u32;
            }
        });
        assert_eq!(items, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    }
}
