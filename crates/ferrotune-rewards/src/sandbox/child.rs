//! The sandbox's code between `fork` and `exec`, and the supervisor process.
//!
//! Owns: namespaces, credentials, capabilities, rlimits and Landlock enforcement of the target;
//! the supervisor that reaps the run's whole process subtree and kills it. Does not own: what is
//! allowed (decided in `sandbox.rs` before the fork) or watching the run (`watch.rs`).
//!
//! Everything here runs in a child forked from a possibly multi-threaded trainer, so it makes
//! only async-signal-safe calls (raw syscalls on values copied before the fork): no allocation,
//! no locks, no Rust std I/O.

use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use super::landlock;

/// Root mode: the private folder is a size-limited tmpfs mounted over the (empty) temp folder
/// in the run's own mount namespace, so a program cannot fill the disk; it disappears with the
/// namespace. The files are written by the child after mounting.
pub(super) struct PrivateMount {
    pub dir: CString,
    /// tmpfs options: size, inode count, owner.
    pub options: CString,
    /// (absolute path inside `dir`, content).
    pub files: Vec<(CString, Vec<u8>)>,
    /// Landlock rights for the mounted folder.
    pub rights: u64,
}

pub(super) struct ChildCfg {
    pub privileged: bool,
    pub mount: Option<PrivateMount>,
    pub dac_bypass: bool,
    pub uid_x: u32,
    pub uid_y: u32,
    pub limits: [(libc::__rlimit_resource_t, u64, u64); 5],
    pub ruleset_fd: RawFd,
}

const CAP_DAC_READ_SEARCH: u32 = 2;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn capset(mask: u32) -> io::Result<()> {
    let mut hdr = CapHeader {
        version: 0x2008_0522,
        pid: 0,
    };
    let data = [
        CapData {
            effective: mask,
            permitted: mask,
            inheritable: mask,
        },
        CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        },
    ];
    // SAFETY: v3 header with two data words, as the ABI requires.
    check(
        unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) }
            as libc::c_int,
    )
}

fn setrlimit(res: libc::__rlimit_resource_t, soft: u64, hard: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: plain syscall.
    check(unsafe { libc::setrlimit(res, &lim) })
}

pub(super) fn child_setup(cfg: &ChildCfg) -> io::Result<()> {
    // SAFETY (whole function): only syscalls, no allocation, no locks.
    unsafe {
        // A new PID namespace too: the target (the supervisor's only child) becomes its init,
        // so when the target dies the kernel kills everything else in it, even processes that
        // left the process group and session. This is the cleanup guarantee without root.
        let flags = if cfg.privileged {
            libc::CLONE_NEWNET | libc::CLONE_NEWPID | libc::CLONE_NEWNS
        } else {
            libc::CLONE_NEWUSER | libc::CLONE_NEWNET | libc::CLONE_NEWPID
        };
        check(libc::unshare(flags))?;
        check(libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0))?;
        setrlimit(libc::RLIMIT_CORE, 0, 0)?;
        if let Some(m) = &cfg.mount {
            mount_private(m, cfg.uid_x, cfg.ruleset_fd)?;
        }
        if cfg.privileged {
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setresgid(cfg.uid_x, cfg.uid_x, cfg.uid_x))?;
            if cfg.dac_bypass {
                check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0))?;
            }
            // Supervisor credentials: can kill uid X, cannot be signalled by it.
            check(libc::setresuid(cfg.uid_y, cfg.uid_x, cfg.uid_y))?;
        }
        let pid = libc::fork();
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid > 0 {
            supervise(pid, cfg.privileged);
        }
        // Target.
        check(libc::setpgid(0, 0))?;
        if cfg.privileged {
            check(libc::setresuid(cfg.uid_x, cfg.uid_x, cfg.uid_x))?;
            if cfg.dac_bypass {
                capset(1 << CAP_DAC_READ_SEARCH)?;
                check(libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    CAP_DAC_READ_SEARCH as libc::c_ulong,
                    0,
                    0,
                ))?;
            }
        }
        // After the credential change (which clears it). The usual "did the parent already
        // die?" check cannot be made here: as a namespace init, getppid() is always 0. The
        // supervisor is only killed by the trainer after its own 2 s grace, long after this.
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
        for (res, soft, hard) in cfg.limits {
            setrlimit(res, soft, hard)?;
        }
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        landlock::restrict_self(cfg.ruleset_fd)?;
    }
    Ok(())
}

