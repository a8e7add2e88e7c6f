//! What the host and a worker say to each other over their socket: one
//! JSON message a frame (a 4-byte little-endian length, then the text), and
//! with some frames, file descriptors (the shared-memory regions) passed as
//! `SCM_RIGHTS`. Tensors never cross the socket: a message gives where each
//! lies in a region both processes map.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::ops::Range;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::PathBuf;

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

/// The largest message either side accepts (a plan or a signature is a few
/// hundred bytes; probes of a layer with many inputs a few kilobytes).
pub const MAX_MESSAGE: usize = 16 << 20;

/// The most descriptors one message carries.
pub const MAX_FDS: usize = 4;

/// An element type and a shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    pub dtype: u32,
    pub shape: Vec<usize>,
}

/// A tensor in a shared region: its type, shape and byte range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    pub dtype: u32,
    pub shape: Vec<usize>,
    pub bytes: Range<usize>,
}

/// A parameter in the parameter region of a `Prepare`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Param {
    pub name: String,
    pub slot: Slot,
}

/// One piece of a split forward call: rows of each tensor, as shapes and
/// byte ranges within its slot (an input lent whole has its own range).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    pub inputs: Vec<Option<(Vec<usize>, Range<usize>)>>,
    pub outputs: Vec<(Vec<usize>, Range<usize>)>,
}

/// What the host asks of a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// The first message: which library to check and open, and the
    /// address-space limit to run it under.
    Start {
        path: PathBuf,
        name: String,
        sha256: String,
        memory_limit: u64,
    },
    Create {
        config: String,
    },
    Signature {
        layer: u64,
    },
    Plan {
        layer: u64,
        inputs: Vec<Option<Spec>>,
    },
    Flops {
        layer: u64,
        inputs: Vec<Option<Spec>>,
    },
    BatchIndependent {
        layer: u64,
    },
    Probes {
        layer: u64,
    },
    /// Carries the parameter region's descriptor when `params` is not empty.
    Prepare {
        layer: u64,
        inputs: Vec<Option<Spec>>,
        params: Vec<Param>,
    },
    DropPrepared {
        layer: u64,
        prepared: u64,
    },
    /// Carries a new input region's descriptor (then a new output region's)
    /// when the flags say so.
    Forward {
        layer: u64,
        prepared: u64,
        inputs: Vec<Option<Slot>>,
        outputs: Vec<Slot>,
        pieces: Vec<Piece>,
        /// Run the pieces on threads of their own that enter `forward` at
        /// the same moment (`check-plugin`'s `threads` check), instead of
        /// on the worker's pool.
        together: bool,
        /// Lend the worker's pool of this many threads to the call, when it
        /// has no pieces (below 2: lend none).
        lend_threads: usize,
        new_input_region: bool,
        new_output_region: bool,
    },
    DropLayer {
        layer: u64,
    },
    /// check-plugin's `gradcheck` ([`crate::gradcheck`]), run in the worker:
    /// carries one sealed region holding the inputs and then the
    /// parameters (when there are any). `outputs`: what the plan declares.
    Gradcheck {
        layer: u64,
        inputs: Vec<Option<Slot>>,
        params: Vec<Param>,
        outputs: Vec<Spec>,
        seed: u64,
    },
}

/// One port of a signature: name, optional, accepted element types.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    pub name: String,
    pub optional: bool,
    pub dtypes: Vec<u32>,
}

/// A parameter a plan declares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamDecl {
    pub name: String,
    pub dtype: u32,
    pub shape: Vec<usize>,
    pub fan_in: usize,
    pub fan_out: usize,
    pub init: String,
}

impl From<&layer_api::abi::ParamDecl> for ParamDecl {
    fn from(p: &layer_api::abi::ParamDecl) -> ParamDecl {
        ParamDecl {
            name: p.name.to_string(),
            dtype: p.dtype.0,
            shape: p.shape.to_vec(),
            fan_in: p.fan_in,
            fan_out: p.fan_out,
            init: p.init.to_string(),
        }
    }
}

/// One input of a probe (see `layer_abi::ProbeInput`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeInput {
    pub shape: Vec<usize>,
    pub dtype: u32,
    pub low: i64,
    pub high: i64,
}

/// The sandbox a worker put itself in: empty lists mean all of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxReport {
    /// Protections asked for that the kernel could not give, each with why.
    pub missing: Vec<String>,
}

