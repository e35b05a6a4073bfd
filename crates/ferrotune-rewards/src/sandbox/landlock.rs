//! Landlock (Linux ≥ 5.13) filesystem confinement through raw syscalls.
//!
//! Owns: probing the ABI version, building a ruleset in the parent (it opens paths, so it
//! allocates), and the one async-signal-safe call the sandboxed child makes (`restrict_self`).
//! Does not own: deciding which paths are allowed (that is `sandbox.rs`).
//!
//! Why raw syscalls instead of the `landlock` crate: the restriction must be applied in the
//! forked child between `fork` and `exec`, where only async-signal-safe calls are allowed; the
//! crate allocates. Creating the ruleset in the parent and inheriting its fd keeps the child to
//! a single syscall.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

// Filesystem access rights (include/uapi/linux/landlock.h).
const FS_EXECUTE: u64 = 1 << 0;
const FS_WRITE_FILE: u64 = 1 << 1;
const FS_READ_FILE: u64 = 1 << 2;
const FS_READ_DIR: u64 = 1 << 3;
const FS_TRUNCATE: u64 = 1 << 14; // ABI 3
const FS_IOCTL_DEV: u64 = 1 << 15; // ABI 5
/// Rights that make sense on a non-directory (the kernel rejects the others with EINVAL).
const FILE_RIGHTS: u64 = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV;
// Network rights (ABI 4): handled with no rule = every TCP bind/connect is denied.
const NET_BIND_TCP: u64 = 1 << 0;
const NET_CONNECT_TCP: u64 = 1 << 1;
// Scopes (ABI 6): no abstract unix sockets or signals across the domain boundary.
const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
const SCOPE_SIGNAL: u64 = 1 << 1;

const CREATE_RULESET_VERSION: libc::c_uint = 1;
const RULE_PATH_BENEATH: libc::c_int = 1;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// What a rule grants beneath a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read files, list directories, execute.
    ReadExec,
    /// Read and write an existing file (for `/dev/null`).
    ReadWriteFile,
    /// Everything Landlock can restrict (the sandbox's private folder).
    Full,
}

/// The Landlock ABI version this kernel speaks, 0 when Landlock is absent or disabled.
pub fn abi_version() -> u32 {
    // SAFETY: the documented probe call: NULL attr, size 0, VERSION flag.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    if v < 0 {
        0
    } else {
        v as u32
    }
}

fn handled_fs(abi: u32) -> u64 {
    let mut all = (1u64 << 13) - 1; // ABI 1: bits 0..=12
    if abi >= 2 {
        all |= 1 << 13; // REFER
    }
    if abi >= 3 {
        all |= FS_TRUNCATE;
    }
    if abi >= 5 {
        all |= FS_IOCTL_DEV;
    }
    all
}

/// A ruleset under construction; its fd is inherited by the forked child (it is O_CLOEXEC, so
/// it disappears at `exec`).
pub struct Ruleset {
    fd: OwnedFd,
    handled: u64,
}

impl Ruleset {
    /// A ruleset that handles every right `abi` knows: anything not allowed by a rule is denied.
    pub fn new(abi: u32) -> io::Result<Self> {
        let attr = RulesetAttr {
            handled_access_fs: handled_fs(abi),
            handled_access_net: if abi >= 4 {
                NET_BIND_TCP | NET_CONNECT_TCP
            } else {
                0
            },
            scoped: if abi >= 6 {
                SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
            } else {
                0
            },
        };
        // Older kernels reject a struct larger than they know unless the tail is zero; size the
        // struct to the fields this ABI has.
        let size = if abi >= 6 {
            24
        } else if abi >= 4 {
            16
        } else {
            8
        };
        // SAFETY: attr outlives the call; size does not exceed the struct.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const RulesetAttr,
                size as usize,
                0u32,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd to us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        Ok(Ruleset {
            fd,
            handled: handled_fs(abi),
        })
    }

    /// Allow `access` beneath `path`. A path that does not exist is skipped (returns Ok(false)),
    /// so the same list works on distributions without `/lib64` or `/lib32`.
    pub fn allow(&mut self, path: &Path, access: Access) -> io::Result<bool> {
        let c = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
        // SAFETY: c is a valid C string; O_PATH only names the inode.
        let raw = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        if raw < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::NotFound {
                Ok(false)
            } else {
                Err(e)
            };
        }
        // SAFETY: fresh fd from open.
        let pfd = unsafe { OwnedFd::from_raw_fd(raw) };
        let is_dir = std::fs::metadata(path)?.is_dir();
        let mut rights = match access {
            Access::ReadExec => FS_EXECUTE | FS_READ_FILE | FS_READ_DIR,
            Access::ReadWriteFile => FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE,
            Access::Full => self.handled,
        };
        if !is_dir {
            rights &= FILE_RIGHTS;
        }
        rights &= self.handled;
        add_rule(self.fd.as_raw_fd(), pfd.as_raw_fd(), rights)?;
        Ok(true)
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Every right this ABI can restrict, for a directory rule (the private folder).
pub fn full_access(abi: u32) -> u64 {
    handled_fs(abi)
}

/// Add a path-beneath rule for an already opened `O_PATH` fd. Async-signal-safe: the child uses
/// it for the private tmpfs it mounts after the fork.
pub fn add_rule(ruleset_fd: RawFd, path_fd: RawFd, rights: u64) -> io::Result<()> {
    let attr = PathBeneathAttr {
        allowed_access: rights,
        parent_fd: path_fd,
    };
    // SAFETY: attr outlives the call; both fds are open.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset_fd,
            RULE_PATH_BENEATH,
            &attr as *const PathBeneathAttr,
            0u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Enforce the ruleset on the calling thread and its future children. Async-signal-safe: call
/// it in the forked child after `PR_SET_NO_NEW_PRIVS`.
pub fn restrict_self(ruleset_fd: RawFd) -> io::Result<()> {
    // SAFETY: a plain syscall on an inherited fd.
    let r = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset_fd, 0u32) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
