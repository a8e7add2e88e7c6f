//! The sandbox a worker puts itself in before it opens the plugin library:
//! Landlock for the file system (read its own library and the system's
//! shared libraries, nothing else; create nothing), and a seccomp filter
//! that refuses new sockets and new programs. Each part the kernel cannot
//! give is reported, not silently skipped.

use std::collections::BTreeMap;
use std::path::Path;

use landlock::{
    path_beneath_rules, Access, AccessFs, AccessNet, RestrictionStatus, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule};

/// Directories the dynamic loader reads the plugin's own shared-library
/// dependencies from (the C library, libgcc, libstdc++…).
const SYSTEM_LIBRARIES: [&str; 5] = [
    "/lib",
    "/lib64",
    "/usr/lib",
    "/usr/lib64",
    "/etc/ld.so.cache",
];

/// System calls a plugin is refused (with `EPERM`): making sockets of any
/// kind, starting other programs, and reaching into other processes.
const REFUSED_SYSCALLS: [i64; 9] = [
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
];

/// Confines the calling process (and threads it starts later) for good.
/// Returns the protections that could not be applied, each with why.
pub fn enter(library: &Path) -> Vec<String> {
    let mut missing = Vec::new();
    // Neither part may be undone by running a set-user-ID program, and
    // seccomp requires this of a process without CAP_SYS_ADMIN.
    if let Err(e) = rustix::thread::set_no_new_privs(true) {
        missing.push(format!("no_new_privs: {e}"));
    }
    if let Err(why) = landlock(library) {
        missing.push(why);
    }
    if let Err(why) = seccomp() {
        missing.push(why);
    }
    missing
}

fn landlock(library: &Path) -> Result<(), String> {
    // The newest ABI this code knows; the crate's best-effort mode keeps
    // what an older kernel supports, and the status says what it got.
    let abi = ABI::V6;
    let failed = |e: &dyn std::fmt::Display| format!("Landlock (file system): {e}");
    let read_exec = AccessFs::from_read(abi);
    let status: RestrictionStatus = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.handle_access(AccessNet::from_all(abi)))
        .and_then(|r| r.scope(Scope::from_all(abi)))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules(SYSTEM_LIBRARIES, read_exec)))
        .and_then(|r| r.add_rules(path_beneath_rules([library], AccessFs::ReadFile)))
        .and_then(|r| r.restrict_self())
        .map_err(|e| failed(&e))?;
    match status.ruleset {
        RulesetStatus::FullyEnforced => Ok(()),
        RulesetStatus::PartiallyEnforced => Err(
            "Landlock (file system) is only partly enforced: this kernel's Landlock ABI is \
             older than version 6, so some restrictions (such as on network ports or \
             signals) are missing"
                .to_string(),
        ),
        RulesetStatus::NotEnforced => Err(
            "Landlock (file system) is not enforced: this kernel does not offer it (Linux 5.13 \
             or later, with landlock in its lsm= list)"
                .to_string(),
        ),
    }
}

fn seccomp() -> Result<(), String> {
    let failed = |e: &dyn std::fmt::Display| format!("seccomp (sockets, exec): {e}");
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| failed(&e))?;
    let rules: BTreeMap<i64, Vec<SeccompRule>> =
        REFUSED_SYSCALLS.iter().map(|&n| (n, Vec::new())).collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| failed(&e))?;
    let program: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| failed(&e))?;
    seccompiler::apply_filter_all_threads(&program).map_err(|e| failed(&e))
}