/// Mount the private tmpfs, write the run's files into it (owned by uid X), make it the cwd
/// and allow it in the Landlock ruleset (the rule the parent could not add: the tmpfs root is a
/// different inode from the folder under it).
unsafe fn mount_private(m: &PrivateMount, uid: u32, ruleset_fd: RawFd) -> io::Result<()> {
    // Our mounts must not propagate back to the trainer's namespace.
    check(libc::mount(
        std::ptr::null(),
        c"/".as_ptr(),
        std::ptr::null(),
        libc::MS_REC | libc::MS_PRIVATE,
        std::ptr::null(),
    ))?;
    check(libc::mount(
        c"tmpfs".as_ptr(),
        m.dir.as_ptr(),
        c"tmpfs".as_ptr(),
        libc::MS_NOSUID | libc::MS_NODEV,
        m.options.as_ptr().cast(),
    ))?;
    for (path, data) in &m.files {
        let fd = libc::open(
            path.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
            0o600,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut off = 0;
        while off < data.len() {
            let n = libc::write(fd, data[off..].as_ptr().cast(), data.len() - off);
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                libc::close(fd);
                return Err(e);
            }
            off += n as usize;
        }
        let r = libc::fchown(fd, uid, uid);
        libc::close(fd);
        check(r)?;
    }
    // std changed into the folder before the mount: that is now the hidden one underneath.
    check(libc::chdir(m.dir.as_ptr()))?;
    let fd = libc::open(m.dir.as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let r = landlock::add_rule(ruleset_fd, fd, m.rights);
    libc::close(fd);
    r
}

static KILL_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_kill_request(_: libc::c_int) {
    KILL_REQUESTED.store(true, Ordering::SeqCst);
}

/// The supervisor: reap the subtree, kill it when the target ends or on SIGUSR1, exit with the
/// target's status. Never returns.
fn supervise(target: libc::pid_t, privileged: bool) -> ! {
    // SAFETY (whole function): only syscalls in a single-threaded forked child.
    unsafe {
        let _ = capset(0);
        // Close the pipes (and std's exec-error pipe) so the trainer sees EOF as soon as the
        // sandboxed processes are gone.
        libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_kill_request as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        let mut target_status: Option<libc::c_int> = None;
        let mut killing = false;
        let mut rounds = 0u32;
        loop {
            if KILL_REQUESTED.load(Ordering::SeqCst) {
                killing = true;
            }
            if killing {
                kill_all(target, privileged);
            }
            let mut st = 0;
            let opts = if killing {
                libc::__WALL | libc::WNOHANG
            } else {
                libc::__WALL
            };
            let r = libc::waitpid(-1, &mut st, opts);
            if r > 0 {
                if r == target {
                    target_status = Some(st);
                    killing = true;
                }
                continue;
            }
            if r == 0 {
                // Still children after a kill: give the kernel a moment, then kill again.
                // Bounded so a process in uninterruptible sleep cannot hold us forever.
                rounds += 1;
                if rounds > 5000 {
                    break;
                }
                let ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 1_000_000,
                };
                libc::nanosleep(&ts, std::ptr::null_mut());
                continue;
            }
            if *libc::__errno_location() == libc::EINTR {
                continue;
            }
            break; // ECHILD: the whole subtree is gone.
        }
        match target_status {
            Some(st) if libc::WIFEXITED(st) => libc::_exit(libc::WEXITSTATUS(st)),
            Some(st) if libc::WIFSIGNALED(st) => {
                let sig = libc::WTERMSIG(st);
                libc::signal(sig, libc::SIG_DFL);
                libc::kill(libc::getpid(), sig);
                libc::_exit(128 + sig)
            }
            _ => libc::_exit(125),
        }
    }
}

/// Kill the target, the init of the run's PID namespace (the kernel then kills the rest of the
/// namespace), and in root mode every process of uid X as well.
unsafe fn kill_all(target: libc::pid_t, privileged: bool) {
    libc::kill(target, libc::SIGKILL);
    if privileged {
        libc::kill(-1, libc::SIGKILL);
    }
}
