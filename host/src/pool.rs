//! The host's threads: one pool per thread count, made once per process and
//! shared by every run, and lent to a plugin's call (interface 1.3's
//! `lend_pool`) when the host does not split that call across threads
//! itself.
//!
//! A batch large enough is cut into pieces of rows, one call per piece on
//! the pool's threads. A smaller one (a single row, a few dozen) runs as one
//! call, and that call gets the pool instead, to split its work another way
//! (a product's output columns). Either the host splits a call or the
//! plugin does, never both, so no more threads are busy than `--threads`
//! asked for.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use layer_api::abi::{HostPool, PoolTask, TableRef};
use rayon::ThreadPool;

use crate::error::Error;

/// The pool of `threads` threads, made on first use; `None` for one thread
/// (everything then runs on the calling thread).
pub fn shared(threads: usize) -> Result<Option<Arc<ThreadPool>>, Error> {
    if threads <= 1 {
        return Ok(None);
    }
    static POOLS: Mutex<BTreeMap<usize, Arc<ThreadPool>>> = Mutex::new(BTreeMap::new());
    let mut pools = POOLS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(pool) = pools.get(&threads) {
        return Ok(Some(Arc::clone(pool)));
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("layer-worker-{i}"))
        .build()
        .map_err(|e| Error::Threads(e.to_string()))?;
    let pool = Arc::new(pool);
    pools.insert(threads, Arc::clone(&pool));
    Ok(Some(pool))
}

/// Runs `call` (one `forward` or `backward` of the plugin whose table is
/// `table`, on this thread) with `pool` lent to it, when there is a pool of
/// two or more threads and the plugin takes one (interface 1.3); otherwise
/// just runs it.
pub(crate) fn lending<T>(
    table: &TableRef,
    pool: Option<&ThreadPool>,
    call: impl FnOnce() -> T,
) -> T {
    let (Some(pool), Some(lend)) = (pool, table.lend_pool()) else {
        return call();
    };
    if pool.current_num_threads() < 2 {
        return call();
    }
    let lent = HostPool {
        threads: pool.current_num_threads(),
        context: std::ptr::from_ref(pool).cast::<c_void>(),
        run: run_tasks,
    };
    lend(Some(&lent));
    // Ends the loan even if `call` unwinds (the host's own code between the
    // two `lend`s), so that the plugin never keeps a pointer to `pool`.
    struct EndLoan(extern "C" fn(Option<&HostPool>));
    impl Drop for EndLoan {
        fn drop(&mut self) {
            (self.0)(None);
        }
    }
    let _end = EndLoan(lend);
    call()
}

/// [`HostPool::run`]: the tasks on the pool, one on the calling thread,
/// which would otherwise only wait (so at most the pool's size run at once
/// when there are no more tasks than threads).
extern "C" fn run_tasks(context: *const c_void, tasks: usize, task: PoolTask, data: *const c_void) {
    /// `data` moved to the pool's threads; the plugin made it for `task`,
    /// to be called from any thread.
    #[derive(Clone, Copy)]
    struct Data(*const c_void);
    // SAFETY: see above: `data` is only passed back to `task`.
    unsafe impl Send for Data {}
    impl Data {
        fn get(self) -> *const c_void {
            self.0
        }
    }
    // SAFETY: `context` is the `&ThreadPool` that `lending` put in the
    // `HostPool`, which outlives the loan this call happens during.
    let pool = unsafe { &*context.cast::<ThreadPool>() };
    let data = Data(data);
    if tasks == 0 {
        return;
    }
    // `task` never unwinds (the interface forbids it, and an `extern "C"`
    // function that tried would abort), so neither does this.
    pool.in_place_scope(|scope| {
        for index in 1..tasks {
            scope.spawn(move |_| task(data.get(), index));
        }
        task(data.get(), 0);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pool_per_thread_count() {
        assert!(shared(1).unwrap().is_none());
        let a = shared(3).unwrap().unwrap();
        let b = shared(3).unwrap().unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.current_num_threads(), 3);
    }

    #[test]
    fn every_task_runs_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let pool = shared(2).unwrap().unwrap();
        let counts: Vec<AtomicUsize> = (0..7).map(|_| AtomicUsize::new(0)).collect();
        extern "C" fn count(data: *const c_void, index: usize) {
            // SAFETY: the test passes its `Vec<AtomicUsize>`.
            let counts = unsafe { &*data.cast::<Vec<AtomicUsize>>() };
            counts[index].fetch_add(1, Ordering::SeqCst);
        }
        let context = std::ptr::from_ref(pool.as_ref()).cast::<c_void>();
        run_tasks(context, 7, count, std::ptr::from_ref(&counts).cast());
        assert!(counts.iter().all(|c| c.load(Ordering::SeqCst) == 1));
        run_tasks(context, 0, count, std::ptr::from_ref(&counts).cast());
    }
}