/// What a worker answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    Started {
        sandbox: SandboxReport,
        has_flops: bool,
        has_backward: bool,
    },
    Created(u64),
    Signature {
        inputs: Vec<Port>,
        outputs: Vec<Port>,
    },
    Plan {
        outputs: Vec<Spec>,
        params: Vec<ParamDecl>,
    },
    Flops(u64),
    Bool(bool),
    Probes(Vec<Vec<Option<ProbeInput>>>),
    Prepared(u64),
    Done,
    Gradcheck(crate::gradcheck::GradReport),
    /// The call failed in the plugin (an error it returned, or a panic it
    /// caught), or the worker refused it.
    Failed {
        panicked: bool,
        message: String,
    },
}

/// Sends `message` with `fds` attached as one frame.
pub fn send<T: Serialize>(
    socket: BorrowedFd<'_>,
    message: &T,
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<()> {
    let body = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    let header = u32::try_from(body.len())
        .map_err(|_| std::io::Error::other("message too long"))?
        .to_le_bytes();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(std::io::Error::other(
            "too many descriptors for one message",
        ));
    }
    let total = header.len() + body.len();
    let mut sent = sendmsg(
        socket,
        &[IoSlice::new(&header), IoSlice::new(&body)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    // A stream socket may take part of a long frame; the rest follows
    // without descriptors.
    while sent < total {
        let rest: Vec<IoSlice<'_>> = if sent < header.len() {
            vec![IoSlice::new(&header[sent..]), IoSlice::new(&body)]
        } else {
            vec![IoSlice::new(&body[sent - header.len()..])]
        };
        let mut none = SendAncillaryBuffer::default();
        let n = sendmsg(socket, &rest, &mut none, SendFlags::NOSIGNAL)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        sent += n;
    }
    Ok(())
}

/// Receives one frame: the message and the descriptors that came with it.
/// `Ok(None)` when the other side closed the socket between frames.
pub fn receive<T: for<'de> Deserialize<'de>>(
    socket: BorrowedFd<'_>,
) -> std::io::Result<Option<(T, Vec<OwnedFd>)>> {
    let mut header = [0u8; 4];
    let mut fds = Vec::new();
    let mut got = 0;
    while got < header.len() {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = recvmsg(
            socket,
            &mut [IoSliceMut::new(&mut header[got..])],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if msg.bytes == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += msg.bytes;
    }
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_MESSAGE {
        return Err(std::io::Error::other(format!(
            "a message of {len} bytes, more than the {MAX_MESSAGE} allowed"
        )));
    }
    let mut body = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = rustix::io::read(socket, &mut body[got..])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    let message = serde_json::from_slice(&body).map_err(std::io::Error::other)?;
    Ok(Some((message, fds)))
}

/// How long a side polls for the other's message before it sleeps in the
/// kernel. An idle core that sleeps takes tens of microseconds to wake (on
/// the 2-core development VM, 45 us per call, against 14 us when the
/// cores stayed busy), more than a small layer's whole call; polling this
/// long costs at most this much of a core per call.
pub const SPIN: std::time::Duration = std::time::Duration::from_micros(100);

/// How long a worker polls for the next request, after a call that was
/// shorter than this on one thread: long enough for a host that goes
/// straight on to its next call, short enough that an idle worker takes
/// little from a busy one.
pub const WORKER_SPIN: std::time::Duration = std::time::Duration::from_micros(30);

/// Polls `fd` for up to `limit` without sleeping; true once it has
/// something to read (or was closed).
pub fn spin_until_readable(fd: BorrowedFd<'_>, limit: std::time::Duration) -> bool {
    let started = std::time::Instant::now();
    loop {
        if readable(fd, Some(std::time::Duration::ZERO)).unwrap_or(true) {
            return true;
        }
        if started.elapsed() >= limit {
            return false;
        }
        std::hint::spin_loop();
    }
}

/// Whether `fd` has something to read within `timeout` (`None`: wait as
/// long as it takes).
pub fn readable(fd: BorrowedFd<'_>, timeout: Option<std::time::Duration>) -> std::io::Result<bool> {
    let timeout = timeout.map(|t| rustix::time::Timespec {
        tv_sec: t.as_secs() as i64,
        tv_nsec: i64::from(t.subsec_nanos()),
    });
    let mut fds = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN | rustix::event::PollFlags::HUP,
    )];
    loop {
        match rustix::event::poll(&mut fds, timeout.as_ref()) {
            Ok(n) => return Ok(n > 0),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}
